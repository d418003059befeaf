//! Wire types and names shared by every cloudllm component.
//!
//! The tunnel is a WebSocket dialled out by the daemon. Its text messages carry [`Control`]
//! messages (JSON); its binary messages carry sessions of the tunnel's multiplexer, opened by
//! the relay on demand (the relay sends requests, the daemon answers them). A busy tunnel may
//! get lanes: more WebSockets of the same tunnel ([`Control::Lanes`]). Everything the two ends
//! must agree on — header names, the control messages, the protocol version and the table of
//! Ollama endpoints a tunnel carries ([`endpoints`]) — lives here so that neither side can
//! drift. This crate does no I/O.

use serde::{Deserialize, Serialize};

pub mod endpoints;
pub mod ipc;

/// Version of the tunnel protocol. The daemon sends it when it dials and in its [`Hello`];
/// the relay refuses versions it does not speak. Version 2 opened HTTP/2 sessions on demand,
/// with control messages as WebSocket text; version 3 keeps both but carries sessions as the
/// tunnel's own multiplexer (`tunnel/src/mux`) instead of HTTP/2.
pub const PROTOCOL_VERSION: u32 = 3;

/// Path on the relay where daemons open their tunnel (WebSocket upgrade).
pub const TUNNEL_PATH: &str = "/tunnel";

/// Header on the tunnel upgrade request carrying [`PROTOCOL_VERSION`].
pub const HEADER_PROTOCOL: &str = "x-cloudllm-protocol";
/// Header on the tunnel upgrade request carrying the daemon's stable device id.
pub const HEADER_DEVICE_ID: &str = "x-cloudllm-device-id";
/// Header on the tunnel upgrade request carrying the human-readable device name.
pub const HEADER_DEVICE_NAME: &str = "x-cloudllm-device-name";
/// Header a user may set on an API request to pick one of their devices by name or id.
pub const HEADER_DEVICE: &str = "x-cloudllm-device";
/// Header on a lane's upgrade request (see [`Control::Lanes`]): `SHARD.KEY`, the relay thread
/// the lane is for and the key the relay gave the tunnel.
pub const HEADER_LANE: &str = "x-cloudllm-lane";
/// Most lanes a relay asks one tunnel for: one per relay thread but the tunnel's own, and no
/// relay runs on more cores than this.
pub const MAX_LANES: usize = 256;
/// Request id carried end to end: user → relay → daemon → Ollama, and back on the response.
pub const HEADER_REQUEST_ID: &str = "x-request-id";

/// Largest [`Control`] message either end reads, in bytes (as JSON text). A hello with
/// [`MAX_MODELS`] names of [`MAX_MODEL_NAME_BYTES`] fits; the cap stops a hostile peer from
/// making the other end buffer without end.
pub const MAX_CONTROL_BYTES: usize = 256 * 1024;

/// Most model names a device reports; the rest are left out (by the daemon and by the relay).
pub const MAX_MODELS: usize = 512;

/// Longest model name a device reports, in bytes.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// Longest `daemon_version` a hello may carry, in bytes: a semantic version with a
/// pre-release and build part fits in a quarter of it. The relay refuses longer ones, so a
/// hostile daemon cannot fill the relay's log with one field.
pub const MAX_VERSION_BYTES: usize = 64;

/// Whether a hello's `daemon_version` is acceptable: 1 to [`MAX_VERSION_BYTES`] characters
/// from what semantic versions use (`A–Z a–z 0–9 . + - _`). Nothing else reaches a log line.
pub fn valid_version(version: &str) -> bool {
    !version.is_empty()
        && version.len() <= MAX_VERSION_BYTES
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-' | b'_'))
}

/// `text` safe to print on a terminal or in a log line: characters that could end a line or
/// steer a terminal (newlines, ESC and other control characters, invisible format characters
/// such as bidi overrides) as Rust escapes (`\n`, `\u{1b}`); everything else as it is, so
/// ordinary text (quotes and apostrophes included) is unchanged and not copied.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let plain = |c: char| matches!(c, '\\' | '"' | '\'') || c.escape_debug().len() == 1;
    if text.chars().all(plain) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if plain(c) {
            out.push(c);
        } else {
            out.extend(c.escape_debug());
        }
    }
    out.into()
}

/// WebSocket close code with which the relay ends a tunnel that a newer tunnel with the same
/// user and device id has replaced (from the 4000–4999 range RFC 6455 leaves to
/// applications). The daemon that gets it does not dial again by itself: two daemons with one
/// device id would otherwise take the device from each other for ever (see the README's
/// security notes); `cloudllm status` says what happened and `cloudllm connect` takes the
/// device back.
pub const CLOSE_REPLACED: u16 = 4001;

/// The reason the relay sends with [`CLOSE_REPLACED`].
pub const REPLACED_REASON: &str = "replaced by another connection with the same device id";

/// A control message: one WebSocket text message on the tunnel, as JSON tagged by `type`.
///
/// The order on a tunnel: the daemon sends [`Control::Hello`] first; the relay answers
/// [`Control::Ready`] once the device is registered (or closes the WebSocket with the reason).
/// After that either end may send the others at any time, also while a session runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Daemon → relay, first message: who is dialling.
    Hello(Hello),
    /// Relay → daemon: the device is registered; requests may come.
    Ready,
    /// Daemon → relay: the device's models changed (a model was pulled or removed, Ollama
    /// started or stopped): the full new list of names.
    Models {
        /// The names, as in Ollama's `/api/tags`.
        models: Vec<String>,
    },
    /// Relay → daemon: the relay is going away (restart, token past expiry). The daemon lets
    /// the requests in flight finish, closes the tunnel and dials again at once.
    Drain,
    /// Either way: this end's session is over; no more of its bytes follow. Once both
    /// ends have sent it the tunnel is idle, and the relay opens the next session by sending
    /// its first bytes.
    SessionEnd,
    /// Relay → daemon, to a daemon whose hello offered [`Hello::lanes`]: the device is busy;
    /// open one more connection (a *lane*) for each relay thread in `shards`, each an upgrade
    /// on the tunnel path with [`HEADER_LANE`] set to `SHARD.KEY`. A lane carries sessions as
    /// the tunnel does but no control messages beyond them; the relay closes it once the
    /// device is idle, and the daemon does not dial it again by itself.
    Lanes {
        /// The relay threads to open a lane for (at most [`MAX_LANES`]).
        shards: Vec<u32>,
        /// Names this tunnel on the relay: 32 hex digits.
        key: String,
    },
}

impl Control {
    /// The message as WebSocket text.
    pub fn to_text(&self) -> String {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The daemon's self-description, its first message on a tunnel.
/// Unknown fields are ignored, so a newer daemon may add some without breaking older relays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The daemon's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The daemon's package version, for logs and support.
    pub daemon_version: String,
    /// The names of the models the device's Ollama has (empty while Ollama is down).
    #[serde(default)]
    pub models: Vec<String>,
    /// The daemon opens lanes when the relay asks ([`Control::Lanes`]). Absent from older
    /// daemons' hellos: the relay asks only those that offer.
    #[serde(default)]
    pub lanes: bool,
}

/// Whether `key` is a lane key as the relay makes them: 32 lowercase hex digits.
pub fn valid_lane_key(key: &str) -> bool {
    key.len() == 32 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Model names cut to what a tunnel carries: at most [`MAX_MODELS`] non-empty printable
/// names of up to [`MAX_MODEL_NAME_BYTES`], so that any list fits in [`MAX_CONTROL_BYTES`].
pub fn sane_models(mut models: Vec<String>) -> Vec<String> {
    models.retain(|m| {
        !m.is_empty()
            && m.len() <= MAX_MODEL_NAME_BYTES
            && m.bytes().all(|b| (0x21..0x7f).contains(&b))
    });
    models.truncate(MAX_MODELS);
    models
}

/// Path on the relay that tells clients how to log in: a [`RelayInfo`].
pub const WELL_KNOWN_PATH: &str = "/.well-known/cloudllm";

/// What `cloudllm login --relay URL` needs to know about a relay, published at
/// [`WELL_KNOWN_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// The relay's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// How users get an agent token.
    pub auth: RelayAuth,
    /// A web page for the relay's users (an account or dashboard page), if it has one. Absent
    /// from older relays' documents and omitted when unset, so older clients read it unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_url: Option<String>,
}

/// Path on the relay where a daemon asks, with its agent token (`POST`), for a one-time code
/// that signs a browser in on the relay's web page as the same user (`cloudllm open`): an
/// [`OpenWebCode`]. The page trades the code, once and within [`OpenWebCode::expires_in`], for a
/// short-lived client token.
pub const OPEN_WEB_PATH: &str = "/cloudllm/open";

/// The relay's answer at [`OPEN_WEB_PATH`]. The code signs someone in: it is a [`Secret`], so it
/// never shows in `Debug` output or logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenWebCode {
    /// The one-time code (hex).
    pub code: Secret,
    /// Seconds it stays valid.
    pub expires_in: u64,
    /// The page's path with the code in its fragment (`/#open=CODE`), for clients that know
    /// the relay only by its root.
    pub path: Secret,
}

/// How users get an agent token for a relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum RelayAuth {
    /// Tokens come from the relay operator (`cloudllm-relay token issue`): log in with
    /// `--with-token`.
    Token,
    /// Tokens come from an OpenID Connect provider.
    Oidc {
        /// The provider's issuer URL (discovery at `/.well-known/openid-configuration`).
        issuer: String,
        /// The public client id registered for cloudllm.
        client_id: String,
        /// Scopes to request.
        scopes: Vec<String>,
    },
}

/// A secret (token, signing key) that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Longest device name or id accepted on the wire, in bytes.
pub const MAX_DEVICE_FIELD_BYTES: usize = 128;

/// Whether a device name or id is acceptable: non-empty, short, printable ASCII without spaces
/// at the ends. Both ends check it, so logs and headers never carry control characters.
pub fn valid_device_field(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_DEVICE_FIELD_BYTES
        && value.trim() == value
        && value.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// An error body in Ollama's shape: `{"error": "..."}`. Ollama clients print the message.
pub fn ollama_error(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// An error body in the OpenAI API's shape, for `/v1/*`: OpenAI SDKs read `error.message`.
pub fn openai_error(message: &str, kind: &str) -> String {
    serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": null }
    })
    .to_string()
}

/// An error body in the shape the caller's API uses: OpenAI's for `/v1/*`, Ollama's otherwise.
/// `server_fault` picks the OpenAI error type (`api_error` or `invalid_request_error`).
pub fn api_error_body(path: &str, server_fault: bool, message: &str) -> String {
    if path.starts_with("/v1/") {
        let kind = if server_fault {
            "api_error"
        } else {
            "invalid_request_error"
        };
        openai_error(message, kind)
    } else {
        ollama_error(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_tolerates_newer_fields() {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            daemon_version: "0.1.0".into(),
            models: vec!["smollm2:135m".into()],
            lanes: true,
        };
        let text = Control::Hello(hello.clone()).to_text();
        assert_eq!(
            serde_json::from_str::<Control>(&text).unwrap(),
            Control::Hello(hello.clone())
        );
        let extra = text.replace('}', r#","surprise":1}"#);
        assert_eq!(
            serde_json::from_str::<Control>(&extra).unwrap(),
            Control::Hello(hello)
        );
        assert!(
            serde_json::from_str::<Control>(r#"{"type":"hello","daemon_version":"1"}"#).is_err()
        );
        let bare: Control = serde_json::from_str(
            r#"{"type":"hello","protocol_version":2,"daemon_version":"0.0.9"}"#,
        )
        .unwrap();
        assert!(
            matches!(bare, Control::Hello(Hello { models, lanes: false, .. }) if models.is_empty())
        );
    }

    #[test]
    fn lanes_name_their_shards_and_a_key() {
        let lanes = Control::Lanes {
            shards: vec![1, 3],
            key: "0123456789abcdef0123456789abcdef".into(),
        };
        assert_eq!(
            lanes.to_text(),
            r#"{"type":"lanes","shards":[1,3],"key":"0123456789abcdef0123456789abcdef"}"#
        );
        assert_eq!(
            serde_json::from_str::<Control>(&lanes.to_text()).unwrap(),
            lanes
        );
        assert!(valid_lane_key("0123456789abcdef0123456789abcdef"));
        for bad in [
            "",
            "0123456789ABCDEF0123456789ABCDEF",
            "0123",
            "g123456789abcdef0123456789abcdef",
        ] {
            assert!(!valid_lane_key(bad), "{bad}");
        }
    }

    #[test]
    fn control_messages_are_tagged_json() {
        assert_eq!(Control::Ready.to_text(), r#"{"type":"ready"}"#);
        assert_eq!(Control::SessionEnd.to_text(), r#"{"type":"session_end"}"#);
        let models = Control::Models {
            models: vec!["a:latest".into()],
        };
        assert_eq!(
            models.to_text(),
            r#"{"type":"models","models":["a:latest"]}"#
        );
        assert_eq!(
            serde_json::from_str::<Control>(&models.to_text()).unwrap(),
            models
        );
        assert!(serde_json::from_str::<Control>(r#"{"type":"reboot"}"#).is_err());
    }

    #[test]
    fn the_largest_model_list_fits_in_a_control_message() {
        let names = vec!["m".repeat(MAX_MODEL_NAME_BYTES); MAX_MODELS + 10];
        let mut with_junk = names.clone();
        with_junk.insert(0, "bad name".into());
        with_junk.insert(0, "x".repeat(MAX_MODEL_NAME_BYTES + 1));
        with_junk.insert(0, String::new());
        let models = sane_models(with_junk);
        assert_eq!(models.len(), MAX_MODELS);
        assert!(models.iter().all(|m| m.len() == MAX_MODEL_NAME_BYTES));
        let hello = Control::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            daemon_version: "x".repeat(64),
            models,
            lanes: true,
        });
        assert!(hello.to_text().len() <= MAX_CONTROL_BYTES);
    }

    #[test]
    fn device_fields_reject_control_characters_and_length() {
        assert!(valid_device_field("my-laptop"));
        assert!(valid_device_field("Kitchen PC"));
        assert!(!valid_device_field(""));
        assert!(!valid_device_field(" padded"));
        assert!(!valid_device_field("new\nline"));
        assert!(!valid_device_field(&"x".repeat(MAX_DEVICE_FIELD_BYTES + 1)));
        assert!(!valid_device_field("naïve"));
    }

    #[test]
    fn versions_are_short_and_plain() {
        assert!(valid_version(env!("CARGO_PKG_VERSION")));
        assert!(valid_version("1.2.3-rc.1+build_5"));
        assert!(!valid_version(""));
        assert!(!valid_version("1.0\nINFO forged line"));
        assert!(!valid_version("1.0\u{1b}[31m"));
        assert!(!valid_version("1.0 beta"));
        assert!(!valid_version(&"1".repeat(MAX_VERSION_BYTES + 1)));
        assert!(valid_version(&"1".repeat(MAX_VERSION_BYTES)));
    }

    #[test]
    fn printable_text_escapes_only_what_could_steer_a_terminal() {
        assert!(matches!(
            printable("Bob's \"PC\" \\ naïve"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            printable("a\nb\u{1b}[31m\u{202e}c\t"),
            r"a\nb\u{1b}[31m\u{202e}c\t"
        );
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn error_bodies_have_the_client_shapes() {
        let v: serde_json::Value =
            serde_json::from_str(&ollama_error("a \"quoted\" word")).unwrap();
        assert_eq!(v["error"], "a \"quoted\" word");
        let v: serde_json::Value = serde_json::from_str(&openai_error("m", "t")).unwrap();
        assert_eq!(v["error"]["message"], "m");
        assert_eq!(v["error"]["type"], "t");
        let v: serde_json::Value =
            serde_json::from_str(&api_error_body("/v1/models", true, "m")).unwrap();
        assert_eq!(v["error"]["type"], "api_error");
        let v: serde_json::Value =
            serde_json::from_str(&api_error_body("/api/tags", true, "m")).unwrap();
        assert_eq!(v["error"], "m");
    }
}
