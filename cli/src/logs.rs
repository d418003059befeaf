//! `cloudllm logs`: the daemon's recent log lines, and with `--follow` every new one as the
//! daemon writes it. The daemon keeps the lines; this only prints them.

use cloudllm_ipc_client::Client;
use cloudllm_proto::ipc::{Request, Response};

use crate::exit::{Failure, check};
use crate::output::outln;

/// Prints the last `lines` lines, then (with `follow`) new ones until the daemon stops.
pub async fn run(client: &mut Client, follow: bool, lines: usize) -> Result<u8, Failure> {
    client.send(&Request::Logs { lines, follow }).await?;
    loop {
        match check(client.recv().await?)? {
            Response::Log { line } => outln!("{line}"),
            _ => return Ok(0),
        }
    }
}
