//! Thread-per-core serving: one single-threaded runtime per core (a *shard*), and each plain
//! TCP connection served on the shard of the user its first request names.
//!
//! Why: a request crosses two tasks in the relay, the client's HTTP/1 connection and the
//! device's tunnel (HTTP/2 over a WebSocket). On tokio's work-stealing runtime the two often
//! sit on different cores, and every request then wakes a second thread: measured, that
//! hand-off was most of what the relay spent per request above a plain hyper proxy
//! (docs/performance.md). Here the tunnel upgrade and the API calls of one user land on one
//! shard, so a request and its tunnel run on one thread, while different users spread over
//! every core.
//!
//! The user is read from the bearer token in the first request head the client sent, without
//! verifying it: placement decides only where the work runs, and every request is verified as
//! before wherever it lands. A connection that names no user (the web page's files, a health
//! check, a token that is not a JWT) goes to the shards in turn. Later requests on the same
//! connection may name other users (a proxy in front pooling its connections): they are served
//! all the same, crossing threads as before.
//!
//! TLS connections stay on the main runtime: a TLS stream cannot move between runtimes, and
//! its first request cannot be read before its handshake.

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Most bytes of a connection's first request read (without consuming them) to find its
/// user: 8 KiB, hyper's own first read. A bearer token from an identity provider is 1–2 KiB;
/// a head whose token starts further on goes to the shards in turn.
pub(crate) const PEEK_BYTES: usize = 8 * 1024;

/// The shards: their runtimes' handles. Dropping the last `Shards` ends their threads, and
/// with them every task still running there (as a process exit would).
pub(crate) struct Shards {
    handles: Vec<Handle>,
    /// Keyed once per relay: which shard a user lands on is not predictable from outside.
    hasher: RandomState,
    /// The next shard for a connection that names no user.
    next: AtomicUsize,
    /// Each shard thread runs until its sender here is dropped.
    _running: Vec<oneshot::Sender<()>>,
}

impl Shards {
    /// Starts `count` shard threads (at least one), each with a single-threaded runtime.
    pub(crate) fn start(count: usize) -> io::Result<Shards> {
        let count = count.max(1);
        let mut handles = Vec::with_capacity(count);
        let mut running = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("relay-shard-{index}"))
                .spawn(move || {
                    // Ends when the sender is dropped; the runtime, dropped after it, drops
                    // the tasks left on it.
                    let _ = runtime.block_on(stopped);
                })?;
            running.push(stop);
        }
        Ok(Shards {
            handles,
            hasher: RandomState::new(),
            next: AtomicUsize::new(0),
            _running: running,
        })
    }

    /// How many shards there are.
    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }

    /// The runtime to serve a connection whose first request head starts with `head`.
    pub(crate) fn for_head(&self, head: &[u8]) -> &Handle {
        &self.handles[self.index_for(user_of(head))]
    }

    fn index_for(&self, user: Option<String>) -> usize {
        let n = self.handles.len();
        match user {
            Some(user) => (self.hasher.hash_one(user) % n as u64) as usize,
            None => self.next.fetch_add(1, Ordering::Relaxed) % n,
        }
    }
}

/// The user (`sub`) of the bearer token in a request head, unverified; `None` when the bytes
/// hold no complete `Authorization` line with a JWT whose payload names one.
pub(crate) fn user_of(head: &[u8]) -> Option<String> {
    let token = bearer_token(head)?;
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Subject {
        sub: String,
    }
    serde_json::from_slice::<Subject>(&json).ok().map(|s| s.sub)
}

/// The token of the first complete `Authorization: Bearer …` line in `head`, before the blank
/// line that ends the head.
fn bearer_token(head: &[u8]) -> Option<&str> {
    // Only complete lines: the last piece may have been cut by the peek.
    let complete = &head[..head.windows(2).rposition(|w| w == b"\r\n")?];
    let mut headers = complete
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .skip(1) // the request line
        .take_while(|line| !line.is_empty()); // the body is not the head
    headers.find_map(|line| {
        let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
        if !name.eq_ignore_ascii_case(b"authorization") {
            return None;
        }
        let value = std::str::from_utf8(&value[1..]).ok()?.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|token| !token.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let encode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2ln", encode(r#"{"alg":"HS256"}"#), encode(payload))
    }

    #[test]
    fn the_user_is_the_tokens_subject() {
        let head = format!(
            "POST /api/chat HTTP/1.1\r\nhost: relay\r\nAUTHORIZATION: bearer {}\r\n\r\n{{",
            jwt(r#"{"sub":"alice","scope":"client"}"#)
        );
        assert_eq!(user_of(head.as_bytes()).as_deref(), Some("alice"));
    }

    #[test]
    fn no_user_without_a_whole_bearer_jwt() {
        let token = jwt(r#"{"sub":"alice"}"#);
        let cut = format!("GET /api/tags HTTP/1.1\r\nauthorization: Bearer {token}");
        let heads = [
            "GET / HTTP/1.1\r\nhost: relay\r\n\r\n".to_owned(),
            format!("GET / HTTP/1.1\r\nauthorization: Basic {token}\r\n\r\n"),
            "GET / HTTP/1.1\r\nauthorization: Bearer not-a-jwt\r\n\r\n".to_owned(),
            format!(
                "GET / HTTP/1.1\r\nauthorization: Bearer {}\r\n\r\n",
                jwt(r#"{"scope":"client"}"#)
            ),
            // The request line is not a header, and a cut line is not read.
            format!("authorization: Bearer {token}\r\n\r\n"),
            // Nor is the body.
            format!(
                "POST /api/chat HTTP/1.1\r\nhost: relay\r\n\r\nauthorization: Bearer {token}\r\n"
            ),
            cut,
        ];
        for head in heads {
            assert_eq!(user_of(head.as_bytes()), None, "{head}");
        }
    }

    #[tokio::test]
    async fn one_user_always_lands_on_one_shard_and_others_go_in_turn() {
        let shards = Shards::start(4).unwrap();
        let alice = shards.index_for(Some("alice".into()));
        for _ in 0..10 {
            assert_eq!(shards.index_for(Some("alice".into())), alice);
        }
        let anonymous: Vec<usize> = (0..8).map(|_| shards.index_for(None)).collect();
        assert_eq!(anonymous, [0, 1, 2, 3, 0, 1, 2, 3]);
        // Work spawned on a shard runs on that shard's thread.
        let head = format!(
            "GET / HTTP/1.1\r\nauthorization: Bearer {}\r\n\r\n",
            jwt(r#"{"sub":"alice"}"#)
        );
        let name = shards
            .for_head(head.as_bytes())
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(name, Some(format!("relay-shard-{alice}")));
    }

    #[tokio::test]
    async fn dropping_the_shards_ends_their_tasks() {
        let shards = Shards::start(2).unwrap();
        let (held, released) = oneshot::channel::<()>();
        let task = shards.handles[0].spawn(async move {
            let _held = held;
            std::future::pending::<()>().await
        });
        drop(shards);
        // The task's sender is dropped with it: the receiver sees the channel close.
        assert!(
            tokio::time::timeout(std::time::Duration::from_secs(5), released)
                .await
                .expect("the shard's task ended")
                .is_err()
        );
        assert!(task.await.unwrap_err().is_cancelled());
    }
}
