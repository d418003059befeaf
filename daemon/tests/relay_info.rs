//! Fetching a relay's login details (`/.well-known/cloudllm`) from a hostile or broken relay:
//! an endless answer or a huge declared length is cut off at the 64 KiB limit with a clear
//! error instead of being buffered, and a redirect is not followed. The relays here are raw
//! TCP servers on loopback, so they can misbehave in ways a real HTTP server would not.

use std::net::SocketAddr;
use std::time::Duration;

use cloudllm_daemon::login::fetch_relay_info;
use cloudllm_proto::{RelayAuth, RelayInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use url::Url;

/// Bound on every await that could hang; shorter than the fetch's own 10 s timeout, so a
/// fetch that waits for its timeout instead of stopping at the limit fails the test.
const STEP: Duration = Duration::from_secs(5);

/// The fetch's size limit, as documented.
const LIMIT: usize = 64 * 1024;

/// The fake relay's socket send buffer, in bytes.
const SEND_BUFFER: u32 = 16 * 1024;

/// What a fake relay does once it has read the request head.
enum Misbehaviour {
    /// Sends a chunked body that never ends.
    Endless,
    /// Declares this `Content-Length`, sends 1 KiB of it and waits until the client goes away.
    Declares(u64),
    /// Sends this whole answer.
    Answers(String),
}

/// A fake relay that serves one connection; its task returns the body bytes it sent before the
/// client closed the connection.
async fn fake_relay(behaviour: Misbehaviour) -> (Url, JoinHandle<usize>) {
    let socket = TcpSocket::new_v4().unwrap();
    // Small, so that what the relay has written is close to what the daemon has read.
    socket.set_send_buffer_size(SEND_BUFFER).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        read_head(&mut stream).await;
        match behaviour {
            Misbehaviour::Endless => {
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            transfer-encoding: chunked\r\n\r\n";
                stream.write_all(head.as_bytes()).await.unwrap();
                let chunk = [b' '; 8 * 1024];
                let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
                frame.extend_from_slice(&chunk);
                frame.extend_from_slice(b"\r\n");
                let mut sent = 0;
                while stream.write_all(&frame).await.is_ok() {
                    sent += chunk.len();
                }
                sent
            }
            Misbehaviour::Declares(length) => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n");
                stream.write_all(head.as_bytes()).await.unwrap();
                stream.write_all(&[b' '; 1024]).await.unwrap();
                // Holds the connection until the client closes it.
                let mut rest = [0u8; 64];
                while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
                1024
            }
            Misbehaviour::Answers(answer) => {
                stream.write_all(answer.as_bytes()).await.unwrap();
                answer.len()
            }
        }
    });
    (Url::parse(&format!("http://{addr}/")).unwrap(), task)
}

async fn read_head(stream: &mut TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the client closed before sending its request");
        head.extend_from_slice(&buf[..n]);
    }
}

fn ok_answer(info: &RelayInfo) -> String {
    let body = serde_json::to_string(info).unwrap();
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
}

fn token_relay() -> RelayInfo {
    RelayInfo {
        protocol_version: cloudllm_proto::PROTOCOL_VERSION,
        auth: RelayAuth::Token,
        web_url: None,
    }
}

#[tokio::test]
async fn an_endless_answer_is_cut_off_at_the_limit() {
    let (relay, server) = fake_relay(Misbehaviour::Endless).await;
    let result = timeout(STEP, fetch_relay_info(&relay))
        .await
        .expect("the fetch stops at the limit, not at its timeout");
    let error = format!("{:#}", result.expect_err("an endless answer is refused"));
    assert!(
        error.contains("oversized answer (over 65536 bytes)"),
        "{error}"
    );
    let sent = timeout(STEP, server)
        .await
        .expect("the relay sees the connection closed")
        .unwrap();
    // Beyond the limit, what the relay wrote sits in its small send buffer and the daemon's
    // receive buffer (128 KiB by default on Linux; 64 KiB more was seen); a fetch that read on
    // would never have closed the connection at all.
    assert!(sent <= LIMIT + 512 * 1024, "the relay sent {sent} bytes");
}

#[tokio::test]
async fn a_huge_declared_length_is_refused_before_reading() {
    let (relay, server) = fake_relay(Misbehaviour::Declares(1 << 40)).await;
    let started = Instant::now();
    let result = timeout(STEP, fetch_relay_info(&relay))
        .await
        .expect("the fetch gives up at once");
    let error = format!("{:#}", result.expect_err("a huge answer is refused"));
    assert!(error.contains("oversized answer"), "{error}");
    timeout(STEP, server)
        .await
        .expect("the relay sees the connection closed")
        .unwrap();
    assert!(started.elapsed() < STEP);
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    // Where the redirect points: a relay that would answer, so following it would succeed.
    let (elsewhere, _target) = fake_relay(Misbehaviour::Answers(ok_answer(&token_relay()))).await;
    let location = elsewhere.join(cloudllm_proto::WELL_KNOWN_PATH).unwrap();
    let redirect = format!(
        "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\n\
         connection: close\r\n\r\n"
    );
    let (relay, _server) = fake_relay(Misbehaviour::Answers(redirect)).await;
    let result = timeout(STEP, fetch_relay_info(&relay)).await.unwrap();
    let error = format!("{:#}", result.expect_err("a redirect is refused"));
    assert!(error.contains("302"), "{error}");
    assert!(error.contains(location.as_str()), "{error}");
    assert!(error.contains("--relay"), "{error}");
}

#[tokio::test]
async fn a_relay_document_is_read() {
    let info = RelayInfo {
        protocol_version: cloudllm_proto::PROTOCOL_VERSION,
        auth: RelayAuth::Oidc {
            issuer: "https://id.example".into(),
            client_id: "cloudllm".into(),
            scopes: vec!["openid".into()],
        },
        web_url: Some("https://relay.example/account".into()),
    };
    let (relay, _server) = fake_relay(Misbehaviour::Answers(ok_answer(&info))).await;
    let fetched = timeout(STEP, fetch_relay_info(&relay))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fetched, info);
}
