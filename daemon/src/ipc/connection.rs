//! One client connection: line framing (bounded), the hello that must come first, the limit on
//! idling between requests, and the permission check before anything that changes the daemon's
//! state. What each request does is `dispatch`'s.

use std::time::Duration;

use cloudllm_proto::ipc::{self, ErrorCode, IPC_VERSION, MAX_LINE_BYTES, Request, Response};
use interprocess::local_socket::tokio::Stream;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, WriteHalf};
use tracing::debug;

use super::Shared;
use super::dispatch::dispatch;
use super::socket::Peer;
use crate::supervisor::ControlError;

/// How long a connection may wait between requests before it is closed: a CLI sends its
/// request as soon as it has said hello, and a tray opens a connection per action, so 60 s
/// only ends connections that are held open on purpose.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a new connection has to say hello: the CLI and the tray do so at once; a
/// connection that stays silent (or sends only junk) would otherwise hold one of the
/// [`MAX_CONNECTIONS`](super::MAX_CONNECTIONS) slots for good.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads one line of at most [`MAX_LINE_BYTES`], without its newline. `Ok(None)` at the end
/// of the stream; an error for a longer line (the connection is then closed, since the rest of
/// the stream cannot be framed).
pub async fn read_line(
    reader: &mut (impl AsyncBufRead + Unpin),
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let limit = MAX_LINE_BYTES as u64 + 1;
    let read = (&mut *reader)
        .take(limit)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_LINE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("request line longer than {MAX_LINE_BYTES} bytes"),
        ));
    }
    Ok(Some(line))
}

/// Decodes one request line (as [`read_line`] returns it): the request, or the
/// [`ErrorCode::BadRequest`] reply the client gets for a line that is not one.
pub fn decode_request(line: &[u8]) -> Result<Request, Box<Response>> {
    serde_json::from_slice(line).map_err(|err| {
        Box::new(error(
            ErrorCode::BadRequest,
            format!("not a request this daemon knows: {err}"),
        ))
    })
}

pub(super) async fn send(
    writer: &mut WriteHalf<Stream>,
    response: &Response,
) -> std::io::Result<()> {
    writer.write_all(&ipc::to_line(response)).await?;
    writer.flush().await
}

pub(super) fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

pub(super) fn control_error(err: ControlError) -> Response {
    let code = match &err {
        ControlError::NotLoggedIn => ErrorCode::NotLoggedIn,
        ControlError::InvalidConfig(_) => ErrorCode::InvalidConfig,
        ControlError::LoginFailed(_) => ErrorCode::LoginFailed,
        ControlError::Internal(_) => ErrorCode::Internal,
    };
    error(code, err.to_string())
}

/// Whether a request changes the daemon's state.
fn changes_state(request: &Request) -> bool {
    !matches!(
        request,
        Request::Hello { .. }
            | Request::Status
            | Request::Watch
            | Request::ConfigGet { .. }
            | Request::Logs { .. }
            | Request::Models
            | Request::RelayInfo
    )
}

pub(super) async fn handle(stream: Stream, peer: Peer, context: &Shared) {
    let (recv, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::new(recv);
    let mut greeted = false;
    let hello_deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        let read = if greeted {
            // Between requests: a connection held open without asking anything gives its slot
            // back. The whole line counts, so sending it a byte at a time does not help.
            match tokio::time::timeout(context.idle_timeout, read_line(&mut reader)).await {
                Ok(read) => read,
                Err(_) => {
                    debug!(uid = ?peer.uid, "closing an idle IPC connection");
                    return;
                }
            }
        } else {
            match tokio::time::timeout_at(hello_deadline, read_line(&mut reader)).await {
                Ok(read) => read,
                Err(_) => {
                    let message = format!("no hello within {HELLO_TIMEOUT:?}");
                    let _ = send(&mut writer, &error(ErrorCode::BadRequest, message)).await;
                    return;
                }
            }
        };
        let line = match read {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(err) => {
                let _ = send(&mut writer, &error(ErrorCode::BadRequest, err.to_string())).await;
                return;
            }
        };
        let request = match decode_request(&line) {
            Ok(request) => request,
            Err(reply) => {
                if send(&mut writer, &reply).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if !greeted {
            let reply = match request {
                Request::Hello { version } if version == IPC_VERSION => Response::Hello {
                    version: IPC_VERSION,
                    daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
                },
                Request::Hello { version } => error(
                    ErrorCode::VersionMismatch,
                    format!(
                        "this cloudllmd speaks IPC version {IPC_VERSION}, the client {version}: use the cloudllm that came with it"
                    ),
                ),
                _ => error(ErrorCode::BadRequest, "the first request must be hello"),
            };
            let ok = matches!(reply, Response::Hello { .. });
            if send(&mut writer, &reply).await.is_err() || !ok {
                return;
            }
            greeted = true;
            continue;
        }
        if changes_state(&request) && !context.operators.allow(peer) {
            let reply = error(
                ErrorCode::PermissionDenied,
                "permission denied: only the daemon's own user, root or its operator group may change it",
            );
            if send(&mut writer, &reply).await.is_err() {
                return;
            }
            continue;
        }
        let keep_going = dispatch(request, context, &mut reader, &mut writer).await;
        if !keep_going {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded() {
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        let mut reader = BufReader::new(&long[..]);
        assert!(read_line(&mut reader).await.is_err());
        let mut ok = BufReader::new(&b"{\"method\":\"status\"}\nrest"[..]);
        assert_eq!(
            read_line(&mut ok).await.unwrap().unwrap(),
            b"{\"method\":\"status\"}"
        );
        assert_eq!(read_line(&mut ok).await.unwrap().unwrap(), b"rest");
        assert!(read_line(&mut ok).await.unwrap().is_none());
    }

    #[test]
    fn only_reads_are_allowed_to_everyone() {
        assert!(changes_state(&Request::Disconnect));
        assert!(!changes_state(&Request::Status));
    }
}
