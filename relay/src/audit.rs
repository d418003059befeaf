//! The audit log: one JSON line per security event and per request, for the operator.
//!
//! It records who did what and how much — tunnel connects and disconnects, authentication
//! failures, request metadata (id, user, device, method, path, status, bytes, duration) — and
//! never a token, a prompt or a completion: events can only carry the fields below. Lines go
//! through a bounded queue to one writer thread, so a slow disk never slows a request; when the
//! queue is full the line is dropped and counted, and the count is logged. The writer takes
//! every line waiting and writes them with one system call: a plain thread with a plain file,
//! because tokio's files hand each write to its blocking pool and back, two thread hand-offs
//! per batch (issue 19).

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Lines waiting for the writer: 8,192 lines of ~300 bytes is ~2.5 MiB at worst, seconds of a
/// busy relay's traffic if the disk stalls.
const QUEUE: usize = 8192;

/// One audit event.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A daemon opened a tunnel.
    TunnelConnect {
        /// The device's owner.
        user: String,
        /// The device's name.
        device: String,
        /// The device's id.
        device_id: String,
        /// Where the daemon connected from.
        addr: Option<IpAddr>,
    },
    /// A tunnel ended.
    TunnelDisconnect {
        /// The device's owner.
        user: String,
        /// The device's name.
        device: String,
        /// The device's id.
        device_id: String,
        /// How long it was up, in seconds.
        seconds: u64,
        /// Why it ended.
        reason: String,
    },
    /// A request or tunnel was refused for its credentials.
    AuthFailure {
        /// Why (the message the caller got).
        reason: String,
        /// `api` or `tunnel`.
        route: &'static str,
        /// Where the caller connected from.
        addr: Option<IpAddr>,
    },
    /// A request or tunnel was refused by a limit (429).
    RateLimited {
        /// The caller, once known (absent for per-address authentication limits).
        user: Option<String>,
        /// Which limit: `requests_per_minute`, `concurrent_requests`, `devices`,
        /// `auth_failures`.
        limit: &'static str,
        /// `api` or `tunnel`.
        route: &'static str,
        /// Where the caller connected from.
        addr: Option<IpAddr>,
    },
    /// An API request, logged when its response has ended.
    Request {
        /// The request id (also in the response and the daemon's log).
        request_id: String,
        /// The caller.
        user: String,
        /// The device that served it, if any.
        device: Option<String>,
        /// HTTP method.
        method: String,
        /// Path, without the query.
        path: String,
        /// The model the request named, when the relay read it.
        model: Option<String>,
        /// Response status.
        status: u16,
        /// Request body bytes received.
        bytes_in: u64,
        /// Response body bytes sent.
        bytes_out: u64,
        /// From the request's arrival to the end of its response, in milliseconds.
        duration_ms: u64,
        /// Where the caller connected from.
        addr: Option<IpAddr>,
    },
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Standard output.
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

impl Target {
    /// `-` is standard output; anything else a file.
    pub fn parse(value: &str) -> Target {
        if value == "-" {
            Target::Stdout
        } else {
            Target::File(PathBuf::from(value))
        }
    }
}

/// A handle to the audit log; cheap to clone. A disabled log records nothing.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    lines: Option<mpsc::Sender<String>>,
    dropped: Arc<AtomicU64>,
    /// In a cluster, this node's name, on every line.
    node: Option<Arc<str>>,
}

impl Audit {
    /// An audit log that records nothing.
    pub fn disabled() -> Audit {
        Audit::default()
    }

    /// Opens `target` and starts its writer. The writer ends once every handle is dropped.
    pub async fn open(target: &Target) -> anyhow::Result<(Audit, JoinHandle<()>)> {
        let mut out: Box<dyn std::io::Write + Send> = match target {
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => {
                let mut options = std::fs::OpenOptions::new();
                options.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
                let path = path.clone();
                let file = tokio::task::spawn_blocking(move || {
                    options
                        .open(&path)
                        .with_context(|| format!("opening the audit log {}", path.display()))
                })
                .await
                .context("opening the audit log")??;
                Box::new(file)
            }
        };
        let (lines, mut rx) = mpsc::channel::<String>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || {
                let mut batch = String::new();
                while let Some(line) = rx.blocking_recv() {
                    batch.clear();
                    batch.push_str(&line);
                    while let Ok(more) = rx.try_recv() {
                        batch.push_str(&more);
                    }
                    if let Err(err) = out.write_all(batch.as_bytes()).and_then(|()| out.flush()) {
                        tracing::error!(error = %err, "cannot write the audit log");
                    }
                    let lost = counter.swap(0, Ordering::Relaxed);
                    if lost > 0 {
                        tracing::warn!(
                            lost,
                            "audit lines dropped: the audit log could not keep up"
                        );
                    }
                }
                let _ = done.send(());
            })
            .context("starting the audit log's writer")?;
        // Ends when the thread has written the last line (every handle dropped).
        let writer = tokio::spawn(async move {
            let _ = finished.await;
        });
        Ok((
            Audit {
                lines: Some(lines),
                dropped,
                node: None,
            },
            writer,
        ))
    }

    /// Names `node` on every line (a cluster node's name, `[cluster] node`).
    pub fn with_node(mut self, node: &str) -> Audit {
        self.node = Some(node.into());
        self
    }

    /// Whether events are recorded at all.
    pub fn is_enabled(&self) -> bool {
        self.lines.is_some()
    }

    /// Records an event (without waiting; see the module docs).
    pub fn record(&self, event: Event) {
        let Some(lines) = &self.lines else { return };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let line = Line {
            ts: now.as_millis() as f64 / 1000.0,
            node: self.node.as_deref(),
            event: &event,
        };
        // Written straight into the line (no JSON tree in between).
        let Ok(mut text) = serde_json::to_string(&line) else {
            return;
        };
        text.push('\n');
        if lines.try_send(text).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One line of the audit log: when, which node (in a cluster), and the event's own fields.
#[derive(Serialize)]
struct Line<'a> {
    /// Seconds since the Unix epoch, to the millisecond.
    ts: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    #[serde(flatten)]
    event: &'a Event,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_the_event_with_its_time_and_node() {
        let event = Event::AuthFailure {
            reason: "invalid token".into(),
            route: "api",
            addr: None,
        };
        let line = |node| {
            let text = serde_json::to_string(&Line {
                ts: 1.5,
                node,
                event: &event,
            })
            .unwrap();
            serde_json::from_str::<serde_json::Value>(&text).unwrap()
        };
        assert_eq!(
            line(Some("node-1")),
            serde_json::json!({
                "ts": 1.5, "node": "node-1", "event": "auth_failure",
                "reason": "invalid token", "route": "api", "addr": null,
            })
        );
        assert!(line(None).get("node").is_none());
    }

    #[tokio::test]
    async fn events_become_json_lines_with_a_timestamp() {
        let dir = std::env::temp_dir().join(format!("cloudllm-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let (audit, writer) = Audit::open(&Target::File(path.clone())).await.unwrap();
        audit.record(Event::AuthFailure {
            reason: "invalid token".into(),
            route: "api",
            addr: None,
        });
        audit.record(Event::TunnelDisconnect {
            user: "u".into(),
            device: "d".into(),
            device_id: "i".into(),
            seconds: 3,
            reason: "closed".into(),
        });
        drop(audit);
        writer.await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "auth_failure");
        assert!(lines[0]["ts"].as_f64().unwrap() > 1.7e9);
        assert_eq!(lines[1]["event"], "tunnel_disconnect");
        assert_eq!(lines[1]["seconds"], 3);
        assert_eq!(Target::parse("-"), Target::Stdout);
        let _ = std::fs::remove_dir_all(dir);
    }
}
