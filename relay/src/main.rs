//! `cloudllm-relay`: run the relay, or mint tokens with its secret.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cloudllm_lifecycle::{service, signal};
use cloudllm_proto::Secret;
use cloudllm_relay::{Keys, RelayConfig, Scope};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "The cloudllm relay: reach the Ollama on your own machine from anywhere"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve {
        /// Address to listen on [default: 127.0.0.1:8080, or `listen` in the config file].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Config file (TOML).
        #[arg(long, env = "CLOUDLLM_RELAY_CONFIG")]
        config: Option<PathBuf>,
        /// Development mode: without a configured secret, generate a throwaway one and print
        /// ready-to-use tokens. Never for production: tokens die with the process.
        #[arg(long)]
        dev: bool,
    },
    /// Check a config file (and the environment's secret) without starting: exit 0 if the relay
    /// would start with it.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// Manage tokens signed with this relay's secret.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Operate a cluster through its Redis (the config's [cluster] table).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// List the live nodes and how many devices each holds.
    Status {
        /// The config file the nodes run with.
        #[arg(long, env = "CLOUDLLM_RELAY_CONFIG")]
        config: PathBuf,
    },
    /// Close every tunnel of a user, on every node.
    DropUser {
        /// The user whose tunnels close.
        #[arg(long)]
        user: String,
        /// The config file the nodes run with.
        #[arg(long, env = "CLOUDLLM_RELAY_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new token: `agent` for a daemon, `client` for API callers.
    Issue {
        /// The user the token belongs to.
        #[arg(long)]
        user: String,
        /// What the token may do.
        #[arg(long, value_enum)]
        scope: Scope,
        /// The user's tier.
        #[arg(long)]
        tier: Option<String>,
        /// How long the token is valid, e.g. `12h`, `30d`.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Config file holding the secret (else CLOUDLLM_RELAY_SECRET).
        #[arg(long, env = "CLOUDLLM_RELAY_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<RelayConfig> {
    let mut config = match path {
        Some(path) => RelayConfig::load(path)?,
        None => RelayConfig::default(),
    };
    config.apply_env();
    Ok(config)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Lines go out in batches (warnings at once): no system call per logged line.
    let (log_output, flush_log) = cloudllm_lifecycle::log_output::BatchedStderr::new();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(log_output)
        .with_ansi(cloudllm_lifecycle::stderr_in_colour())
        .init();
    let result =
        match cli.command {
            Command::Serve {
                listen,
                config,
                dev,
            } => serve(listen, config, dev),
            Command::CheckConfig { file } => load_config(Some(&file)).and_then(|config| {
                config.validate()?;
                let auth = match (&config.secret, &config.jwks) {
                    (Some(_), Some(jwks)) => format!("own HS256 secret and JWKS from {}", jwks.url),
                    (Some(_), None) => "own HS256 secret".to_owned(),
                    (None, Some(jwks)) => format!("JWKS from {}", jwks.url),
                    (None, None) => "none".to_owned(),
                };
                let login = config
                    .login
                    .as_ref()
                    .map_or("operator-issued tokens (--with-token)".to_owned(), |l| {
                        format!("OpenID provider {}", l.issuer)
                    });
                let audit = config.audit_log.as_deref().unwrap_or("off");
                let tls = config.tls.as_ref().map_or(
                    "off (plain HTTP, for a TLS-terminating proxy in front)".to_owned(),
                    |tls| format!("cert {}, key {}", tls.cert.display(), tls.key.display()),
                );
                let tiers: Vec<String> = config
                .tiers
                .iter()
                .map(|(name, t)| {
                    format!(
                        "{name}{} ({}/min, {} at once, {} device(s), body {} bytes, streams {})",
                        if *name == config.default_tier { ", default" } else { "" },
                        t.requests_per_minute,
                        t.concurrent_requests,
                        t.devices,
                        t.max_body_bytes,
                        humantime::format_duration(t.max_stream)
                    )
                })
                .collect();
                let metrics = config
                    .metrics_listen
                    .map_or("/metrics on the main address".to_owned(), |addr| {
                        format!("/metrics on {addr}")
                    });
                print_out(&format!(
                    "{}: ok\n  listen: {}\n  tls: {tls}\n  tokens: {auth}\n  login: {login}\n  \
                 tier claim: {}\n  tiers: {}\n  audit log: {audit}\n  metrics: {metrics}",
                    file.display(),
                    config.listen,
                    config.tier_claim,
                    tiers.join("; ")
                ))
            }),
            Command::Token {
                command:
                    TokenCommand::Issue {
                        user,
                        scope,
                        tier,
                        ttl,
                        config,
                    },
            } => load_config(config.as_ref()).and_then(|config| {
                let keys = Keys::new(config.require_secret()?);
                print_out(&keys.issue(&user, scope, tier.as_deref(), ttl)?)
            }),
            Command::Cluster { command } => cluster_command(command),
        };
    // The log's last lines before the error that ends the process.
    drop(flush_log);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cloudllm-relay: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn serve(listen: Option<SocketAddr>, path: Option<PathBuf>, dev: bool) -> anyhow::Result<()> {
    let mut config = load_config(path.as_ref())?;
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if dev && config.secret.is_none() {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|err| anyhow::anyhow!("no randomness: {err}"))?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        config.secret = Some(Secret::new(hex));
    }
    // Installed before the relay says it listens: the default actions of SIGHUP, SIGTERM and
    // SIGINT would end the process without draining.
    #[cfg(unix)]
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let shutdown = CancellationToken::new();
    signal::cancel_on_stop_signal(shutdown.clone(), "draining tunnels");
    let relay = cloudllm_relay::serve(config.clone(), shutdown.clone()).await?;
    // Listening: tell systemd (`Type=notify`), keep its watchdog fed from this runtime, and
    // say `STOPPING=1` when the drain begins.
    let running = service::announce_ready(&shutdown);
    if dev {
        print_dev_tokens(&config, relay.addr)?;
    }
    #[cfg(unix)]
    tokio::spawn(reload_on_hangup(hangup, relay.tls.clone()));
    let result = relay.done.await.context("relay task")?;
    running.finish().await;
    result
}

#[tokio::main(flavor = "current_thread")]
async fn cluster_command(command: ClusterCommand) -> anyhow::Result<()> {
    use cloudllm_relay::cluster::admin;
    match command {
        ClusterCommand::Status { config: file } => {
            let config = load_config(Some(&file))?;
            print_out(&admin::status(&config, &file).await?.to_string())
        }
        ClusterCommand::DropUser { user, config: file } => {
            let config = load_config(Some(&file))?;
            print_out(&admin::drop_user(&config, &file, &user).await?.to_string())
        }
    }
}

/// SIGHUP: read the TLS certificate and key files again (after a renewal). A failed reload
/// keeps the current certificate and logs why.
#[cfg(unix)]
async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    tls: Option<cloudllm_relay::tls::Tls>,
) {
    while hangup.recv().await.is_some() {
        match &tls {
            // Logs the outcome itself.
            Some(tls) => {
                let _ = tls.reload();
            }
            None => tracing::info!("SIGHUP: nothing to reload (no [tls] in the config)"),
        }
    }
}

fn print_dev_tokens(config: &RelayConfig, addr: SocketAddr) -> anyhow::Result<()> {
    let keys = Keys::new(config.require_secret()?);
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let ttl = Duration::from_secs(24 * 3600);
    let agent = keys.issue("dev", Scope::Agent, Some("premium"), ttl)?;
    let client = keys.issue("dev", Scope::Client, Some("premium"), ttl)?;
    print_out(&format!(
        "\nDevelopment mode: throwaway secret, tokens for user \"dev\" valid 24 h.\n\n\
         Start the daemon on the machine with Ollama:\n  \
         CLOUDLLM_RELAY_URL={scheme}://{addr} CLOUDLLM_TOKEN={agent} cloudllmd\n\n\
         Then call your Ollama through the relay:\n  \
         curl -H 'Authorization: Bearer {client}' {scheme}://{addr}/api/tags\n"
    ))
}

/// Writes `text` and a newline to standard output. A reader that has gone away (`… | head -1`)
/// is not an error: it wanted no more, and a serving relay carries on (`println!` would panic
/// there).
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(err).context("writing to standard output"))
        }
        _ => Ok(()),
    }
}
