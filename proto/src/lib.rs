//! Wire types and names shared by every cloudllm component.
//!
//! The tunnel is HTTP/2 inside a WebSocket: the relay is the HTTP/2 client and the daemon the
//! server. Everything the two ends must agree on — header names, the reserved control paths,
//! the handshake document and the protocol version — lives here so that neither side can drift.
//! This crate does no I/O.

use serde::{Deserialize, Serialize};

pub mod ipc;

/// Version of the tunnel protocol. The daemon sends it when it dials and in its [`Hello`];
/// the relay refuses versions it does not speak.
pub const PROTOCOL_VERSION: u32 = 1;

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
/// Request id carried end to end: user → relay → daemon → Ollama, and back on the response.
pub const HEADER_REQUEST_ID: &str = "x-request-id";

/// Prefix of the control paths the relay calls on the daemon through the tunnel. User traffic
/// can never reach these: the relay only forwards `/api/*` and `/v1/*`.
pub const CONTROL_PREFIX: &str = "/.cloudllm/";
/// `GET`: the daemon answers with its [`Hello`].
pub const CONTROL_HELLO: &str = "/.cloudllm/hello";
/// `POST`: the relay asks the daemon to drain this tunnel (the relay is going away). The daemon
/// answers, sends HTTP/2 GOAWAY, lets in-flight streams finish, and reconnects at once.
pub const CONTROL_DRAIN: &str = "/.cloudllm/drain";

/// `GET`: a long-lived stream of [`DeviceEvent`]s, one JSON document per line, from the daemon
/// to the relay (the relay is the HTTP/2 client, so the daemon answers one request forever).
pub const CONTROL_EVENTS: &str = "/.cloudllm/events";

/// Largest [`DeviceEvent`] line the relay reads, in bytes: room for thousands of model names.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Most model names a device may report; the relay ignores the rest.
pub const MAX_MODELS: usize = 4096;

/// Something the daemon tells the relay after the hello, on [`CONTROL_EVENTS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum DeviceEvent {
    /// The device's models changed (a model was pulled or removed, Ollama started or stopped):
    /// the full new list of names.
    Models {
        /// The names, as in Ollama's `/api/tags`.
        models: Vec<String>,
    },
}

/// Largest [`Hello`] document the relay reads, in bytes: a few hundred bytes plus the model
/// names, as much as a [`DeviceEvent`]. The cap stops a hostile daemon from making the relay
/// buffer without end.
pub const MAX_HELLO_BYTES: usize = MAX_EVENT_BYTES;

/// The daemon's self-description, fetched by the relay right after the tunnel opens.
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
        };
        let text = serde_json::to_string(&hello).unwrap();
        assert_eq!(serde_json::from_str::<Hello>(&text).unwrap(), hello);
        let extra = text.replace('}', r#","surprise":1}"#);
        assert_eq!(serde_json::from_str::<Hello>(&extra).unwrap(), hello);
        assert!(serde_json::from_str::<Hello>(r#"{"daemon_version":"1"}"#).is_err());
        // An older daemon's hello has no models.
        let old: Hello =
            serde_json::from_str(r#"{"protocol_version":1,"daemon_version":"0.0.9"}"#).unwrap();
        assert!(old.models.is_empty());
    }

    #[test]
    fn device_events_are_tagged_lines() {
        let event = DeviceEvent::Models {
            models: vec!["a:latest".into()],
        };
        let text = serde_json::to_string(&event).unwrap();
        assert_eq!(text, r#"{"event":"models","models":["a:latest"]}"#);
        assert_eq!(serde_json::from_str::<DeviceEvent>(&text).unwrap(), event);
        assert!(serde_json::from_str::<DeviceEvent>(r#"{"event":"reboot"}"#).is_err());
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
