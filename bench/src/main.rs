//! `cloudllm-bench`: measure a fake Ollama directly and through cloudllm, print the table.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "Measures requests to a fake Ollama backend directly and through cloudllm's relay and daemon",
    after_help = "Missing a target is not an error: the exit status is 0 whenever the run completes. \
                  Logs go to stderr; RUST_LOG defaults to `warn` so that logging does not skew the figures."
)]
struct Cli {
    /// A shorter run (well under a minute), with fewer requests and repetitions.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cloudllm-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let report = cloudllm_bench::run(&cloudllm_bench::Options { quick: cli.quick })?;
    print!("{report}");
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
