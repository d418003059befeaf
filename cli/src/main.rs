//! `cloudllm`: parses the command line and runs one command (see the library's root for the
//! layout). Commands that need no daemon run first; every other one connects to the daemon's
//! socket and hands the connection to its module.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cloudllm_cli::args::{Cli, Command};
use cloudllm_cli::exit::{EXIT_FAILED, Failure};
use cloudllm_cli::{
    completions, config, daemon, login, logs, models, open, service, session, status,
};
use cloudllm_ipc_client::{Client, socket_path};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cloudllm: {err}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("cloudllm: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    let socket = cli.socket;
    match cli.command {
        Command::Completions { shell } => Ok(completions::print(shell)),
        Command::Daemon { args } => daemon::run(&args),
        Command::Service { command } => service::run(command),
        Command::Login(args) => login::run(&mut connect(socket).await?, args).await,
        Command::Logout => session::logout(&mut connect(socket).await?).await,
        Command::Status { json, watch } => {
            status::run(&mut connect(socket).await?, json, watch).await
        }
        Command::Connect => session::connect(&mut connect(socket).await?).await,
        Command::Disconnect => session::disconnect(&mut connect(socket).await?).await,
        Command::Logs { follow, lines } => {
            logs::run(&mut connect(socket).await?, follow, lines).await
        }
        Command::Config { command } => config::run(&mut connect(socket).await?, command).await,
        Command::Models { json } => models::run(&mut connect(socket).await?, json).await,
        Command::Open { print } => open::run(&mut connect(socket).await?, print).await,
    }
}

/// Connects to the daemon at `socket` (the flag or `CLOUDLLM_SOCKET`), else where it runs.
async fn connect(socket: Option<PathBuf>) -> Result<Client, Failure> {
    Ok(Client::connect(&socket_path(socket)?).await?)
}
