//! The tray's menu: its entries, what each clickable one does ([`Action`]), and how the menu
//! for a daemon state is laid out. The menu always repeats the tooltip's facts as disabled
//! lines, because the Linux AppIndicator protocol has no tooltips; [`crate::view`] decides
//! what those facts and the headline are.

/// Something a menu item does when clicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Ask the daemon to open the tunnel.
    Connect,
    /// Ask the daemon to close the tunnel.
    Disconnect,
    /// Put the relay's API base URL on the clipboard.
    CopyApiUrl,
    /// Open the relay's web page in the browser.
    OpenWebPage,
    /// Show the daemon's recent log lines in a text viewer.
    ShowLogs,
    /// Quit the tray (never the daemon).
    Quit,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 6] = [
        Action::Connect,
        Action::Disconnect,
        Action::CopyApiUrl,
        Action::OpenWebPage,
        Action::ShowLogs,
        Action::Quit,
    ];

    /// The menu item id that carries this action.
    pub fn id(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Disconnect => "disconnect",
            Action::CopyApiUrl => "copy-api-url",
            Action::OpenWebPage => "open-web-page",
            Action::ShowLogs => "show-logs",
            Action::Quit => "quit",
        }
    }

    /// The action a menu item id stands for, if any.
    pub fn from_id(id: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|action| action.id() == id)
    }
}

/// One menu entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A line of text that cannot be clicked.
    Info(String),
    /// A clickable item.
    Item {
        /// Its label.
        label: String,
        /// What it does.
        action: Action,
    },
    /// A separator line.
    Separator,
}

/// Whether two menus have the same items in the same places, differing at most in their texts:
/// then the shown menu can be relabelled in place instead of replaced, which would close it
/// under the user's pointer (a reconnecting daemon changes the status line every attempt).
pub fn same_layout(a: &[Entry], b: &[Entry]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|pair| match pair {
            (Entry::Info(_), Entry::Info(_)) | (Entry::Separator, Entry::Separator) => true,
            (Entry::Item { action: x, .. }, Entry::Item { action: y, .. }) => x == y,
            _ => false,
        })
}

/// What the menu of a reachable daemon offers besides its headline and facts.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Offers {
    /// Connect or Disconnect, when either makes sense in this state.
    pub toggle: Option<Action>,
    /// "Copy API URL": the relay is known.
    pub api_url: bool,
    /// "Open web page": the relay publishes one, or the daemon can sign a browser in on the
    /// relay's own.
    pub web_page: bool,
}

/// The menu of a reachable daemon: the headline and facts as lines, then what it `offers`,
/// "Show logs" and "Quit".
pub(crate) fn daemon_menu(
    headline: String,
    facts: impl IntoIterator<Item = String>,
    offers: Offers,
) -> Vec<Entry> {
    let mut menu = vec![Entry::Info(headline)];
    menu.extend(facts.into_iter().map(Entry::Info));
    menu.push(Entry::Separator);
    match offers.toggle {
        Some(Action::Connect) => menu.push(item("Connect", Action::Connect)),
        Some(_) => menu.push(item("Disconnect", Action::Disconnect)),
        None => {}
    }
    if offers.api_url {
        menu.push(item("Copy API URL", Action::CopyApiUrl));
    }
    if offers.web_page {
        menu.push(item("Open web page", Action::OpenWebPage));
    }
    menu.push(item("Show logs", Action::ShowLogs));
    menu.push(Entry::Separator);
    menu.push(item("Quit", Action::Quit));
    menu
}

/// The menu while the daemon cannot be reached: why, how to start it, and "Quit".
pub(crate) fn no_daemon_menu(headline: String) -> Vec<Entry> {
    vec![
        Entry::Info(headline),
        Entry::Info("Start it with `cloudllm daemon` or `cloudllm service install`".to_owned()),
        Entry::Separator,
        item("Quit", Action::Quit),
    ]
}

/// A clickable item.
pub(crate) fn item(label: &str, action: Action) -> Entry {
    Entry::Item {
        label: label.to_owned(),
        action,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::fixtures::*;
    use crate::view::{Look, TrayState, WebPage, view};
    use cloudllm_proto::ipc::Connection;

    #[test]
    fn disconnected_offers_connect_only() {
        let view = show(&status(Connection::Disconnected, up(2)));
        assert_eq!(view.look, Look::Disconnected);
        assert_eq!(headline(&view), "Disconnected");
        assert_eq!(actions(&view), OFFLINE_ACTIONS);
    }

    #[test]
    fn the_web_page_is_the_relays_published_one_else_its_own_signed_in() {
        let state = status(
            Connection::Connected {
                since: 1,
                rtt_ms: None,
            },
            up(1),
        );
        let page = "https://relay.example.com/account";
        let with_page = view(&state, Some(page), None);
        assert_eq!(with_page.web_page, Some(WebPage::Published(page.into())));
        assert_eq!(actions(&with_page), ONLINE_ACTIONS);
        // Without one, the relay's own page, signed in by the daemon (`cloudllm open`).
        let own = show(&state);
        assert_eq!(own.web_page, Some(WebPage::SignedIn));
        assert_eq!(actions(&own), actions(&with_page));
        let gone = TrayState::NoDaemon {
            reason: "the daemon stopped".into(),
        };
        assert_eq!(view(&gone, Some(page), None).web_page, None);
        let logged_out = status(Connection::LoggedOut, up(1));
        assert!(!actions(&show(&logged_out)).contains(&Action::OpenWebPage));
    }

    #[test]
    fn a_reconnecting_menu_keeps_its_layout_but_a_disconnected_one_does_not() {
        let reconnecting = |attempt| {
            show(&status(
                Connection::Reconnecting {
                    attempt,
                    next_try: 9,
                    last_error: "refused".into(),
                },
                up(1),
            ))
        };
        let (first, second) = (reconnecting(1), reconnecting(2));
        assert_ne!(first.menu, second.menu);
        assert!(same_layout(&first.menu, &second.menu));
        let disconnected = show(&status(Connection::Disconnected, up(1)));
        assert!(!same_layout(&first.menu, &disconnected.menu));
        let gone = show(&TrayState::Starting);
        assert!(!same_layout(&first.menu, &gone.menu));
    }

    #[test]
    fn action_ids_round_trip() {
        for action in Action::ALL {
            assert_eq!(Action::from_id(action.id()), Some(action));
        }
        assert_eq!(Action::from_id("format-disk"), None);
    }
}
