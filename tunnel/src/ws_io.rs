//! [`WsIo`]: a WebSocket seen as a plain byte stream, so hyper can run HTTP/2 over it.
//!
//! Writes are gathered and sent as one binary message per flush (at most
//! [`MAX_WS_MESSAGE_OUT`](crate::MAX_WS_MESSAGE_OUT) bytes each); reads hand out the payload of
//! binary messages and skip pings, pongs and text; a close or the end of the socket is the end
//! of the stream. The adapter also keeps the WebSocket itself alive: it sends a ping every
//! interval and fails the stream when nothing at all has arrived for too long, so a peer that
//! vanished without a FIN is noticed even before HTTP/2's own PING timeout.
//!
//! The peer's close frame (code and reason) can be kept in a [`CloseCell`]: HTTP/2 above sees
//! only the end of the stream, but the daemon redials at once when a proxy in front of the
//! relay closes with 1012 (service restart) and reports any other code to the user.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::{Liveness, MAX_WS_MESSAGE_OUT};

/// A WebSocket connection as an `AsyncRead + AsyncWrite` byte stream. See the module docs.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// Unread rest of the last binary message received.
    read_buf: Bytes,
    /// Bytes written by hyper and not yet sent as a message.
    write_buf: BytesMut,
    liveness: Liveness,
    /// When anything (data, ping, pong) last arrived from the peer.
    last_received: Instant,
    /// Fires when the next ping is due.
    ping_timer: Pin<Box<Sleep>>,
    /// Fires when the peer may be declared dead unless something arrived meanwhile.
    idle_timer: Pin<Box<Sleep>>,
    /// A ping was queued but the socket has not been flushed since.
    ping_unflushed: bool,
    /// When our last ping went out, until its pong arrives.
    ping_sent: Option<Instant>,
    /// Where the measured round trip goes, in microseconds.
    rtt_micros: Option<Arc<AtomicU64>>,
    /// Where the peer's close frame goes.
    close: Option<CloseCell>,
}

/// The close frame the peer sent, if it sent one, filled in by [`WsIo`] when it reads it.
pub type CloseCell = Arc<std::sync::Mutex<Option<CloseFrame>>>;

impl<S> WsIo<S> {
    /// Wraps an established WebSocket. `liveness` sets the ping interval and how long the
    /// peer may stay silent ([`Liveness::detection_bound`]) before reads fail. The first ping
    /// goes out at once, so the round trip is known right after connecting.
    pub fn new(ws: WebSocketStream<S>, liveness: Liveness) -> Self {
        let now = Instant::now();
        WsIo {
            ws,
            read_buf: Bytes::new(),
            write_buf: BytesMut::new(),
            liveness,
            last_received: now,
            ping_timer: Box::pin(tokio::time::sleep_until(now)),
            idle_timer: Box::pin(tokio::time::sleep_until(now + liveness.detection_bound())),
            ping_unflushed: false,
            ping_sent: None,
            rtt_micros: None,
            close: None,
        }
    }

    /// Stores the peer's close frame (code and reason) into `cell` when one arrives.
    pub fn with_close(mut self, cell: CloseCell) -> Self {
        self.close = Some(cell);
        self
    }

    /// Stores each measured ping round trip (microseconds) into `cell`.
    pub fn with_rtt(mut self, cell: Arc<AtomicU64>) -> Self {
        self.rtt_micros = Some(cell);
        self
    }
}

fn to_io(err: WsError) -> io::Error {
    match err {
        WsError::Io(err) => err,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => io::Error::other(other),
    }
}

impl<S> WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Sends a due ping and fails when the peer has been silent past the detection bound.
    /// Never returns `Ready(Ok)`: it only registers timers and reports death.
    fn poll_liveness(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.idle_timer.as_mut().poll(cx).is_ready() {
            let deadline = self.last_received + self.liveness.detection_bound();
            if deadline <= Instant::now() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "tunnel peer silent for {:?}: connection presumed dead",
                        self.liveness.detection_bound()
                    ),
                ));
            }
            self.idle_timer.as_mut().reset(deadline);
            // Register the waker on the new deadline.
            let _ = self.idle_timer.as_mut().poll(cx);
        }
        if self.ping_timer.as_mut().poll(cx).is_ready()
            && let Poll::Ready(ready) = Pin::new(&mut self.ws).poll_ready(cx)
        {
            ready.map_err(to_io)?;
            Pin::new(&mut self.ws)
                .start_send(Message::Ping(Bytes::new()))
                .map_err(to_io)?;
            self.ping_unflushed = true;
            self.ping_sent = Some(Instant::now());
            let next = Instant::now() + self.liveness.ping_interval;
            self.ping_timer.as_mut().reset(next);
            let _ = self.ping_timer.as_mut().poll(cx);
        }
        if self.ping_unflushed
            && let Poll::Ready(flushed) = Pin::new(&mut self.ws).poll_flush(cx)
        {
            flushed.map_err(to_io)?;
            self.ping_unflushed = false;
        }
        Ok(())
    }

    /// Sends what hyper has written so far as one binary message.
    fn poll_send_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(to_io)?;
        let payload = self.write_buf.split().freeze();
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(payload))
            .map_err(to_io)?;
        Poll::Ready(Ok(()))
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
        let this = self.get_mut();
        loop {
            if !this.read_buf.is_empty() {
                let n = this.read_buf.len().min(buf.remaining());
                buf.put_slice(&this.read_buf[..n]);
                this.read_buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            this.poll_liveness(cx)?;
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(message)) => {
                    this.last_received = Instant::now();
                    match message {
                        Message::Binary(data) => this.read_buf = data,
                        // A close ends the byte stream; tungstenite answers it for us.
                        Message::Close(frame) => {
                            if let (Some(frame), Some(cell)) = (frame, &this.close)
                                && let Ok(mut slot) = cell.lock()
                            {
                                *slot = Some(frame);
                            }
                            return Poll::Ready(Ok(()));
                        }
                        Message::Pong(_) => {
                            if let (Some(sent), Some(cell)) =
                                (this.ping_sent.take(), &this.rtt_micros)
                            {
                                let micros =
                                    sent.elapsed().as_micros().clamp(1, u128::from(u64::MAX));
                                cell.store(micros as u64, Ordering::Relaxed);
                            }
                        }
                        // Pings are answered by tungstenite; text carries no data.
                        Message::Ping(_) | Message::Text(_) => {}
                        Message::Frame(_) => {}
                    }
                }
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) | None => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(err)) => return Poll::Ready(Err(to_io(err))),
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
        let this = self.get_mut();
        if this.write_buf.len() >= MAX_WS_MESSAGE_OUT {
            ready!(this.poll_send_buffered(cx))?;
        }
        let n = data.len().min(MAX_WS_MESSAGE_OUT - this.write_buf.len());
        this.write_buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_buffered(cx))?;
        ready!(Pin::new(&mut this.ws).poll_flush(cx)).map_err(to_io)?;
        this.ping_unflushed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_buffered(cx))?;
        match ready!(Pin::new(&mut this.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(to_io(err))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;

    async fn pair(liveness: Liveness) -> (WsIo<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let ours = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let theirs = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (WsIo::new(ours, liveness), theirs)
    }

    #[tokio::test]
    async fn bytes_round_trip_as_binary_messages_split_at_the_cap() {
        use futures_util::{SinkExt, StreamExt};
        let (mut io, mut peer) = pair(Liveness::default()).await;
        let data = vec![7u8; MAX_WS_MESSAGE_OUT + 10];
        io.write_all(&data).await.unwrap();
        io.flush().await.unwrap();
        let first = peer.next().await.unwrap().unwrap();
        let second = peer.next().await.unwrap().unwrap();
        assert_eq!(first.len(), MAX_WS_MESSAGE_OUT);
        assert_eq!(second.len(), 10);
        assert!(matches!(first, Message::Binary(_)));

        peer.send(Message::Text("ignored".into())).await.unwrap();
        peer.send(Message::Binary(Bytes::from_static(b"hello")))
            .await
            .unwrap();
        let mut got = [0u8; 5];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");

        peer.close(None).await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(io.read_to_end(&mut rest).await.unwrap(), 0, "close is EOF");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_peer_is_declared_dead_within_the_bound_and_pinged_before() {
        use futures_util::StreamExt;
        let liveness = Liveness {
            ping_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(3),
        };
        let (mut io, mut peer) = pair(liveness).await;
        let start = Instant::now();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let err = io.read(&mut buf).await.unwrap_err();
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
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        let (io, mut peer) = pair(Liveness::default()).await;
        let cell = CloseCell::default();
        let mut io = io.with_close(cell.clone());
        peer.close(Some(CloseFrame {
            code: CloseCode::Restart,
            reason: "maintenance".into(),
        }))
        .await
        .unwrap();
        let mut rest = Vec::new();
        assert_eq!(io.read_to_end(&mut rest).await.unwrap(), 0, "close is EOF");
        let frame = cell.lock().unwrap().clone().expect("the close frame");
        assert_eq!(frame.code, CloseCode::Restart);
        assert_eq!(frame.reason.as_str(), "maintenance");
    }

    #[tokio::test]
    async fn pongs_measure_the_round_trip() {
        use futures_util::StreamExt;
        let (io, mut peer) = pair(Liveness::default()).await;
        let cell = Arc::new(AtomicU64::new(0));
        let mut io = io.with_rtt(cell.clone());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            let _ = io.read(&mut buf).await;
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
        use futures_util::SinkExt;
        let liveness = Liveness {
            ping_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(3),
        };
        let (mut io, mut peer) = pair(liveness).await;
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 4];
            io.read_exact(&mut buf).await.map(|_| buf)
        });
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            peer.send(Message::Pong(Bytes::new())).await.unwrap();
        }
        peer.send(Message::Binary(Bytes::from_static(b"live")))
            .await
            .unwrap();
        assert_eq!(&reader.await.unwrap().unwrap(), b"live");
    }
}
