//! Watching the local Ollama: whether it answers, its version and its models, polled in the
//! background so `status` can say "Ollama down" before a user's request finds out.

use std::time::Duration;

use bytes::Bytes;
use cloudllm_proto::ipc::Ollama;
use cloudllm_tunnel::body::read_limited;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::supervisor::Supervisor;

/// How often Ollama is polled: 10 s notices a stopped Ollama quickly and costs nothing.
pub const POLL_INTERVAL: Duration = Duration::from_secs(10);

/// How long one probe may take: Ollama is local, so 3 s means it is stuck or absent.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest listing read, in bytes: thousands of models fit in 4 MiB.
const MAX_LISTING_BYTES: usize = 4 * 1024 * 1024;

/// A small HTTP client for Ollama's listing endpoints.
#[derive(Clone)]
pub struct OllamaClient {
    client: Client<HttpConnector, Empty<Bytes>>,
    base: Url,
}

#[derive(Deserialize)]
struct Version {
    version: String,
}

#[derive(Deserialize)]
struct Tags {
    models: Vec<Model>,
}

#[derive(Deserialize)]
struct Model {
    name: String,
}

impl OllamaClient {
    /// A client for the Ollama at `base`.
    pub fn new(base: Url) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(PROBE_TIMEOUT));
        OllamaClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base,
        }
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T, String> {
        let url = self.base.join(path).map_err(|e| e.to_string())?;
        let uri: http::Uri = url
            .as_str()
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        let request = async {
            let response = self.client.get(uri).await.map_err(|e| {
                let cause = std::error::Error::source(&e)
                    .map_or_else(|| e.to_string(), ToString::to_string);
                format!("cannot reach Ollama at {}: {cause}", self.base)
            })?;
            if !response.status().is_success() {
                return Err(format!("Ollama answered {} on {path}", response.status()));
            }
            let body = read_limited(response.into_body(), MAX_LISTING_BYTES)
                .await
                .map_err(|e| format!("reading {path}: {e}"))?;
            serde_json::from_slice(&body)
                .map_err(|e| format!("Ollama's {path} is not what Ollama sends: {e}"))
        };
        tokio::time::timeout(PROBE_TIMEOUT, request)
            .await
            .map_err(|_| {
                format!(
                    "Ollama at {} did not answer within {PROBE_TIMEOUT:?}",
                    self.base
                )
            })?
    }

    /// Whether Ollama answers, with its version and model count, and its model names (none
    /// when it is down).
    pub async fn probe(&self) -> (Ollama, Vec<String>) {
        let version = match self.get_json::<Version>("/api/version").await {
            Ok(version) => version.version,
            Err(error) => return (Ollama::Down { error }, Vec::new()),
        };
        match self.models().await {
            Ok(mut models) => {
                models.sort_unstable();
                let up = Ollama::Up {
                    version,
                    models: models.len(),
                };
                (up, models)
            }
            Err(error) => (Ollama::Down { error }, Vec::new()),
        }
    }

    /// The names of Ollama's models (`/api/tags`, as the relay sees them).
    pub async fn models(&self) -> Result<Vec<String>, String> {
        let tags: Tags = self.get_json("/api/tags").await?;
        Ok(tags.models.into_iter().map(|m| m.name).collect())
    }
}

/// Polls Ollama (at the currently configured address) every [`POLL_INTERVAL`] and records what
/// it finds in the daemon's state, until `shutdown`. Logs only transitions, not every poll.
pub async fn watch(supervisor: std::sync::Arc<Supervisor>, shutdown: CancellationToken) {
    let mut last_up: Option<bool> = None;
    let state = supervisor.state().clone();
    loop {
        let client = OllamaClient::new(supervisor.config().ollama_url.clone());
        let (found, models) = client.probe().await;
        let up = matches!(found, Ollama::Up { .. });
        if last_up != Some(up) {
            match &found {
                Ollama::Down { error } => tracing::warn!(
                    %error,
                    "Ollama is not reachable: start it with `ollama serve`, or set ollama_url (CLOUDLLM_OLLAMA_URL)"
                ),
                Ollama::Up { version, models } => tracing::info!(%version, models, "Ollama is up"),
                Ollama::Unknown => {}
            }
            last_up = Some(up);
        }
        state.update(|status| status.ollama = found);
        state.set_models(models);
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
