//! Starting, switching and stopping tunnels as the [`Desired`](super::Desired) state says.
//!
//! A switch (a renewed token, another relay, changed settings) is make before break: the new
//! tunnel starts while the old one keeps serving, and the old one drains once the new one is
//! registered on the relay, or after [`SWITCH_TIMEOUT`] if it never is.

use std::sync::Arc;
use std::time::Duration;

use cloudllm_proto::ipc::Connection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use url::Url;

use super::Supervisor;
use crate::config::DaemonConfig;
use crate::tunnel::{self, Finished, Stop};

/// How long an old tunnel keeps serving while its replacement registers. Past it the old one
/// drains anyway: a replacement that cannot register in 15 s is failing, and the old token is
/// about to expire.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(15);

impl Supervisor {
    /// Runs the tunnel the [`Desired`](super::Desired) state asks for, until shutdown.
    pub async fn run_tunnels(self: Arc<Self>) {
        struct Running {
            stop: Stop,
            task: JoinHandle<()>,
            /// Cancelled once this tunnel, or one that replaced it, is up: the tunnels it
            /// replaced wait for it to give way.
            up: CancellationToken,
        }
        let mut desired = self.desired.subscribe();
        let mut current: Option<Running> = None;
        let mut running_session: Option<(String, Arc<DaemonConfig>)> = None;
        loop {
            let want = desired.borrow_and_update().clone();
            let session = want.session.clone().filter(|_| {
                want.connect && want.login_required.is_none() && want.replaced.is_none()
            });
            let key = session
                .as_ref()
                .map(|s| (s.token.expose().to_owned(), s.config.clone()));
            let unchanged = match (&key, &running_session) {
                (Some((token, config)), Some((old_token, old_config))) => {
                    token == old_token && Arc::ptr_eq(config, old_config)
                }
                (None, None) => true,
                _ => false,
            };
            if !unchanged {
                running_session = key;
                let old = current.take();
                match session {
                    Some(session) => {
                        let up = CancellationToken::new();
                        if let Some(old) = &old {
                            // Before the new tunnel exists: the relay replacing the old one
                            // with it is then known to be our own doing.
                            old.stop.superseded.cancel();
                        }
                        // Daemon shutdown reaches every tunnel, retiring ones included.
                        let stop = Stop {
                            now: self.shutdown.child_token(),
                            retire: CancellationToken::new(),
                            superseded: CancellationToken::new(),
                        };
                        let relay = session.config.relay_url.clone();
                        // From here on only this tunnel writes the connection state: the old
                        // one may keep failing to redial a relay that is gone while it waits.
                        let report = self.state.begin_tunnel();
                        let run = tunnel::run(session, report.clone(), stop.clone(), up.clone());
                        let supervisor = self.clone();
                        let task = tokio::spawn(async move {
                            let finished = run.await;
                            info!(relay = ?relay.as_ref().map(Url::as_str), "tunnel ended");
                            match finished {
                                Ok(Finished::Stopped) => {}
                                Ok(Finished::Replaced { at }) => {
                                    supervisor.desired.send_modify(|d| d.replaced = Some(at));
                                }
                                Err(err) => {
                                    warn!(error = format!("{err:#}"), "tunnel cannot start");
                                    report.set_connection(Connection::Reconnecting {
                                        attempt: 0,
                                        next_try: 0,
                                        last_error: format!(
                                            "cannot start: {err:#}; fix it with `cloudllm config set`"
                                        ),
                                    });
                                }
                            }
                        });
                        if let Some(old) = old {
                            // Make before break: the old tunnel serves until the new one is up.
                            let new_up = up.clone();
                            tokio::spawn(async move {
                                tokio::select! {
                                    () = new_up.cancelled() => {}
                                    () = tokio::time::sleep(SWITCH_TIMEOUT) => {}
                                }
                                // Tunnels still waiting for the old one (it replaced them before
                                // it came up) give way now too, not after their own time limit.
                                old.up.cancel();
                                old.stop.retire.cancel();
                                let _ = old.task.await;
                            });
                        }
                        current = Some(Running { stop, task, up });
                    }
                    None => {
                        if let Some(old) = old {
                            old.stop.now.cancel();
                            // The tunnels it replaced stop waiting for it.
                            old.up.cancel();
                            tokio::spawn(old.task);
                        }
                        self.state
                            .end_tunnels(match (&want.login_required, &want.session) {
                                (Some(reason), _) => Connection::LoginRequired {
                                    reason: reason.clone(),
                                },
                                (None, None) => Connection::LoggedOut,
                                (None, Some(_)) => match want.replaced {
                                    Some(at) if want.connect => Connection::Replaced { at },
                                    _ => Connection::Disconnected,
                                },
                            });
                    }
                }
            }
            tokio::select! {
                changed = desired.changed() => if changed.is_err() { break },
                () = self.shutdown.cancelled() => break,
            }
        }
        if let Some(current) = current {
            current.stop.now.cancel();
            let _ = current.task.await;
        }
    }
}
