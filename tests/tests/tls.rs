//! The relay terminates TLS itself (`[tls]`): the daemon tunnels over `wss://` trusting the
//! relay's CA through `ca_file`, clients that do not trust it get no connection, and a reloaded
//! certificate is served to new connections while the tunnel and a stream in flight stay on
//! the connections they had.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cloudllm_e2e::{
    FakeOllama, STEP, TestDaemon, TestRelay, daemon_config, read_to_end, relay_config, scratch_dir,
    send, take_lines, token, wait_status,
};
use cloudllm_proto::ipc::Connection;
use cloudllm_relay::{RelayConfig, Scope, TlsConfig};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::timeout;
use url::Url;

/// A throwaway CA, with a name of its own, that signs certificates for `localhost`.
struct TestCa {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A new certificate for `localhost` and its key, PEM.
    fn leaf(&self) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The DER of the first certificate in `pem`.
fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A test relay config serving TLS from `cert.pem`/`key.pem` in `dir`, which hold `leaf`.
fn tls_relay_config(dir: &Path, (cert, key): &(String, String)) -> RelayConfig {
    let tls = TlsConfig {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&tls.cert, cert).unwrap();
    std::fs::write(&tls.key, key).unwrap();
    RelayConfig {
        tls: Some(tls),
        ..relay_config()
    }
}

/// The relay's `https://localhost:PORT` URL (the certificates are for `localhost`).
fn https_url(addr: SocketAddr) -> Url {
    Url::parse(&format!("https://localhost:{}", addr.port())).unwrap()
}

/// Writes the CA to `dir` and returns the file, for the daemon's `ca_file`.
fn ca_file(dir: &Path, ca: &TestCa) -> PathBuf {
    let path = dir.join("ca.pem");
    std::fs::write(&path, &ca.pem).unwrap();
    path
}

/// An HTTP client that trusts `ca` (and nothing else).
fn https_client(ca: &TestCa) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
        .resolve("localhost", SocketAddr::from(([127, 0, 0, 1], 0)))
        .build()
        .unwrap()
}

/// A fresh TLS handshake with the relay, trusting `ca_pem`: the certificate it presented, or
/// the handshake's error.
async fn handshake(addr: SocketAddr, ca_pem: &str) -> Result<Vec<u8>, std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = timeout(STEP, TcpStream::connect(addr)).await.unwrap()?;
    let name = ServerName::try_from("localhost").unwrap();
    let tls = timeout(STEP, connector.connect(name, tcp)).await.unwrap()?;
    let (_, connection) = tls.get_ref();
    Ok(connection.peer_certificates().unwrap()[0].to_vec())
}

/// Waits until the daemon's tunnel is up and returns its id.
async fn tunnel_id(relay: &TestRelay) -> u64 {
    relay.wait_for_devices("alice", 1).await;
    relay.relay.registry.all()[0].tunnel_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_tunnels_over_the_relays_own_tls_and_untrusting_clients_fail() {
    cloudllm_e2e::init_logs();
    let dir = scratch_dir();
    let ca = TestCa::new("relay test CA");
    let leaf = ca.leaf();
    let relay = TestRelay::start(tls_relay_config(&dir, &leaf)).await;
    let addr = relay.relay.addr;
    let https = https_url(addr);
    let backend = FakeOllama::start().await;

    // A client that trusts another CA: the handshake fails on the certificate.
    let err = handshake(addr, &TestCa::new("someone else's CA").pem)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("UnknownIssuer"),
        "unexpected error: {err}"
    );
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = cloudllm_e2e::client()
        .get(format!("http://{addr}/healthz"))
        .send();
    assert!(timeout(STEP, plain).await.unwrap().is_err());

    // A daemon without the CA does not connect.
    let config = daemon_config(&https, "alice", "no-ca", &backend.url());
    let socket = config.socket_path.clone().expect("a socket path");
    let untrusted = TestDaemon::start(config);
    // Proof that it dialled and the handshake failed on the certificate, before checking
    // that it did not get through.
    let status = wait_status(&socket, STEP, |s| {
        matches!(&s.connection, Connection::Reconnecting { last_error, .. } if last_error.contains("UnknownIssuer"))
    })
    .await;
    assert!(
        relay.relay.registry.is_empty(),
        "connected despite an untrusted certificate: {status:?}"
    );
    drop(untrusted);

    // With the CA in `ca_file`, it tunnels over wss:// and requests go through.
    let mut config = daemon_config(&https, "alice", "laptop", &backend.url());
    config.ca_file = Some(ca_file(&dir, &ca));
    let _daemon = TestDaemon::start(config);
    relay.wait_for_devices("alice", 1).await;
    assert_eq!(handshake(addr, &ca.pem).await.unwrap(), der(&leaf.0));

    let http = https_client(&ca);
    let response = timeout(
        STEP,
        http.get(format!("{https}api/tags"))
            .bearer_auth(token("alice", Scope::Client))
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    let response = send(
        http.post(format!("{https}api/generate"))
            .bearer_auth(token("alice", Scope::Client))
            .json(&json!({"prompt": "over-tls", "options": {"num_predict": 5}, "fake_interval_ms": 10})),
    )
    .await;
    assert_eq!(response.status(), 200);
    let (mut buf, ended) = read_to_end(response).await;
    ended.expect("the stream ends cleanly");
    let lines = take_lines(&mut buf);
    assert_eq!(lines.len(), 6);
    assert_eq!(lines.last().unwrap()["done"], true);
    // Served on the main runtime, a TLS relay asks no tunnel for lanes (its daemon offers them).
    assert!(relay.relay.registry.all().iter().all(|d| !d.has_lanes()));
    relay.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_certificate_reaches_new_connections_while_the_tunnel_and_streams_stay() {
    cloudllm_e2e::init_logs();
    let dir = scratch_dir();
    let ca = TestCa::new("relay test CA");
    let first = ca.leaf();
    let config = tls_relay_config(&dir, &first);
    let files = config.tls.clone().unwrap();
    let relay = TestRelay::start(config).await;
    let addr = relay.relay.addr;
    let backend = FakeOllama::start().await;
    let mut daemon = daemon_config(&https_url(addr), "alice", "laptop", &backend.url());
    daemon.ca_file = Some(ca_file(&dir, &ca));
    let _daemon = TestDaemon::start(daemon);
    let tunnel = tunnel_id(&relay).await;
    assert_eq!(handshake(addr, &ca.pem).await.unwrap(), der(&first.0));

    // A stream that spans the reload: 30 lines, 50 ms apart.
    let http = https_client(&ca);
    let mut response = timeout(
        STEP,
        http.post(format!("{}api/generate", https_url(addr)))
            .bearer_auth(token("alice", Scope::Client))
            .json(&json!({"prompt": "spanning", "options": {"num_predict": 30}, "fake_interval_ms": 50}))
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), 200);
    let mut buf = timeout(STEP, response.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .to_vec();

    // The renewal: new files, then the reload (what SIGHUP does).
    let second = ca.leaf();
    std::fs::write(&files.cert, &second.0).unwrap();
    std::fs::write(&files.key, &second.1).unwrap();
    let tls = relay.relay.tls.as_ref().expect("the relay serves TLS");
    tls.reload().unwrap();
    assert_eq!(
        handshake(addr, &ca.pem).await.unwrap(),
        der(&second.0),
        "a new connection gets the new certificate"
    );
    assert_eq!(
        backend.records.ended.lock().unwrap().get("spanning"),
        None,
        "the stream is still in flight after the reload"
    );

    // The stream in flight finishes on its old connection.
    while let Some(chunk) = timeout(STEP, response.chunk()).await.unwrap().unwrap() {
        buf.extend_from_slice(&chunk);
    }
    let lines = take_lines(&mut buf);
    assert_eq!(lines.len(), 31, "every line of the spanning stream arrived");
    assert_eq!(lines.last().unwrap()["done"], true);

    // The tunnel is the one from before the reload: the daemon never reconnected.
    let devices = relay.relay.registry.all();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].tunnel_id, tunnel, "the tunnel was replaced");
    let response = timeout(
        STEP,
        http.get(format!("{}api/tags", https_url(addr)))
            .bearer_auth(token("alice", Scope::Client))
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), 200);

    // A broken renewal keeps the certificate that works.
    std::fs::write(&files.key, "-----BEGIN PRIVATE KEY-----\ntruncated").unwrap();
    let err = tls.reload().unwrap_err().to_string();
    assert!(err.contains("key.pem"), "{err}");
    assert_eq!(handshake(addr, &ca.pem).await.unwrap(), der(&second.0));
    assert_eq!(relay.relay.registry.all()[0].tunnel_id, tunnel);

    relay.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_does_not_hold_up_other_handshakes() {
    let dir = scratch_dir();
    let ca = TestCa::new("relay test CA");
    let relay = TestRelay::start(tls_relay_config(&dir, &ca.leaf())).await;
    let addr = relay.relay.addr;
    // Connections that never start their handshake.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // Each new client is served at once, not after the silent ones time out.
    let started = tokio::time::Instant::now();
    let http = https_client(&ca);
    for _ in 0..3 {
        let response = timeout(STEP, http.get(format!("{}healthz", https_url(addr))).send())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    drop(silent);
    relay.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_ca_file_is_a_clear_startup_error() {
    let relay = TestRelay::start(relay_config()).await;
    let backend = FakeOllama::start().await;
    let mut config = daemon_config(&relay.url(), "alice", "laptop", &backend.url());
    config.ca_file = Some("/nonexistent/ca.pem".into());
    let err = cloudllm_daemon::run(config, Default::default())
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("ca_file /nonexistent/ca.pem"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_does_not_match_the_certificate_stops_the_relay_from_starting() {
    let dir = scratch_dir();
    let ca = TestCa::new("relay test CA");
    let (cert, _) = ca.leaf();
    let (_, other_key) = ca.leaf();
    let config = tls_relay_config(&dir, &(cert, other_key));
    let err = cloudllm_relay::serve(config, Default::default())
        .await
        .err()
        .expect("the relay started with a mismatched key");
    let err = format!("{err:#}");
    assert!(
        err.contains("[tls]") && err.contains("does not match") && err.contains("key.pem"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
