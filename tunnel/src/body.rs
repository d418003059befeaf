//! Reading a whole HTTP body that came from the network, and never more of it than a limit.
//!
//! Relay and daemon read a few bodies whole: a JSON Web Key Set, an OpenID configuration, the
//! relay's `/.well-known/cloudllm`, Ollama's model list, a device's model list, a request body
//! the relay routes by model. Every one of them comes from a peer that may be hostile or broken
//! and may send an endless body or announce a huge one. [`read_limited`] is the one way they
//! are read: it refuses a declared length (`Content-Length`, as the body's size hint) over the
//! limit before reading anything, and stops at the first chunk that would pass the limit, so at
//! most `limit` bytes plus the chunk in hand are ever held. Dropping the body then closes the
//! connection, which stops the sender.
//!
//! It works on any [`hyper::body::Body`]: hyper's `Incoming`, axum's `Body`, and a reqwest
//! response turned into its body (`reqwest::Body::from(response)`), which keeps reqwest's
//! timeouts.

use std::pin::pin;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Body;

/// Why a body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError<E> {
    /// The body is, or says it is, longer than the limit; reading stopped there.
    #[error("the body is larger than {limit} bytes")]
    TooLarge {
        /// The limit that was passed, in bytes.
        limit: usize,
    },
    /// The body could not be read (connection lost, timeout, malformed framing).
    #[error("reading the body: {0}")]
    Read(#[source] E),
}

/// Reads `body` to its end into one buffer, unless it is longer than `limit` bytes: then it
/// fails with [`BodyError::TooLarge`] as soon as that is known (from the declared length, or
/// from the chunk that passes the limit) without reading further. Trailers are ignored.
pub async fn read_limited<B>(body: B, limit: usize) -> Result<Bytes, BodyError<B::Error>>
where
    B: Body,
{
    let declared = body.size_hint().lower();
    if declared > limit as u64 {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = pin!(body);
    // The declared length is at most `limit` here: a fair first allocation.
    let mut out = BytesMut::with_capacity(declared as usize);
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let Ok(mut data) = frame.map_err(BodyError::Read)?.into_data() else {
            continue;
        };
        if data.remaining() > limit - out.len() {
            return Err(BodyError::TooLarge { limit });
        }
        while data.has_remaining() {
            let chunk = data.chunk();
            let len = chunk.len();
            out.extend_from_slice(chunk);
            data.advance(len);
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::{Frame, SizeHint};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket};

    use super::*;

    /// Bound on every await that could hang.
    const STEP: Duration = Duration::from_secs(10);

    /// An endless body of `chunk`-byte frames that counts the frames it handed out, and may
    /// announce a length.
    struct Endless {
        chunk: usize,
        polled: Arc<AtomicUsize>,
        declared: Option<u64>,
    }

    impl Body for Endless {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.polled.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; self.chunk])))))
        }

        fn size_hint(&self) -> SizeHint {
            self.declared.map(SizeHint::with_exact).unwrap_or_default()
        }
    }

    fn endless(chunk: usize, declared: Option<u64>) -> (Endless, Arc<AtomicUsize>) {
        let polled = Arc::new(AtomicUsize::new(0));
        let body = Endless {
            chunk,
            polled: polled.clone(),
            declared,
        };
        (body, polled)
    }

    #[tokio::test]
    async fn an_endless_body_is_read_only_up_to_the_limit_and_one_chunk() {
        let (body, polled) = endless(1000, None);
        let result = read_limited(body, 10_500).await;
        assert!(
            matches!(result, Err(BodyError::TooLarge { limit: 10_500 })),
            "{result:?}"
        );
        // Ten chunks fit; the eleventh passes the limit and is the last one taken.
        assert_eq!(polled.load(Ordering::Relaxed), 11);
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_reading() {
        let (body, polled) = endless(1000, Some(1 << 40));
        let result = read_limited(body, 64 * 1024).await;
        assert!(
            matches!(result, Err(BodyError::TooLarge { .. })),
            "{result:?}"
        );
        assert_eq!(polled.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_body_of_exactly_the_limit_is_read_whole_and_trailers_are_ignored() {
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::data(Bytes::from_static(b"world"))),
            Ok(Frame::trailers(hyper::HeaderMap::new())),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        assert_eq!(read_limited(body, 11).await.unwrap(), "hello world");
        assert_eq!(
            read_limited(Full::new(Bytes::from_static(b"12")), 1)
                .await
                .unwrap_err()
                .to_string(),
            "the body is larger than 1 bytes"
        );
        assert!(
            read_limited(http_body_util::Empty::<Bytes>::new(), 0)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_read_error_is_passed_on() {
        let frames = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Err("connection reset"),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let result = read_limited(body, 100).await;
        assert!(
            matches!(result, Err(BodyError::Read("connection reset"))),
            "{result:?}"
        );
        let boxed = Full::new(Bytes::from_static(b"ok"))
            .map_err(|never: Infallible| match never {})
            .boxed();
        assert_eq!(read_limited(boxed, 2).await.unwrap(), "ok");
    }

    /// Over a real connection: a server that sends a chunked body without end sees the
    /// connection closed once the reader has passed its limit, having sent no more than the
    /// limit plus what the (deliberately small) socket buffers and hyper's read buffer hold.
    #[tokio::test]
    async fn an_endless_body_over_http_closes_the_connection_at_the_limit() {
        const LIMIT: usize = 256 * 1024;
        const CHUNK: usize = 16 * 1024;
        const BUFFER: u32 = 16 * 1024;
        let listener = {
            let socket = TcpSocket::new_v4().unwrap();
            socket.set_send_buffer_size(BUFFER).unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            socket.listen(1).unwrap()
        };
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_endless(listener, CHUNK));

        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(BUFFER).unwrap();
        let stream = tokio::time::timeout(STEP, socket.connect(addr))
            .await
            .unwrap()
            .unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        let connection = tokio::spawn(connection);
        let request = hyper::Request::get("/endless")
            .header(hyper::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = tokio::time::timeout(STEP, sender.send_request(request))
            .await
            .unwrap()
            .unwrap();
        let result = tokio::time::timeout(STEP, read_limited(response.into_body(), LIMIT))
            .await
            .expect("the reader stops by itself");
        assert!(
            matches!(result, Err(BodyError::TooLarge { limit: LIMIT })),
            "{result:?}"
        );
        // The sender stays: dropping the unfinished body alone closes the connection.
        let sent = tokio::time::timeout(STEP, server)
            .await
            .expect("the server sees the connection closed")
            .unwrap();
        drop((sender, connection));
        // Beyond the limit and the chunk that passed it, the stream can only sit in the two
        // (16 KiB) socket buffers and hyper's read buffer: about 16 KiB more was seen.
        let slack = 128 * 1024;
        assert!(
            sent <= LIMIT + CHUNK + slack,
            "the server sent {sent} bytes"
        );
    }

    /// Answers one request with an endless chunked body; returns the bytes it sent before the
    /// connection was closed on it.
    async fn serve_endless(listener: TcpListener, chunk: usize) -> usize {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return 0,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let header = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        if stream.write_all(header).await.is_err() {
            return 0;
        }
        let mut frame = format!("{chunk:x}\r\n").into_bytes();
        frame.extend(std::iter::repeat_n(b'x', chunk));
        frame.extend_from_slice(b"\r\n");
        let mut sent = 0;
        while stream.write_all(&frame).await.is_ok() {
            sent += chunk;
        }
        sent
    }
}
