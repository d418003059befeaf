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
//! Reading and checking the files is `cert`; `Tls::listener` (`listener`) is what the
//! HTTP server takes connections from, handshakes done.

mod cert;
mod listener;

use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

pub use crate::config::TlsConfig;
use cert::provider;
pub use cert::{CertError, load};
pub use listener::HANDSHAKE_TIMEOUT;

/// The one application protocol offered. The relay serves HTTP/1.1 only, which the WebSocket
/// upgrade of `/tunnel` needs; HTTP/2 runs inside the tunnel, not on this listener.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

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
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use rustls::pki_types::pem::PemObject;

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
