//! `cloudllmd`: run the cloudllm daemon in the foreground (as a service or by hand).

use std::path::PathBuf;

use clap::Parser;
use cloudllm_daemon::DaemonConfig;
use cloudllm_daemon::logs::LogBuffer;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// mimalloc rather than glibc's malloc: a request through the tunnel allocates and frees
/// dozens of small buffers, and glibc's allocator took about a tenth of the daemon's CPU per
/// request (issue 19).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "cloudllmd: keeps a tunnel from this machine's Ollama to a cloudllm relay",
    after_help = "Control it with `cloudllm` (login, status, connect, …).\n\
                  Environment: CLOUDLLM_RELAY_URL, CLOUDLLM_OLLAMA_URL, CLOUDLLM_TOKEN (an agent token, \
                  instead of `cloudllm login`), CLOUDLLM_DEVICE_NAME, RUST_LOG (log filter)."
)]
struct Cli {
    /// Config file [default: cloudllmd.toml in the platform config dir; /etc/cloudllm/ with --system].
    #[arg(long, env = "CLOUDLLM_CONFIG")]
    config: Option<PathBuf>,
    /// Run as a system service: socket in /run/cloudllm (/var/run/cloudllm on macOS), state in
    /// /var/lib/cloudllm.
    #[arg(long)]
    system: bool,
    /// Run under the Windows service control manager (as `cloudllm service install` registers it).
    #[cfg(windows)]
    #[arg(long)]
    service: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter =
        || tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Lines go out in batches (warnings at once): no system call per logged line.
    let (log_output, flush_log) = cloudllm_lifecycle::log_output::BatchedStderr::new();
    // Standard error in colour takes a layer of its own beside the plain lines of
    // `cloudllm logs`; without colour (a service's log, a file) one layer formats each line
    // once and writes it to both (the daemon logs a line per request).
    let colour = cloudllm_lifecycle::stderr_in_colour();
    let buffer = LogBuffer::global();
    let (coloured, plain) = if colour {
        let stderr = tracing_subscriber::fmt::layer()
            .with_ansi(true)
            .with_writer(log_output)
            .with_filter(filter());
        (Some(stderr), buffer.layer().with_filter(filter()).boxed())
    } else {
        let both = buffer.plain_layer(log_output).with_filter(filter());
        (None, both.boxed())
    };
    tracing_subscriber::registry()
        .with(plain)
        .with(coloured)
        .init();
    #[cfg(windows)]
    let result = if cli.service {
        load(&cli).and_then(cloudllm_daemon::windows_service::run)
    } else {
        run(cli)
    };
    #[cfg(not(windows))]
    let result = run(cli);
    // The log's last lines before the error that ends the process.
    drop(flush_log);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cloudllmd: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> anyhow::Result<DaemonConfig> {
    let path = cli
        .config
        .clone()
        .or_else(|| DaemonConfig::default_path(cli.system));
    let mut config = match &path {
        Some(path) if cli.config.is_some() || path.exists() => DaemonConfig::load(path)?,
        _ => DaemonConfig::default(),
    };
    config.file = path;
    config.system = cli.system;
    config.apply_env(|name| std::env::var(name).ok())?;
    config.validate()?;
    Ok(config)
}

/// One thread: the daemon carries one tunnel, whose HTTP/2 connection is one task that every
/// request passes through, and its blocking work (keyring, files) runs on tokio's blocking
/// pool. With a worker per core, each request woke threads on other cores to hand work over;
/// on one thread the daemon spent about a fifth less CPU per request (issue 19).
#[tokio::main(flavor = "current_thread")]
async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = load(&cli)?;
    let shutdown = CancellationToken::new();
    cloudllm_lifecycle::signal::cancel_on_stop_signal(
        shutdown.clone(),
        "finishing in-flight requests",
    );
    cloudllm_daemon::run(config, shutdown).await
}
