//! The answers that go on after the request: `watch` (the state, then every change),
//! `logs` (recent lines, then new ones with `--follow`) and an interactive login (the user's
//! steps, then the result). Each ends when the client sends anything more or hangs up.

use std::time::Duration;

use cloudllm_proto::ipc::{self, Response};
use interprocess::local_socket::tokio::Stream;
use tokio::io::{AsyncReadExt, BufReader, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use super::Shared;
use super::connection::{control_error, send};

/// How often `watch` re-sends the state while only the request counters move.
const COUNTER_REFRESH: Duration = Duration::from_secs(1);

/// Resolves when the client sends anything more or hangs up: streams end there.
async fn client_gone(reader: &mut BufReader<ReadHalf<Stream>>) {
    let mut byte = [0u8; 1];
    let _ = reader.read(&mut byte).await;
}

pub(super) async fn watch(
    context: &Shared,
    reader: &mut BufReader<ReadHalf<Stream>>,
    writer: &mut WriteHalf<Stream>,
) -> bool {
    let state = context.supervisor.state();
    let mut changes = state.subscribe();
    let mut tick = tokio::time::interval(COUNTER_REFRESH);
    let mut last_sent = None;
    loop {
        let mut status = changes.borrow_and_update().clone();
        state.fill_live(&mut status);
        if last_sent.as_ref() != Some(&status) {
            if send(writer, &Response::Status(status.clone()))
                .await
                .is_err()
            {
                return false;
            }
            last_sent = Some(status);
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return false },
            _ = tick.tick() => {}
            () = client_gone(reader) => return false,
        }
    }
}

pub(super) async fn logs(
    context: &Shared,
    lines: usize,
    follow: bool,
    reader: &mut BufReader<ReadHalf<Stream>>,
    writer: &mut WriteHalf<Stream>,
) -> bool {
    let mut new_lines = context.logs.follow();
    for line in context.logs.recent(lines) {
        if send(writer, &Response::Log { line }).await.is_err() {
            return false;
        }
    }
    if !follow {
        return send(writer, &Response::Ok).await.is_ok();
    }
    loop {
        let line = tokio::select! {
            line = new_lines.recv() => match line {
                Ok(line) => line,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    format!("… {missed} lines skipped (the reader was too slow)")
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
            },
            () = client_gone(reader) => return false,
        };
        if send(writer, &Response::Log { line }).await.is_err() {
            return false;
        }
    }
}

pub(super) async fn login(
    context: &Shared,
    relay_url: Option<String>,
    flow: ipc::LoginFlow,
    reader: &mut BufReader<ReadHalf<Stream>>,
    writer: &mut WriteHalf<Stream>,
) -> bool {
    let (prompts, mut prompt_rx) = mpsc::channel(4);
    let login = context
        .supervisor
        .login_interactive(relay_url, flow, prompts);
    tokio::pin!(login);
    loop {
        tokio::select! {
            result = &mut login => {
                let reply = result.map_or_else(control_error, |user| Response::LoginDone { user });
                return send(writer, &reply).await.is_ok();
            }
            Some(prompt) = prompt_rx.recv() => {
                if send(writer, &Response::LoginPrompt(prompt)).await.is_err() {
                    return false;
                }
            }
            // The user pressed Ctrl-C in the CLI: abandon the login.
            () = client_gone(reader) => return false,
        }
    }
}
