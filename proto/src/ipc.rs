//! The daemon's local IPC protocol: newline-delimited JSON over a local socket.
//!
//! A client opens with [`Request::Hello`] carrying [`IPC_VERSION`]; the daemon answers
//! [`Response::Hello`] or an error if the versions differ. Then each request gets one response,
//! except `watch`, `logs --follow` and the interactive login, which stream responses until the
//! client hangs up (or, for login, until [`Response::LoginDone`] or an error). Every line is at
//! most [`MAX_LINE_BYTES`]; an oversized or unparsable line gets an [`ErrorCode::BadRequest`]
//! reply, never a crash.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Secret;

/// Version of the IPC protocol, exchanged in the first line.
pub const IPC_VERSION: u32 = 1;

/// Longest line either side sends, in bytes. The largest message is a login token or a batch
/// of status fields: a few KiB. 64 KiB leaves room and bounds a hostile client.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// A request from a client (CLI, tray) to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Opens the session with the client's [`IPC_VERSION`].
    Hello {
        /// The client's IPC version.
        version: u32,
    },
    /// The daemon's current state.
    Status,
    /// The current state, then every change, until the client hangs up.
    Watch,
    /// Open the tunnel (and keep it open across restarts of the daemon).
    Connect,
    /// Close the tunnel (and keep it closed across restarts of the daemon).
    Disconnect,
    /// Log in with an agent token the user already has.
    LoginWithToken {
        /// The relay's base URL; the configured one when absent.
        relay_url: Option<String>,
        /// The agent token.
        token: Secret,
    },
    /// Log in through the relay's identity provider: the daemon streams
    /// [`Response::LoginPrompt`] and then [`Response::LoginDone`].
    Login {
        /// The relay's base URL; the configured one when absent.
        relay_url: Option<String>,
        /// Which flow to use.
        flow: LoginFlow,
    },
    /// Forget the credentials and close the tunnel.
    Logout,
    /// Read settings: one key, or all when absent.
    ConfigGet {
        /// The setting's name.
        key: Option<String>,
    },
    /// Change a setting (written to the config file and applied).
    ConfigSet {
        /// The setting's name.
        key: String,
        /// Its new value, as it would be written in the config file.
        value: String,
    },
    /// Recent log lines, and new ones as they come when `follow` is set.
    Logs {
        /// How many recent lines.
        lines: usize,
        /// Keep streaming new lines.
        follow: bool,
    },
    /// The local Ollama's models, as the relay will see them.
    Models,
    /// The configured relay's public description (its `/.well-known/cloudllm`), fetched by the
    /// daemon. Added after IPC version 1 shipped: older daemons answer it with
    /// [`ErrorCode::BadRequest`], which clients take as "unknown".
    RelayInfo,
    /// A link that opens the relay's web page already signed in as the logged-in user
    /// (`cloudllm open`, the tray's "Open web page"): the daemon asks the relay for a one-time
    /// code with its agent token. Added after IPC version 1 shipped: older daemons answer it
    /// with [`ErrorCode::BadRequest`].
    OpenWeb,
}

/// Which interactive login flow to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoginFlow {
    /// Device flow when the provider offers it, else the browser flow.
    Auto,
    /// OAuth 2.0 device authorization grant (RFC 8628).
    Device,
    /// Authorization code with PKCE and a loopback redirect (RFC 8252).
    Browser,
}

/// A response from the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Answer to [`Request::Hello`].
    Hello {
        /// The daemon's IPC version.
        version: u32,
        /// The daemon's package version.
        daemon_version: String,
    },
    /// The request was carried out.
    Ok,
    /// The daemon's state (answer to `status`, and each event of `watch`).
    Status(Status),
    /// A step of an interactive login the user must take.
    LoginPrompt(LoginPrompt),
    /// The login finished; the daemon is connecting.
    LoginDone {
        /// The user now logged in.
        user: Option<String>,
    },
    /// Settings and their values.
    Config {
        /// Setting name → value as written in the config file.
        values: BTreeMap<String, String>,
        /// The config file.
        path: String,
    },
    /// One log line.
    Log {
        /// The line, without its newline.
        line: String,
    },
    /// The local Ollama's models.
    Models {
        /// Model names.
        models: Vec<String>,
    },
    /// Answer to [`Request::RelayInfo`].
    RelayInfo(crate::RelayInfo),
    /// Answer to [`Request::OpenWeb`].
    WebUrl {
        /// The page's address with a one-time sign-in code in its fragment. It signs a browser
        /// in once, within a minute: a [`Secret`], so it never shows in `Debug` output or logs.
        url: Secret,
    },
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A message for the user.
        message: String,
    },
}

/// What the user must do to finish an interactive login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginPrompt {
    /// The page to open.
    pub url: String,
    /// The code to enter on that page (device flow), if any.
    pub user_code: Option<String>,
    /// The page with the code already filled in, if the provider offers one.
    pub url_complete: Option<String>,
}

/// Kinds of IPC failure, for clients to map onto exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line was not a valid request (unknown method, bad JSON, too long).
    BadRequest,
    /// The client and daemon speak different IPC versions.
    VersionMismatch,
    /// The caller may not change this daemon's state.
    PermissionDenied,
    /// A setting name or value was refused.
    InvalidConfig,
    /// The operation needs a login first.
    NotLoggedIn,
    /// The login failed.
    LoginFailed,
    /// Something else went wrong in the daemon.
    Internal,
}

/// Everything the daemon reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// The daemon's package version.
    pub daemon_version: String,
    /// The tunnel's state.
    pub connection: Connection,
    /// The relay's base URL.
    pub relay_url: Option<String>,
    /// The logged-in user (`sub` of the agent token).
    pub user: Option<String>,
    /// The user's tier, if the token names one.
    pub tier: Option<String>,
    /// This device's name.
    pub device_name: String,
    /// The local Ollama.
    pub ollama: Ollama,
    /// Requests being served now.
    pub requests_in_flight: u64,
    /// Requests served since the daemon started.
    pub requests_total: u64,
    /// Where the credentials are kept, in words ("OS keyring", "file …").
    pub credential_store: String,
}

/// The tunnel's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum Connection {
    /// No credentials: `cloudllm login` first.
    LoggedOut,
    /// The credentials stopped working (refresh failed, token refused): log in again.
    LoginRequired {
        /// Why.
        reason: String,
    },
    /// Logged in, tunnel closed on request (`cloudllm disconnect`).
    Disconnected,
    /// Dialling the relay.
    Connecting,
    /// The tunnel is up.
    Connected {
        /// Since when, Unix seconds.
        since: u64,
        /// Round trip to the relay in milliseconds, once measured.
        rtt_ms: Option<u64>,
    },
    /// The tunnel is down and will be dialled again.
    Reconnecting {
        /// Failures in a row.
        attempt: u32,
        /// When the next attempt starts, Unix seconds.
        next_try: u64,
        /// What went wrong last.
        last_error: String,
    },
    /// Another connection with this device's id took the device over on the relay (a copy of
    /// this machine's state, or someone with the agent token). The daemon does not dial again
    /// until `cloudllm connect` (or its own restart), so two daemons never take the device from
    /// each other in a loop.
    Replaced {
        /// When, Unix seconds.
        at: u64,
    },
}

/// The local Ollama's state, polled in the background.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum Ollama {
    /// Not checked yet.
    Unknown,
    /// Answering.
    Up {
        /// Ollama's version.
        version: String,
        /// How many models it has.
        models: usize,
    },
    /// Not answering.
    Down {
        /// Why.
        error: String,
    },
}

/// The system daemon's IPC socket (systemd `RuntimeDirectory=cloudllm`).
#[cfg(not(target_os = "macos"))]
pub const SYSTEM_SOCKET: &str = "/run/cloudllm/cloudllmd.sock";
/// The system daemon's IPC socket (macOS has no `/run`; its `/var/run` is writable by root).
#[cfg(target_os = "macos")]
pub const SYSTEM_SOCKET: &str = "/var/run/cloudllm/cloudllmd.sock";

/// Where a daemon puts its IPC socket unless configured otherwise, and where clients look: a
/// user daemon's in the user's runtime dir (`$XDG_RUNTIME_DIR/cloudllm/cloudllmd.sock` on
/// Linux, the cache dir under the home directory elsewhere or when `XDG_RUNTIME_DIR` is unset),
/// the system daemon's at [`SYSTEM_SOCKET`].
///
/// A user daemon's socket is never put in a directory shared with other users (such as `/tmp`):
/// there another user could bind the name first and receive what the CLI sends, tokens
/// included. With neither `XDG_RUNTIME_DIR` nor a home directory ([`NoSocketDir`]) the caller
/// must be told where to put it instead.
pub fn default_socket_path(system: bool) -> Result<std::path::PathBuf, NoSocketDir> {
    if system {
        return Ok(std::path::PathBuf::from(SYSTEM_SOCKET));
    }
    directories::ProjectDirs::from("", "", "cloudllm")
        .map(|dirs| {
            dirs.runtime_dir()
                .unwrap_or_else(|| dirs.cache_dir())
                .join("cloudllmd.sock")
        })
        // A relative `HOME` would put the socket wherever the process happens to start.
        .filter(|path| path.is_absolute())
        .ok_or(NoSocketDir)
}

/// No private directory for a user daemon's socket: neither `XDG_RUNTIME_DIR` nor `HOME` is
/// set, and the user database names no home directory for this user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoSocketDir;

impl std::fmt::Display for NoSocketDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "there is no private directory for the daemon's socket: neither XDG_RUNTIME_DIR nor \
             HOME is set to an absolute path and this user has no home directory (a shared \
             directory such as /tmp is never used: another user could take the socket's name)",
        )
    }
}

impl std::error::Error for NoSocketDir {}

/// The named pipe a daemon with socket `path` listens on where local sockets have no paths
/// (Windows): the path's file name. Daemon and clients both derive it here, so they agree.
pub fn pipe_name(path: &std::path::Path) -> &str {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("cloudllmd.sock")
}

/// Writes a message as one JSON line (with its newline).
pub fn to_line<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_names_are_the_socket_file_name() {
        assert_eq!(
            pipe_name(std::path::Path::new("/run/cloudllm/x.sock")),
            "x.sock"
        );
        assert_eq!(pipe_name(std::path::Path::new("/")), "cloudllmd.sock");
    }

    #[test]
    fn requests_and_responses_round_trip_as_single_lines() {
        let requests = [
            Request::Hello {
                version: IPC_VERSION,
            },
            Request::Status,
            Request::LoginWithToken {
                relay_url: Some("http://r".into()),
                token: Secret::new("tok\nwith newline"),
            },
            Request::ConfigSet {
                key: "device_name".into(),
                value: "box".into(),
            },
            Request::Logs {
                lines: 10,
                follow: true,
            },
        ];
        for request in requests {
            let line = to_line(&request);
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
            assert_eq!(serde_json::from_slice::<Request>(&line).unwrap(), request);
        }
        let status = Response::Status(Status {
            daemon_version: "1".into(),
            connection: Connection::Reconnecting {
                attempt: 2,
                next_try: 5,
                last_error: "refused".into(),
            },
            relay_url: None,
            user: Some("alice".into()),
            tier: None,
            device_name: "d".into(),
            ollama: Ollama::Up {
                version: "0.5".into(),
                models: 3,
            },
            requests_in_flight: 0,
            requests_total: 7,
            credential_store: "OS keyring".into(),
        });
        let text = String::from_utf8(to_line(&status)).unwrap();
        assert!(text.contains(r#""state":"reconnecting""#), "{text}");
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), status);
    }

    #[test]
    fn relay_info_is_asked_and_answered_compatibly() {
        let line = to_line(&Request::RelayInfo);
        assert_eq!(line, b"{\"method\":\"relay_info\"}\n");
        // A relay without a web page sends exactly what older relays sent.
        let info = crate::RelayInfo {
            protocol_version: 1,
            auth: crate::RelayAuth::Token,
            web_url: None,
        };
        let text = serde_json::to_string(&info).unwrap();
        assert_eq!(text, r#"{"protocol_version":1,"auth":{"mode":"token"}}"#);
        assert_eq!(
            serde_json::from_str::<crate::RelayInfo>(&text).unwrap(),
            info
        );
        let with_page = crate::RelayInfo {
            web_url: Some("https://relay.example.com/account".into()),
            ..info
        };
        let answer = Response::RelayInfo(with_page);
        let text = String::from_utf8(to_line(&answer)).unwrap();
        assert!(text.contains(r#""type":"relay_info""#), "{text}");
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), answer);
    }

    #[test]
    fn open_web_is_asked_and_answered_without_showing_the_link() {
        assert_eq!(to_line(&Request::OpenWeb), b"{\"method\":\"open_web\"}\n");
        let answer = Response::WebUrl {
            url: Secret::new("https://relay.example.com/#open=c0de"),
        };
        let text = String::from_utf8(to_line(&answer)).unwrap();
        assert_eq!(
            text,
            "{\"type\":\"web_url\",\"url\":\"https://relay.example.com/#open=c0de\"}\n"
        );
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), answer);
        assert!(!format!("{answer:?}").contains("c0de"), "{answer:?}");
    }

    #[test]
    fn unknown_methods_and_fields_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"method":"format_disk"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"method":"config_get","key":null,"x":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"version":1}"#).is_err());
    }
}
