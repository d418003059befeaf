//! The daemon dials `https://` relays over TLS (`wss://`), trusting the system's roots plus an
//! extra CA file, and refuses a certificate it cannot verify.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cloudllm_e2e::{FakeOllama, TestDaemon, TestRelay, daemon_config, relay_config};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use url::Url;

/// A TLS-terminating front for the relay (what a reverse proxy does in production), with a
/// certificate for `localhost` from a throwaway CA. Returns its address and the CA in PEM.
async fn tls_front(relay: SocketAddr) -> (SocketAddr, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut upstream) = TcpStream::connect(relay).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    (addr, ca.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_tunnels_over_tls_with_an_extra_ca_and_refuses_unknown_certificates() {
    cloudllm_e2e::init_logs();
    let relay = TestRelay::start(relay_config()).await;
    let (front, ca_pem) = tls_front(relay.relay.addr).await;
    let backend = FakeOllama::start().await;
    let https = Url::parse(&format!("https://localhost:{}", front.port())).unwrap();

    // Without the CA the certificate is not trusted: no tunnel.
    let untrusted = TestDaemon::start(daemon_config(&https, "alice", "no-ca", &backend.url()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        relay.relay.registry.is_empty(),
        "connected despite an untrusted certificate"
    );
    drop(untrusted);

    let dir = std::env::temp_dir().join(format!("cloudllm-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let mut config = daemon_config(&https, "alice", "laptop", &backend.url());
    config.ca_file = Some(ca_file);
    let _daemon = TestDaemon::start(config);
    relay.wait_for_devices("alice", 1).await;
    let response = relay.get_as("alice", "/api/tags").await;
    assert_eq!(response.status(), 200);
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
