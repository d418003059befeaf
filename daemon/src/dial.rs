//! Dialling the relay: TCP (with TCP_NODELAY), TLS for `https://`/`wss://` relays (rustls with
//! the system's roots plus an optional extra CA file), then the WebSocket upgrade on `/tunnel`
//! carrying the agent token and this device's identity.

use std::sync::Arc;
use std::time::Duration;

use cloudllm_proto as proto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
use url::Url;

use crate::config::DaemonConfig;

/// Time for TCP connect, TLS and the WebSocket upgrade together: 15 s covers a slow mobile
/// link and still notices a black-holed relay quickly.
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// A byte stream to the relay, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Why dialling failed. `Refused` means the relay answered and said no: retrying with the same
/// token will not help, which the caller shows differently from a network error.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The relay refused the tunnel (bad token, protocol, limit).
    #[error("relay refused the tunnel: HTTP {status}: {reason}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The relay's explanation.
        reason: String,
    },
    /// Network, TLS or protocol failure.
    #[error("{0}")]
    Network(String),
}

/// The TLS settings for the relay, built once.
pub fn tls_config(config: &DaemonConfig) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use anyhow::Context;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &config.ca_file {
        let pem =
            std::fs::read(path).with_context(|| format!("reading ca_file {}", path.display()))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.with_context(|| format!("parsing ca_file {}", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("adding a certificate from ca_file {}", path.display()))?;
            added += 1;
        }
        anyhow::ensure!(
            added > 0,
            "ca_file {} holds no PEM certificate",
            path.display()
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// The WebSocket URL of the relay's tunnel endpoint for a relay base URL.
pub fn tunnel_url(relay: &Url) -> Url {
    let mut url = relay_endpoint(relay, proto::TUNNEL_PATH);
    let scheme = match relay.scheme() {
        "https" | "wss" => "wss",
        _ => "ws",
    };
    // Both schemes are special with the same defaults, so this cannot fail.
    let _ = url.set_scheme(scheme);
    url
}

/// The URL of `path` (absolute, as the relay serves it) on the relay at base URL `relay`:
/// under the base URL's path, so that a relay a reverse proxy serves under a prefix
/// (`https://example.com/cloudllm/`) is reached there.
pub fn relay_endpoint(relay: &Url, path: &str) -> Url {
    let mut url = relay.clone();
    let base = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("{base}{path}"));
    url.set_query(None);
    url.set_fragment(None);
    url
}

/// Opens the tunnel's WebSocket; with `lane` (`SHARD.KEY`, as the relay asked), one of its
/// lanes.
pub async fn dial(
    config: &DaemonConfig,
    tls: &Arc<rustls::ClientConfig>,
    device_id: &str,
    token: &cloudllm_proto::Secret,
    lane: Option<&str>,
) -> Result<WebSocketStream<Box<dyn Stream>>, DialError> {
    tokio::time::timeout(
        DIAL_TIMEOUT,
        dial_inner(config, tls, device_id, token, lane),
    )
    .await
    .map_err(|_| DialError::Network(format!("no answer within {DIAL_TIMEOUT:?}")))?
}

async fn dial_inner(
    config: &DaemonConfig,
    tls: &Arc<rustls::ClientConfig>,
    device_id: &str,
    token: &cloudllm_proto::Secret,
    lane: Option<&str>,
) -> Result<WebSocketStream<Box<dyn Stream>>, DialError> {
    let net =
        |what: &str, err: &dyn std::fmt::Display| DialError::Network(format!("{what}: {err}"));
    let relay = config
        .relay_url
        .as_ref()
        .ok_or_else(|| DialError::Network("no relay URL".into()))?;
    let url = tunnel_url(relay);
    let host = url
        .host_str()
        .ok_or_else(|| DialError::Network("relay URL has no host".into()))?
        .to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|err| net(&format!("connecting to {host}:{port}"), &err))?;
    tcp.set_nodelay(true)
        .map_err(|err| net("TCP_NODELAY", &err))?;
    let stream: Box<dyn Stream> = if url.scheme() == "wss" {
        let name =
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|err| net("relay host name", &err))?;
        let tls = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|err| net(&format!("TLS with {host}"), &err))?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };

    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|err| net("tunnel request", &err))?;
    let headers = request.headers_mut();
    let value = |v: &str| {
        http::HeaderValue::from_str(v)
            .map_err(|_| DialError::Network("header value is not valid".into()))
    };
    headers.insert(
        http::header::AUTHORIZATION,
        value(&format!("Bearer {}", token.expose()))?,
    );
    headers.insert(
        proto::HEADER_PROTOCOL,
        value(&proto::PROTOCOL_VERSION.to_string())?,
    );
    headers.insert(proto::HEADER_DEVICE_ID, value(device_id)?);
    headers.insert(proto::HEADER_DEVICE_NAME, value(&config.device_name)?);
    if let Some(lane) = lane {
        headers.insert(proto::HEADER_LANE, value(lane)?);
    }
    headers.insert(
        http::header::USER_AGENT,
        value(concat!("cloudllmd/", env!("CARGO_PKG_VERSION")))?,
    );

    match tokio_tungstenite::client_async_with_config(
        request,
        stream,
        Some(cloudllm_tunnel::ws_config(
            cloudllm_tunnel::DAEMON_WS_READ_BUFFER,
        )),
    )
    .await
    {
        Ok((ws, _response)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let reason = response
                .body()
                .as_deref()
                .map(|b| {
                    String::from_utf8_lossy(&b[..b.len().min(512)])
                        .trim()
                        .to_owned()
                })
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| {
                    response
                        .status()
                        .canonical_reason()
                        .unwrap_or("")
                        .to_owned()
                });
            Err(DialError::Refused { status, reason })
        }
        Err(err) => Err(net("WebSocket upgrade", &err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_urls_follow_the_relay_base_url() {
        let cases = [
            ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/tunnel"),
            (
                "https://relay.example.com",
                "wss://relay.example.com/tunnel",
            ),
            (
                "https://example.com/cloudllm/",
                "wss://example.com/cloudllm/tunnel",
            ),
            (
                "wss://example.com:9443?x=1",
                "wss://example.com:9443/tunnel",
            ),
        ];
        for (base, want) in cases {
            assert_eq!(tunnel_url(&Url::parse(base).unwrap()).as_str(), want);
        }
    }
}
