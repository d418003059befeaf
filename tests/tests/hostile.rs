//! Hostile input: slow and oversized requests on the relay, a malicious daemon on `/tunnel`
//! (garbage, truncated or invalid HTTP/2, oversized WebSocket messages, a peer that never
//! reads), and random bytes on the daemon's IPC socket. In every case the attacker's
//! connection is closed within a bounded time, and meanwhile another user is served through
//! their own healthy daemon.

use std::time::Duration;

use bytes::Bytes;
use cloudllm_e2e::{STEP, Stack, relay_config, token, tunnel_ws_request};
use cloudllm_proto as proto;
use cloudllm_relay::{RelayConfig, Scope};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// The relay's read timeout in these tests: short, so slow clients are cut quickly.
const READ_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the relay may take to be rid of a hostile connection in these tests: the read
/// timeout or the tunnel's liveness bound (below), the hello timeout (10 s) at most, plus slack.
const CLOSE_BOUND: Duration = Duration::from_secs(15);

/// A relay config with quick liveness and read timeouts.
fn hostile_config() -> RelayConfig {
    let mut config = relay_config();
    config.client_read_timeout = READ_TIMEOUT;
    config.ping_interval = Duration::from_millis(500);
    config.ping_timeout = Duration::from_millis(500);
    config
}

/// A little deterministic noise (xorshift), so failures replay.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Alice, the bystander, is still served through her own daemon.
async fn alice_is_served(stack: &Stack) {
    let response = timeout(STEP, stack.get("/api/tags").send())
        .await
        .expect("alice's request timed out")
        .expect("alice's request");
    assert_eq!(response.status(), 200, "alice is no longer served");
}

/// Waits until the relay has closed `tcp`: a read returns the end of the stream or an error.
/// Returns how long that took.
async fn closed_within(tcp: &mut TcpStream, bound: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match timeout(bound.saturating_sub(started.elapsed()), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the relay kept the connection open for {bound:?}"),
        }
    }
}

/// Opens a tunnel as `user`'s daemon would (valid agent token, protocol and device headers).
async fn dial_tunnel(stack: &Stack, user: &str) -> WebSocketStream<TcpStream> {
    let request = tunnel_ws_request(&stack.relay, user, &format!("{user}-box"), "box");
    let tcp = timeout(STEP, TcpStream::connect(stack.relay.relay.addr))
        .await
        .expect("tunnel connect timed out")
        .expect("tunnel connect");
    let config = cloudllm_tunnel::ws_config(cloudllm_tunnel::DAEMON_WS_READ_BUFFER)
        .max_message_size(None)
        .max_frame_size(None);
    let (ws, response) = timeout(
        STEP,
        tokio_tungstenite::client_async_with_config(request, tcp, Some(config)),
    )
    .await
    .expect("tunnel dial timed out")
    .expect("tunnel dial");
    assert_eq!(response.status(), 101);
    ws
}

/// Reads the WebSocket (answering pings) until the relay closes it; panics past `bound`.
async fn ws_closed_within(ws: &mut WebSocketStream<TcpStream>, bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return,
            Ok(Some(Ok(_))) => continue,
            Err(_) => panic!("the relay kept the hostile tunnel open for {bound:?}"),
        }
    }
}

/// Waits until `user` has no device on the relay any more.
async fn no_device_left(stack: &Stack, user: &str) {
    stack.relay.wait_for_devices(user, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_and_idle_connections_are_cut_while_others_are_served() {
    let stack = Stack::with_relay_config(hostile_config()).await;
    let addr = stack.relay.relay.addr;
    // 100 attackers: half send a header line a byte at a time, half send nothing at all.
    const ATTACKERS: usize = 100;
    let mut attackers = Vec::new();
    for n in 0..ATTACKERS {
        let tcp = timeout(STEP, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        attackers.push(tokio::spawn(async move {
            let mut tcp = tcp;
            let started = Instant::now();
            if n % 2 == 0 {
                let _ = tcp.write_all(b"GET /api/tags HTTP/1.1\r\nHost: relay\r\n").await;
                // One byte every 100 ms, for at most 10 s: never a complete head.
                for byte in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
                    if tcp.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let _ = closed_within(&mut tcp, CLOSE_BOUND).await;
            started.elapsed()
        }));
    }
    // Meanwhile the relay serves alice, more than once.
    for _ in 0..3 {
        alice_is_served(&stack).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for attacker in attackers {
        let held = timeout(STEP, attacker).await.unwrap().unwrap();
        assert!(
            held < READ_TIMEOUT * 4,
            "a slow client held its connection for {held:?} (read timeout {READ_TIMEOUT:?})"
        );
    }
    alice_is_served(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_gets_408_and_the_connection_closes() {
    let stack = Stack::with_relay_config(hostile_config()).await;
    let addr = stack.relay.relay.addr;
    // Authenticated: the body is forwarded to alice's device as it comes, and given up on once
    // it stops arriving.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/generate HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":",
        token("alice", Scope::Client)
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = timeout(CLOSE_BOUND, tcp.read_to_end(&mut answer)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "the relay kept a stalled upload open");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        took < READ_TIMEOUT * 4,
        "a stalled upload held for {took:?}"
    );

    // Unauthenticated: refused at once, without waiting for the body.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"POST /api/generate HTTP/1.1\r\nHost: relay\r\nContent-Length: 1000000\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    timeout(CLOSE_BOUND, tcp.read_to_end(&mut answer))
        .await
        .expect("the relay kept an unauthenticated upload open")
        .ok();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 401"));
    alice_is_served(&stack).await;
}

/// Everything the relay answers on `tcp` until it closes it (bounded by [`CLOSE_BOUND`]).
async fn answer_of(tcp: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    // A reset (the relay closing with unread bytes) ends the answer too.
    let _ = timeout(CLOSE_BOUND, tcp.read_to_end(&mut answer))
        .await
        .expect("the relay kept the connection open");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_and_others_are_served() {
    let stack = Stack::with_relay_config(hostile_config()).await;
    let addr = stack.relay.relay.addr;
    // A 1 MiB header: far over hyper's limit for a request head (about 400 KiB).
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut request = b"GET /api/tags HTTP/1.1\r\nHost: relay\r\nX-Big: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    request.extend_from_slice(b"\r\n\r\n");
    // The relay may stop reading (and close) before the whole header is written.
    let _ = timeout(STEP, tcp.write_all(&request)).await;
    let answer = answer_of(&mut tcp).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "a 1 MiB header got {answer:.80}"
    );
    // Thousands of small headers.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut request = b"GET /api/tags HTTP/1.1\r\nHost: relay\r\n".to_vec();
    for n in 0..5000 {
        request.extend_from_slice(format!("X-H{n}: v\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    let _ = timeout(STEP, tcp.write_all(&request)).await;
    let answer = answer_of(&mut tcp).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "5,000 headers got {answer:.80}"
    );
    alice_is_served(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_websocket_messages_on_the_tunnel_close_it() {
    let stack = Stack::with_relay_config(hostile_config()).await;
    // Random binary messages instead of the hello, and after it outside any session.
    for hello in [None, Some(good_hello())] {
        let mut ws = dial_tunnel(&stack, "mallory").await;
        if let Some(hello) = hello {
            ws.send(hello).await.unwrap();
            stack.relay.wait_for_devices("mallory", 1).await;
        }
        for seed in 1..20 {
            if ws
                .send(Message::Binary(noise(seed, 4096).into()))
                .await
                .is_err()
            {
                break;
            }
        }
        ws_closed_within(&mut ws, CLOSE_BOUND).await;
        no_device_left(&stack, "mallory").await;
        alice_is_served(&stack).await;
    }

    // Text and a message far over the relay's 256 KiB limit.
    let mut ws = dial_tunnel(&stack, "mallory").await;
    let _ = ws.send(Message::Text("hello?".into())).await;
    let _ = ws
        .send(Message::Binary(vec![0u8; 4 * 1024 * 1024].into()))
        .await;
    ws_closed_within(&mut ws, CLOSE_BOUND).await;
    no_device_left(&stack, "mallory").await;
    alice_is_served(&stack).await;

    // Half a WebSocket frame (a text frame's header announcing 100 bytes, and 4 of them), then
    // silence: the hello never comes.
    let mut ws = dial_tunnel(&stack, "mallory").await;
    ws.get_mut()
        .write_all(&[0x81, 0x80 | 100, 1, 2, 3, 4, b'{', b'"', b't', b'y'])
        .await
        .unwrap();
    let started = Instant::now();
    ws_closed_within(&mut ws, CLOSE_BOUND).await;
    assert!(started.elapsed() < CLOSE_BOUND);
    no_device_left(&stack, "mallory").await;
    alice_is_served(&stack).await;
}

/// A hostile daemon, written by hand on the tunnel's frames: it answers every request with an
/// empty model list until the test makes it misbehave.
struct Relayed {
    /// Sends control messages (WebSocket text) as the daemon.
    say: tokio::sync::mpsc::Sender<String>,
    /// Stops answering and sends these raw bytes as a binary message instead.
    inject: tokio::sync::mpsc::Sender<Vec<u8>>,
    /// Stops reading the tunnel at all (the WebSocket, and so the TCP socket).
    stop_reading: tokio_util::sync::CancellationToken,
    /// Cancelled once the tunnel has ended (the relay closed it).
    ended: tokio_util::sync::CancellationToken,
}

/// The fake daemon's answer to the requests in one message from the relay: a 200 with an
/// empty model list on each stream a request head opened.
fn answers(message: Bytes) -> Option<Bytes> {
    use cloudllm_tunnel::mux::frame::{self, Frame};
    let mut out = bytes::BytesMut::new();
    for frame in frame::Frames::new(message) {
        if let Ok(Frame::Request { id, .. }) = frame {
            frame::put_response(
                &mut out,
                id,
                http::StatusCode::OK,
                &http::HeaderMap::new(),
                false,
            )
            .unwrap();
            frame::put_data(&mut out, id, br#"{"models":[]}"#, true);
        }
    }
    (!out.is_empty()).then(|| out.freeze())
}

/// Sends `hello` as the daemon's first message on `ws`, then answers the relay's requests
/// (see [`answers`]) until told otherwise. Returns the controls.
fn serve_over(ws: WebSocketStream<TcpStream>, hello: Message) -> Relayed {
    let (say, mut said) = tokio::sync::mpsc::channel::<String>(4);
    let (inject, mut injected) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let stop_reading = tokio_util::sync::CancellationToken::new();
    let stop = stop_reading.clone();
    let ended = tokio_util::sync::CancellationToken::new();
    let ended_guard = ended.clone().drop_guard();
    tokio::spawn(async move {
        let _ended = ended_guard;
        let (mut sink, mut stream) = ws.split();
        if sink.send(hello).await.is_err() {
            return;
        }
        let mut answering = true;
        loop {
            tokio::select! {
                bytes = injected.recv() => match bytes {
                    Some(bytes) => {
                        answering = false;
                        if sink.send(Message::Binary(bytes.into())).await.is_err() { return }
                    }
                    None => return,
                },
                text = said.recv() => match text {
                    Some(text) => if sink.send(Message::Text(text.into())).await.is_err() { return },
                    None => return,
                },
                message = stream.next(), if !stop.is_cancelled() => match message {
                    Some(Ok(Message::Binary(data))) => {
                        if let Some(answer) = answers(data).filter(|_| answering)
                            && sink.send(Message::Binary(answer)).await.is_err()
                        {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => return,
                },
                () = stop.cancelled(), if !stop.is_cancelled() => {}
            }
        }
    });
    Relayed {
        say,
        inject,
        stop_reading,
        ended,
    }
}

fn hello_message(hello: &proto::Hello) -> Message {
    Message::Text(proto::Control::Hello(hello.clone()).to_text().into())
}

fn good_hello() -> Message {
    hello_message(&proto::Hello {
        protocol_version: proto::PROTOCOL_VERSION,
        daemon_version: "0.0.0-hostile".into(),
        models: vec!["m:latest".into()],
        lanes: false,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_turns_to_invalid_frames_is_dropped() {
    let stack = Stack::with_relay_config(hostile_config()).await;
    for garbage in [
        // A data frame announcing 16 MiB in a message of nine bytes.
        vec![0, 0, 0, 1, 3, 0x01, 0, 0, 0],
        // A window frame granting nothing.
        vec![0, 0, 0, 1, 5, 0, 0, 0, 4, 0, 0, 0, 0],
        // A request head sent to the relay, which only sends them.
        vec![
            0, 0, 0, 9, 1, 0, 0, 0, 10, 0, 3, b'G', b'E', b'T', 0, 1, b'/', 0, 0,
        ],
        noise(7, 2000),
    ] {
        let ws = dial_tunnel(&stack, "mallory").await;
        let relayed = serve_over(ws, good_hello());
        stack.relay.wait_for_devices("mallory", 1).await;
        // A request opens the tunnel's session, which works; then the daemon turns.
        let response = stack.relay.get_as("mallory", "/api/tags").await;
        assert_eq!(response.status(), 200);
        alice_is_served(&stack).await;
        relayed.inject.send(garbage).await.unwrap();
        let started = Instant::now();
        no_device_left(&stack, "mallory").await;
        timeout(CLOSE_BOUND, relayed.ended.cancelled())
            .await
            .expect("the relay kept a tunnel sending invalid frames open");
        assert!(started.elapsed() < CLOSE_BOUND);
        alice_is_served(&stack).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_hello_is_invalid_never_registers() {
    let stack = Stack::with_relay_config(hostile_config()).await;
    let mut too_big = proto::Hello {
        protocol_version: proto::PROTOCOL_VERSION,
        daemon_version: "x".into(),
        models: Vec::new(),
        lanes: false,
    };
    too_big.daemon_version = "x".repeat(proto::MAX_CONTROL_BYTES + 10);
    let old = proto::Hello {
        protocol_version: 1,
        daemon_version: "x".into(),
        models: Vec::new(),
        lanes: false,
    };
    for hello in [
        Message::Text("not json".into()),
        Message::Text(r#"{"type":"models","models":[]}"#.into()),
        hello_message(&old),
        hello_message(&too_big),
        Message::Binary(Bytes::from_static(b"PRI * HTTP/2.0")),
    ] {
        let ws = dial_tunnel(&stack, "mallory").await;
        let relayed = serve_over(ws, hello);
        // The relay closes the tunnel by itself, and the device never shows up.
        timeout(CLOSE_BOUND, relayed.ended.cancelled())
            .await
            .expect("the relay kept a tunnel with an invalid hello open");
        assert!(stack.relay.relay.registry.devices_of("mallory").is_empty());
        alice_is_served(&stack).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_never_reads_is_dropped_and_its_requests_fail_in_time() {
    let stack = Stack::with_relay_config(hostile_config()).await;
    let ws = dial_tunnel(&stack, "mallory").await;
    let relayed = serve_over(ws, good_hello());
    stack.relay.wait_for_devices("mallory", 1).await;
    // The daemon stops reading its socket: no pongs, no answers, nothing.
    relayed.stop_reading.cancel();
    // A request to it meanwhile ends (502) instead of hanging.
    let started = Instant::now();
    let response = timeout(
        CLOSE_BOUND,
        cloudllm_e2e::client()
            .post(stack.relay.api("/api/generate"))
            .bearer_auth(token("mallory", Scope::Client))
            .body(vec![b'x'; 512 * 1024])
            .send(),
    )
    .await
    .expect("a request to a daemon that never reads hung");
    if let Ok(response) = response {
        assert!(response.status().is_server_error(), "{}", response.status());
    }
    no_device_left(&stack, "mallory").await;
    assert!(started.elapsed() < CLOSE_BOUND);
    alice_is_served(&stack).await;
}

/// Sends `bytes` on a fresh connection to the daemon's IPC socket, half-closes it, and returns
/// the response lines the daemon wrote before it closed the connection.
async fn ipc_exchange(socket: &std::path::Path, bytes: &[u8]) -> Vec<proto::ipc::Response> {
    let mut stream = timeout(STEP, tokio::net::UnixStream::connect(socket))
        .await
        .expect("IPC connect timed out")
        .expect("IPC connect");
    // The daemon may close the connection before it has read everything.
    let _ = timeout(STEP, stream.write_all(bytes)).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    let _ = timeout(STEP, stream.read_to_end(&mut answer))
        .await
        .expect("the daemon kept a garbage connection open");
    answer
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).expect("the daemon answers in IPC lines"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_the_ipc_socket_leave_the_daemon_serving() {
    use proto::ipc::{ErrorCode, IPC_VERSION, MAX_LINE_BYTES, Request, Response, to_line};
    let stack = Stack::with_relay_config(hostile_config()).await;
    let config =
        cloudllm_e2e::daemon_config(&stack.relay.url(), "bob", "desk", &stack.backend.url());
    let socket = config.socket_path.clone().expect("socket path");
    let daemon = cloudllm_e2e::TestDaemon::start(config);
    stack.relay.wait_for_devices("bob", 1).await;
    let bad_request = |r: &Response| {
        matches!(
            r,
            Response::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        )
    };

    // Junk instead of a hello: an error for each line, and nothing else.
    let mut junk_line = noise(11, 10_000);
    junk_line.retain(|b| *b != b'\n');
    junk_line.push(b'\n');
    let mut attempts: Vec<Vec<u8>> = vec![
        noise(12, 100),
        junk_line.clone(),
        vec![0xff; 3 * MAX_LINE_BYTES],
        b"{\"method\":\"hello\",\"version\":\"one\"}\n".to_vec(),
        b"\n".to_vec(),
    ];
    for seed in 20..40 {
        attempts.push(noise(seed, 5000));
    }
    for attempt in &attempts {
        let answers = ipc_exchange(&socket, attempt).await;
        assert!(!answers.is_empty() || attempt.is_empty());
        assert!(answers.iter().all(bad_request), "{answers:?}");
    }

    // After a proper hello, each junk line gets its own error and the session goes on.
    let mut session = to_line(&Request::Hello {
        version: IPC_VERSION,
    });
    session.extend_from_slice(&junk_line);
    session.extend_from_slice(b"{\"method\":\"config_get\",\"key\":null,\"surprise\":1}\n");
    session.extend_from_slice(&to_line(&Request::Status));
    let answers = ipc_exchange(&socket, &session).await;
    assert_eq!(answers.len(), 4, "{answers:?}");
    assert!(matches!(answers[0], Response::Hello { .. }));
    assert!(bad_request(&answers[1]) && bad_request(&answers[2]));
    assert!(matches!(answers[3], Response::Status(_)));

    // A line over the limit ends the session with an error, however it started.
    let mut session = to_line(&Request::Hello {
        version: IPC_VERSION,
    });
    session.extend(std::iter::repeat_n(b'x', 2 * MAX_LINE_BYTES));
    let answers = ipc_exchange(&socket, &session).await;
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(bad_request(&answers[1]));

    // The daemon still runs, answers its CLI and serves bob through the relay.
    assert!(!daemon.is_finished());
    let mut client = timeout(STEP, cloudllm_ipc_client::Client::connect(&socket))
        .await
        .unwrap()
        .expect("the CLI connects");
    let status = timeout(STEP, client.call(&Request::Status))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(status, Response::Status(_)), "{status:?}");
    let response = stack.relay.get_as("bob", "/api/tags").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_ipc_connections_cannot_lock_the_cli_out_for_long() {
    use proto::ipc::{Request, Response};
    /// The daemon's connection cap (`MAX_CONNECTIONS` in daemon/src/ipc.rs).
    const SLOTS: usize = 64;
    /// The daemon's `HELLO_TIMEOUT` plus slack.
    const HELLO_BOUND: Duration = Duration::from_secs(14);
    let stack = Stack::with_relay_config(hostile_config()).await;
    let config =
        cloudllm_e2e::daemon_config(&stack.relay.url(), "bob", "desk", &stack.backend.url());
    let socket = config.socket_path.clone().expect("socket path");
    let _daemon = cloudllm_e2e::TestDaemon::start(config);
    stack.relay.wait_for_devices("bob", 1).await;

    // Every slot taken by a connection that never says anything.
    let mut silent = Vec::new();
    for _ in 0..SLOTS {
        silent.push(
            timeout(STEP, tokio::net::UnixStream::connect(&socket))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let started = Instant::now();
    // Each is told off and closed once the hello timeout has passed.
    for stream in &mut silent {
        let mut answer = Vec::new();
        let left = HELLO_BOUND.saturating_sub(started.elapsed());
        timeout(left, stream.read_to_end(&mut answer))
            .await
            .expect("a silent IPC connection was kept open")
            .unwrap();
        let reply: Response = serde_json::from_slice(&answer).expect("one error line");
        assert!(matches!(reply, Response::Error { .. }), "{reply:?}");
    }
    assert!(
        started.elapsed() > Duration::from_secs(5),
        "closed before any timeout"
    );
    // The CLI gets in again.
    let mut client = timeout(STEP, cloudllm_ipc_client::Client::connect(&socket))
        .await
        .unwrap()
        .expect("the CLI connects once the silent connections are gone");
    let status = timeout(STEP, client.call(&Request::Status))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(status, Response::Status(_)), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_or_oversized_control_messages_close_that_tunnel_only() {
    let stack = Stack::with_relay_config(hostile_config()).await;
    // Model names a relay does not keep are left out; the tunnel stays.
    let ws = dial_tunnel(&stack, "mallory").await;
    let relayed = serve_over(ws, good_hello());
    stack.relay.wait_for_devices("mallory", 1).await;
    let junk = proto::Control::Models {
        models: vec![
            "ok:latest".into(),
            "bad name".into(),
            "x".repeat(300),
            String::new(),
        ],
    };
    relayed.say.send(junk.to_text()).await.unwrap();
    stack
        .relay
        .wait_for_models("mallory", "box", &["ok:latest"])
        .await;
    assert!(!relayed.ended.is_cancelled(), "the tunnel was closed");
    drop(relayed);
    no_device_left(&stack, "mallory").await;

    for bad in [
        "not json".to_owned(),
        r#"{"type":"models"}"#.to_owned(),
        r#"{"type":"reboot"}"#.to_owned(),
        format!(
            r#"{{"type":"models","models":["{}"]}}"#,
            "m".repeat(3 * proto::MAX_CONTROL_BYTES)
        ),
    ] {
        let ws = dial_tunnel(&stack, "mallory").await;
        let relayed = serve_over(ws, good_hello());
        stack.relay.wait_for_devices("mallory", 1).await;
        relayed.say.send(bad).await.unwrap();
        timeout(CLOSE_BOUND, relayed.ended.cancelled())
            .await
            .expect("the relay kept a tunnel with a bad control message open");
        no_device_left(&stack, "mallory").await;
        alice_is_served(&stack).await;
    }
}
