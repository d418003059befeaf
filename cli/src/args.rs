//! The command line: what `cloudllm` accepts, as clap types. Each command's own options live
//! with the command when they are more than a flag or two ([`LoginArgs`], [`ConfigCommand`],
//! [`ServiceCommand`]); `main` parses these and dispatches to the module of each command.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use cloudllm_ipc_client::SOCKET_ENV;

use crate::config::ConfigCommand;
use crate::login::LoginArgs;
use crate::service::ServiceCommand;

/// `cloudllm` and its global options.
#[derive(Parser)]
#[command(
    name = "cloudllm",
    version,
    about = "Reach the Ollama on this machine from anywhere, through a cloudllm relay",
    after_help = "Exit codes: 0 ok (status: connected), 1 failed, 2 usage, 3 daemon not running, \
                  4 status: not connected, 5 permission denied."
)]
pub struct Cli {
    /// The daemon's socket [default: the user daemon's, else the system daemon's].
    #[arg(long, global = true, env = SOCKET_ENV)]
    pub socket: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand)]
pub enum Command {
    /// Log in to a relay; the daemon then connects.
    Login(LoginArgs),
    /// Forget the credentials and close the tunnel.
    Logout,
    /// Show the daemon's state; exits 4 when not connected.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Keep printing every change (one line, or one JSON document, each).
        #[arg(long)]
        watch: bool,
    },
    /// Open the tunnel (and keep it open across restarts).
    Connect,
    /// Close the tunnel (and keep it closed across restarts).
    Disconnect,
    /// Show the daemon's recent log lines.
    Logs {
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// How many recent lines.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
    },
    /// Read or change the daemon's settings.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// List the local Ollama's models, as the relay will see them.
    Models {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Open the relay's web page in your browser, already signed in (a one-time link).
    Open {
        /// Print the link instead of opening it (it works once, within a minute).
        #[arg(long)]
        print: bool,
    },
    /// Run the daemon in the foreground (`cloudllmd`).
    Daemon {
        /// Arguments for cloudllmd (e.g. --config FILE).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install, remove or query cloudllmd as a service (systemd, launchd, Windows service).
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}
