//! Is there somewhere to show the icon? On Linux a tray needs a display and a tray host: a
//! StatusNotifier watcher on the session bus (KDE, GNOME with the AppIndicator extension, most
//! panels) or an XEmbed system tray on the X display (older panels, `trayer`). Without one the
//! icon would silently go nowhere, so the tray says so in one line and exits instead.
//!
//! macOS and Windows always have a menu bar / notification area.

use std::time::Duration;

/// Between two looks for a tray host.
#[cfg(target_os = "linux")]
const HOST_POLL: Duration = Duration::from_millis(250);

/// Why the tray cannot be shown, in one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum NoHost {
    /// Not in a graphical session at all (a server, an SSH login).
    #[error(
        "no display (neither DISPLAY nor WAYLAND_DISPLAY is set): the tray needs a desktop session; use `cloudllm status` instead"
    )]
    NoDisplay,
    /// The X display named in `DISPLAY` does not answer.
    #[error("cannot open the display {display}: {reason}")]
    BadDisplay {
        /// The `DISPLAY` value.
        display: String,
        /// Why.
        reason: String,
    },
    /// A display, but no panel that shows tray icons.
    #[error(
        "no system tray on this display (no StatusNotifier watcher on the session bus and no XEmbed tray) after {0:?}; use `cloudllm status` instead"
    )]
    NoTray(Duration),
}

/// Waits up to `wait` for a tray host; `Ok` once there is one.
#[cfg(target_os = "linux")]
pub fn wait_for_host(wait: Duration) -> Result<(), NoHost> {
    let display = std::env::var("DISPLAY").ok().filter(|d| !d.is_empty());
    let wayland = std::env::var_os("WAYLAND_DISPLAY").is_some_and(|d| !d.is_empty());
    if display.is_none() && !wayland {
        return Err(NoHost::NoDisplay);
    }
    let x11 = match &display {
        Some(name) => match x11rb::connect(Some(name)) {
            Ok(connection) => Some(connection),
            Err(err) if !wayland => {
                return Err(NoHost::BadDisplay {
                    display: name.clone(),
                    reason: err.to_string(),
                });
            }
            Err(_) => None,
        },
        None => None,
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        let xembed = x11
            .as_ref()
            .is_some_and(|(connection, screen)| xembed_tray(connection, *screen));
        if xembed || status_notifier_watcher() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(NoHost::NoTray(wait));
        }
        std::thread::sleep(HOST_POLL);
    }
}

/// Other platforms always have a place for the icon.
#[cfg(not(target_os = "linux"))]
pub fn wait_for_host(_wait: Duration) -> Result<(), NoHost> {
    Ok(())
}

/// Whether an XEmbed system tray owns the `_NET_SYSTEM_TRAY_S<screen>` selection (the
/// freedesktop System Tray protocol).
#[cfg(target_os = "linux")]
fn xembed_tray(connection: &impl x11rb::connection::Connection, screen: usize) -> bool {
    use x11rb::protocol::xproto::ConnectionExt as _;
    let name = format!("_NET_SYSTEM_TRAY_S{screen}");
    let Ok(Ok(atom)) = connection
        .intern_atom(false, name.as_bytes())
        .map(|cookie| cookie.reply())
    else {
        return false;
    };
    connection
        .get_selection_owner(atom.atom)
        .ok()
        .and_then(|cookie| cookie.reply().ok())
        .is_some_and(|reply| reply.owner != x11rb::NONE)
}

/// Whether a StatusNotifier watcher is on the session bus (where AppIndicator icons go).
#[cfg(target_os = "linux")]
fn status_notifier_watcher() -> bool {
    use gio::prelude::*;
    /// A local bus call answers in microseconds; this only bounds a wedged bus.
    const TIMEOUT_MS: i32 = 1000;
    let Ok(bus) = gio::bus_get_sync(gio::BusType::Session, None::<&gio::Cancellable>) else {
        return false;
    };
    bus.call_sync(
        Some("org.freedesktop.DBus"),
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "NameHasOwner",
        Some(&("org.kde.StatusNotifierWatcher",).to_variant()),
        Some(gio::glib::VariantTy::new("(b)").expect("a valid type string")),
        gio::DBusCallFlags::NONE,
        TIMEOUT_MS,
        None::<&gio::Cancellable>,
    )
    .ok()
    .and_then(|reply| reply.get::<(bool,)>())
    .is_some_and(|(owned,)| owned)
}
