//! The usual end-to-end setup in one call: a relay, alice's fake Ollama and alice's daemon
//! (device `laptop`) tunnelled to the relay, each config adjustable, with request builders that
//! carry alice's client token.

use std::path::PathBuf;

use cloudllm_daemon::DaemonConfig;
use cloudllm_relay::{RelayConfig, Scope};

use crate::{
    FakeOllama, TestDaemon, TestRelay, client, daemon_config, init_logs, relay_config, token,
};

/// Relay, fake backend and one daemon of user `alice` (device `laptop`), connected.
pub struct Stack {
    /// The relay.
    pub relay: TestRelay,
    /// Alice's fake Ollama.
    pub backend: FakeOllama,
    /// Alice's daemon.
    pub daemon: TestDaemon,
    /// Alice's daemon's IPC socket.
    pub socket: PathBuf,
    /// The config alice's daemon was started with, to start it again.
    pub daemon_config: DaemonConfig,
    /// An HTTP client.
    pub http: reqwest::Client,
}

impl Stack {
    /// Starts the stack with the default test relay config.
    pub async fn start() -> Stack {
        Stack::with_relay_config(relay_config()).await
    }

    /// Starts the stack with `config` for the relay.
    pub async fn with_relay_config(config: RelayConfig) -> Stack {
        Stack::with_configs(config, |_| {}).await
    }

    /// Starts the stack with `config` for the relay and alice's daemon config (see
    /// [`daemon_config`]) changed by `adjust`; returns once her device is connected.
    pub async fn with_configs(
        config: RelayConfig,
        adjust: impl FnOnce(&mut DaemonConfig),
    ) -> Stack {
        init_logs();
        let relay = TestRelay::start(config).await;
        let backend = FakeOllama::start().await;
        let mut daemon_config = daemon_config(&relay.url(), "alice", "laptop", &backend.url());
        adjust(&mut daemon_config);
        let socket = daemon_config
            .socket_path
            .clone()
            .expect("daemon_config sets a socket");
        let daemon = TestDaemon::start(daemon_config.clone());
        relay.wait_for_devices("alice", 1).await;
        Stack {
            relay,
            backend,
            daemon,
            socket,
            daemon_config,
            http: client(),
        }
    }

    /// A request builder for `path` on the relay with alice's client token.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.relay.api(path))
            .bearer_auth(token("alice", Scope::Client))
    }

    /// A GET request builder for `path` on the relay with alice's client token.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(self.relay.api(path))
            .bearer_auth(token("alice", Scope::Client))
    }
}
