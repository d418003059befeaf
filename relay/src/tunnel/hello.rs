//! The daemon's first words on a tunnel, and everything else it says that reaches a log.
//!
//! Everything the daemon sends is hostile until checked: the hello's version must be a plain
//! version string or the tunnel is refused (with a WebSocket close that says why), model names
//! are cut to what [`proto::sane_models`] allows, and whatever else from the network reaches a
//! log line goes through [`escaped`].

use std::borrow::Cow;
use std::sync::{Arc, Weak};

use anyhow::Context;
use cloudllm_proto::{self as proto, Control, Hello};
use cloudllm_tunnel::{Link, ReadAhead};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tracing::debug;

use super::{HANDSHAKE_TIMEOUT, TunnelIo, TunnelLink};
use crate::AppState;
use crate::registry::Device;

/// Longest piece of network-supplied text (an error chain with a peer's words in it) the relay
/// writes into one log line, in bytes: enough for any honest error, and a hostile peer cannot
/// grow the log by more per connection.
const MAX_LOGGED_BYTES: usize = 512;

/// The close reason for a hello whose version is not a plain version string.
const BAD_VERSION_REASON: &str =
    "invalid hello: daemon_version must be 1 to 64 characters of A-Z a-z 0-9 . + - _";

/// Opens the tunnel on an upgraded connection: the WebSocket and the daemon's hello. Returns
/// the device, not yet registered, and the link, whose control handler keeps the device's
/// model list current.
pub(super) async fn open(
    state: &AppState,
    io: TokioIo<hyper::upgrade::Upgraded>,
    (user, id, name): (String, String, String),
) -> anyhow::Result<(Arc<Device>, TunnelLink, String)> {
    let mut ws = WebSocketStream::from_raw_socket(
        ReadAhead::new(io),
        Role::Server,
        Some(cloudllm_tunnel::ws_config(
            cloudllm_tunnel::RELAY_WS_READ_BUFFER,
        )),
    )
    .await;
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_hello(&mut ws))
        .await
        .context("hello timed out")??;
    if hello.protocol_version != proto::PROTOCOL_VERSION {
        refuse_hello(&mut ws, "unsupported protocol version: upgrade cloudllmd").await;
        anyhow::bail!(
            "daemon speaks protocol {}, relay speaks {}",
            hello.protocol_version,
            proto::PROTOCOL_VERSION
        );
    }
    if !proto::valid_version(&hello.daemon_version) {
        refuse_hello(&mut ws, BAD_VERSION_REASON).await;
        anyhow::bail!(
            "invalid hello: a daemon_version of {} bytes that is not a plain version",
            hello.daemon_version.len()
        );
    }
    let mut device = Device::new(user, id, name);
    if hello.lanes && state.lanes > 1 {
        device = device.with_lanes();
    }
    let device = Arc::new(device);
    let offered = hello.models.len();
    let models = proto::sane_models(hello.models);
    if models.len() < offered {
        debug!(
            offered,
            kept = models.len(),
            "left out model names that are empty, too long or not printable ASCII"
        );
    }
    device.set_models(models);
    let handler = control_handler(Arc::downgrade(&device));
    let link = Link::new(ws, state.config.liveness(), handler);
    Ok((device, link, hello.daemon_version))
}

/// Reads the daemon's first message, which must be its hello.
async fn read_hello(ws: &mut WebSocketStream<TunnelIo>) -> anyhow::Result<Hello> {
    use futures_util::StreamExt;
    loop {
        let message = ws
            .next()
            .await
            .context("tunnel closed before the hello")?
            .context("reading the hello")?;
        match message {
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Text(text) => match serde_json::from_str(text.as_str()) {
                Ok(Control::Hello(hello)) => return Ok(hello),
                Ok(other) => {
                    refuse_hello(ws, "invalid hello: the first message must be a hello").await;
                    anyhow::bail!("daemon sent a {} message before its hello", kind(&other))
                }
                Err(err) => {
                    refuse_hello(ws, "invalid hello: unreadable JSON").await;
                    // serde quotes what it could not read: the peer's words, cut and escaped.
                    anyhow::bail!("unreadable hello: {}", escaped(&err.to_string()))
                }
            },
            Message::Binary(_) => {
                refuse_hello(ws, "invalid hello: the first message must be a hello").await;
                anyhow::bail!("daemon sent binary data before its hello")
            }
            Message::Close(_) | Message::Frame(_) => {
                anyhow::bail!("tunnel closed before the hello")
            }
        }
    }
}

/// What the relay does with the daemon's control messages after the hello: model lists
/// update the device; anything else a daemon does not send is ignored.
fn control_handler(device: Weak<Device>) -> cloudllm_tunnel::ControlHandler {
    Box::new(move |control| match control {
        Control::Models { models } => {
            if let Some(device) = device.upgrade() {
                let models = proto::sane_models(models);
                debug!(models = models.len(), "device models changed");
                device.set_models(models);
            }
        }
        other => debug!(
            control = kind(&other),
            "ignoring a control message daemons do not send"
        ),
    })
}

/// Closes a tunnel whose hello is refused with 1002 (protocol error) and `reason`, and reads
/// (for a bounded time) until the daemon answers the close: a socket dropped with unread bytes
/// is reset, and the reset may overtake the reason.
async fn refuse_hello(ws: &mut WebSocketStream<TunnelIo>, reason: &str) {
    use futures_util::StreamExt;
    let frame = CloseFrame {
        code: CloseCode::Protocol,
        reason: reason.to_owned().into(),
    };
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        ws.close(Some(frame)).await?;
        while let Some(message) = ws.next().await {
            if let Message::Close(_) = message? {
                break;
            }
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    })
    .await;
}

/// A control message's type, which is all the relay logs of a message it does not expect (the
/// rest may be a quarter of a megabyte of the peer's text).
fn kind(control: &Control) -> &'static str {
    match control {
        Control::Hello(_) => "hello",
        Control::Ready => "ready",
        Control::Models { .. } => "models",
        Control::Drain => "drain",
        Control::SessionEnd => "session_end",
        Control::Lanes { .. } => "lanes",
    }
}

/// `text` as it may go into a log line: [`proto::printable`] (no newlines, ESC or other
/// characters that could forge a line or steer a terminal), cut to [`MAX_LOGGED_BYTES`] with
/// the length left out noted. Short plain text is returned as it is.
pub(super) fn escaped(text: &str) -> Cow<'_, str> {
    let shown = proto::printable(text);
    if shown.len() <= MAX_LOGGED_BYTES {
        return shown;
    }
    let mut end = MAX_LOGGED_BYTES;
    while !shown.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!(
        "{}… ({} more bytes)",
        &shown[..end],
        shown.len() - end
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_text_cannot_break_lines_steer_terminals_or_grow_without_end() {
        assert!(matches!(escaped("alice"), Cow::Borrowed("alice")));
        assert!(matches!(escaped(r#"a "quoted" \ path"#), Cow::Borrowed(_)));
        let forged = "1.0\n2026-01-01T00:00:00Z  INFO forged: admin logged in\u{1b}[2J\u{202e}";
        let shown = escaped(forged);
        assert!(!shown.contains(['\n', '\u{1b}', '\u{202e}']), "{shown}");
        assert!(
            shown.contains(r"\n") && shown.contains(r"\u{1b}"),
            "{shown}"
        );
        let huge = "\n".repeat(250_000);
        let shown = escaped(&huge);
        assert!(
            shown.len() <= MAX_LOGGED_BYTES + 32,
            "{} bytes",
            shown.len()
        );
        assert!(shown.ends_with("more bytes)"), "{shown}");
        assert!(!shown.contains('\n'));
        // Cut on a character boundary, whatever the text.
        let wide = "é".repeat(1000);
        assert!(escaped(&wide).starts_with("éé"));
    }
}
