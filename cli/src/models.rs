//! `cloudllm models`: the local Ollama's models as the daemon sees them, which are the ones
//! the relay will route to this device.

use cloudllm_ipc_client::Client;
use cloudllm_proto::ipc::{Request, Response};

use crate::exit::{Failure, check, fail};
use crate::output::outln;

/// Prints the models, one a line or (with `json`) as a JSON array.
pub async fn run(client: &mut Client, json: bool) -> Result<u8, Failure> {
    let Response::Models { models } = check(client.call(&Request::Models).await?)? else {
        return Err(fail("unexpected answer to models"));
    };
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&models).unwrap_or_default()
        );
    } else if models.is_empty() {
        outln!("Ollama has no models yet: `ollama pull MODEL` on this machine.");
    } else {
        models.iter().for_each(|m| outln!("{m}"));
    }
    Ok(0)
}
