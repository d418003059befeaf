//! Client side of the cloudllm daemon's IPC socket, shared by the `cloudllm` CLI and the tray.
//!
//! [`Client::connect`] finds the daemon's socket, says hello with the IPC version, and then
//! sends [`Request`]s and reads [`Response`]s, one JSON line each.
//!
//! [`service`] installs the daemon as a service of the platform's service manager.

pub mod service;

use std::path::{Path, PathBuf};

use cloudllm_proto::ipc::{self, IPC_VERSION, MAX_LINE_BYTES, Request, Response};
use interprocess::local_socket::Name;
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::tokio::Stream as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};

/// Environment variable naming the daemon's socket.
pub const SOCKET_ENV: &str = "CLOUDLLM_SOCKET";

/// Why the daemon could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No daemon listens on the socket.
    #[error(
        "the cloudllm daemon is not running (no socket at {0}). Start it with `cloudllm daemon`, or run `cloudllmd`"
    )]
    NotRunning(PathBuf),
    /// The socket exists but this user may not open it.
    #[error(
        "permission denied opening {0}: the daemon belongs to another user (use sudo, or ask to be in its operator group)"
    )]
    PermissionDenied(PathBuf),
    /// The daemon answered, but not as expected.
    #[error("{0}")]
    Protocol(String),
    /// Anything else.
    #[error("cannot reach the daemon at {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// The socket to use: `explicit` (flag or `CLOUDLLM_SOCKET`), else a user daemon's socket if
/// one exists, else the system daemon's if that exists, else the user daemon's (for messages).
pub fn socket_path(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(path) = explicit {
        return path;
    }
    let user = ipc::default_socket_path(false);
    let system = ipc::default_socket_path(true);
    if !user.exists() && system.exists() {
        system
    } else {
        user
    }
}

fn name(path: &Path) -> std::io::Result<Name<'_>> {
    #[cfg(unix)]
    {
        use interprocess::local_socket::{GenericFilePath, ToFsName};
        path.to_fs_name::<GenericFilePath>()
    }
    #[cfg(not(unix))]
    {
        use interprocess::local_socket::{GenericNamespaced, ToNsName};
        cloudllm_proto::ipc::pipe_name(path).to_ns_name::<GenericNamespaced>()
    }
}

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<ReadHalf<Stream>>,
    writer: WriteHalf<Stream>,
    /// The daemon's package version.
    pub daemon_version: String,
}

impl Client {
    /// Connects to the daemon at `path` and exchanges versions.
    pub async fn connect(path: &Path) -> Result<Client, ConnectError> {
        let io = |err| ConnectError::Io(path.to_owned(), err);
        let stream = match Stream::connect(name(path).map_err(io)?).await {
            Ok(stream) => stream,
            Err(err) => {
                return Err(match err.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        ConnectError::NotRunning(path.to_owned())
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        ConnectError::PermissionDenied(path.to_owned())
                    }
                    _ => io(err),
                });
            }
        };
        let (reader, writer) = tokio::io::split(stream);
        let mut client = Client {
            reader: BufReader::new(reader),
            writer,
            daemon_version: String::new(),
        };
        let hello = client
            .call(&Request::Hello {
                version: IPC_VERSION,
            })
            .await
            .map_err(io)?;
        match hello {
            Response::Hello { daemon_version, .. } => {
                client.daemon_version = daemon_version;
                Ok(client)
            }
            Response::Error { message, .. } => Err(ConnectError::Protocol(message)),
            other => Err(ConnectError::Protocol(format!(
                "unexpected answer to hello: {other:?}"
            ))),
        }
    }

    /// Sends one request.
    pub async fn send(&mut self, request: &Request) -> std::io::Result<()> {
        self.writer.write_all(&ipc::to_line(request)).await?;
        self.writer.flush().await
    }

    /// Reads one response; `UnexpectedEof` when the daemon closed the connection.
    pub async fn recv(&mut self) -> std::io::Result<Response> {
        let mut line = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if read == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection",
            ));
        }
        serde_json::from_slice(line.trim_ascii_end()).map_err(|err| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unreadable answer from the daemon: {err}"),
            )
        })
    }

    /// Sends a request and reads its one response.
    pub async fn call(&mut self, request: &Request) -> std::io::Result<Response> {
        self.send(request).await?;
        self.recv().await
    }
}
