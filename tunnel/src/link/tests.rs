//! The link over an in-memory socket: pings, silence, control messages, close frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cloudllm_proto::Control;
use futures_util::{SinkExt, StreamExt};
use tokio::io::DuplexStream;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

use super::*;
use crate::Liveness;

type Controls = Arc<std::sync::Mutex<Vec<Control>>>;

/// Short intervals for the tests that run on a paused clock: a ping every 2 s, dead after 5 s.
const QUICK: Liveness = Liveness {
    ping_interval: Duration::from_secs(2),
    timeout: Duration::from_secs(3),
};

/// A link over an in-memory socket, the raw WebSocket of its peer, and the control
/// messages the link's handler got.
async fn pair(liveness: Liveness) -> (Link<DuplexStream>, WebSocketStream<DuplexStream>, Controls) {
    pair_with_buffer(liveness, 1 << 20).await
}

async fn pair_with_buffer(
    liveness: Liveness,
    buffer: usize,
) -> (Link<DuplexStream>, WebSocketStream<DuplexStream>, Controls) {
    let (a, b) = tokio::io::duplex(buffer);
    let ours = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
    let theirs = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
    let got = Controls::default();
    let sink = got.clone();
    let handler = Box::new(move |c| sink.lock().unwrap().push(c));
    (Link::new(ours, liveness, handler), theirs, got)
}

/// The peer's next message that is not a ping.
async fn next_data(peer: &mut WebSocketStream<DuplexStream>) -> Message {
    loop {
        match peer.next().await.unwrap().unwrap() {
            Message::Ping(_) | Message::Pong(_) => {}
            other => return other,
        }
    }
}

fn text(control: &Control) -> Message {
    Message::Text(control.to_text().into())
}

#[tokio::test]
async fn ending_a_session_waits_for_the_peer_and_drops_its_last_bytes() {
    let (mut link, mut peer, _) = pair(Liveness::default()).await;
    let ending = tokio::spawn(async move { link.end_session(false).await.map(|()| link) });
    assert_eq!(next_data(&mut peer).await, text(&Control::SessionEnd));
    peer.send(Message::Binary(Bytes::from_static(b"late")))
        .await
        .unwrap();
    peer.send(text(&Control::SessionEnd)).await.unwrap();
    peer.send(Message::Binary(Bytes::from_static(b"next")))
        .await
        .unwrap();
    let mut link = ending.await.unwrap().unwrap();
    // The idle link's next data is the next session's first bytes.
    assert!(matches!(link.next().await.unwrap(), Incoming::Data(d) if d == "next"));
}

#[tokio::test]
async fn the_outbox_sends_while_the_owner_waits_for_data() {
    let (mut link, mut peer, _) = pair(Liveness::default()).await;
    let outbox = link.outbox();
    let reader = tokio::spawn(async move { link.next().await });
    outbox.push(Control::Drain);
    assert_eq!(next_data(&mut peer).await, text(&Control::Drain));
    peer.send(Message::Binary(Bytes::from_static(b"done")))
        .await
        .unwrap();
    let incoming = reader.await.unwrap().unwrap();
    assert!(matches!(incoming, Incoming::Data(d) if d == "done"));
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_fails_a_send_within_the_bound() {
    let liveness = QUICK;
    // A socket with room for 64 bytes, and a peer that never reads.
    let (mut link, _peer, _) = pair_with_buffer(liveness, 64).await;
    let big = Control::Models {
        models: vec!["m".repeat(1000)],
    };
    let started = Instant::now();
    let err = link.send(&big).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert_eq!(started.elapsed(), liveness.detection_bound());
    // Closing does not hang either.
    link.close(CloseCode::Normal, "bye").await;
    assert!(link.is_closed());
}

#[tokio::test]
async fn unreadable_control_messages_fail_the_link() {
    let (mut link, mut peer, _) = pair(Liveness::default()).await;
    peer.send(Message::Text("hello?".into())).await.unwrap();
    let err = link.next().await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[tokio::test(start_paused = true)]
async fn silent_peer_is_declared_dead_within_the_bound_and_pinged_before() {
    let liveness = QUICK;
    let (mut link, mut peer, _) = pair(liveness).await;
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let err = link.next().await.unwrap_err();
        (err.kind(), Instant::now())
    });
    // The peer sees our first ping at once and the next after one interval (it never
    // answers them).
    let first = peer.next().await.unwrap().unwrap();
    assert!(matches!(first, Message::Ping(_)));
    assert_eq!(Instant::now() - start, Duration::ZERO);
    let second = peer.next().await.unwrap().unwrap();
    assert!(matches!(second, Message::Ping(_)));
    assert_eq!(Instant::now() - start, liveness.ping_interval);
    let (kind, died) = reader.await.unwrap();
    assert_eq!(kind, io::ErrorKind::TimedOut);
    assert_eq!(died - start, liveness.detection_bound());
}

#[tokio::test]
async fn the_peers_close_code_and_reason_are_kept() {
    let (mut link, mut peer, _) = pair(Liveness::default()).await;
    peer.close(Some(CloseFrame {
        code: CloseCode::Restart,
        reason: "maintenance".into(),
    }))
    .await
    .unwrap();
    assert!(matches!(link.next().await.unwrap(), Incoming::Closed));
    assert!(link.is_closed());
    let frame = link.peer_close().expect("the close frame");
    assert_eq!(frame.code, CloseCode::Restart);
    assert_eq!(frame.reason.as_str(), "maintenance");
}

#[tokio::test]
async fn pongs_measure_the_round_trip() {
    let (link, mut peer, _) = pair(Liveness::default()).await;
    let cell = Arc::new(AtomicU64::new(0));
    let mut link = link.with_rtt(cell.clone());
    let reader = tokio::spawn(async move {
        let _ = link.next().await;
    });
    // The peer reads our first ping; tungstenite answers it with a pong as it reads on.
    let ping = peer.next().await.unwrap().unwrap();
    assert!(matches!(ping, Message::Ping(_)));
    let reading = tokio::spawn(async move { while peer.next().await.is_some() {} });
    for _ in 0..200 {
        if cell.load(Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(cell.load(Ordering::Relaxed) > 0, "round trip measured");
    reader.abort();
    reading.abort();
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_keeps_talking_stays_alive() {
    let liveness = QUICK;
    let (mut link, mut peer, _) = pair(liveness).await;
    let reader = tokio::spawn(async move { link.next().await });
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        peer.send(Message::Pong(Bytes::new())).await.unwrap();
    }
    peer.send(Message::Binary(Bytes::from_static(b"live")))
        .await
        .unwrap();
    let incoming = reader.await.unwrap().unwrap();
    assert!(matches!(incoming, Incoming::Data(d) if d == "live"));
}
