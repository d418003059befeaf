//! How cloudllm's long-lived processes (`cloudllm-relay serve` and `cloudllmd`) start and stop
//! under a service manager: one implementation, so the relay and the daemon cannot drift apart.
//!
//! - [`signal`]: the first SIGTERM or Ctrl-C starts a graceful stop (tunnels and requests in
//!   flight drain); a second one exits at once with code 130.
//! - [`service`]: systemd's `Type=notify` protocol: `READY=1` once the process serves,
//!   `WATCHDOG=1` keep-alives, `STOPPING=1` when the graceful stop begins.
//!
//! The Windows service control manager has its own protocol (`cloudllm_daemon::windows_service`).

#![forbid(unsafe_code)]

pub mod service;
pub mod signal;
