//! The certificate and key files: read, parsed and checked against each other, with an error
//! that names the file and says what is wrong.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::InconsistentKeys;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::TlsConfig;

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
pub(super) fn provider() -> Arc<CryptoProvider> {
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
