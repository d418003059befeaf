//! TLS termination in the relay: HTTPS for API clients and `wss://` for daemons, with no
//! reverse proxy in front.
//!
//! The certificate chain and its key come from PEM files (`[tls]` in the config). They are
//! checked when loaded (a certificate is there, a key is there, the key belongs to the
//! certificate), so a broken file is an error naming that file at startup rather than a failed
//! handshake later. [`Tls`] serves whatever certificate it loaded last through a
//! [`ResolvesServerCert`] whose certificate can be swapped while the relay runs: [`Tls::reload`]
//! (SIGHUP in `cloudllm-relay serve`) reads the files again and only handshakes that start
//! afterwards see the new certificate. Established connections, and so the daemons' tunnels, are
//! never touched: a TLS session keeps the keys it negotiated. A reload that fails keeps the
//! current certificate, so a renewal script that writes a half-finished file cannot take the
//! relay offline.
//!
//! [`Tls::listener`] is what the HTTP server takes connections from: a background task accepts
//! TCP connections, admits each through the caps on unauthenticated connections
//! ([`crate::connections`]) before any TLS work (a refused one is closed at once), and runs each
//! handshake in a task of its own under a timeout, so a slow or silent client never holds up
//! anyone else's, and passes finished connections on through a bounded channel.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument, debug, debug_span, info, info_span, warn};

pub use crate::config::TlsConfig;
use crate::connections::{Accept, Gate, Incoming};

/// Longest a client may take to complete its TLS handshake: 10 s. A real client needs one or
/// two round trips (well under a second even across continents); the bound is what a
/// connection that never speaks may cost: one socket and one small task for this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once, at most: 1024. Beyond that, new connections wait (within
/// their handshake timeout) for one to finish; accepting never waits, so the caps on
/// unauthenticated connections always see new connections and can close idle ones to make
/// room. A reconnect storm of thousands of daemons still passes quickly (each handshake takes
/// milliseconds), while a flood of clients that never finish theirs holds bounded memory.
const MAX_HANDSHAKES: usize = 1024;

/// Finished handshakes waiting for the HTTP server to take them: 64. The server takes them in
/// a tight loop; this only smooths bursts.
const READY_QUEUE: usize = 64;

/// The one application protocol offered. The relay serves HTTP/1.1 only, which the WebSocket
/// upgrade of `/tunnel` needs; HTTP/2 runs inside the tunnel, not on this listener.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// Why a certificate or key file cannot be used. Each names the file and says what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The file is missing or unreadable.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        error: io::Error,
    },
    /// The file is not well-formed PEM.
    #[error("{} is not valid PEM: {detail}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        detail: String,
    },
    /// The certificate file has no certificate in it.
    #[error(
        "{} holds no certificate: expected PEM `-----BEGIN CERTIFICATE-----` blocks, the relay's own certificate first, then its chain (e.g. Let's Encrypt's fullchain.pem)",
        path.display()
    )]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file has no private key in it.
    #[error(
        "{} holds no private key: expected a PEM `BEGIN PRIVATE KEY` (PKCS#8), `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY` block (an encrypted key must be decrypted first)",
        path.display()
    )]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key is of a kind the relay cannot sign with.
    #[error("the private key in {} cannot be used: {detail}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        detail: String,
    },
    /// The first certificate does not parse.
    #[error("the first certificate in {} is not a valid X.509 certificate: {detail}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
    /// The key is not the certificate's.
    #[error(
        "the private key in {} does not match the certificate in {} (is it the key of another certificate?)",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

/// The crypto provider the relay's TLS uses: ring, as everywhere in the workspace.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks the certificate chain and key that `config` names.
pub fn load(config: &TlsConfig) -> Result<Arc<CertifiedKey>, CertError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| CertError::Read {
            path: path.to_owned(),
            error,
        })
    };
    let pem_error = |path: &Path, err: pem::Error| CertError::Pem {
        path: path.to_owned(),
        detail: err.to_string(),
    };

    let cert_pem = read(&config.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(&config.cert, err))?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: config.cert.clone(),
        });
    }

    let key_pem = read(&config.key)?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(CertError::NoKey {
                path: config.key.clone(),
            });
        }
        Err(err) => return Err(pem_error(&config.key, err)),
    };
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|err| CertError::BadKey {
            path: config.key.clone(),
            detail: err.to_string(),
        })?;

    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // Unknown: the key cannot tell its public half; rustls serves such keys too.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(CertError::KeyMismatch {
                cert: config.cert.clone(),
                key: config.key.clone(),
            })
        }
        Err(err) => Err(CertError::BadCertificate {
            path: config.cert.clone(),
            detail: err.to_string(),
        }),
    }
}

/// Hands every handshake the certificate loaded last.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl CurrentCert {
    fn get(&self) -> Arc<CertifiedKey> {
        // A panic while swapping cannot leave a torn value behind: the guarded value is one Arc.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, cert: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = cert;
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The relay's TLS: the files it serves from and the certificate loaded from them. Cloning
/// gives another handle to the same certificate.
#[derive(Clone)]
pub struct Tls {
    files: TlsConfig,
    current: Arc<CurrentCert>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the certificate and key that `files` names.
    pub fn new(files: &TlsConfig) -> Result<Tls, CertError> {
        let current = Arc::new(CurrentCert(RwLock::new(load(files)?)));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
        Ok(Tls {
            files: files.clone(),
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reads the certificate and key files again and serves the new pair to handshakes from
    /// now on; connections already open keep theirs. On an error the current certificate stays
    /// and the reason is logged (and returned).
    pub fn reload(&self) -> Result<(), CertError> {
        match load(&self.files) {
            Ok(cert) => {
                let chain = cert.cert.len();
                self.current.set(cert);
                info!(cert = %self.files.cert.display(), chain, "TLS certificate reloaded");
                Ok(())
            }
            Err(err) => {
                warn!(error = %err, "TLS certificate not reloaded: still serving the previous one");
                Err(err)
            }
        }
    }

    /// The certificate chain served right now (DER, the relay's own certificate first).
    pub fn certificate_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.get().cert.clone()
    }

    /// Serves TLS on `tcp`, admitting connections through `gate`: the returned listener yields
    /// connections whose handshake has completed. Accepting stops once the listener is dropped.
    pub(crate) fn listener(
        &self,
        tcp: TcpListener,
        keepalive: socket2::TcpKeepalive,
        gate: Arc<Gate>,
    ) -> TlsListener {
        let (ready_tx, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(
            accept_loop(tcp, keepalive, self.acceptor.clone(), gate, ready_tx)
                .instrument(info_span!("tls_accept")),
        );
        TlsListener { ready }
    }
}

/// Accepts TCP connections and runs their handshakes, until the [`TlsListener`] is dropped.
async fn accept_loop(
    tcp: TcpListener,
    keepalive: socket2::TcpKeepalive,
    acceptor: TlsAcceptor,
    gate: Arc<Gate>,
    ready: mpsc::Sender<Incoming<TlsStream<TcpStream>>>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, addr) = tokio::select! {
            _ = ready.closed() => break,
            accepted = tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_failed(err).await;
                    continue;
                }
            },
        };
        let Some(slot) = gate.admit(addr.ip()) else {
            debug!(%addr, "connection refused: too many unauthenticated connections");
            continue; // dropping `stream` closes it, before any TLS work
        };
        crate::tune_socket(&stream, &keepalive);
        let acceptor = acceptor.clone();
        let handshakes = handshakes.clone();
        let ready = ready.clone();
        tokio::spawn(
            async move {
                let handshake = async {
                    // Never closed, so always a permit; held for the handshake only.
                    let permit = handshakes.acquire_owned().await;
                    let tls = acceptor.accept(stream).await;
                    drop(permit);
                    tls
                };
                let evicted = slot.clone();
                tokio::select! {
                    () = evicted.evicted() => {
                        debug!("closed during its TLS handshake to make room for newer connections");
                    }
                    handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match handshake {
                        Ok(Ok(tls)) => {
                            let incoming = Incoming { io: tls, peer: addr, slot };
                            // Fails only when the server has stopped accepting: the connection
                            // closes.
                            let _ = ready.send(incoming).await;
                        }
                        Ok(Err(err)) => debug!(error = %err, "TLS handshake failed"),
                        Err(_) => debug!(timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out"),
                    },
                }
            }
            .instrument(debug_span!("tls_handshake", %addr)),
        );
    }
    debug!("stopped accepting TLS connections");
}

/// After a failed `accept`: a connection that died before it was accepted is nobody's concern;
/// anything else (out of file descriptors, most likely) is logged, and accepting pauses for a
/// second rather than spinning.
pub(crate) async fn accept_failed(err: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        err.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    warn!(error = %err, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Connections whose TLS handshake has completed, admitted by the gate.
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<Incoming<TlsStream<TcpStream>>>,
}

impl Accept for TlsListener {
    type Io = TlsStream<TcpStream>;

    async fn accept(&mut self) -> Incoming<Self::Io> {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop ends only when this listener is dropped, so this is unreachable
            // in practice; waiting forever is what a listener with no more clients does.
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `localhost` and its PKCS#8 key, both PEM.
    fn self_signed() -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    struct Files {
        dir: PathBuf,
        config: TlsConfig,
    }

    impl Files {
        fn new(name: &str, cert: &str, key: &str) -> Files {
            let dir = std::env::temp_dir()
                .join(format!("cloudllm-relay-tls-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let config = TlsConfig {
                cert: dir.join("cert.pem"),
                key: dir.join("key.pem"),
            };
            std::fs::write(&config.cert, cert).unwrap();
            std::fs::write(&config.key, key).unwrap();
            Files { dir, config }
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_matching_pair_loads_with_its_chain() {
        let (cert, key) = self_signed();
        let (ca, _) = self_signed();
        let files = Files::new("ok", &format!("{cert}{ca}"), &key);
        let loaded = load(&files.config).unwrap();
        assert_eq!(loaded.cert.len(), 2, "the whole chain is served");
    }

    #[test]
    fn each_broken_file_is_named_with_what_is_wrong() {
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();

        let files = Files::new("missing", &cert, &key);
        let mut config = files.config.clone();
        config.cert = files.dir.join("nope.pem");
        let err = load(&config).unwrap_err().to_string();
        assert!(
            err.contains("cannot read") && err.contains("nope.pem"),
            "{err}"
        );

        let files = Files::new("no-cert", &key, &key);
        let err = load(&files.config).unwrap_err().to_string();
        assert!(
            err.contains("holds no certificate") && err.contains("cert.pem"),
            "{err}"
        );

        let files = Files::new("no-key", &cert, &cert);
        let err = load(&files.config).unwrap_err().to_string();
        assert!(
            err.contains("holds no private key") && err.contains("key.pem"),
            "{err}"
        );

        let files = Files::new("mismatch", &cert, &other_key);
        let err = load(&files.config).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
        let err = err.to_string();
        assert!(
            err.contains("does not match") && err.contains("key.pem") && err.contains("cert.pem"),
            "{err}"
        );

        let truncated = &cert[..cert.len() - 30];
        let files = Files::new("truncated", truncated, &key);
        let err = load(&files.config).unwrap_err().to_string();
        assert!(
            err.contains("not valid PEM") && err.contains("cert.pem"),
            "{err}"
        );

        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let files = Files::new("garbage", garbage, &key);
        let err = load(&files.config).unwrap_err().to_string();
        assert!(
            err.contains("not a valid X.509 certificate") && err.contains("cert.pem"),
            "{err}"
        );
    }

    #[test]
    fn a_failed_reload_keeps_the_current_certificate() {
        let (cert, key) = self_signed();
        let files = Files::new("reload", &cert, &key);
        let tls = Tls::new(&files.config).unwrap();
        let before = tls.certificate_chain();

        std::fs::write(&files.config.key, "not a key").unwrap();
        assert!(tls.reload().is_err());
        assert_eq!(tls.certificate_chain(), before);

        let (cert2, key2) = self_signed();
        std::fs::write(&files.config.cert, &cert2).unwrap();
        std::fs::write(&files.config.key, &key2).unwrap();
        tls.reload().unwrap();
        let after = tls.certificate_chain();
        assert_ne!(after, before);
        assert_eq!(
            after[0].as_ref(),
            CertificateDer::from_pem_slice(cert2.as_bytes())
                .unwrap()
                .as_ref()
        );
    }

    #[test]
    fn tls_names_two_files_and_a_missing_one_is_a_startup_error() {
        let mut config: crate::RelayConfig = toml::from_str(
            "secret = \"0123456789abcdef0123456789abcdef\"\n[tls]\ncert = \"/nonexistent/fullchain.pem\"\nkey = \"/nonexistent/privkey.pem\"\n",
        )
        .unwrap();
        let tls = config.tls.clone().unwrap();
        assert_eq!(tls.cert, Path::new("/nonexistent/fullchain.pem"));
        assert_eq!(tls.key, Path::new("/nonexistent/privkey.pem"));
        let err = format!("{:#}", config.validate().unwrap_err());
        assert!(
            err.contains("[tls]") && err.contains("/nonexistent/fullchain.pem"),
            "{err}"
        );
        config.tls = None;
        assert!(config.validate().is_ok());

        let err = toml::from_str::<crate::RelayConfig>("[tls]\ncert = \"c.pem\"\n").unwrap_err();
        assert!(err.to_string().contains("key"), "{err}");
        let err = toml::from_str::<crate::RelayConfig>(
            "[tls]\ncert = \"c\"\nkey = \"k\"\nchain = \"x\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("chain"), "{err}");
    }
}
