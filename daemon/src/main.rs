//! `cloudllmd`: run the cloudllm daemon in the foreground.

use std::path::PathBuf;

use clap::Parser;
use cloudllm_daemon::DaemonConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "cloudllmd: keeps a tunnel from this machine's Ollama to a cloudllm relay",
    after_help = "Environment: CLOUDLLM_RELAY_URL, CLOUDLLM_OLLAMA_URL, CLOUDLLM_TOKEN (agent token), \
                  CLOUDLLM_DEVICE_NAME, RUST_LOG (log filter)."
)]
struct Cli {
    /// Config file [default: cloudllmd.toml in the platform config dir, if it exists].
    #[arg(long, env = "CLOUDLLM_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cloudllmd: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> anyhow::Result<DaemonConfig> {
    let mut config = match &cli.config {
        Some(path) => DaemonConfig::load(path)?,
        None => match DaemonConfig::default_path().filter(|p| p.exists()) {
            Some(path) => DaemonConfig::load(&path)?,
            None => DaemonConfig::default(),
        },
    };
    config.apply_env(|name| std::env::var(name).ok())?;
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = load(&cli)?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(
            "shutting down: finishing in-flight requests (a second signal exits at once)"
        );
        signal.cancel();
        wait_for_signal().await;
        std::process::exit(130);
    });
    cloudllm_daemon::run(config, shutdown).await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
