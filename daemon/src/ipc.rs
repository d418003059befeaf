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

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cloudllm_proto::ipc::{self, ErrorCode, IPC_VERSION, MAX_LINE_BYTES, Request, Response};
use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::traits::tokio::{Listener as _, Stream as _};
use interprocess::local_socket::{ListenerOptions, Name};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::logs::LogBuffer;
use crate::ollama::OllamaClient;
use crate::supervisor::{ControlError, Supervisor};

/// How often `watch` re-sends the state while only the request counters move.
const COUNTER_REFRESH: Duration = Duration::from_secs(1);

/// Most IPC connections served at once: clients are a CLI or two and a tray; 64 leaves room and
/// bounds a local process opening connections in a loop.
pub const MAX_CONNECTIONS: usize = 64;

/// Most connections one user other than root and the daemon's own may hold: a tray (its
/// watch, and one per menu action), a `status --watch`, a `logs --follow` and a few commands
/// come to well under 16.
pub const MAX_CONNECTIONS_PER_USER: usize = 16;

/// Slots of the [`MAX_CONNECTIONS`] that only root and the daemon's own user may take, so
/// that other users together can never fill the socket: 8 is room for an operator's status,
/// disconnect and logs while something else holds all the rest.
pub const RESERVED_FOR_OWNER: usize = 8;

/// How long a connection may wait between requests before it is closed: a CLI sends its
/// request as soon as it has said hello, and a tray opens a connection per action, so 60 s
/// only ends connections that are held open on purpose.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the daemon spends telling a refused connection why: the reply fits in a fresh
/// socket's buffer, so this only bounds a peer that does not read.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Refusals answered at once; more are closed without a word, so a flood costs no more than
/// this many small tasks.
const MAX_REFUSAL_REPLIES: usize = 8;

/// How long a new connection has to say hello: the CLI and the tray do so at once; a
/// connection that stays silent (or sends only junk) would otherwise hold one of the
/// [`MAX_CONNECTIONS`] slots for good.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: Option<u32>,
    gid: Option<u32>,
}

/// Whose requests may change the daemon's state.
#[derive(Debug, Clone, Copy)]
struct Operators {
    daemon_uid: Option<u32>,
    group: Option<u32>,
}

impl Operators {
    fn allow(&self, peer: Peer) -> bool {
        if cfg!(not(unix)) {
            // Named pipes are limited to the creating user and administrators by their ACL.
            return true;
        }
        match (peer.uid, self.group) {
            (Some(0), _) => true,
            (Some(uid), _) if Some(uid) == self.daemon_uid => true,
            (_, None) => false,
            (uid, Some(group)) => {
                peer.gid == Some(group) || uid.is_some_and(|u| member_of(u, group))
            }
        }
    }
}

/// Whether the user `uid` is a member of group `gid` in the group database (as a supplementary
/// group: `usermod -aG`). The socket's peer credentials carry only the effective group.
#[cfg(unix)]
fn member_of(uid: u32, gid: u32) -> bool {
    use nix::unistd::{Gid, Uid, User, getgrouplist};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return false;
    };
    getgrouplist(&name, user.gid).is_ok_and(|groups| groups.contains(&Gid::from_raw(gid)))
}

#[cfg(not(unix))]
fn member_of(_uid: u32, _gid: u32) -> bool {
    false
}

fn socket_name(path: &Path) -> std::io::Result<Name<'_>> {
    #[cfg(unix)]
    {
        use interprocess::local_socket::{GenericFilePath, ToFsName};
        path.to_fs_name::<GenericFilePath>()
    }
    #[cfg(not(unix))]
    {
        use interprocess::local_socket::{GenericNamespaced, ToNsName};
        cloudllm_proto::ipc::pipe_name(path).to_ns_name::<GenericNamespaced>()
    }
}

/// Creates the IPC socket at `path`. A socket file left by a dead daemon is replaced; a live
/// daemon's socket is never taken over. A user daemon's socket is 0600. A system daemon's is
/// 0660 and owned by `operator_group` when that group exists (only root and operators can
/// connect), else 0666 (anyone may read; changes are checked per request).
pub(crate) async fn bind(
    path: &Path,
    system: bool,
    operator_group: Option<&str>,
) -> anyhow::Result<Listener> {
    let group = if system {
        operator_group.and_then(group_id)
    } else {
        None
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        #[cfg(unix)]
        if !system {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        match Stream::connect(socket_name(path)?).await {
            Ok(_) => anyhow::bail!(
                "another cloudllmd is already running on {} (stop it first, or set socket_path)",
                path.display()
            ),
            Err(_) => {
                info!(socket = %path.display(), "replacing the stale socket of a daemon that is gone");
                std::fs::remove_file(path)
                    .with_context(|| format!("removing stale {}", path.display()))?;
            }
        }
    }
    let mode = match (system, group) {
        (false, _) => 0o600,
        (true, Some(_)) => 0o660,
        (true, None) => 0o666,
    };
    let options = ListenerOptions::new()
        .name(socket_name(path)?)
        .reclaim_name(true);
    #[cfg(unix)]
    let options = {
        use interprocess::os::unix::local_socket::ListenerOptionsExt;
        options.mode(mode)
    };
    let listener = options
        .create_tokio()
        .with_context(|| format!("creating the IPC socket {}", path.display()))?;
    // The process umask narrows the mode given at creation; set it exactly.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("giving {} to the operator group", path.display()))?;
        }
    }
    #[cfg(not(unix))]
    let _ = mode;
    Ok(listener)
}

/// What every connection handler needs.
struct Shared {
    supervisor: Arc<Supervisor>,
    logs: Arc<LogBuffer>,
    operators: Operators,
    idle_timeout: Duration,
}

/// The connections being served, counted per user so that no other user can take the slots
/// root and the daemon's own user need (see [`RESERVED_FOR_OWNER`]).
struct Slots {
    owner: Option<u32>,
    counts: std::sync::Mutex<SlotCounts>,
}

#[derive(Default)]
struct SlotCounts {
    total: usize,
    /// Connections of users other than root and the owner, by uid (`None`: unknown).
    by_user: std::collections::HashMap<Option<u32>, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Every slot is taken.
    Full,
    /// The slots other users may take are all taken.
    OthersFull,
    /// This user holds [`MAX_CONNECTIONS_PER_USER`] already.
    UserFull,
}

impl Refusal {
    fn message(self) -> String {
        match self {
            Refusal::Full => format!(
                "cloudllmd is serving {MAX_CONNECTIONS} connections already; try again shortly"
            ),
            Refusal::OthersFull => format!(
                "cloudllmd is serving {} connections of other users already (the rest are kept for \
                 root and its own user); try again shortly",
                MAX_CONNECTIONS - RESERVED_FOR_OWNER
            ),
            Refusal::UserFull => format!(
                "you hold {MAX_CONNECTIONS_PER_USER} connections to cloudllmd already: close some \
                 (a `cloudllm status --watch`, `logs --follow` or tray) and try again"
            ),
        }
    }
}

/// One connection's place in [`Slots`], given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    user: Option<Option<u32>>,
}

impl Slots {
    fn new(owner: Option<u32>) -> Slots {
        Slots {
            owner,
            counts: std::sync::Mutex::new(SlotCounts::default()),
        }
    }

    /// Root and the daemon's own user; everyone where there are no uids (Windows' named pipe
    /// admits only its creator and administrators).
    fn privileged(&self, uid: Option<u32>) -> bool {
        cfg!(not(unix)) || uid == Some(0) || (uid.is_some() && uid == self.owner)
    }

    fn acquire(self: &Arc<Self>, uid: Option<u32>) -> Result<Slot, Refusal> {
        let privileged = self.privileged(uid);
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if counts.total >= MAX_CONNECTIONS {
            return Err(Refusal::Full);
        }
        if privileged {
            counts.total += 1;
            return Ok(Slot {
                slots: self.clone(),
                user: None,
            });
        }
        let others: usize = counts.by_user.values().sum();
        if others >= MAX_CONNECTIONS - RESERVED_FOR_OWNER {
            return Err(Refusal::OthersFull);
        }
        let mine = counts.by_user.entry(uid).or_default();
        if *mine >= MAX_CONNECTIONS_PER_USER {
            return Err(Refusal::UserFull);
        }
        *mine += 1;
        counts.total += 1;
        Ok(Slot {
            slots: self.clone(),
            user: Some(uid),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self
            .slots
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        if let Some(uid) = self.user
            && let Some(count) = counts.by_user.get_mut(&uid)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.by_user.remove(&uid);
            }
        }
    }
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

fn peer_of(stream: &Stream) -> Peer {
    #[cfg(unix)]
    {
        use interprocess::local_socket::traits::StreamCommon;
        if let Ok(creds) = stream.peer_creds() {
            return Peer {
                uid: creds.euid(),
                gid: creds.egid(),
            };
        }
    }
    let _ = stream;
    Peer {
        uid: None,
        gid: None,
    }
}

#[cfg(unix)]
fn current_uid() -> Option<u32> {
    Some(nix::unistd::geteuid().as_raw())
}

#[cfg(not(unix))]
fn current_uid() -> Option<u32> {
    None
}

#[cfg(unix)]
fn group_id(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

#[cfg(not(unix))]
fn group_id(_name: &str) -> Option<u32> {
    None
}

/// Reads one line of at most [`MAX_LINE_BYTES`], without its newline. `Ok(None)` at the end
/// of the stream; an error for a longer line (the connection is then closed, since the rest of
/// the stream cannot be framed).
pub async fn read_line(
    reader: &mut (impl AsyncBufRead + Unpin),
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let limit = MAX_LINE_BYTES as u64 + 1;
    let read = (&mut *reader)
        .take(limit)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_LINE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("request line longer than {MAX_LINE_BYTES} bytes"),
        ));
    }
    Ok(Some(line))
}

/// Decodes one request line (as [`read_line`] returns it): the request, or the
/// [`ErrorCode::BadRequest`] reply the client gets for a line that is not one.
pub fn decode_request(line: &[u8]) -> Result<Request, Box<Response>> {
    serde_json::from_slice(line).map_err(|err| {
        Box::new(error(
            ErrorCode::BadRequest,
            format!("not a request this daemon knows: {err}"),
        ))
    })
}

async fn send(writer: &mut WriteHalf<Stream>, response: &Response) -> std::io::Result<()> {
    writer.write_all(&ipc::to_line(response)).await?;
    writer.flush().await
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

fn control_error(err: ControlError) -> Response {
    let code = match &err {
        ControlError::NotLoggedIn => ErrorCode::NotLoggedIn,
        ControlError::InvalidConfig(_) => ErrorCode::InvalidConfig,
        ControlError::LoginFailed(_) => ErrorCode::LoginFailed,
        ControlError::Internal(_) => ErrorCode::Internal,
    };
    error(code, err.to_string())
}

/// Whether a request changes the daemon's state.
fn changes_state(request: &Request) -> bool {
    !matches!(
        request,
        Request::Hello { .. }
            | Request::Status
            | Request::Watch
            | Request::ConfigGet { .. }
            | Request::Logs { .. }
            | Request::Models
            | Request::RelayInfo
    )
}

async fn handle(stream: Stream, peer: Peer, context: &Shared) {
    let (recv, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::new(recv);
    let mut greeted = false;
    let hello_deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        let read = if greeted {
            // Between requests: a connection held open without asking anything gives its slot
            // back. The whole line counts, so sending it a byte at a time does not help.
            match tokio::time::timeout(context.idle_timeout, read_line(&mut reader)).await {
                Ok(read) => read,
                Err(_) => {
                    debug!(uid = ?peer.uid, "closing an idle IPC connection");
                    return;
                }
            }
        } else {
            match tokio::time::timeout_at(hello_deadline, read_line(&mut reader)).await {
                Ok(read) => read,
                Err(_) => {
                    let message = format!("no hello within {HELLO_TIMEOUT:?}");
                    let _ = send(&mut writer, &error(ErrorCode::BadRequest, message)).await;
                    return;
                }
            }
        };
        let line = match read {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(err) => {
                let _ = send(&mut writer, &error(ErrorCode::BadRequest, err.to_string())).await;
                return;
            }
        };
        let request = match decode_request(&line) {
            Ok(request) => request,
            Err(reply) => {
                if send(&mut writer, &reply).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if !greeted {
            let reply = match request {
                Request::Hello { version } if version == IPC_VERSION => Response::Hello {
                    version: IPC_VERSION,
                    daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
                },
                Request::Hello { version } => error(
                    ErrorCode::VersionMismatch,
                    format!(
                        "this cloudllmd speaks IPC version {IPC_VERSION}, the client {version}: use the cloudllm that came with it"
                    ),
                ),
                _ => error(ErrorCode::BadRequest, "the first request must be hello"),
            };
            let ok = matches!(reply, Response::Hello { .. });
            if send(&mut writer, &reply).await.is_err() || !ok {
                return;
            }
            greeted = true;
            continue;
        }
        if changes_state(&request) && !context.operators.allow(peer) {
            let reply = error(
                ErrorCode::PermissionDenied,
                "permission denied: only the daemon's own user, root or its operator group may change it",
            );
            if send(&mut writer, &reply).await.is_err() {
                return;
            }
            continue;
        }
        let keep_going = dispatch(request, context, &mut reader, &mut writer).await;
        if !keep_going {
            return;
        }
    }
}

/// Carries out one request. Returns false when the connection should close.
async fn dispatch(
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

/// Resolves when the client sends anything more or hangs up: streams end there.
async fn client_gone(reader: &mut BufReader<ReadHalf<Stream>>) {
    let mut byte = [0u8; 1];
    let _ = reader.read(&mut byte).await;
}

async fn watch(
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

async fn logs(
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

async fn login(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded() {
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        let mut reader = BufReader::new(&long[..]);
        assert!(read_line(&mut reader).await.is_err());
        let mut ok = BufReader::new(&b"{\"method\":\"status\"}\nrest"[..]);
        assert_eq!(
            read_line(&mut ok).await.unwrap().unwrap(),
            b"{\"method\":\"status\"}"
        );
        assert_eq!(read_line(&mut ok).await.unwrap().unwrap(), b"rest");
        assert!(read_line(&mut ok).await.unwrap().is_none());
    }

    #[test]
    fn only_the_owner_root_and_operators_may_change_state() {
        let operators = Operators {
            daemon_uid: Some(1000),
            group: Some(50),
        };
        let peer = |uid, gid| Peer {
            uid: Some(uid),
            gid: Some(gid),
        };
        assert!(operators.allow(peer(0, 0)));
        assert!(operators.allow(peer(1000, 1000)));
        assert!(operators.allow(peer(1001, 50)));
        assert!(!operators.allow(peer(1001, 1001)));
        assert!(!operators.allow(Peer {
            uid: None,
            gid: None
        }));
        assert!(changes_state(&Request::Disconnect));
        assert!(!changes_state(&Request::Status));
    }

    #[test]
    fn other_users_cannot_take_the_owners_slots() {
        let slots = Arc::new(Slots::new(Some(1000)));
        // One user fills its share and no more.
        let mut held: Vec<Slot> = (0..MAX_CONNECTIONS_PER_USER)
            .map(|_| slots.acquire(Some(2000)).unwrap())
            .collect();
        assert_eq!(slots.acquire(Some(2000)).err(), Some(Refusal::UserFull));
        // Other users fill what is left to them, and no more.
        let mut uid = 3000;
        while held.len() < MAX_CONNECTIONS - RESERVED_FOR_OWNER {
            match slots.acquire(Some(uid)) {
                Ok(slot) => held.push(slot),
                Err(Refusal::UserFull) => uid += 1,
                Err(other) => panic!("{other:?}"),
            }
        }
        assert_eq!(slots.acquire(Some(9999)).err(), Some(Refusal::OthersFull));
        assert_eq!(slots.acquire(None).err(), Some(Refusal::OthersFull));
        // Root and the owner still get in, up to the total.
        held.push(slots.acquire(Some(0)).unwrap());
        while held.len() < MAX_CONNECTIONS {
            held.push(slots.acquire(Some(1000)).unwrap());
        }
        assert_eq!(slots.acquire(Some(0)).err(), Some(Refusal::Full));
        // Slots come back when connections end.
        held.truncate(MAX_CONNECTIONS_PER_USER);
        assert_eq!(
            slots.acquire(Some(2000)).err(),
            Some(Refusal::UserFull),
            "still at its share"
        );
        assert!(slots.acquire(Some(3000)).is_ok());
        held.clear();
        assert!(slots.acquire(Some(2000)).is_ok());
        let counts = slots.counts.lock().unwrap();
        assert_eq!(counts.total, 0, "the temporary slot was given back");
        assert!(counts.by_user.is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn group_membership_comes_from_the_group_database() {
        // root's own group is in its group list; nobody is not in root's group, and a user
        // that does not exist is in none.
        assert!(member_of(0, 0));
        assert!(!member_of(65534, 0));
        assert!(!member_of(4_000_000_000, 0));
        let operators = Operators {
            daemon_uid: Some(1000),
            group: Some(0),
        };
        assert!(!operators.allow(Peer {
            uid: Some(65534),
            gid: Some(65534)
        }));
    }
}
