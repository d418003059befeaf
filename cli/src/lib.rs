//! Client side of the cloudllm daemon's IPC socket, shared by the `cloudllm` CLI and the tray.
//!
//! [`Client::connect`] finds the daemon's socket, says hello with the IPC version, and then
//! sends [`Request`]s and reads [`Response`]s, one JSON line each.
//!
//! A socket is a name in the file system, and whoever binds the name first gets the
//! connections. Before a request that hands the daemon a secret (a token) or that makes the
//! user act on the daemon's word (the interactive login, whose URL the user opens and signs in
//! at), the client checks who is listening: the socket's owner and the peer's credentials must
//! be this user, root, or the system daemon's user ([`SYSTEM_DAEMON_USER`]).
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

/// The account the system daemon runs as (systemd's `User=`, created by the package's
/// sysusers.d file): besides this user and root, the only owner trusted with a secret.
pub const SYSTEM_DAEMON_USER: &str = "cloudllm";

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

/// The socket to use: `explicit` (flag or `CLOUDLLM_SOCKET`), else a user daemon's socket if
/// one exists, else the system daemon's if that exists, else the user daemon's (for messages).
/// An error when nothing was named, no system daemon runs, and this user has no private
/// directory for a socket: a shared one such as `/tmp` is never guessed.
pub fn socket_path(explicit: Option<PathBuf>) -> Result<PathBuf, ConnectError> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    let system = ipc::default_socket_path(true).map_err(ConnectError::NoSocketPath)?;
    match ipc::default_socket_path(false) {
        Ok(user) if !user.exists() && system.exists() => Ok(system),
        Ok(user) => Ok(user),
        Err(_) if system.exists() => Ok(system),
        Err(e) => Err(ConnectError::NoSocketPath(e)),
    }
}

/// Whether a request trusts the daemon with something: a secret it sends, or a login whose
/// URL the user will open and sign in at.
fn needs_trusted_daemon(request: &Request) -> bool {
    matches!(
        request,
        Request::LoginWithToken { .. } | Request::Login { .. }
    )
}

/// Who listens on a socket, as far as the platform tells.
#[derive(Debug, Clone, Copy, Default)]
struct Listener {
    /// The socket file's owner.
    owner: Option<u32>,
    /// The listening process's effective uid (peer credentials).
    peer: Option<u32>,
}

impl Listener {
    #[cfg(unix)]
    fn of(path: &Path, stream: &Stream) -> Listener {
        use interprocess::local_socket::traits::StreamCommon;
        use std::os::unix::fs::MetadataExt;
        Listener {
            owner: std::fs::metadata(path).ok().map(|meta| meta.uid()),
            peer: stream.peer_creds().ok().and_then(|creds| creds.euid()),
        }
    }

    #[cfg(not(unix))]
    fn of(_path: &Path, _stream: &Stream) -> Listener {
        Listener::default()
    }

    /// `Ok` when every uid known is trusted ([`trusted_uid`]), else the first one that is not.
    /// Unix sockets always give peer credentials; with none at all, nothing is trusted.
    #[cfg(unix)]
    fn check(self) -> Result<(), u32> {
        if self.owner.is_none() && self.peer.is_none() {
            return Err(u32::MAX);
        }
        for uid in [self.peer, self.owner].into_iter().flatten() {
            if !trusted_uid(uid) {
                return Err(uid);
            }
        }
        Ok(())
    }

    /// Named pipes carry no uid here; their name space is the machine's.
    #[cfg(not(unix))]
    fn check(self) -> Result<(), u32> {
        Ok(())
    }
}

/// This user, root, or the system daemon's user.
#[cfg(unix)]
fn trusted_uid(uid: u32) -> bool {
    use nix::unistd::{User, geteuid};
    uid == 0
        || uid == geteuid().as_raw()
        || User::from_name(SYSTEM_DAEMON_USER)
            .ok()
            .flatten()
            .is_some_and(|user| user.uid.as_raw() == uid)
}

/// A uid as people know it: `name (uid N)`.
#[cfg(unix)]
fn describe_uid(uid: u32) -> String {
    if uid == u32::MAX {
        return "an unknown user".to_owned();
    }
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("user {} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}

#[cfg(not(unix))]
fn describe_uid(uid: u32) -> String {
    format!("uid {uid}")
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
        self.listener.check().map_err(|uid| {
            std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "refusing to log in through {}: it belongs to {}, not to you, root or the \
                     system daemon's user `{SYSTEM_DAEMON_USER}`, so another user may be posing \
                     as the daemon to catch your token. Use your own daemon's socket (--socket \
                     PATH or {SOCKET_ENV}), or find out who created this one",
                    self.path.display(),
                    describe_uid(uid),
                ),
            )
        })
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
