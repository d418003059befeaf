//! The GUI: one event loop (tao: GTK on Linux, AppKit on macOS, Win32 on Windows) that owns
//! the tray icon and its menu, and draws whatever [`view`] says for the latest daemon state.
//!
//! The IPC client runs on its own thread ([`crate::daemon`]) and posts events into this loop
//! through its proxy; menu clicks come in the same way and go back as [`Action`]s. Nothing here
//! decides anything: the look, tooltip and menu all come from the pure [`view`] function.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tao::event::{Event, StartCause};
use tao::event_loop::{ControlFlow, EventLoopBuilder};
use tracing::{info, warn};
use tray_icon::menu::{Menu, MenuEvent, MenuId, MenuItem, PredefinedMenuItem};
use tray_icon::{Icon, TrayIcon, TrayIconBuilder};

use crate::daemon;
use crate::host;
use crate::icon;
use crate::menu::{Action, Entry, same_layout};
use crate::view::{Look, TrayState, View, WebPage, view};

/// What reaches the event loop from other threads.
#[derive(Debug)]
enum UserEvent {
    /// From the IPC thread.
    Daemon(daemon::Event),
    /// A menu item was clicked.
    Menu(MenuId),
}

/// Shows the tray for the daemon at `socket` until the user picks Quit. Fails (before showing
/// anything) only when no tray host appears within `wait_for_tray`; a missing daemon is a
/// state, not an error.
pub fn run(socket: PathBuf, wait_for_tray: std::time::Duration) -> anyhow::Result<()> {
    host::wait_for_host(wait_for_tray)?;
    let event_loop = EventLoopBuilder::<UserEvent>::with_user_event().build();

    let proxy = event_loop.create_proxy();
    MenuEvent::set_event_handler(Some(move |event: MenuEvent| {
        let _ = proxy.send_event(UserEvent::Menu(event.id));
    }));
    let proxy = event_loop.create_proxy();
    let actions = daemon::spawn(socket, move |event| {
        let _ = proxy.send_event(UserEvent::Daemon(event));
    })
    .context("starting the IPC thread")?;

    let icons = Look::ALL
        .into_iter()
        .map(|look| {
            Ok((
                look,
                Icon::from_rgba(icon::rgba(look), icon::SIZE, icon::SIZE)?,
            ))
        })
        .collect::<Result<HashMap<_, _>, tray_icon::BadIcon>>()
        .context("drawing the icons")?;
    let icon_dir = icon_dir().context("creating a directory for the icon's image files")?;
    let mut tray: Option<Tray> = None;
    // What the daemon said last; kept outside the icon, which exists only once the loop runs.
    let mut state = TrayState::Starting;
    let mut failure: Option<String> = None;
    let mut web_page: Option<String> = None;

    event_loop.run(move |event, _, control_flow| {
        *control_flow = ControlFlow::Wait;
        match event {
            // The icon is created once the loop runs: macOS needs its application running first.
            Event::NewEvents(StartCause::Init) => {
                match Tray::new(
                    icon_dir.path(),
                    icons.clone(),
                    view(&state, web_page.as_deref(), failure.as_deref()),
                ) {
                    Ok(created) => tray = Some(created),
                    Err(err) => {
                        eprintln!("cloudllm-tray: cannot show the tray icon: {err:#}");
                        *control_flow = ControlFlow::ExitWithCode(1);
                    }
                }
            }
            Event::UserEvent(UserEvent::Daemon(event)) => {
                match event {
                    daemon::Event::State(new) => state = new,
                    daemon::Event::ActionDone(outcome) => failure = outcome,
                    daemon::Event::WebPage(page) => web_page = page,
                }
                if let Some(tray) = &mut tray {
                    tray.show(view(&state, web_page.as_deref(), failure.as_deref()));
                }
            }
            Event::UserEvent(UserEvent::Menu(id)) => {
                let Some(action) = Action::from_id(id.as_ref()) else {
                    return;
                };
                info!(?action, "menu");
                match action {
                    Action::Quit => *control_flow = ControlFlow::Exit,
                    Action::CopyApiUrl => {
                        if let Some(tray) = &mut tray {
                            failure = tray.copy_api_url().err();
                            tray.show(view(&state, web_page.as_deref(), failure.as_deref()));
                        }
                    }
                    Action::OpenWebPage => {
                        let Some(tray) = &mut tray else { return };
                        match tray.shown.web_page.clone() {
                            // The relay's own page: the daemon asks for a one-time link.
                            Some(WebPage::SignedIn) if !actions.try_send(action) => {
                                warn!(?action, "the daemon is busy; click ignored");
                            }
                            Some(WebPage::Published(url)) => {
                                failure = open::that_detached(&url)
                                    .map_err(|err| format!("cannot open {url}: {err}"))
                                    .err();
                                tray.show(view(&state, web_page.as_deref(), failure.as_deref()));
                            }
                            Some(WebPage::SignedIn) | None => {}
                        }
                    }
                    Action::Connect | Action::Disconnect | Action::ShowLogs => {
                        if !actions.try_send(action) {
                            warn!(?action, "the daemon is busy; click ignored");
                        }
                    }
                }
            }
            _ => {}
        }
    })
}

/// A directory of this process's own (mode 0700, removed when the tray ends) for the image
/// files the Linux tray hands to the desktop, in `$XDG_RUNTIME_DIR` when there is one.
///
/// Why: by default every program built on `tray-icon` writes `tray-icon/tray-icon-<id>-<n>.png`
/// under one shared directory and deletes the previous file on each change, so two trays
/// running at once (two users on one machine without a runtime directory, or two daemons'
/// trays) delete each other's images and show a broken icon or a stale one.
fn icon_dir() -> std::io::Result<tempfile::TempDir> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute() && dir.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let mut builder = tempfile::Builder::new();
    builder.prefix("cloudllm-tray-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o700));
    }
    builder.tempdir_in(base)
}

/// The icon, its menu, and what they show now.
struct Tray {
    icon: TrayIcon,
    icons: HashMap<Look, Icon>,
    shown: View,
    /// The shown menu's items, by position (`None` for separators), for relabelling in place.
    items: Vec<Option<MenuItem>>,
    /// Kept alive: on X11 the clipboard's content lives as long as its owner.
    clipboard: Option<arboard::Clipboard>,
}

impl Tray {
    fn new(icon_dir: &Path, icons: HashMap<Look, Icon>, shown: View) -> anyhow::Result<Tray> {
        let (menu, items) = build_menu(&shown.menu)?;
        let icon = TrayIconBuilder::new()
            .with_id("cloudllm")
            .with_temp_dir_path(icon_dir)
            .with_icon(icons[&shown.look].clone())
            .with_tooltip(&shown.tooltip)
            .with_menu(Box::new(menu))
            .with_menu_on_left_click(true)
            .build()
            .context("creating the tray icon")?;
        Ok(Tray {
            icon,
            icons,
            shown,
            items,
            clipboard: None,
        })
    }

    /// Updates what differs between the shown view and `next`.
    fn show(&mut self, next: View) {
        if next.look != self.shown.look {
            info!(look = ?next.look, "icon");
            if let Err(err) = self.icon.set_icon(Some(self.icons[&next.look].clone())) {
                warn!(error = %err, "cannot change the icon");
            }
        }
        if next.tooltip != self.shown.tooltip
            && let Err(err) = self.icon.set_tooltip(Some(&next.tooltip))
        {
            warn!(error = %err, "cannot change the tooltip");
        }
        if same_layout(&next.menu, &self.shown.menu) {
            for ((entry, old), item) in next.menu.iter().zip(&self.shown.menu).zip(&self.items) {
                if let (Some(item), true) = (item, entry != old) {
                    item.set_text(label(entry));
                }
            }
        } else {
            match build_menu(&next.menu) {
                Ok((menu, items)) => {
                    self.icon.set_menu(Some(Box::new(menu)));
                    self.items = items;
                }
                Err(err) => warn!(error = %err, "cannot build the menu"),
            }
        }
        self.shown = next;
    }

    /// Puts the shown API URL on the clipboard.
    fn copy_api_url(&mut self) -> Result<(), String> {
        let Some(url) = self.shown.api_url.clone() else {
            return Ok(());
        };
        let copied = match &mut self.clipboard {
            Some(clipboard) => clipboard.set_text(url),
            None => arboard::Clipboard::new().and_then(|mut clipboard| {
                clipboard.set_text(url)?;
                self.clipboard = Some(clipboard);
                Ok(())
            }),
        };
        copied.map_err(|err| format!("cannot use the clipboard: {err}"))
    }
}

/// The toolkit's menu for `entries`, and its items by position (`None` for separators).
fn build_menu(entries: &[Entry]) -> anyhow::Result<(Menu, Vec<Option<MenuItem>>)> {
    let menu = Menu::new();
    let mut items = Vec::with_capacity(entries.len());
    for entry in entries {
        let item = match entry {
            Entry::Info(text) => Some(MenuItem::new(text, false, None)),
            Entry::Item { label, action } => {
                Some(MenuItem::with_id(action.id(), label, true, None))
            }
            Entry::Separator => None,
        };
        match &item {
            Some(item) => menu.append(item)?,
            None => menu.append(&PredefinedMenuItem::separator())?,
        }
        items.push(item);
    }
    Ok((menu, items))
}

/// The text an entry shows.
fn label(entry: &Entry) -> &str {
    match entry {
        Entry::Info(text) | Entry::Item { label: text, .. } => text,
        Entry::Separator => "",
    }
}
