//! How `cloudllm status` puts the daemon's state into words: the block of `status`, the one
//! line of `status --watch`, durations as a person says them, and colour only where it helps
//! (a terminal, no `NO_COLOR`). What the relay said (a login-required reason, a reconnect
//! error) is made printable before it reaches the terminal.

use std::io::IsTerminal;

use cloudllm_proto::ipc::{Connection, Ollama, Status};

/// Whether to colour output: only on a terminal, and never with `NO_COLOR` set.
#[derive(Clone, Copy)]
pub struct Style {
    color: bool,
}

impl Style {
    /// The style for this process's standard output.
    pub fn detect() -> Self {
        Style::for_output(
            std::io::stdout().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        )
    }

    /// Colour only on a terminal, and never when `NO_COLOR` is set to anything non-empty
    /// (no-color.org).
    fn for_output(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> Self {
        Style {
            color: terminal && no_color.is_none_or(|v| v.is_empty()),
        }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// The block `cloudllm status` prints: one fact a line.
pub fn describe(status: &Status, style: Style) -> String {
    let user = match (&status.user, &status.tier) {
        (Some(user), Some(tier)) => format!("{user} ({tier})"),
        (Some(user), None) => user.clone(),
        _ => "—".to_owned(),
    };
    format!(
        "Tunnel:       {}\nUser:         {user}\nDevice:       {}\nOllama:       {}\nRequests:     {} in flight, {} total\nCredentials:  {}\nDaemon:       cloudllmd {}\n",
        connection_text(&status.connection, status.relay_url.as_deref(), style),
        status.device_name,
        ollama_text(&status.ollama, style),
        status.requests_in_flight,
        status.requests_total,
        status.credential_store,
        status.daemon_version,
    )
}

/// The line `cloudllm status --watch` prints for each change.
pub fn one_line(status: &Status, style: Style) -> String {
    format!(
        "{} · Ollama {} · {} in flight, {} total",
        connection_text(&status.connection, status.relay_url.as_deref(), style),
        ollama_text(&status.ollama, style),
        status.requests_in_flight,
        status.requests_total
    )
}

fn connection_text(connection: &Connection, relay: Option<&str>, style: Style) -> String {
    let relay = relay.unwrap_or("the relay");
    match connection {
        Connection::LoggedOut => style.paint("31", "logged out: run `cloudllm login --relay URL`"),
        Connection::LoginRequired { reason } => style.paint(
            "31",
            &format!("login required: {}", cloudllm_proto::printable(reason)),
        ),
        Connection::Disconnected => style.paint("33", "disconnected (run `cloudllm connect`)"),
        Connection::Connecting => style.paint("33", &format!("connecting to {relay}")),
        Connection::Connected { since, rtt_ms } => {
            let rtt = rtt_ms
                .map(|ms| format!(", rtt {ms} ms"))
                .unwrap_or_default();
            let ago = now().saturating_sub(*since);
            style.paint(
                "32",
                &format!("connected to {relay} for {}{rtt}", human_duration(ago)),
            )
        }
        Connection::Reconnecting {
            attempt,
            next_try,
            last_error,
        } => {
            let wait = next_try.saturating_sub(now());
            style.paint(
                "33",
                &format!(
                    "reconnecting (attempt {attempt}, next in {wait} s): {}",
                    cloudllm_proto::printable(last_error)
                ),
            )
        }
        Connection::Replaced { at } => style.paint("31", &replaced_text(*at, now())),
    }
}

/// What `status` says of a tunnel another connection with the same device id replaced at
/// `at`, seen at `now` (Unix seconds).
fn replaced_text(at: u64, now: u64) -> String {
    let when = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(at),
    );
    format!(
        "replaced by another connection with the same device id at {when} ({} ago); \
         run `cloudllm connect` to take it back",
        human_duration(now.saturating_sub(at))
    )
}

fn ollama_text(ollama: &Ollama, style: Style) -> String {
    match ollama {
        Ollama::Unknown => "checking…".to_owned(),
        Ollama::Up { version, models } => style.paint(
            "32",
            &format!(
                "up, version {version}, {models} model{}",
                if *models == 1 { "" } else { "s" }
            ),
        ),
        Ollama::Down { error } => style.paint("31", &format!("down: {error}")),
    }
}

fn human_duration(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3600 => format!("{} min", seconds / 60),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}

/// Unix seconds now (0 on a clock before 1970).
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let none = None;
        let set = Some(std::ffi::OsStr::new("1"));
        let empty = Some(std::ffi::OsStr::new(""));
        assert!(Style::for_output(true, none).color);
        assert!(Style::for_output(true, empty).color);
        assert!(!Style::for_output(true, set).color);
        assert!(!Style::for_output(false, none).color);
        let plain = Style::for_output(false, none);
        assert_eq!(plain.paint("32", "connected"), "connected");
        assert_eq!(
            Style::for_output(true, none).paint("32", "up"),
            "\x1b[32mup\x1b[0m"
        );
    }

    #[test]
    fn a_replaced_tunnel_says_when_and_how_to_take_it_back() {
        let text = replaced_text(1_767_225_600, 1_767_225_600 + 300);
        assert_eq!(
            text,
            "replaced by another connection with the same device id at 2026-01-01T00:00:00Z \
             (5 min ago); run `cloudllm connect` to take it back"
        );
        let plain = Style::for_output(false, None);
        let shown = connection_text(&Connection::Replaced { at: 5 }, None, plain);
        assert!(
            shown.starts_with("replaced by another connection"),
            "{shown}"
        );
        // Whatever reached the daemon from the network, the terminal gets no escape codes.
        let hostile = Connection::Reconnecting {
            attempt: 1,
            next_try: 0,
            last_error: "closed (\u{1b}[2Jbye\nforged)".into(),
        };
        let shown = connection_text(&hostile, None, plain);
        assert!(!shown.contains(['\u{1b}', '\n']), "{shown}");
    }

    #[test]
    fn one_model_is_not_one_models() {
        let plain = Style::for_output(false, None);
        let up = |models| Ollama::Up {
            version: "0.5.4".into(),
            models,
        };
        assert_eq!(ollama_text(&up(1), plain), "up, version 0.5.4, 1 model");
        assert_eq!(ollama_text(&up(2), plain), "up, version 0.5.4, 2 models");
    }

    #[test]
    fn durations_read_like_a_person_would_say_them() {
        assert_eq!(human_duration(5), "5 s");
        assert_eq!(human_duration(125), "2 min");
        assert_eq!(human_duration(3 * 3600 + 120), "3 h 2 min");
    }
}
