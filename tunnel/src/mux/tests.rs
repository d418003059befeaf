//! The multiplexer end to end over an in-memory WebSocket: a relay-side client and a
//! daemon-side session, with handlers that stream, stall and notice being dropped.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::io::DuplexStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

use super::WINDOW;
use super::client::{Client, connect};
use super::{Error, Reason, RecvBody};
use crate::{Link, Liveness};

type Handler = Arc<dyn Fn(Request<RecvBody>) -> Response<AnyBody> + Send + Sync>;
type AnyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// A client whose requests a session answers with `handler`; `stop` drains the session.
async fn session(handler: Handler, stop: CancellationToken) -> Client {
    let (relay_end, daemon_end) = tokio::io::duplex(256 * 1024);
    session_over(relay_end, daemon_end, handler, stop).await
}

/// [`session`] over a pipe whose daemon end is `daemon_end` (wrapped, say, to watch it).
async fn session_over<S>(
    relay_end: DuplexStream,
    daemon_end: S,
    handler: Handler,
    stop: CancellationToken,
) -> Client
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let relay_ws = WebSocketStream::from_raw_socket(relay_end, Role::Server, None).await;
    let daemon_ws = WebSocketStream::from_raw_socket(daemon_end, Role::Client, None).await;
    let daemon = Link::new(daemon_ws, Liveness::default(), Box::new(|_| {}));
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| {
            let response = handler(req);
            async move { Ok::<_, Infallible>(response) }
        });
        let _ = crate::server::serve(daemon, service, &stop).await;
    });
    let relay = Link::new(relay_ws, Liveness::default(), Box::new(|_| {}));
    let (client, _cut, connection) = connect(relay);
    tokio::spawn(connection);
    client
}

fn full(bytes: impl Into<Bytes>) -> AnyBody {
    Full::new(bytes.into()).boxed_unsync()
}

/// A body of `chunks` chunks of `size` bytes, counting in `sent` how many the session took.
fn counted(chunks: usize, size: usize, sent: Arc<AtomicUsize>) -> AnyBody {
    let stream = futures_util::stream::iter(0..chunks).map(move |_| {
        sent.fetch_add(size, Ordering::SeqCst);
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(vec![b'x'; size])))
    });
    StreamBody::new(stream).boxed_unsync()
}

#[tokio::test]
async fn bodies_larger_than_the_window_cross_whole_both_ways() {
    let echo: Handler = Arc::new(|req: Request<RecvBody>| {
        let (stream_tx, stream_rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                let data = frame.unwrap().into_data().unwrap();
                let _ = stream_tx.send(Ok(http_body::Frame::data(data))).await;
            }
        });
        let stream = tokio_stream_from(stream_rx);
        Response::new(StreamBody::new(stream).boxed_unsync())
    });
    let client = session(echo, CancellationToken::new()).await;
    let sent: Vec<u8> = (0..5 * WINDOW as usize).map(|i| (i % 251) as u8).collect();
    let response = client
        .send_request(
            Request::post("/api/chat")
                .body(Full::new(Bytes::from(sent.clone())))
                .unwrap(),
        )
        .await
        .unwrap();
    let got = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the echoed body differs");
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<http_body::Frame<Bytes>, Infallible>>,
) -> impl futures_util::Stream<Item = Result<http_body::Frame<Bytes>, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn a_stalled_reader_holds_one_window_and_stops_only_its_stream() {
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let handler: Handler = Arc::new(move |req: Request<RecvBody>| {
        if req.uri().path() == "/big" {
            Response::new(counted(2000, 1024, counter.clone()))
        } else {
            Response::new(full("small"))
        }
    });
    let client = session(handler, CancellationToken::new()).await;
    // Its head is read, its body never.
    let stalled = client
        .send_request(Request::get("/big").body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    for _ in 0..20 {
        let small = client
            .send_request(
                Request::get("/small")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let body = small.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "small");
    }
    // The daemon's side took at most a window (plus the chunk in hand) of the stalled body.
    let taken = sent.load(Ordering::SeqCst);
    assert!(
        taken <= WINDOW as usize + 2 * 1024,
        "{taken} bytes taken for a reader that reads nothing"
    );
    // Once read, the rest flows.
    let got = stalled.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), 2000 * 1024);
}

#[tokio::test]
async fn dropping_the_response_body_stops_the_handlers_body() {
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
    let dropped_tx = Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    let handler: Handler = Arc::new(move |_req| {
        // An endless body that reports when it is dropped.
        struct Guard(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Guard {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(());
                }
            }
        }
        let guard = Guard(dropped_tx.lock().unwrap().take());
        let stream = futures_util::stream::unfold(guard, |guard| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Some((
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"token\n"))),
                guard,
            ))
        });
        Response::new(StreamBody::new(stream).boxed_unsync())
    });
    let client = session(handler, CancellationToken::new()).await;
    let response = client
        .send_request(
            Request::post("/api/generate")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "token\n");
    drop(body);
    tokio::time::timeout(Duration::from_secs(5), dropped_rx)
        .await
        .expect("the handler's body was not dropped after the caller went away")
        .unwrap();
}

#[tokio::test]
async fn a_draining_session_refuses_new_requests_and_finishes_those_in_flight() {
    let stop = CancellationToken::new();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let handler: Handler = Arc::new(move |_req| {
        let mut release = release_rx.clone();
        let stream = futures_util::stream::once(async move {
            let _ = release.wait_for(|r| *r).await;
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"done")))
        });
        Response::new(StreamBody::new(stream).boxed_unsync())
    });
    let client = session(handler, stop.clone()).await;
    let in_flight = client
        .send_request(Request::get("/slow").body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    stop.cancel();
    let refused = client
        .send_request(Request::get("/new").body(Full::new(Bytes::new())).unwrap())
        .await;
    assert!(
        matches!(
            refused,
            Err(Error::Reset(Reason::Refused)) | Err(Error::Closed(_))
        ),
        "{refused:?}"
    );
    release_tx.send(true).unwrap();
    let body = in_flight.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "done");
}

#[tokio::test]
async fn a_request_too_large_to_send_fails_alone_and_the_session_goes_on() {
    let handler: Handler = Arc::new(|_req| Response::new(full("ok")));
    let client = session(handler, CancellationToken::new()).await;
    // The session is up and its connection task idle.
    let first = client
        .send_request(Request::get("/a").body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), "ok");
    tokio::time::sleep(Duration::from_millis(20)).await;

    let huge = "v".repeat(70 * 1024);
    let refused = client
        .send_request(
            Request::get("/b")
                .header("x-huge", huge.as_str())
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert!(matches!(refused, Err(Error::HeadTooLarge)), "{refused:?}");
    let next = tokio::time::timeout(
        Duration::from_secs(5),
        client.send_request(Request::get("/c").body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .expect("the session stalled after a refused head")
    .unwrap();
    assert_eq!(next.into_body().collect().await.unwrap().to_bytes(), "ok");
}

/// The daemon's end of the pipe, counting the bytes its session wrote.
struct Counting {
    inner: DuplexStream,
    written: Arc<AtomicUsize>,
}

impl tokio::io::AsyncRead for Counting {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counting {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.written.fetch_add(written, Ordering::SeqCst);
        std::task::Poll::Ready(Ok(written))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_response_sent_whole_is_dropped_only_after_it_is_written() {
    let written = Arc::new(AtomicUsize::new(0));
    // How much the session had written when the handler's response body was dropped.
    let at_drop = Arc::new(std::sync::Mutex::new(None::<usize>));
    let (relay_end, daemon_end) = tokio::io::duplex(256 * 1024);
    let daemon_end = Counting {
        inner: daemon_end,
        written: written.clone(),
    };
    let (written_seen, at_drop_set) = (written.clone(), at_drop.clone());
    let handler: Handler = Arc::new(move |_req| {
        struct Guard(Arc<AtomicUsize>, Arc<std::sync::Mutex<Option<usize>>>);
        impl Drop for Guard {
            fn drop(&mut self) {
                *self.1.lock().unwrap() = Some(self.0.load(Ordering::SeqCst));
            }
        }
        let guard = Guard(written_seen.clone(), at_drop_set.clone());
        let body = full("the answer").map_frame(move |frame| {
            let _guard = &guard;
            frame
        });
        Response::new(body.boxed_unsync())
    });
    let client = session_over(relay_end, daemon_end, handler, CancellationToken::new()).await;

    let response = client
        .send_request(
            Request::get("/api/version")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "the answer"
    );
    let at_drop = at_drop.lock().unwrap().expect("the body was dropped");
    assert_eq!(
        at_drop,
        written.load(Ordering::SeqCst),
        "the body was dropped before its answer was written"
    );
}

#[test]
fn outgoing_messages_hold_whole_frames_within_the_bound() {
    use super::frame::{self, Frames};
    use crate::{MAX_WS_MESSAGE_IN, MAX_WS_MESSAGE_OUT};

    let shared = super::Shared::new();
    let mut core = shared.lock();
    let mut wakes = super::Wakes::default();
    let full_chunk = vec![b'x'; frame::MAX_DATA];
    let mut large = http::HeaderMap::new();
    large.insert(
        "x-large",
        http::HeaderValue::from_str(&"h".repeat(40 * 1024)).unwrap(),
    );
    let mut put = 0;
    for id in 0..60u32 {
        // Small frames, data of every size up to a full frame, now and then a large head.
        core.put(&mut wakes, |out| {
            frame::put_data(out, id, b"token\n", false)
        });
        let size = (id as usize * 4_099) % (frame::MAX_DATA + 1);
        core.put(&mut wakes, |out| {
            frame::put_data(out, id, &full_chunk[..size], false)
        });
        core.put(&mut wakes, |out| frame::put_window(out, id, 1_000));
        put += 3;
        if id % 15 == 0 {
            core.put(&mut wakes, |out| {
                frame::put_response(out, id, http::StatusCode::OK, &large, false)
            })
            .unwrap();
            put += 1;
        }
    }
    let mut messages = std::collections::VecDeque::new();
    core.take_output(&mut messages);
    let mut read = 0;
    for message in messages {
        let frames = Frames::new(message.clone())
            .collect::<Result<Vec<_>, _>>()
            .expect("a message of whole frames");
        assert!(
            message.len() <= MAX_WS_MESSAGE_OUT || frames.len() == 1,
            "a message of {} frames is {} bytes",
            frames.len(),
            message.len()
        );
        assert!(message.len() <= MAX_WS_MESSAGE_IN);
        read += frames.len();
    }
    assert_eq!(read, put, "every frame put went out once");
}
