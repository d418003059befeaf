//! `cloudllm status`: the daemon's state once (exit 0 when connected, 4 when not, so scripts
//! can wait on it), or with `--watch` every change as the daemon reports it. The words and
//! colours are [`crate::render`]'s.

use cloudllm_ipc_client::Client;
use cloudllm_proto::ipc::{Connection, Request, Response};

use crate::exit::{EXIT_NOT_CONNECTED, Failure, check, fail};
use crate::output::{out, outln};
use crate::render::{Style, describe, one_line};

/// Runs `cloudllm status`: as JSON with `json`, and following every change with `watch`.
pub async fn run(client: &mut Client, json: bool, watch: bool) -> Result<u8, Failure> {
    let style = Style::detect();
    if watch {
        return follow(client, json, style).await;
    }
    let Response::Status(status) = check(client.call(&Request::Status).await?)? else {
        return Err(fail("unexpected answer to status"));
    };
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
    } else {
        out!("{}", describe(&status, style));
    }
    Ok(
        if matches!(status.connection, Connection::Connected { .. }) {
            0
        } else {
            EXIT_NOT_CONNECTED
        },
    )
}

/// Prints one line (or one JSON document) for every state the daemon reports, until it stops.
async fn follow(client: &mut Client, json: bool, style: Style) -> Result<u8, Failure> {
    client.send(&Request::Watch).await?;
    loop {
        let Response::Status(status) = check(client.recv().await?)? else {
            continue;
        };
        if json {
            outln!("{}", serde_json::to_string(&status).unwrap_or_default());
        } else {
            outln!("{}", one_line(&status, style));
        }
    }
}
