//! Thread-per-core serving: one single-threaded runtime per core (a *shard*), and each plain
//! TCP connection served on the shard its first request calls for.
//!
//! Why: a request crosses two tasks in the relay, the client's HTTP/1 connection and the
//! device's tunnel. On tokio's work-stealing runtime the two often sit on different cores, and
//! every request then wakes a second thread: measured, that hand-off was most of what the relay
//! spent per request above a plain hyper proxy (docs/performance.md). Here a request and the
//! tunnel connection it uses run on one thread, while the work spreads over every core:
//! - A device's tunnel and its *lanes* (more connections of the same tunnel, one per shard,
//!   which the relay asks a busy device for: `tunnel::lane`) each land on their own shard;
//!   a lane's upgrade names its shard in its `x-cloudllm-lane` header.
//! - A user whose device opens lanes has their connections go to the shards in turn: each
//!   shard has a lane of that device. Other users' connections go to the shard of the user
//!   their first request names (where that user's tunnel is too); so do the tunnels.
//!
//! The user is read from the bearer token in the first request head the client sent, without
//! verifying it: placement decides only where the work runs, and every request is verified as
//! before wherever it lands. A connection that names no user (the web page's files, a health
//! check, a token that is not a JWT) goes to the shards in turn. Later requests on the same
//! connection may name other users (a proxy in front pooling its connections): they are served
//! all the same, crossing threads as before.
//!
//! TLS connections stay on the main runtime: a TLS stream cannot move between runtimes, and
//! its first request cannot be read before its handshake. Lanes are not asked for then.

use std::cell::Cell;
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

thread_local! {
    /// The index of the shard this thread runs, on shard threads.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the shard the calling thread runs; `None` off the shards (TLS connections,
/// the main runtime).
pub(crate) fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

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
                    CURRENT.with(|current| current.set(Some(index)));
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

    /// The runtime to serve a connection whose first request head starts with `head`: the
    /// shard a lane's upgrade names; for a user that `spreads` (their device has lanes), the
    /// next shard in turn; else the user's own shard.
    pub(crate) fn for_head(&self, head: &[u8], spreads: impl Fn(&str) -> bool) -> &Handle {
        if let Some(shard) = lane_of(head).filter(|&shard| shard < self.handles.len()) {
            return &self.handles[shard];
        }
        let user = user_of(head).filter(|user| !spreads(user));
        &self.handles[self.index_for(user)]
    }

    /// The shard of `user`; the next in turn for none.
    fn index_for(&self, user: Option<String>) -> usize {
        let n = self.handles.len();
        match user {
            Some(user) => (self.hasher.hash_one(user) % n as u64) as usize,
            None => self.next.fetch_add(1, Ordering::Relaxed) % n,
        }
    }
}

/// The shard a lane's upgrade request names (`x-cloudllm-lane: SHARD.KEY`); the key is
/// checked where the upgrade is served.
fn lane_of(head: &[u8]) -> Option<usize> {
    let value = header(head, cloudllm_proto::HEADER_LANE)?;
    value.split_once('.')?.0.parse().ok()
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

/// The token of the first complete `Authorization: Bearer …` line in `head`.
fn bearer_token(head: &[u8]) -> Option<&str> {
    let (scheme, token) = header(head, "authorization")?.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// The value (trimmed) of the first complete `name` header line in `head`, before the blank
/// line that ends the head.
fn header<'h>(head: &'h [u8], name: &str) -> Option<&'h str> {
    // Only complete lines: the last piece may have been cut by the peek.
    let complete = &head[..head.windows(2).rposition(|w| w == b"\r\n")?];
    let mut headers = complete
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .skip(1) // the request line
        .take_while(|line| !line.is_empty()); // the body is not the head
    headers.find_map(|line| {
        let (found, value) = line.split_at(line.iter().position(|&b| b == b':')?);
        if !found.eq_ignore_ascii_case(name.as_bytes()) {
            return None;
        }
        Some(std::str::from_utf8(&value[1..]).ok()?.trim())
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
        let on_shard = |head: &str, spreads: bool| {
            shards
                .for_head(head.as_bytes(), |_| spreads)
                .spawn(async { (std::thread::current().name().map(str::to_owned), current()) })
        };
        let (name, index) = on_shard(&head, false).await.unwrap();
        assert_eq!(name, Some(format!("relay-shard-{alice}")));
        assert_eq!(index, Some(alice));
        assert_eq!(current(), None, "the test's own thread is no shard");
        // Once alice's device has lanes, her connections go round the shards.
        let spread: Vec<usize> =
            futures_util::future::join_all((0..4).map(|_| on_shard(&head, true)))
                .await
                .into_iter()
                .map(|placed| placed.unwrap().1.unwrap())
                .collect();
        let mut sorted = spread.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2, 3], "{spread:?}");
        // A lane's upgrade lands on the shard it names, whatever its user.
        for shard in 0..4 {
            let lane = format!(
                "GET /tunnel HTTP/1.1\r\nAuthorization: Bearer {}\r\nX-Cloudllm-Lane: {shard}.{}\r\n\r\n",
                jwt(r#"{"sub":"alice"}"#),
                "0".repeat(32)
            );
            assert_eq!(on_shard(&lane, false).await.unwrap().1, Some(shard));
        }
        // A shard out of range is no lane: the head goes where its user does.
        let wild = head.replace("\r\n\r\n", "\r\nx-cloudllm-lane: 9.k\r\n\r\n");
        assert_eq!(on_shard(&wild, false).await.unwrap().1, Some(alice));
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
