//! `cloudllm-tray`: the status icon of the cloudllm daemon, a thin client of its IPC socket
//! (through `cloudllm_ipc_client`).
//!
//! The daemon owns all state; the tray follows its `watch` stream and turns menu clicks into
//! IPC calls. Layout:
//! - [`view`]: a daemon state → the icon's look, the tooltip and the menu (a pure function);
//! - [`menu`]: the menu's entries and actions, and how a menu is laid out;
//! - [`icon`]: draws each look;
//! - [`daemon`]: talks to the daemon on a thread of its own;
//! - `app` (feature `gui`): runs the platform's event loop with the icon, and `host` checks
//!   first that there is a tray to show it in.

pub mod daemon;
pub mod icon;
pub mod menu;
pub mod view;

#[cfg(feature = "gui")]
pub mod app;
#[cfg(feature = "gui")]
pub mod host;
