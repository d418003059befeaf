//! The caps on unauthenticated connections, seen from outside: idle connections from one
//! address beyond its cap are closed at once (before any TLS work with `[tls]`) while clients at
//! other addresses are served; idle connections that had their time make room for newcomers,
//! also on the same address; a client whose requests are admitted is not capped however many
//! keep-alive connections it holds; a connection that never sends a byte is closed after
//! `client_read_timeout`. The metrics count every connection the caps closed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cloudllm_e2e::metrics::metric_value;
use cloudllm_e2e::{STEP, Stack, TestRelay, client_from, relay_config, token};
use cloudllm_relay::connections::EVICT_AFTER;
use cloudllm_relay::{RelayConfig, Scope, TlsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};

/// How soon a refused connection must be closed: "at once", with room for a busy test machine.
const AT_ONCE: Duration = Duration::from_secs(1);

/// A relay config with the given caps and `/metrics` on a listener of its own (connections to
/// it are not counted, so scraping changes nothing).
fn capped(per_address: u32, total: u32) -> RelayConfig {
    let mut config = relay_config();
    config.max_unauthenticated_connections_per_address = per_address;
    config.max_unauthenticated_connections = total;
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config
}

/// A TCP connection to `relay` from the loopback address `from` (all of 127/8 is loopback on
/// Linux, so each is another client address).
async fn connect_from(from: &str, relay: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    let tcp = timeout(STEP, socket.connect(relay))
        .await
        .expect("connect timed out")
        .expect("connect");
    tcp.set_nodelay(true).unwrap();
    tcp
}

/// Whether the relay closes `tcp` (end of stream or reset) within `bound`.
async fn closed_within(tcp: &mut TcpStream, bound: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. a 408 before the close
            Err(_) => return false,
        }
    }
}

/// `/metrics` from the relay's metrics listener.
async fn scrape(relay: &TestRelay) -> String {
    assert!(relay.relay.metrics_addr.is_some(), "metrics_listen is set");
    relay.metrics().await
}

/// The value of the series `series` (name with labels, as written), 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or(0.0)
}

/// Opens an idle connection from each address in `from` and waits until the relay counts them
/// all as unauthenticated.
async fn hold_idle(relay: &TestRelay, from: &[&str]) -> Vec<TcpStream> {
    let mut idle = Vec::new();
    for from in from {
        idle.push(connect_from(from, relay.relay.addr).await);
    }
    relay.wait_metric(UNAUTHENTICATED, from.len() as f64).await;
    idle
}

const UNAUTHENTICATED: &str = "cloudllm_unauthenticated_connections";
const REFUSED_ADDRESS: &str = "cloudllm_connections_refused_total{cap=\"address\"}";
const REFUSED_TOTAL: &str = "cloudllm_connections_refused_total{cap=\"total\"}";
const EVICTED_ADDRESS: &str = "cloudllm_connections_evicted_total{cap=\"address\"}";
const EVICTED_TOTAL: &str = "cloudllm_connections_evicted_total{cap=\"total\"}";

/// `GET /api/tags` as alice from `from`: the status.
async fn alice_from(stack: &Stack, from: &str) -> u16 {
    client_from(from)
        .get(stack.relay.api("/api/tags"))
        .bearer_auth(token("alice", Scope::Client))
        .send()
        .await
        .expect("alice's request")
        .status()
        .as_u16()
}

/// Sends one authenticated keep-alive request on `tcp` and gives the response's status.
async fn request_on(tcp: &mut TcpStream, token: &str) -> u16 {
    let request =
        format!("GET /api/tags HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {token}\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = timeout(STEP, tcp.read(&mut buf))
            .await
            .expect("response timed out")
            .expect("response");
        assert!(
            n > 0,
            "the relay closed the connection instead of answering"
        );
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_over_the_address_cap_are_closed_at_once_and_others_are_served() {
    const CAP: usize = 8;
    let stack = Stack::with_relay_config(capped(CAP as u32, 1000)).await;
    let addr = stack.relay.relay.addr;
    let idle = hold_idle(&stack.relay, &["127.0.0.1"; CAP]).await;

    // One more from the same address: closed at once, and counted.
    let mut extra = connect_from("127.0.0.1", addr).await;
    assert!(
        closed_within(&mut extra, AT_ONCE).await,
        "a connection over the address's cap must be closed at once"
    );
    stack.relay.wait_metric(REFUSED_ADDRESS, 1.0).await;

    // Another address is served meanwhile, by the relay and alice's daemon.
    assert_eq!(alice_from(&stack, "127.0.0.2").await, 200);
    let text = scrape(&stack.relay).await;
    assert_eq!(value(&text, UNAUTHENTICATED), CAP as f64, "{text}");
    assert_eq!(value(&text, EVICTED_ADDRESS), 0.0, "{text}");
    drop(idle);
    stack.relay.wait_metric(UNAUTHENTICATED, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_that_had_their_time_make_room_even_on_the_same_address() {
    const CAP: usize = 4;
    let stack = Stack::with_relay_config(capped(CAP as u32, 1000)).await;
    let mut idle = hold_idle(&stack.relay, &["127.0.0.1"; CAP]).await;
    // Once they have had the time any real client needs to authenticate, a newcomer from the
    // same address (here alice herself, behind the same NAT as the idler) pushes the oldest
    // out and is served.
    tokio::time::sleep(EVICT_AFTER + Duration::from_millis(100)).await;
    assert_eq!(alice_from(&stack, "127.0.0.1").await, 200);
    assert!(
        closed_within(&mut idle[0], STEP).await,
        "the oldest idle connection makes room"
    );
    stack.relay.wait_metric(EVICTED_ADDRESS, 1.0).await;
    assert_eq!(value(&scrape(&stack.relay).await, REFUSED_ADDRESS), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_cap_refuses_newcomers_then_evicts_idle_connections_from_anywhere() {
    const TOTAL: usize = 3;
    let stack = Stack::with_relay_config(capped(100, TOTAL as u32)).await;
    let addr = stack.relay.relay.addr;
    let from = ["127.0.0.1", "127.0.0.3", "127.0.0.4"];
    assert_eq!(from.len(), TOTAL);
    let mut idle = hold_idle(&stack.relay, &from).await;
    // Full of young connections: a newcomer from yet another address is refused at once …
    let mut young = connect_from("127.0.0.6", addr).await;
    assert!(closed_within(&mut young, AT_ONCE).await);
    stack.relay.wait_metric(REFUSED_TOTAL, 1.0).await;
    // … and once they have had their time, the oldest anywhere makes room instead.
    tokio::time::sleep(EVICT_AFTER + Duration::from_millis(100)).await;
    assert_eq!(alice_from(&stack, "127.0.0.6").await, 200);
    assert!(closed_within(&mut idle[0], STEP).await);
    stack.relay.wait_metric(EVICTED_TOTAL, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_whose_requests_were_admitted_are_not_capped() {
    const CAP: usize = 3;
    let stack = Stack::with_relay_config(capped(CAP as u32, 1000)).await;
    let addr = stack.relay.relay.addr;
    let alice = token("alice", Scope::Client);
    // Four times the cap, each opened after the previous one's request was admitted.
    let mut open = Vec::new();
    for n in 0..CAP * 4 {
        let mut tcp = connect_from("127.0.0.5", addr).await;
        assert_eq!(request_on(&mut tcp, &alice).await, 200, "connection {n}");
        open.push(tcp);
    }
    stack.relay.wait_metric(UNAUTHENTICATED, 0.0).await;
    // Each can carry more requests.
    for tcp in &mut open {
        assert_eq!(request_on(tcp, &alice).await, 200);
    }
    // A connection whose token failed still counts: it is not an admitted client.
    let mut forged = connect_from("127.0.0.5", addr).await;
    assert_eq!(request_on(&mut forged, "forged").await, 401);
    stack.relay.wait_metric(UNAUTHENTICATED, 1.0).await;
    let text = scrape(&stack.relay).await;
    assert_eq!(value(&text, REFUSED_ADDRESS), 0.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_a_byte_is_closed_after_the_read_timeout() {
    let mut config = capped(128, 1000);
    config.client_read_timeout = Duration::from_secs(1);
    let relay = TestRelay::start(config).await;
    let started = Instant::now();
    let mut silent = connect_from("127.0.0.1", relay.relay.addr).await;
    relay.wait_metric(UNAUTHENTICATED, 1.0).await;
    assert!(closed_within(&mut silent, STEP).await);
    let held = started.elapsed();
    assert!(
        held < Duration::from_secs(4),
        "a silent connection was held for {held:?} (read timeout 1 s)"
    );
    relay.wait_metric(UNAUTHENTICATED, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_connections_over_the_cap_are_closed_before_the_handshake() {
    let dir = std::env::temp_dir().join(format!("cloudllm-conn-caps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let tls = TlsConfig {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&tls.cert, cert.cert.pem()).unwrap();
    std::fs::write(&tls.key, cert.signing_key.serialize_pem()).unwrap();
    let mut config = capped(2, 1000);
    config.tls = Some(tls);
    let relay = TestRelay::start(config).await;
    let addr = relay.relay.addr;

    // Two connections that never say hello hold the address's cap …
    let _idle = hold_idle(&relay, &["127.0.0.1"; 2]).await;
    // … so the third is closed at once, before its ClientHello is even read.
    let mut extra = connect_from("127.0.0.1", addr).await;
    assert!(closed_within(&mut extra, AT_ONCE).await);
    relay.wait_metric(REFUSED_ADDRESS, 1.0).await;

    // An HTTPS client at another address gets through the handshake and is authenticated
    // (alice has no device here: the relay says so, which it only does to alice).
    let https = reqwest::Client::builder()
        .no_proxy()
        .local_address("127.0.0.2".parse::<IpAddr>().unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", addr)
        .timeout(STEP)
        .build()
        .unwrap();
    let response = https
        .get(format!("https://localhost:{}/api/tags", addr.port()))
        .bearer_auth(token("alice", Scope::Client))
        .send()
        .await
        .expect("the HTTPS request");
    assert_eq!(response.status(), 503);
    assert!(response.text().await.unwrap().contains("device is offline"));
    let _ = std::fs::remove_dir_all(&dir);
}
