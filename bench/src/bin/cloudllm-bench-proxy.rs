//! `cloudllm-bench-proxy`: the minimal hyper reverse proxy that `cloudllm-bench compare` chains
//! twice as the reference for the relay and the daemon (see
//! `cloudllm_bench::paths::hyper_proxy`). Prints `listening on ADDR` once it listens, then
//! serves until it is stopped.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use cloudllm_bench::paths::hyper_proxy;

#[derive(Parser)]
#[command(about = "A minimal HTTP/1 reverse proxy (hyper server → pooled hyper client)")]
struct Cli {
    /// Where to listen (port 0: any free port, printed on stdout).
    #[arg(long)]
    listen: SocketAddr,
    /// Where to forward every request.
    #[arg(long)]
    upstream: SocketAddr,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cloudllm_bench::log_to_stderr();
    cloudllm_bench::exit_code(
        "cloudllm-bench-proxy",
        run(&cli).map(|()| ExitCode::SUCCESS),
    )
}

#[tokio::main]
async fn run(cli: &Cli) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", cli.listen))?;
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "{}{}",
        hyper_proxy::READY_PREFIX,
        listener.local_addr()?
    )?;
    stdout.flush()?;
    hyper_proxy::serve(listener, cli.upstream).await;
    Ok(())
}
