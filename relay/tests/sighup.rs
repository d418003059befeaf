//! `cloudllm-relay serve` with `[tls]` reloads its certificate on a real SIGHUP: new
//! connections get the new certificate, a connection opened before keeps working, a broken
//! renewal is logged and the working certificate stays; without `[tls]`, SIGHUP does not stop
//! the relay.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{BIN, lines_of};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Every wait in these tests is bounded by this.
const STEP: Duration = Duration::from_secs(20);

/// A relay process, its address and its log lines.
struct Relay {
    child: Child,
    addr: SocketAddr,
    log: mpsc::Receiver<String>,
}

impl Relay {
    /// Runs `cloudllm-relay serve --dev` on a free port with `config` (if any) and waits until
    /// it has printed where it listens.
    fn start(config: Option<&Path>) -> Relay {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
            .env_remove("CLOUDLLM_RELAY_SECRET")
            .env_remove("CLOUDLLM_RELAY_CONFIG")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let mut child = command.spawn().unwrap();
        let log = lines_of(child.stderr.take().unwrap());
        let stdout = child.stdout.take().unwrap();
        // The dev banner's curl line ends with the relay's URL.
        let url = BufReader::new(stdout)
            .lines()
            .map(Result::unwrap)
            .find(|line| line.contains("curl -H"))
            .expect("dev mode prints a curl line");
        let url = url.rsplit(' ').next().unwrap();
        let host = url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap();
        Relay {
            child,
            addr: host.parse().unwrap(),
            log,
        }
    }

    fn hangup(&self) {
        signal(&self.child, "-HUP");
    }

    /// Waits for a log line containing `text` and returns it.
    fn wait_log(&self, text: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line containing {text:?}"),
            }
        }
    }

    fn assert_running(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "the relay exited");
    }

    /// SIGTERM, and a clean exit.
    fn stop(mut self) {
        signal(&self.child, "-TERM");
        let deadline = Instant::now() + STEP;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the relay did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "exit status {status}");
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, which: &str) {
    let status = Command::new("kill")
        .args([which, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A throwaway CA and certificates for `localhost` signed by it.
struct TestCa {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Writes a new certificate and key to `files`, returning the certificate's DER.
    fn issue_to(&self, files: &Files) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    /// Opens a TLS connection to `addr` that trusts this CA only.
    async fn connect(&self, addr: SocketAddr) -> TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(
            STEP,
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("localhost").unwrap(), tcp),
        )
        .await
        .unwrap()
        .unwrap()
    }

    /// The certificate a new connection to `addr` is served.
    async fn served(&self, addr: SocketAddr) -> Vec<u8> {
        peer_certificate(&self.connect(addr).await)
    }
}

fn peer_certificate(tls: &TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// `GET /healthz` on a kept-alive connection; returns the status line.
async fn healthz(tls: &mut TlsStream<TcpStream>) -> String {
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    // The body is "ok\n": the response is complete once it has arrived.
    while !response.ends_with(b"\r\n\r\nok\n") {
        let n = tokio::time::timeout(STEP, tls.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&response);
    text.lines().next().unwrap().to_owned()
}

/// `cert.pem` and `key.pem` in a scratch directory, and a config that serves them.
struct Files {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    config: PathBuf,
}

impl Files {
    fn new() -> Files {
        let dir =
            std::env::temp_dir().join(format!("cloudllm-relay-sighup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = Files {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            config: dir.join("relay.toml"),
            dir,
        };
        std::fs::write(
            &files.config,
            format!(
                "[tls]\ncert = {:?}\nkey = {:?}\n",
                files.cert.display().to_string(),
                files.key.display().to_string()
            ),
        )
        .unwrap();
        files
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn sighup_reloads_the_certificate_and_keeps_open_connections() {
    let files = Files::new();
    let ca = TestCa::new();
    let first = ca.issue_to(&files);
    let mut relay = Relay::start(Some(&files.config));
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let mut before = runtime.block_on(ca.connect(relay.addr));
    assert_eq!(peer_certificate(&before), first);
    assert_eq!(runtime.block_on(healthz(&mut before)), "HTTP/1.1 200 OK");

    let second = ca.issue_to(&files);
    relay.hangup();
    relay.wait_log("TLS certificate reloaded");
    assert_eq!(runtime.block_on(ca.served(relay.addr)), second);
    // The connection from before the reload is the same one, still serving.
    assert_eq!(runtime.block_on(healthz(&mut before)), "HTTP/1.1 200 OK");
    relay.assert_running();

    // A renewal that left a broken key: logged, and the working certificate stays.
    std::fs::write(&files.key, "not a key\n").unwrap();
    relay.hangup();
    let line = relay.wait_log("TLS certificate not reloaded");
    assert!(
        line.contains("key.pem") && line.contains("no private key"),
        "{line}"
    );
    assert_eq!(runtime.block_on(ca.served(relay.addr)), second);
    relay.assert_running();
    relay.stop();
}

#[test]
fn sighup_without_tls_leaves_the_relay_running() {
    let mut relay = Relay::start(None);
    relay.hangup();
    relay.wait_log("nothing to reload");
    relay.assert_running();
    relay.stop();
}
