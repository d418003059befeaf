//! `cloudllm config get|set|path`: reads and changes the daemon's settings. The daemon owns
//! its config file and checks every value; this only asks and prints.

use cloudllm_ipc_client::Client;
use cloudllm_proto::ipc::{Request, Response};

use crate::exit::{Failure, check, fail};
use crate::output::outln;

/// `cloudllm config …`.
#[derive(clap::Subcommand)]
pub enum ConfigCommand {
    /// Print one setting, or all.
    Get {
        /// The setting [default: all].
        key: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a setting (an empty value restores the default).
    Set {
        /// The setting.
        key: String,
        /// Its new value.
        value: String,
    },
    /// Print the config file's path.
    Path,
}

/// Runs `cloudllm config …`.
pub async fn run(client: &mut Client, command: ConfigCommand) -> Result<u8, Failure> {
    let (request, json) = match command {
        ConfigCommand::Get { key, json } => (Request::ConfigGet { key }, json),
        ConfigCommand::Set { key, value } => (Request::ConfigSet { key, value }, false),
        ConfigCommand::Path => {
            let Response::Config { path, .. } =
                check(client.call(&Request::ConfigGet { key: None }).await?)?
            else {
                return Err(fail("unexpected answer to config"));
            };
            outln!("{path}");
            return Ok(0);
        }
    };
    let Response::Config { values, .. } = check(client.call(&request).await?)? else {
        return Err(fail("unexpected answer to config"));
    };
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&values).unwrap_or_default()
        );
    } else if values.len() == 1 {
        values.values().for_each(|v| outln!("{v}"));
    } else {
        let width = values.keys().map(String::len).max().unwrap_or(0);
        for (key, value) in &values {
            outln!("{key:width$}  {value}");
        }
    }
    Ok(0)
}
