use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::*;

const CONNECT: Duration = Duration::from_secs(5);

/// A fake Ollama on loopback: runs `answer` on each connection it accepts, in a task of its
/// own; counts the connections.
async fn fake_ollama_with<F, Fut>(answer: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(answer(stream));
        }
    });
    (address, accepted)
}

/// A fake Ollama: answers every request on every connection with `"ok"`, once `gate` lets it
/// (one permit per answer); counts the connections it accepted.
async fn fake_ollama(gate: Arc<Semaphore>) -> (String, Arc<AtomicUsize>) {
    fake_ollama_with(move |stream| {
        let gate = gate.clone();
        async move {
            let service = hyper::service::service_fn(move |_request| {
                let gate = gate.clone();
                async move {
                    gate.acquire().await.unwrap().forget();
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}

fn get(address: &str) -> Request<Empty<Bytes>> {
    Request::get("/api/version")
        .header(http::header::HOST, address)
        .body(Empty::new())
        .unwrap()
}

async fn body_of(response: Response<Incoming>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test]
async fn requests_one_after_another_share_one_connection() {
    let gate = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
    let (address, accepted) = fake_ollama(gate).await;
    let upstream = Upstream::new(address.clone(), CONNECT);
    for _ in 0..5 {
        let response = upstream.send(get(&address)).await.unwrap();
        assert_eq!(body_of(response).await, "ok");
        // The connection task marks the connection ready once it has read the whole response.
        tokio::task::yield_now().await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(upstream.open(), 1);
}

#[tokio::test]
async fn requests_at_once_get_a_connection_each_which_later_ones_reuse() {
    let gate = Arc::new(Semaphore::new(0));
    let (address, accepted) = fake_ollama(gate.clone()).await;
    let upstream = Arc::new(Upstream::new(address.clone(), CONNECT));
    let at_once: Vec<_> = (0..3)
        .map(|_| {
            let (upstream, address) = (upstream.clone(), address.clone());
            tokio::spawn(async move { body_of(upstream.send(get(&address)).await.unwrap()).await })
        })
        .collect();
    // None is answered before all three are with Ollama: each needs a connection of its own.
    while accepted.load(Ordering::SeqCst) < 3 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(Semaphore::MAX_PERMITS / 2);
    for request in at_once {
        assert_eq!(request.await.unwrap(), "ok");
    }
    tokio::task::yield_now().await;
    for _ in 0..3 {
        assert_eq!(
            body_of(upstream.send(get(&address)).await.unwrap()).await,
            "ok"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "later requests reuse them"
    );
}

#[tokio::test]
async fn a_connection_ollama_closed_is_replaced_and_the_request_goes_through() {
    // Answers one request per connection, then closes it without saying so beforehand (no
    // `connection: close`), as a restarted Ollama would.
    let (address, accepted) = fake_ollama_with(|mut stream: TcpStream| async move {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
    })
    .await;
    let upstream = Upstream::new(address.clone(), CONNECT);
    for round in 1..=3 {
        let response = upstream.send(get(&address)).await.unwrap();
        assert_eq!(body_of(response).await, "ok", "request {round}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn no_ollama_is_a_connect_error() {
    // A port that was free a moment ago.
    let address = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let upstream = Upstream::new(address.clone(), CONNECT);
    match upstream.send(get(&address)).await {
        Err(Error::Connect(err)) => {
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused)
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
    assert_eq!(upstream.open(), 0);
}

#[tokio::test]
async fn connections_unused_for_the_idle_timeout_are_closed_at_the_next_request() {
    let gate = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
    let (address, accepted) = fake_ollama(gate).await;
    let idle = Duration::from_millis(50);
    let upstream = Upstream::new(address.clone(), CONNECT).with_idle_timeout(idle);
    body_of(upstream.send(get(&address)).await.unwrap()).await;
    tokio::time::sleep(idle * 2).await;
    body_of(upstream.send(get(&address)).await.unwrap()).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(upstream.open(), 1, "the idle one was closed");
}

#[tokio::test]
async fn a_request_racing_ollamas_close_fails_alone_and_the_next_opens_a_new_connection() {
    // Answers one request per connection and closes it a little later, on a thread of its
    // own: it can close a connection while this test's thread does not look.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let upstream = Upstream::new(address.clone(), CONNECT);
    let first = upstream.send(get(&address)).await.unwrap();
    assert_eq!(body_of(first).await, "ok");
    tokio::task::yield_now().await;
    // The fake closes the connection meanwhile; this thread's runtime does not run the
    // connection's task, so the connection still looks open and ready when taken.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(upstream.open(), 1, "the close is not noticed yet");
    // The request went out before the close was read: it may have reached Ollama, so it is
    // not sent again (as with any HTTP/1 client); the caller gets an error, not a hang.
    match upstream.send(get(&address)).await {
        Err(Error::Http(err)) => assert!(err.is_incomplete_message(), "{err}"),
        other => panic!("expected the closed connection's error, got {other:?}"),
    }
    let third = upstream.send(get(&address)).await.unwrap();
    assert_eq!(body_of(third).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
