//! What the tray shows for a daemon state: the icon's look and the tooltip, and the facts and
//! headline the menu repeats ([`crate::menu`] lays the menu out).
//!
//! [`view`] is a pure function of [`TrayState`], so every state the daemon can report is mapped
//! (and unit tested) without a display; the GUI only draws what it returns.

use cloudllm_proto::ipc::{Connection, Ollama, Status};

use crate::menu::{Action, Entry, Offers, daemon_menu, no_daemon_menu};

/// What the tray knows about the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrayState {
    /// The tray has just started and not reached the daemon yet.
    Starting,
    /// The daemon cannot be reached; the tray dials it again every few seconds.
    NoDaemon {
        /// Why, in words (for the menu's status line).
        reason: String,
    },
    /// The daemon's latest status.
    Daemon(Box<Status>),
}

/// The icon's look: each has its own shape and colour (see [`crate::icon`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Look {
    /// The tunnel is up and Ollama answers: a filled green circle.
    Connected,
    /// Dialling or re-dialling the relay: an orange ring.
    Connecting,
    /// Closed on request: a grey hollow square.
    Disconnected,
    /// Something needs the user (login required, device limit, Ollama down): a red triangle
    /// with "!".
    Error,
    /// The daemon is not running: a purple cross.
    NoDaemon,
}

impl Look {
    /// Every look, for tests and for drawing all icons up front.
    pub const ALL: [Look; 5] = [
        Look::Connected,
        Look::Connecting,
        Look::Disconnected,
        Look::Error,
        Look::NoDaemon,
    ];
}

/// Everything the tray shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The icon.
    pub look: Look,
    /// The tooltip (macOS, Windows; the same facts are in the menu everywhere).
    pub tooltip: String,
    /// The menu, top to bottom.
    pub menu: Vec<Entry>,
    /// What "Copy API URL" copies, when the relay is known.
    pub api_url: Option<String>,
    /// What "Open web page" opens, when there is a page to open.
    pub web_page: Option<WebPage>,
}

/// The page "Open web page" opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebPage {
    /// The page the relay publishes for its users (`web_url`: an account or dashboard page),
    /// opened as it is.
    Published(String),
    /// The relay's own chat page, signed in as the logged-in user through a one-time link the
    /// daemon asks the relay for (what `cloudllm open` does).
    SignedIn,
}

/// The base URL API clients use: the relay's OpenAI-compatible endpoint (`RELAY/v1`), which
/// OpenAI SDKs, Open WebUI and Continue take as their base URL.
pub fn api_url(relay_url: &str) -> String {
    format!("{}/v1", relay_url.trim_end_matches('/'))
}

/// Why a reconnecting daemon is stuck in a way that retrying will not fix: the relay refused
/// this device because the user has too many (HTTP 429 or a "device limit" message).
fn device_limit(last_error: &str) -> bool {
    let error = last_error.to_ascii_lowercase();
    error.contains("device limit") || error.contains("too many devices") || error.contains("429")
}

/// The view for `state`; `web_page` is the page the relay publishes if it has one (else a
/// logged-in daemon offers the relay's own page, signed in), `failure` why the last menu action
/// failed, if it did. Pure: the same inputs always give the same view.
pub fn view(state: &TrayState, web_page: Option<&str>, failure: Option<&str>) -> View {
    let mut view = state_view(state, web_page);
    if let Some(failure) = failure {
        view.menu
            .insert(1, Entry::Info(format!("Last action failed: {failure}")));
    }
    view
}

fn state_view(state: &TrayState, web_page: Option<&str>) -> View {
    let status = match state {
        TrayState::Starting => {
            return no_daemon_view("Looking for the cloudllm daemon…".to_owned());
        }
        TrayState::NoDaemon { reason } => {
            return no_daemon_view(format!("Cannot reach the cloudllm daemon: {reason}"));
        }
        TrayState::Daemon(status) => status,
    };
    let (look, headline, toggle) = match &status.connection {
        Connection::LoggedOut => (
            Look::Error,
            "Not logged in: run `cloudllm login`".to_owned(),
            None,
        ),
        Connection::LoginRequired { reason } => {
            (Look::Error, format!("Login required: {reason}"), None)
        }
        Connection::Disconnected => (
            Look::Disconnected,
            "Disconnected".to_owned(),
            Some(Action::Connect),
        ),
        Connection::Connecting => (
            Look::Connecting,
            "Connecting…".to_owned(),
            Some(Action::Disconnect),
        ),
        Connection::Reconnecting {
            attempt,
            last_error,
            ..
        } => {
            if device_limit(last_error) {
                (
                    Look::Error,
                    format!("Device limit reached: {last_error}"),
                    Some(Action::Disconnect),
                )
            } else {
                (
                    Look::Connecting,
                    format!("Reconnecting (attempt {attempt}): {last_error}"),
                    Some(Action::Disconnect),
                )
            }
        }
        Connection::Replaced { .. } => (
            Look::Error,
            "Replaced by another connection with the same device id: Connect takes it back"
                .to_owned(),
            Some(Action::Connect),
        ),
        Connection::Connected { .. } => match &status.ollama {
            Ollama::Down { error } => (
                Look::Error,
                format!("Connected, but Ollama is down: {error}"),
                Some(Action::Disconnect),
            ),
            _ => (
                Look::Connected,
                "Connected".to_owned(),
                Some(Action::Disconnect),
            ),
        },
    };
    let models = match &status.ollama {
        Ollama::Up { models, .. } => models.to_string(),
        Ollama::Down { .. } => "none (Ollama is down)".to_owned(),
        Ollama::Unknown => "not checked yet".to_owned(),
    };
    let facts = [
        format!(
            "Relay: {}",
            status.relay_url.as_deref().unwrap_or("not set")
        ),
        format!(
            "User: {}",
            status.user.as_deref().unwrap_or("not logged in")
        ),
        format!("Device: {}", status.device_name),
        format!("Models: {models}"),
    ];
    let tooltip = std::iter::once(format!("cloudllm: {headline}"))
        .chain(facts.iter().cloned())
        .collect::<Vec<_>>()
        .join("\n");

    let api_url = status.relay_url.as_deref().map(api_url);
    // The relay signs a browser in only for working credentials.
    let logged_in = status.user.is_some()
        && !matches!(
            status.connection,
            Connection::LoggedOut | Connection::LoginRequired { .. }
        );
    let web_page = match web_page {
        _ if api_url.is_none() => None,
        Some(page) => Some(WebPage::Published(page.to_owned())),
        None if logged_in => Some(WebPage::SignedIn),
        None => None,
    };
    let offers = Offers {
        toggle,
        api_url: api_url.is_some(),
        web_page: web_page.is_some(),
    };
    let menu = daemon_menu(headline, facts, offers);
    View {
        look,
        tooltip,
        menu,
        api_url,
        web_page,
    }
}

fn no_daemon_view(headline: String) -> View {
    View {
        look: Look::NoDaemon,
        tooltip: format!("cloudllm: {headline}"),
        menu: no_daemon_menu(headline),
        api_url: None,
        web_page: None,
    }
}

/// States, views and menu readings shared by the unit tests of this module and of
/// [`crate::menu`].
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub(crate) fn status(connection: Connection, ollama: Ollama) -> TrayState {
        TrayState::Daemon(Box::new(Status {
            daemon_version: "0.1.0".into(),
            connection,
            relay_url: Some("https://relay.example.com/".into()),
            user: Some("alice".into()),
            tier: None,
            device_name: "laptop".into(),
            ollama,
            requests_in_flight: 0,
            requests_total: 0,
            credential_store: "OS keyring".into(),
        }))
    }

    pub(crate) fn show(state: &TrayState) -> View {
        view(state, None, None)
    }

    pub(crate) fn up(models: usize) -> Ollama {
        Ollama::Up {
            version: "0.5.1".into(),
            models,
        }
    }

    /// The menu of a daemon with a tunnel up or on its way: everything but "Connect".
    pub(crate) const ONLINE_ACTIONS: [Action; 5] = [
        Action::Disconnect,
        Action::CopyApiUrl,
        Action::OpenWebPage,
        Action::ShowLogs,
        Action::Quit,
    ];

    /// The menu of a disconnected daemon: everything but "Disconnect".
    pub(crate) const OFFLINE_ACTIONS: [Action; 5] = [
        Action::Connect,
        Action::CopyApiUrl,
        Action::OpenWebPage,
        Action::ShowLogs,
        Action::Quit,
    ];

    pub(crate) fn actions(view: &View) -> Vec<Action> {
        view.menu
            .iter()
            .filter_map(|entry| match entry {
                Entry::Item { action, .. } => Some(*action),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn headline(view: &View) -> &str {
        match view.menu.first() {
            Some(Entry::Info(line)) => line,
            other => panic!("the menu starts with {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use crate::menu::item;

    #[test]
    fn connected_shows_facts_and_offers_disconnect() {
        let view = show(&status(
            Connection::Connected {
                since: 1,
                rtt_ms: Some(3),
            },
            up(3),
        ));
        assert_eq!(view.look, Look::Connected);
        assert_eq!(
            view.tooltip,
            "cloudllm: Connected\nRelay: https://relay.example.com/\nUser: alice\nDevice: laptop\nModels: 3"
        );
        assert_eq!(
            view.menu,
            vec![
                Entry::Info("Connected".into()),
                Entry::Info("Relay: https://relay.example.com/".into()),
                Entry::Info("User: alice".into()),
                Entry::Info("Device: laptop".into()),
                Entry::Info("Models: 3".into()),
                Entry::Separator,
                item("Disconnect", Action::Disconnect),
                item("Copy API URL", Action::CopyApiUrl),
                item("Open web page", Action::OpenWebPage),
                item("Show logs", Action::ShowLogs),
                Entry::Separator,
                item("Quit", Action::Quit),
            ]
        );
        assert_eq!(
            view.api_url.as_deref(),
            Some("https://relay.example.com/v1")
        );
        assert_eq!(view.web_page, Some(WebPage::SignedIn));
    }

    #[test]
    fn connecting_and_reconnecting_look_alike_and_offer_disconnect() {
        let connecting = show(&status(Connection::Connecting, up(1)));
        assert_eq!(connecting.look, Look::Connecting);
        assert_eq!(headline(&connecting), "Connecting…");
        assert!(actions(&connecting).contains(&Action::Disconnect));

        let reconnecting = show(&status(
            Connection::Reconnecting {
                attempt: 4,
                next_try: 99,
                last_error: "connection refused".into(),
            },
            up(1),
        ));
        assert_eq!(reconnecting.look, Look::Connecting);
        assert_eq!(
            headline(&reconnecting),
            "Reconnecting (attempt 4): connection refused"
        );
        assert!(reconnecting.tooltip.contains("Reconnecting (attempt 4)"));
        assert_eq!(actions(&reconnecting), ONLINE_ACTIONS);
    }

    #[test]
    fn errors_need_the_user_and_say_why() {
        let login = show(&status(
            Connection::LoginRequired {
                reason: "the refresh token was revoked".into(),
            },
            up(2),
        ));
        assert_eq!(login.look, Look::Error);
        assert_eq!(
            headline(&login),
            "Login required: the refresh token was revoked"
        );
        assert!(!actions(&login).contains(&Action::Connect));
        assert!(!actions(&login).contains(&Action::Disconnect));
        // The relay would refuse credentials that no longer work.
        assert!(!actions(&login).contains(&Action::OpenWebPage));

        let logged_out = show(&status(Connection::LoggedOut, Ollama::Unknown));
        assert_eq!(logged_out.look, Look::Error);
        assert!(headline(&logged_out).contains("cloudllm login"));
        assert_eq!(logged_out.web_page, None);
        assert!(logged_out.tooltip.contains("Models: not checked yet"));

        let limit = show(&status(
            Connection::Reconnecting {
                attempt: 1,
                next_try: 5,
                last_error: "relay refused the tunnel: HTTP 429: device limit of tier free".into(),
            },
            up(2),
        ));
        assert_eq!(limit.look, Look::Error);
        assert!(headline(&limit).starts_with("Device limit reached"));
        assert!(actions(&limit).contains(&Action::Disconnect));

        let ollama_down = show(&status(
            Connection::Connected {
                since: 1,
                rtt_ms: None,
            },
            Ollama::Down {
                error: "connection refused".into(),
            },
        ));
        assert_eq!(ollama_down.look, Look::Error);
        assert_eq!(
            headline(&ollama_down),
            "Connected, but Ollama is down: connection refused"
        );
        assert!(
            ollama_down
                .tooltip
                .contains("Models: none (Ollama is down)")
        );
        assert!(actions(&ollama_down).contains(&Action::Disconnect));
    }

    #[test]
    fn no_daemon_offers_only_quit() {
        for state in [
            TrayState::Starting,
            TrayState::NoDaemon {
                reason: "no socket at /run/x.sock".into(),
            },
        ] {
            let view = show(&state);
            assert_eq!(view.look, Look::NoDaemon);
            assert_eq!(actions(&view), vec![Action::Quit]);
            assert_eq!(view.api_url, None);
        }
        let view = show(&TrayState::NoDaemon {
            reason: "no socket at /run/x.sock".into(),
        });
        assert_eq!(
            view.tooltip,
            "cloudllm: Cannot reach the cloudllm daemon: no socket at /run/x.sock"
        );
    }

    #[test]
    fn unknown_relay_and_user_are_said_and_nothing_is_copied() {
        let TrayState::Daemon(mut status) = status(Connection::LoggedOut, up(0)) else {
            unreachable!()
        };
        status.relay_url = None;
        status.user = None;
        let view = show(&TrayState::Daemon(status));
        assert!(view.tooltip.contains("Relay: not set"));
        assert!(view.tooltip.contains("User: not logged in"));
        assert!(view.tooltip.contains("Models: 0"));
        assert_eq!(view.api_url, None);
        assert!(!actions(&view).contains(&Action::CopyApiUrl));
    }

    #[test]
    fn a_failed_action_is_said_under_the_headline() {
        let state = status(Connection::Disconnected, up(1));
        let view = view(&state, None, Some("permission denied"));
        assert_eq!(view.menu[0], Entry::Info("Disconnected".into()));
        assert_eq!(
            view.menu[1],
            Entry::Info("Last action failed: permission denied".into())
        );
        assert_eq!(view.look, show(&state).look);
    }

    #[test]
    fn api_url_has_one_slash() {
        assert_eq!(api_url("http://127.0.0.1:8080"), "http://127.0.0.1:8080/v1");
        assert_eq!(
            api_url("http://127.0.0.1:8080/"),
            "http://127.0.0.1:8080/v1"
        );
    }
}
