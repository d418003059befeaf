//! Exit codes, and [`Failure`]: what went wrong with the code that says so. Every command
//! returns `Result<u8, Failure>`; `main` prints the message and exits with the code, so a
//! script can tell a stopped daemon (3) from a refusal (5) from any other failure (1).

use cloudllm_ipc_client::ConnectError;
use cloudllm_proto::ipc::{ErrorCode, Response};

/// Exit code: the request failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: the daemon is not running.
pub const EXIT_NO_DAEMON: u8 = 3;
/// Exit code of `status`: the tunnel is not connected.
pub const EXIT_NOT_CONNECTED: u8 = 4;
/// Exit code: the daemon (or the service manager) refused the request to this user.
pub const EXIT_PERMISSION: u8 = 5;

/// What went wrong, and the exit code that says so.
#[derive(Debug)]
pub struct Failure {
    /// The exit code (one of the `EXIT_*` constants).
    pub code: u8,
    /// What to tell the user.
    pub message: String,
}

impl From<ConnectError> for Failure {
    fn from(err: ConnectError) -> Self {
        let code = match err {
            ConnectError::NotRunning(_) => EXIT_NO_DAEMON,
            ConnectError::PermissionDenied(_) => EXIT_PERMISSION,
            _ => EXIT_FAILED,
        };
        Failure {
            code,
            message: err.to_string(),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        // The client refused to trust the socket's owner with a request: said as it is.
        if err.kind() == std::io::ErrorKind::PermissionDenied {
            return Failure {
                code: EXIT_PERMISSION,
                message: err.to_string(),
            };
        }
        Failure {
            code: EXIT_FAILED,
            message: format!("lost the daemon: {err}"),
        }
    }
}

/// A failure with [`EXIT_FAILED`].
pub fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_FAILED,
        message: message.into(),
    }
}

/// Turns an error response into a failure; passes other responses through.
pub fn check(response: Response) -> Result<Response, Failure> {
    match response {
        Response::Error { code, message } => Err(Failure {
            code: if code == ErrorCode::PermissionDenied {
                EXIT_PERMISSION
            } else {
                EXIT_FAILED
            },
            message,
        }),
        other => Ok(other),
    }
}
