//! `cloudllm-tray`: the status icon of the cloudllm daemon, a thin client of its IPC socket.
//!
//! The daemon owns all state; the tray follows its `watch` stream and turns menu clicks into
//! IPC calls. [`view`] maps a daemon state to the icon, tooltip and menu (a pure function),
//! [`icon`] draws the icons, [`daemon`] talks to the daemon on a thread of its own, and `app`
//! (feature `gui`) runs the platform's event loop with the icon.

pub mod daemon;
pub mod icon;
pub mod view;

#[cfg(feature = "gui")]
pub mod app;
#[cfg(feature = "gui")]
pub mod host;
