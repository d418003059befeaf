//! The tray's side of the daemon's IPC socket: follow its `watch` stream, and carry out menu
//! actions as IPC calls.
//!
//! This runs on a tokio runtime in a thread of its own, because the GUI toolkit owns the main
//! thread (GTK on Linux, AppKit on macOS). It reports to the GUI through a callback (the event
//! loop's proxy) and takes actions from a bounded channel, so neither side ever blocks the other.
//! A daemon that is not running, stops or restarts is normal here: the tray says so and dials
//! again every [`REDIAL`], for as long as it runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudllm_ipc_client::{Client, ConnectError};
use cloudllm_proto::Secret;
use cloudllm_proto::ipc::{Connection, ErrorCode, Request, Response};
use tracing::{info, warn};

use crate::menu::Action;
use crate::view::TrayState;

/// How long the tray waits before dialling a missing daemon again: short enough that a
/// restarted daemon shows within a few seconds, long enough to cost nothing while it is away.
pub const REDIAL: Duration = Duration::from_secs(2);

/// Bound on connecting to the daemon and on each call: the daemon answers local calls in
/// milliseconds, so one that takes this long is stuck.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on asking the daemon for a signed-in link to the web page: the daemon asks the relay
/// within 15 s, and this leaves it room to say why it could not.
pub const OPEN_WEB_TIMEOUT: Duration = Duration::from_secs(20);

/// How many recent log lines "Show logs" fetches: the daemon keeps about this many.
pub const LOG_LINES: usize = 1000;

/// Room for menu clicks not yet carried out; more clicks than this while the daemon is stuck are
/// dropped rather than queued without end.
const ACTION_QUEUE: usize = 8;

/// What the IPC side tells the GUI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The daemon's state changed (or it went away).
    State(TrayState),
    /// A menu action finished: `None` when it worked, else why it failed.
    ActionDone(Option<String>),
    /// The relay's web page, looked up once the tunnel to a relay is up (`None`: it has none).
    WebPage(Option<String>),
}

/// Work for the IPC thread besides following the daemon.
#[derive(Debug)]
enum Job {
    /// A menu action.
    Action(Action),
    /// Ask the daemon for the relay's web page.
    LookUpWebPage,
}

/// Where the GUI sends menu actions for the daemon.
#[derive(Debug, Clone)]
pub struct Actions(tokio::sync::mpsc::Sender<Job>);

impl Actions {
    /// Queues `action`; `false` when the queue is full (the daemon is stuck) or the IPC thread
    /// is gone.
    pub fn try_send(&self, action: Action) -> bool {
        self.0.try_send(Job::Action(action)).is_ok()
    }
}

/// Starts the IPC thread for the daemon at `socket`. `publish` receives every [`Event`]; the
/// returned [`Actions`] take the menu's [`Action::Connect`], [`Action::Disconnect`],
/// [`Action::ShowLogs`] and [`Action::OpenWebPage`] for the relay's own page (others are the
/// GUI's own).
pub fn spawn(
    socket: PathBuf,
    publish: impl Fn(Event) + Send + Sync + 'static,
) -> std::io::Result<Actions> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (jobs, mut queue) = tokio::sync::mpsc::channel(ACTION_QUEUE);
    let lookups = jobs.clone();
    std::thread::Builder::new()
        .name("ipc".into())
        .spawn(move || {
            let publish = std::sync::Arc::new(publish);
            runtime.block_on(async move {
                let watcher = {
                    let publish = publish.clone();
                    let socket = socket.clone();
                    // The relay (if connected) whose web page was last asked for.
                    let asked = std::sync::Mutex::new(None::<String>);
                    async move {
                        watch(&socket, &|state| {
                            let relay = connected_relay(&state);
                            let mut asked = asked.lock().unwrap_or_else(|e| e.into_inner());
                            if relay != *asked {
                                if relay.is_some() {
                                    let _ = lookups.try_send(Job::LookUpWebPage);
                                }
                                *asked = relay;
                            }
                            publish(Event::State(state));
                        })
                        .await
                    }
                };
                let worker = async {
                    while let Some(job) = queue.recv().await {
                        match job {
                            Job::Action(action) => {
                                let result = perform(&socket, action).await.err();
                                if let Some(error) = &result {
                                    warn!(?action, %error, "menu action failed");
                                }
                                publish(Event::ActionDone(result));
                            }
                            Job::LookUpWebPage => publish(Event::WebPage(web_page(&socket).await)),
                        }
                    }
                };
                tokio::select! {
                    () = watcher => {}
                    () = worker => info!("the GUI is gone; IPC thread ends"),
                }
            });
        })?;
    Ok(Actions(jobs))
}

/// The relay a connected daemon tunnels to; `None` while not connected.
fn connected_relay(state: &TrayState) -> Option<String> {
    match state {
        TrayState::Daemon(status) if matches!(status.connection, Connection::Connected { .. }) => {
            status.relay_url.clone()
        }
        _ => None,
    }
}

/// The relay's web page, as the daemon reads it from the relay: `None` when the relay
/// publishes none, names something other than an `http(s)` URL, or cannot be asked (an older
/// daemon answers this request with an error).
pub async fn web_page(socket: &Path) -> Option<String> {
    let answer = tokio::time::timeout(CALL_TIMEOUT, async {
        let mut client = Client::connect(socket).await.ok()?;
        client.call(&Request::RelayInfo).await.ok()
    })
    .await
    .ok()
    .flatten()?;
    match answer {
        Response::RelayInfo(info) => info
            .web_url
            .filter(|url| url.starts_with("https://") || url.starts_with("http://")),
        _ => None,
    }
}

/// Follows the daemon's state forever: publishes each status from its `watch` stream, and
/// [`TrayState::NoDaemon`] whenever it cannot be reached, then dials again after [`REDIAL`].
pub async fn watch(socket: &Path, publish: &dyn Fn(TrayState)) {
    loop {
        let why = match tokio::time::timeout(CALL_TIMEOUT, Client::connect(socket)).await {
            Ok(Ok(mut client)) => {
                info!(socket = %socket.display(), "following the daemon");
                follow(&mut client, publish).await
            }
            Ok(Err(err)) => unreachable_reason(&err),
            Err(_) => format!("not answering on {}", socket.display()),
        };
        publish(TrayState::NoDaemon { reason: why });
        tokio::time::sleep(REDIAL).await;
    }
}

/// Publishes every status of one `watch` stream; returns why it ended.
async fn follow(client: &mut Client, publish: &dyn Fn(TrayState)) -> String {
    if let Err(err) = client.send(&Request::Watch).await {
        return format!("lost the daemon: {err}");
    }
    loop {
        match client.recv().await {
            Ok(Response::Status(status)) => publish(TrayState::Daemon(Box::new(status))),
            Ok(Response::Error { message, .. }) => return format!("refused to report: {message}"),
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                return "the daemon stopped".to_owned();
            }
            Err(err) => return format!("lost the daemon: {err}"),
        }
    }
}

/// A short reason for the menu's status line.
fn unreachable_reason(err: &ConnectError) -> String {
    match err {
        ConnectError::NotRunning(path) => format!("no socket at {}", path.display()),
        ConnectError::PermissionDenied(path) => {
            format!("permission denied on {}", path.display())
        }
        other => other.to_string(),
    }
}

/// Carries out one menu action through the daemon.
pub async fn perform(socket: &Path, action: Action) -> Result<(), String> {
    let request = match action {
        Action::Connect => Request::Connect,
        Action::Disconnect => Request::Disconnect,
        Action::ShowLogs => {
            let path = save_logs(socket, &log_file()).await?;
            return open::that_detached(&path)
                .map_err(|err| format!("cannot open {}: {err}", path.display()));
        }
        Action::OpenWebPage => {
            let link = sign_in_link(socket).await?;
            // Never the link in the error: errors are logged, and the link signs someone in.
            return open::that_detached(link.expose())
                .map_err(|err| format!("cannot start a browser: {err}"));
        }
        Action::CopyApiUrl | Action::Quit => return Ok(()),
    };
    let answer = tokio::time::timeout(CALL_TIMEOUT, async {
        let mut client = Client::connect(socket)
            .await
            .map_err(|err| err.to_string())?;
        client.call(&request).await.map_err(|err| err.to_string())
    })
    .await
    .map_err(|_| "the daemon did not answer".to_owned())??;
    match answer {
        Response::Ok => Ok(()),
        Response::Error { message, .. } => Err(message),
        other => Err(format!("unexpected answer from the daemon: {other:?}")),
    }
}

/// A one-time link that opens the relay's web page signed in as the daemon's user (what
/// `cloudllm open` opens), asked of the daemon, which asks the relay. Or why not, in words.
pub async fn sign_in_link(socket: &Path) -> Result<Secret, String> {
    let answer = tokio::time::timeout(OPEN_WEB_TIMEOUT, async {
        let mut client = Client::connect(socket)
            .await
            .map_err(|err| err.to_string())?;
        client
            .call(&Request::OpenWeb)
            .await
            .map_err(|err| err.to_string())
    })
    .await
    .map_err(|_| "the daemon did not answer".to_owned())??;
    match answer {
        Response::WebUrl { url } => Ok(url),
        Response::Error {
            code: ErrorCode::BadRequest,
            ..
        } => Err("this cloudllmd is too old to sign the web page in: update it".to_owned()),
        Response::Error { message, .. } => Err(message),
        _ => Err("unexpected answer from the daemon".to_owned()),
    }
}

/// Where "Show logs" writes the daemon's recent lines: the user's cache directory, which
/// only they can read.
pub fn log_file() -> PathBuf {
    directories::ProjectDirs::from("", "", "cloudllm")
        .map(|dirs| dirs.cache_dir().to_path_buf())
        .unwrap_or_else(std::env::temp_dir)
        .join("daemon-log.txt")
}

/// Fetches the daemon's recent log lines (`cloudllm logs`) into the text file `path`, so that
/// a viewer can show them without a terminal. Returns `path`.
pub async fn save_logs(socket: &Path, path: &Path) -> Result<PathBuf, String> {
    let lines = tokio::time::timeout(CALL_TIMEOUT, async {
        let mut client = Client::connect(socket)
            .await
            .map_err(|err| err.to_string())?;
        client
            .send(&Request::Logs {
                lines: LOG_LINES,
                follow: false,
            })
            .await
            .map_err(|err| err.to_string())?;
        let mut lines = String::new();
        loop {
            match client.recv().await.map_err(|err| err.to_string())? {
                Response::Log { line } => {
                    lines.push_str(&line);
                    lines.push('\n');
                }
                Response::Error { message, .. } => return Err(message),
                _ => return Ok(lines),
            }
        }
    })
    .await
    .map_err(|_| "the daemon did not send its logs".to_owned())??;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    }
    write_private(path, lines.as_bytes())
        .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    Ok(path.to_owned())
}

/// Writes `contents` to `path`, readable by this user only on Unix (the lines name the relay,
/// the user and the device).
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        // An older file keeps its mode on open: tighten it too.
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    options.open(path)?.write_all(contents)
}
