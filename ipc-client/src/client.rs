//! One connection to the daemon: [`Client::connect`] dials the socket and says hello with the
//! IPC version; then [`Client::send`] and [`Client::recv`] carry one JSON line each, bounded by
//! the protocol's line limit. A request that trusts the daemon with a secret goes out only
//! after the checks of [`crate::trust`].

use std::path::{Path, PathBuf};

use cloudllm_proto::ipc::{self, IPC_VERSION, MAX_LINE_BYTES, Request, Response};
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::tokio::Stream as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};

use crate::SOCKET_ENV;
use crate::socket::name;
use crate::trust::{Listener, needs_trusted_daemon};

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
    /// No socket was named and there is no private place for a user daemon's.
    #[error(
        "{0}. Set XDG_RUNTIME_DIR (or HOME) as the daemon has it, or name the daemon's socket with --socket PATH (or {SOCKET_ENV})"
    )]
    NoSocketPath(ipc::NoSocketDir),
    /// Anything else.
    #[error("cannot reach the daemon at {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<ReadHalf<Stream>>,
    writer: WriteHalf<Stream>,
    path: PathBuf,
    listener: Listener,
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
        let listener = Listener::of(path, &stream);
        let (reader, writer) = tokio::io::split(stream);
        let mut client = Client {
            reader: BufReader::new(reader),
            writer,
            path: path.to_owned(),
            listener,
            daemon_version: String::new(),
        };
        let sent = client
            .send(&Request::Hello {
                version: IPC_VERSION,
            })
            .await;
        // A daemon that refuses the connection says why and hangs up, perhaps before the hello
        // was written: its reason is worth more than the broken pipe.
        let hello = match (client.recv().await, sent) {
            (Ok(reply @ Response::Error { .. }), _) => reply,
            (_, Err(err)) | (Err(err), Ok(())) => return Err(io(err)),
            (Ok(reply), Ok(())) => reply,
        };
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

    /// Sends one request. A request that trusts the daemon with a secret or a login is sent
    /// only to a socket of this user, root or the system daemon's user; otherwise the error is
    /// [`std::io::ErrorKind::PermissionDenied`] and nothing is sent.
    pub async fn send(&mut self, request: &Request) -> std::io::Result<()> {
        if needs_trusted_daemon(request) {
            self.check_trusted()?;
        }
        self.writer.write_all(&ipc::to_line(request)).await?;
        self.writer.flush().await
    }

    /// Checks that the socket belongs to this user, root or the system daemon's user.
    pub fn check_trusted(&self) -> std::io::Result<()> {
        self.listener.ensure_trusted(&self.path)
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
