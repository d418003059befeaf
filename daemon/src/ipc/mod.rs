//! The daemon's IPC server: a local socket (Unix socket; named pipe on Windows) speaking the
//! newline-delimited JSON of [`cloudllm_proto::ipc`]. The CLI and the tray are its clients.
//!
//! Who may do what is decided from the peer's credentials: anyone who can open the socket may
//! read (status, watch, logs, models, config get); changing anything takes the daemon's own
//! user, root, or a member of the configured operator group. The socket is 0600 for a user
//! daemon (only its user can connect at all) and 0666 for a system daemon (any local user may
//! read its status; changes are checked per request).
//!
//! Since any local user may connect to a system daemon's socket, connections are counted per
//! user: one user can take at most [`MAX_CONNECTIONS_PER_USER`], and
//! [`RESERVED_FOR_OWNER`] of the [`MAX_CONNECTIONS`] are kept for root and the daemon's own
//! user, so a flood from another account never locks the operators out. A connection that
//! sits between requests longer than [`IDLE_TIMEOUT`] is closed; streams (`watch`, `logs
//! --follow`, an interactive login) are not idle.
//!
//! This file holds the accept loop; each other concern has its module: `socket` (creating the
//! socket, who is on the other end, who may change things), `slots` (connections counted per
//! user), `connection` (one connection: framing, hello, idle limit, permission check),
//! `dispatch` (a request turned into a call on the supervisor) and `streams` (the answers that
//! go on: `watch`, `logs --follow`, an interactive login).

mod connection;
mod dispatch;
mod slots;
mod socket;
mod streams;

use std::sync::Arc;
use std::time::Duration;

use cloudllm_proto::ipc::ErrorCode;
use interprocess::local_socket::tokio::Listener;
use interprocess::local_socket::traits::tokio::Listener as _;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::logs::LogBuffer;
use crate::supervisor::Supervisor;

pub use connection::{IDLE_TIMEOUT, decode_request, read_line};
pub use slots::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_USER, RESERVED_FOR_OWNER};
pub(crate) use socket::bind;

use connection::{error, handle, send};
use slots::Slots;
use socket::{Operators, current_uid, group_id, peer_of};

/// How long the daemon spends telling a refused connection why: the reply fits in a fresh
/// socket's buffer, so this only bounds a peer that does not read.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Refusals answered at once; more are closed without a word, so a flood costs no more than
/// this many small tasks.
const MAX_REFUSAL_REPLIES: usize = 8;

/// What every connection handler needs.
struct Shared {
    supervisor: Arc<Supervisor>,
    logs: Arc<LogBuffer>,
    operators: Operators,
    idle_timeout: Duration,
}

/// Serves IPC clients on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: Listener,
    supervisor: Arc<Supervisor>,
    logs: Arc<LogBuffer>,
    shutdown: CancellationToken,
) {
    let config = supervisor.config();
    let operators = Operators {
        daemon_uid: current_uid(),
        group: config.operator_group.as_deref().and_then(group_id),
    };
    if let (Some(name), None) = (&config.operator_group, operators.group) {
        warn!(group = %name, "operator_group does not exist: only this user and root may change the daemon");
    }
    let idle_timeout = config.ipc_idle_timeout.unwrap_or(IDLE_TIMEOUT);
    let context = Arc::new(Shared {
        supervisor,
        logs,
        operators,
        idle_timeout,
    });
    let slots = Arc::new(Slots::new(operators.daemon_uid));
    let refusals = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSAL_REPLIES));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => stream,
                Err(err) => {
                    warn!(error = %err, "IPC accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let peer = peer_of(&stream);
        let slot = match slots.acquire(peer.uid) {
            Ok(slot) => slot,
            Err(refusal) => {
                debug!(uid = ?peer.uid, ?refusal, "refusing an IPC connection");
                // Say why, instead of a bare "connection reset", when it costs little.
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        let (_, mut writer) = tokio::io::split(stream);
                        let reply = error(ErrorCode::Internal, refusal.message());
                        let _ =
                            tokio::time::timeout(REFUSAL_TIMEOUT, send(&mut writer, &reply)).await;
                        drop(permit);
                    });
                }
                continue;
            }
        };
        let context = context.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = handle(stream, peer, &context) => {}
                () = shutdown.cancelled() => {}
            }
            drop(slot);
        });
    }
}
