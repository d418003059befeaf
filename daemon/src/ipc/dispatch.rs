//! What each request does: a call on the supervisor (or the Ollama client for `models`), and
//! its answer. Requests that stream (`watch`, `logs`, an interactive login) are `streams`'s.

use cloudllm_proto::ipc::{ErrorCode, Request, Response};
use interprocess::local_socket::tokio::Stream;
use tokio::io::{BufReader, ReadHalf, WriteHalf};

use super::Shared;
use super::connection::{control_error, error, send};
use super::streams::{login, logs, watch};
use crate::ollama::OllamaClient;
use crate::supervisor::Supervisor;

/// Carries out one request. Returns false when the connection should close.
pub(super) async fn dispatch(
    request: Request,
    context: &Shared,
    reader: &mut BufReader<ReadHalf<Stream>>,
    writer: &mut WriteHalf<Stream>,
) -> bool {
    let supervisor = &context.supervisor;
    let reply = match request {
        Request::Hello { .. } => error(ErrorCode::BadRequest, "hello was already said"),
        Request::Status => Response::Status(supervisor.state().snapshot()),
        Request::Watch => return watch(context, reader, writer).await,
        Request::Logs { lines, follow } => {
            return logs(context, lines, follow, reader, writer).await;
        }
        Request::Connect => supervisor
            .connect()
            .map_or_else(control_error, |()| Response::Ok),
        Request::Disconnect => supervisor
            .disconnect()
            .map_or_else(control_error, |()| Response::Ok),
        Request::Logout => supervisor
            .logout()
            .await
            .map_or_else(control_error, |()| Response::Ok),
        Request::LoginWithToken { relay_url, token } => supervisor
            .login_with_token(relay_url, token)
            .await
            .map_or_else(control_error, |user| Response::LoginDone { user }),
        Request::Login { relay_url, flow } => {
            return login(context, relay_url, flow, reader, writer).await;
        }
        Request::ConfigGet { key } => config_get(supervisor, key),
        Request::ConfigSet { key, value } => match supervisor.set_config(&key, &value).await {
            Ok(()) => config_get(supervisor, Some(key)),
            Err(err) => control_error(err),
        },
        Request::Models => match OllamaClient::new(supervisor.config().ollama_url.clone())
            .models()
            .await
        {
            Ok(models) => Response::Models { models },
            Err(message) => error(ErrorCode::Internal, message),
        },
        Request::RelayInfo => supervisor
            .relay_info()
            .await
            .map_or_else(control_error, Response::RelayInfo),
        Request::OpenWeb => crate::web_open::open_for(supervisor)
            .await
            .map_or_else(control_error, |url| Response::WebUrl { url }),
    };
    send(writer, &reply).await.is_ok()
}

fn config_get(supervisor: &Supervisor, key: Option<String>) -> Response {
    let config = supervisor.config();
    let keys: Vec<&str> = match &key {
        Some(key) => vec![key.as_str()],
        None => crate::config::SETTINGS.to_vec(),
    };
    let mut values = std::collections::BTreeMap::new();
    for key in keys {
        match config.get(key) {
            Some(value) => values.insert(key.to_owned(), value),
            None => {
                return error(
                    ErrorCode::InvalidConfig,
                    format!(
                        "unknown setting {key:?}; settings: {}",
                        crate::config::SETTINGS.join(", ")
                    ),
                );
            }
        };
    }
    Response::Config {
        values,
        path: supervisor.config_path().display().to_string(),
    }
}
