//! The tunnel transport shared by the relay and the daemon.
//!
//! A tunnel is one WebSocket connection, dialled out by the daemon ([`Link`]). Its text
//! messages carry control messages ([`cloudllm_proto::Control`]); its binary messages carry
//! sessions, one at a time, which the relay opens when a request comes and closes when the
//! device has been idle a while. A session is the tunnel's own multiplexer ([`mux`]): the relay
//! opens one stream per user request and the daemon answers it, with per-stream flow control
//! and cancellation both ways; liveness is the link's own WebSocket pings and silence bound. An
//! idle tunnel holds no session state at all, only its WebSocket. This crate supplies the link,
//! the multiplexer, the daemon's session loop ([`server::serve`]), the merging of token bursts
//! into large frames ([`coalesce`]), the relay's read-ahead for its small WebSocket reads
//! ([`ReadAhead`]), the bounded reading of whole bodies from the network that relay and daemon
//! share ([`body`]), header hygiene at each hop ([`headers`]), and the HTTP/2 settings of the
//! relay cluster's node-to-node connections ([`h2_client`], [`h2_server`]: HTTP/2 over TCP
//! between relay nodes, not inside the tunnel).

pub mod body;
pub mod coalesce;
pub mod headers;
mod link;
pub mod mux;
mod read_ahead;
pub mod server;

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use link::{ControlHandler, Incoming, Link, Outbox};
pub use read_ahead::{READ_AHEAD, ReadAhead};

/// Per-stream window of the cluster's node-to-node HTTP/2: 64 KiB. With hyper's larger defaults,
/// many streams of small NDJSON chunks made h2 answer `GOAWAY(ENHANCE_YOUR_CALM,
/// too_many_data_frames)`. (The tunnel's own window is [`mux::WINDOW`].)
pub const STREAM_WINDOW: u32 = 64 * 1024;

/// Connection-wide window of the cluster's node-to-node HTTP/2: 64 MiB, so that a few stalled
/// readers (each holding at most [`STREAM_WINDOW`]) can never exhaust it and block the other
/// streams.
pub const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

/// Most concurrent streams (user requests) one tunnel session carries: the relay answers a
/// request past it with an error, the daemon refuses one. Tier concurrency limits normally
/// stop a user well before.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Largest header block accepted on the tunnel, in bytes: far above any real request, far
/// below what would let a peer make us buffer without end.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// Largest WebSocket message we send: one full data frame (16 KiB of payload and its 9-byte
/// header), so a merged 16 KiB chunk of tokens crosses as one message. Bigger messages add
/// latency for the streams queued behind them; smaller ones add per-message overhead.
pub const MAX_WS_MESSAGE_OUT: usize = 16 * 1024 + 9;

/// Largest WebSocket message (and frame) we accept: 256 KiB, the largest control message
/// ([`cloudllm_proto::MAX_CONTROL_BYTES`]). Our own peer never sends binary messages over
/// [`MAX_WS_MESSAGE_OUT`]; anything far beyond it is hostile.
pub const MAX_WS_MESSAGE_IN: usize = cloudllm_proto::MAX_CONTROL_BYTES;

/// The relay's WebSocket read buffer: 1 KiB. tungstenite zero-fills its whole read buffer
/// before each read, so the buffer is resident memory in every tunnel, idle or not, and the
/// relay holds thousands of tunnels: 1 KiB instead of 8 KiB takes an idle tunnel from ≈42 to
/// ≈34 KiB. The relay reads through a [`ReadAhead`], so a burst of large messages still takes
/// one read per [`READ_AHEAD`] bytes, not one per kilobyte.
pub const RELAY_WS_READ_BUFFER: usize = 1024;

/// The daemon's WebSocket read buffer: 8 KiB (tungstenite's default is 128 KiB). The daemon
/// holds one tunnel; its reads carry requests, bodies included.
pub const DAEMON_WS_READ_BUFFER: usize = 8 * 1024;

/// How each end finds out that its peer is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// How often to send a WebSocket ping (and, between relay nodes, an HTTP/2 PING).
    pub ping_interval: Duration,
    /// How long a PING may go unanswered (and the socket stay silent after the last ping was
    /// due) before the peer is declared dead.
    pub timeout: Duration,
}

impl Liveness {
    /// The longest a dead peer can go unnoticed: one interval plus the timeout.
    pub fn detection_bound(&self) -> Duration {
        self.ping_interval + self.timeout
    }
}

impl Default for Liveness {
    /// 10 s + 10 s: a dead peer is noticed within 20 s, and the pings keep load balancers with
    /// the common 60 s idle timeout from cutting an idle tunnel.
    fn default() -> Self {
        Liveness {
            ping_interval: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The WebSocket settings both ends use, with the end's read buffer
/// ([`RELAY_WS_READ_BUFFER`] or [`DAEMON_WS_READ_BUFFER`]).
pub fn ws_config(read_buffer: usize) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        // Our messages are already batched up to MAX_WS_MESSAGE_OUT: write each one at once.
        .write_buffer_size(0)
        .max_write_buffer_size(4 * MAX_WS_MESSAGE_IN)
        .max_message_size(Some(MAX_WS_MESSAGE_IN))
        .max_frame_size(Some(MAX_WS_MESSAGE_IN))
}

/// An HTTP/2 client builder for node-to-node forwarding, with these windows and PING liveness.
pub fn h2_client(liveness: Liveness) -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .adaptive_window(false)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(liveness.ping_interval)
        .keep_alive_timeout(liveness.timeout)
        .keep_alive_while_idle(true);
    builder
}

/// An HTTP/2 server builder for node-to-node forwarding, with these windows, stream limit and PING
/// liveness.
pub fn h2_server(liveness: Liveness) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .adaptive_window(false)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(liveness.ping_interval)
        .keep_alive_timeout(liveness.timeout);
    builder
}

/// Locks `mutex`, also after a holder panicked: every change under the tunnel's locks is one
/// short step, so a panicking holder cannot leave a half-made change.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
