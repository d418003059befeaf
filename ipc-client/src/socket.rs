//! Which socket a client dials. A user daemon and the system daemon each have their own; a
//! client that names none finds the one that runs, and never guesses a shared directory such
//! as `/tmp`, where another user could have bound the name first.

use std::path::{Path, PathBuf};

use cloudllm_proto::ipc;
use interprocess::local_socket::Name;

use crate::ConnectError;

/// Environment variable naming the daemon's socket.
pub const SOCKET_ENV: &str = "CLOUDLLM_SOCKET";

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

/// The platform's name for the socket at `path`: the path itself for a Unix socket, a named
/// pipe derived from it on Windows.
pub(crate) fn name(path: &Path) -> std::io::Result<Name<'_>> {
    #[cfg(unix)]
    {
        use interprocess::local_socket::{GenericFilePath, ToFsName};
        path.to_fs_name::<GenericFilePath>()
    }
    #[cfg(not(unix))]
    {
        use interprocess::local_socket::{GenericNamespaced, ToNsName};
        ipc::pipe_name(path).to_ns_name::<GenericNamespaced>()
    }
}
