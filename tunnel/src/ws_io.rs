//! [`WsIo`]: one HTTP/2 session's byte stream over a lent [`Link`], so hyper can run HTTP/2
//! over the tunnel's WebSocket.
//!
//! Writes are gathered and sent as one binary message per flush (at most
//! [`MAX_WS_MESSAGE_OUT`](crate::MAX_WS_MESSAGE_OUT) bytes each); reads hand out the payload of
//! binary messages. The peer's [`Control::SessionEnd`](cloudllm_proto::Control::SessionEnd)
//! or a close of the WebSocket is the end of the stream; shutting the stream down only flushes
//! it (the WebSocket stays open for the next session). When hyper drops the stream at the end
//! of the session, the link goes back to its owner through the receiver [`WsIo::lend`] returned.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::MAX_WS_MESSAGE_OUT;
use crate::link::{Incoming, Link};

/// One HTTP/2 session's byte stream over a lent link. See the module docs.
pub struct WsIo<S> {
    /// Always present until the stream is dropped.
    link: Option<Link<S>>,
    /// Unread rest of the last binary message received.
    read_buf: Bytes,
    /// Bytes written by hyper and not yet sent as a message.
    write_buf: BytesMut,
    /// The peer has ended the session.
    peer_ended: bool,
    give_back: Option<oneshot::Sender<Returned<S>>>,
}

/// A link back from a session (see [`WsIo::lend`]).
pub struct Returned<S> {
    /// The link, idle unless its WebSocket closed.
    pub link: Link<S>,
    /// Whether the peer ended its part of the session (for [`Link::end_session`]).
    pub peer_ended: bool,
}

impl<S> WsIo<S> {
    /// Lends `link` to a new session whose first bytes from the peer are `first` (empty when
    /// this end opens the session). The link comes back through the receiver when the stream
    /// is dropped.
    pub fn lend(link: Link<S>, first: Bytes) -> (Self, oneshot::Receiver<Returned<S>>) {
        let (give_back, back) = oneshot::channel();
        let io = WsIo {
            link: Some(link),
            read_buf: first,
            write_buf: BytesMut::new(),
            peer_ended: false,
            give_back: Some(give_back),
        };
        (io, back)
    }

    fn parts(&mut self) -> io::Result<(&mut Link<S>, &mut Bytes, &mut BytesMut, &mut bool)> {
        match &mut self.link {
            Some(link) => Ok((
                link,
                &mut self.read_buf,
                &mut self.write_buf,
                &mut self.peer_ended,
            )),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "session stream without its link",
            )),
        }
    }
}

impl<S> Drop for WsIo<S> {
    fn drop(&mut self) {
        if let (Some(link), Some(give_back)) = (self.link.take(), self.give_back.take()) {
            // The owner may be gone (its task was cut): then the link just closes.
            let _ = give_back.send(Returned {
                link,
                peer_ended: self.peer_ended,
            });
        }
    }
}

impl<S> AsyncRead for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (link, read_buf, _, peer_ended) = self.get_mut().parts()?;
        loop {
            if !read_buf.is_empty() {
                let n = read_buf.len().min(buf.remaining());
                buf.put_slice(&read_buf[..n]);
                read_buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if *peer_ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(link.poll_incoming(cx))? {
                Incoming::Data(data) => *read_buf = data,
                Incoming::SessionEnd => *peer_ended = true,
                Incoming::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<S> AsyncWrite for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let (link, _, write_buf, _) = self.get_mut().parts()?;
        if write_buf.len() >= MAX_WS_MESSAGE_OUT {
            ready!(link.poll_send_data(cx, write_buf))?;
        }
        let n = data.len().min(MAX_WS_MESSAGE_OUT - write_buf.len());
        write_buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (link, _, write_buf, _) = self.get_mut().parts()?;
        ready!(link.poll_send_data(cx, write_buf))?;
        link.poll_flush(cx)
    }

    /// Flushes only: the session's end is told by [`Link::end_session`] once the stream is
    /// back with its owner, and the WebSocket outlives the session.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use cloudllm_proto::Control;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::Instant;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

    use super::*;
    use crate::Liveness;

    type Controls = Arc<std::sync::Mutex<Vec<Control>>>;

    /// A link over an in-memory socket, the raw WebSocket of its peer, and the control
    /// messages the link's handler got.
    async fn pair(
        liveness: Liveness,
    ) -> (Link<DuplexStream>, WebSocketStream<DuplexStream>, Controls) {
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
    async fn session_bytes_are_binary_messages_split_at_the_cap_and_end_at_session_end() {
        let (link, mut peer, got) = pair(Liveness::default()).await;
        let (mut io, back) = WsIo::lend(link, Bytes::from_static(b"pre"));
        let data = vec![7u8; MAX_WS_MESSAGE_OUT + 10];
        io.write_all(&data).await.unwrap();
        io.flush().await.unwrap();
        let first = next_data(&mut peer).await;
        let second = next_data(&mut peer).await;
        assert!(matches!(&first, Message::Binary(b) if b.len() == MAX_WS_MESSAGE_OUT));
        assert!(matches!(&second, Message::Binary(b) if b.len() == 10));

        // The first bytes come first; control messages in the middle of a session go to the
        // handler, not into the byte stream.
        let models = Control::Models {
            models: vec!["a:latest".into()],
        };
        peer.send(text(&models)).await.unwrap();
        peer.send(Message::Binary(Bytes::from_static(b"hello")))
            .await
            .unwrap();
        peer.send(text(&Control::SessionEnd)).await.unwrap();
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"prehello", "session end is the end of the stream");
        assert_eq!(*got.lock().unwrap(), vec![models]);

        // Shutting the stream down does not close the WebSocket; dropping it returns the link.
        io.shutdown().await.unwrap();
        drop(io);
        let Returned {
            mut link,
            peer_ended,
        } = back.await.unwrap();
        assert!(peer_ended && !link.is_closed());
        link.end_session(true).await.unwrap();
        assert_eq!(next_data(&mut peer).await, text(&Control::SessionEnd));
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
    async fn the_outbox_sends_while_a_session_waits_for_data() {
        let (link, mut peer, _) = pair(Liveness::default()).await;
        let outbox = link.outbox();
        let (mut io, _back) = WsIo::lend(link, Bytes::new());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 4];
            io.read_exact(&mut buf).await.map(|_| buf)
        });
        outbox.push(Control::Drain);
        assert_eq!(next_data(&mut peer).await, text(&Control::Drain));
        peer.send(Message::Binary(Bytes::from_static(b"done")))
            .await
            .unwrap();
        assert_eq!(&reader.await.unwrap().unwrap(), b"done");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_fails_a_send_within_the_bound() {
        let liveness = Liveness {
            ping_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(3),
        };
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
        let liveness = Liveness {
            ping_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(3),
        };
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
    async fn the_peers_close_code_and_reason_are_kept_and_end_a_session() {
        let (link, mut peer, _) = pair(Liveness::default()).await;
        let (mut io, back) = WsIo::lend(link, Bytes::new());
        peer.close(Some(CloseFrame {
            code: CloseCode::Restart,
            reason: "maintenance".into(),
        }))
        .await
        .unwrap();
        let mut rest = Vec::new();
        assert_eq!(io.read_to_end(&mut rest).await.unwrap(), 0, "close is EOF");
        drop(io);
        let link = back.await.unwrap().link;
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
        let liveness = Liveness {
            ping_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(3),
        };
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
}
