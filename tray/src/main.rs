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
    #[arg(long, env = cloudllm_cli::SOCKET_ENV)]
    socket: Option<PathBuf>,
    /// How long to wait for a system tray to appear before giving up (e.g. 10s, 500ms). At
    /// login the tray may start a moment before the panel does.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    wait_for_tray: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let socket = cloudllm_cli::socket_path(args.socket);
    match run(socket, args.wait_for_tray) {
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
