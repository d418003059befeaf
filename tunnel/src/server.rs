//! The daemon's end of a tunnel: answer each session the relay opens, for as long as the link
//! lives.
//!
//! The relay opens a session by sending its first message (a request) on an idle link; this
//! end then serves it with [`mux::server::serve_session`](crate::mux::server::serve_session)
//! until the relay ends it, tells the peer with [`Link::end_session`], and waits for the next
//! one.

use std::error::Error as StdError;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use http_body::Body;
use hyper::service::Service;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;

use crate::ControlHandler;
use crate::link::{Incoming, Link};
use crate::mux::{BoxError, RecvBody};

/// What the relay tells this end, as cancelled tokens: the daemon's control handler.
#[derive(Clone, Default)]
pub struct RelaySignals {
    /// The relay has registered the device ([`Control::Ready`](cloudllm_proto::Control::Ready)):
    /// requests may come.
    pub ready: CancellationToken,
    /// The relay asks this tunnel to drain
    /// ([`Control::Drain`](cloudllm_proto::Control::Drain)).
    pub drain: CancellationToken,
    /// Notified when the relay asks for lanes
    /// ([`Control::Lanes`](cloudllm_proto::Control::Lanes)); [`RelaySignals::lanes_asked`]
    /// takes what it asked for.
    pub lanes: Arc<Notify>,
    asked: Arc<Mutex<Option<LanesAsked>>>,
}

/// Lanes the relay asked for: one connection per relay thread in `shards`, each presenting
/// `key` (checked: at most [`MAX_LANES`](cloudllm_proto::MAX_LANES) shards, no repeats, a
/// well-formed key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanesAsked {
    /// The relay threads.
    pub shards: Vec<u32>,
    /// The tunnel's lane key.
    pub key: String,
}

impl RelaySignals {
    /// The link's control handler that cancels these tokens; other control messages (which
    /// relays do not send) are ignored, and so is a request for lanes that is not well-formed.
    pub fn handler(&self) -> ControlHandler {
        let signals = self.clone();
        Box::new(move |control| match control {
            cloudllm_proto::Control::Ready => signals.ready.cancel(),
            cloudllm_proto::Control::Drain => signals.drain.cancel(),
            cloudllm_proto::Control::Lanes { mut shards, key } => {
                shards.sort_unstable();
                shards.dedup();
                if shards.len() <= cloudllm_proto::MAX_LANES && cloudllm_proto::valid_lane_key(&key)
                {
                    *signals.asked.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(LanesAsked { shards, key });
                    signals.lanes.notify_one();
                }
            }
            _ => {}
        })
    }

    /// The lanes the relay last asked for, once (see [`RelaySignals::lanes`]).
    pub fn lanes_asked(&self) -> Option<LanesAsked> {
        self.asked.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// How [`serve`] ended.
pub enum Served<S> {
    /// `stop` was cancelled: the session in flight (if any) finished after new requests were refused. The link
    /// is idle and still open; close it with the reason.
    Stopped(Box<Link<S>>),
    /// The peer closed the WebSocket, with this close frame if it sent one.
    Closed(Option<CloseFrame>),
    /// The tunnel failed: the peer went silent, broke the protocol, or the socket failed.
    Failed(Box<dyn StdError + Send + Sync>),
}

/// Serves every session the peer opens on `link` with `service`, until the WebSocket closes or
/// fails, or `stop` is cancelled. On `stop`, a session in flight refuses new requests and its
/// requests in flight run to their end: bound the wait by dropping this future.
pub async fn serve<S, Svc, B>(
    mut link: Link<S>,
    service: Svc,
    stop: &CancellationToken,
) -> Served<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
    Svc: Service<Request<RecvBody>, Response = Response<B>>,
    Svc::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    loop {
        let first = tokio::select! {
            incoming = link.next() => match incoming {
                Ok(Incoming::Data(first)) => first,
                Ok(Incoming::SessionEnd) => {
                    return Served::Failed("the relay ended a session that was not open".into());
                }
                Ok(Incoming::Closed) => return Served::Closed(link.peer_close().cloned()),
                Err(err) => return Served::Failed(err.into()),
            },
            () = stop.cancelled() => return Served::Stopped(Box::new(link)),
        };
        let ended = crate::mux::server::serve_session(link, first, &service, stop).await;
        link = ended.link;
        if link.is_closed() {
            return Served::Closed(link.peer_close().cloned());
        }
        if let Err(err) = ended.result {
            return Served::Failed(err.into());
        }
        if stop.is_cancelled() {
            // The peer reads the end before the close the caller sends next.
            let _ = link.send(&cloudllm_proto::Control::SessionEnd).await;
            return Served::Stopped(Box::new(link));
        }
        if let Err(err) = link.end_session(ended.peer_ended).await {
            return Served::Failed(err.into());
        }
    }
}

/// `err` and its causes, `: `-separated. hyper's errors print only their own kind
/// ("connection error"); the cause (the peer silent past the ping bound, a reset) is what the
/// user needs to see.
pub fn with_causes(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connection error")]
    struct Outer(#[source] io::Error);

    #[test]
    fn well_formed_requests_for_lanes_are_kept_for_the_daemon() {
        let signals = RelaySignals::default();
        let mut handler = signals.handler();
        let key = "0123456789abcdef0123456789abcdef".to_owned();
        handler(cloudllm_proto::Control::Lanes {
            shards: vec![3, 1, 3],
            key: "not a key".into(),
        });
        handler(cloudllm_proto::Control::Lanes {
            shards: vec![0; cloudllm_proto::MAX_LANES + 1],
            key: key.clone(),
        });
        // Repeats count once: MAX_LANES + 1 zeros are one shard.
        assert_eq!(
            signals.lanes_asked(),
            Some(LanesAsked {
                shards: vec![0],
                key: key.clone()
            })
        );
        let too_many: Vec<u32> = (0..=cloudllm_proto::MAX_LANES as u32).collect();
        handler(cloudllm_proto::Control::Lanes {
            shards: too_many,
            key: key.clone(),
        });
        assert_eq!(signals.lanes_asked(), None);
        handler(cloudllm_proto::Control::Lanes {
            shards: vec![3, 1, 3],
            key: key.clone(),
        });
        assert_eq!(
            signals.lanes_asked(),
            Some(LanesAsked {
                shards: vec![1, 3],
                key
            })
        );
        // Taken once.
        assert_eq!(signals.lanes_asked(), None);
    }

    #[test]
    fn errors_are_reported_with_their_causes() {
        let err = Outer(io::Error::new(
            io::ErrorKind::TimedOut,
            "tunnel peer silent for 2s",
        ));
        assert_eq!(
            with_causes(&err),
            "connection error: tunnel peer silent for 2s"
        );
        let plain = io::Error::other("reset");
        assert_eq!(with_causes(&plain), "reset");
    }
}
