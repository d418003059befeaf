//! How cloudllm's long-lived processes (`cloudllm-relay serve` and `cloudllmd`) start and stop
//! under a service manager: one implementation, so the relay and the daemon cannot drift apart.
//!
//! - [`signal`]: the first SIGTERM or Ctrl-C starts a graceful stop (tunnels and requests in
//!   flight drain); a second one exits at once with code 130.
//! - [`service`]: systemd's `Type=notify` protocol: `READY=1` once the process serves,
//!   `WATCHDOG=1` keep-alives, `STOPPING=1` when the graceful stop begins.
//! - [`log_output`]: their log lines go to standard error in batches, not one system call per
//!   line.
//! - [`stderr_in_colour`]: whether their log on standard error may carry colour codes (never
//!   under journald, in a file or a pipe).
//!
//! The Windows service control manager has its own protocol (`cloudllm_daemon::windows_service`).

#![forbid(unsafe_code)]

pub mod log_output;
pub mod service;
pub mod signal;

/// Whether standard error should carry terminal colours: only on a terminal, and never with
/// `NO_COLOR` set (<https://no-color.org>). journald, a file or a pipe gets plain text.
pub fn stderr_in_colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
