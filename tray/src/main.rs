//! `cloudllm-tray`: shows the cloudllm daemon's state as a tray icon with a menu.

// A release build on Windows opens no console window beside the icon.
#![cfg_attr(all(windows, not(debug_assertions)), windows_subsystem = "windows")]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Show the cloudllm daemon's state in the system tray.
#[derive(Parser)]
#[command(name = "cloudllm-tray", version)]
struct Args {
    /// The daemon's socket [default: the user daemon's, else the system daemon's].
    #[arg(long, env = cloudllm_ipc_client::SOCKET_ENV)]
    socket: Option<PathBuf>,
    /// How long to wait for a system tray to appear before giving up (e.g. 10s, 500ms). At
    /// login the tray may start a moment before the panel does.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    wait_for_tray: Duration,
}

/// Colours only on a terminal and never with `NO_COLOR` set: a log file gets plain text.
fn stderr_in_colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(stderr_in_colour())
        .init();
    let result = cloudllm_ipc_client::socket_path(args.socket)
        .map_err(anyhow::Error::from)
        .and_then(|socket| run(socket, args.wait_for_tray));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cloudllm-tray: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "gui")]
fn run(socket: PathBuf, wait_for_tray: Duration) -> anyhow::Result<()> {
    cloudllm_tray::app::run(socket, wait_for_tray)
}

#[cfg(not(feature = "gui"))]
fn run(_socket: PathBuf, _wait_for_tray: Duration) -> anyhow::Result<()> {
    anyhow::bail!(
        "built without the `gui` feature (no GTK): rebuild with `cargo build -p cloudllm-tray`, or use `cloudllm status`"
    )
}
