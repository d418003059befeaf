//! What a login must learn before it starts: from the relay, how its users log in (its
//! `/.well-known/cloudllm` document); from the identity provider that names, its endpoints (its
//! OpenID configuration, OpenID Connect Discovery 1.0).
//!
//! Both documents decide where the user's credentials go, so both are fetched bounded in time
//! and size and following no redirect, and the provider's endpoints must be `https://` (plain
//! `http://` only on this machine) and belong to the issuer the relay named.

use std::time::Duration;

use anyhow::Context;
use cloudllm_proto::RelayInfo;
use cloudllm_tunnel::body::{BodyError, read_limited};
use hyper::StatusCode;
use serde::Deserialize;
use tracing::debug;
use url::{Host, Url};

use super::http::{Http, HttpError};
use super::{LoginError, Provider, clean};

/// Largest `/.well-known/cloudllm` document read, in bytes: a real one is a few hundred bytes
/// (an issuer, a client id, a few scopes, a web page); 64 KiB is far beyond any of them.
const MAX_RELAY_INFO_BYTES: usize = 64 * 1024;

/// Time to fetch the relay's login details, body included: the relay is one small document
/// away, so 10 s means it is unreachable or stuck.
const RELAY_INFO_TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches the relay's public description ([`cloudllm_proto::WELL_KNOWN_PATH`] under `relay`):
/// how its users log in. Bounded in time (10 s) and size (64 KiB): an endless or oversized
/// answer is cut off at the limit, not read whole.
///
/// Follows no redirect: the document names the identity provider the user signs in at, so it
/// must come from the relay the user named, over the scheme the user named. Following one
/// would let another host (behind an open redirect on the relay's domain, say) choose where the
/// user signs in, or downgrade to plain http. The error says where the redirect points, so a
/// user whose relay moved can name the new address.
pub async fn fetch_relay_info(relay: &Url) -> anyhow::Result<RelayInfo> {
    // Under the base URL's path, where the tunnel is dialled too.
    let url = crate::dial::relay_endpoint(relay, cloudllm_proto::WELL_KNOWN_PATH);
    let client = reqwest::Client::builder()
        .timeout(RELAY_INFO_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("HTTP client")?;
    let response = client
        .get(url.clone())
        .send()
        .await
        .with_context(|| format!("asking {url} how to log in"))?;
    let status = response.status();
    if status.is_redirection() {
        let to = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|to| to.to_str().ok())
            .map_or_else(|| "nowhere".to_owned(), clean);
        anyhow::bail!(
            "{url} answered {status}, a redirect to {to}, and the login details are only taken \
             from the relay itself: if the relay moved there, log in with `--relay` set to its \
             new address"
        );
    }
    anyhow::ensure!(
        status.is_success(),
        "{url} answered {status}: is this a cloudllm relay?"
    );
    let body = read_limited(reqwest::Body::from(response), MAX_RELAY_INFO_BYTES)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { limit } => anyhow::anyhow!(
                "{url} sent an oversized answer (over {limit} bytes): is this a cloudllm relay?"
            ),
            BodyError::Read(e) => anyhow::Error::new(e).context(format!("reading {url}")),
        })?;
    serde_json::from_slice(&body)
        .with_context(|| format!("{url} is not a cloudllm relay's login document"))
}

/// The part of an OpenID configuration the login flows use (OpenID Connect Discovery 1.0 §3).
#[derive(Deserialize)]
struct Metadata {
    issuer: String,
    authorization_endpoint: Url,
    token_endpoint: Url,
    #[serde(default)]
    device_authorization_endpoint: Option<Url>,
}

/// Fetches `{issuer}/.well-known/openid-configuration` (bounded size/time) and checks the issuer
/// matches, and that every endpoint is `https://` (or `http://` on a loopback address, for
/// tests and self-hosted providers on the same machine).
pub async fn discover(
    issuer: &Url,
    client_id: &str,
    scopes: &[String],
) -> Result<Provider, LoginError> {
    require_secure(issuer, "the issuer")?;
    let base = issuer.as_str().trim_end_matches('/');
    let url = Url::parse(&format!("{base}/.well-known/openid-configuration"))
        .map_err(|e| LoginError::Discovery(format!("{issuer} cannot be an issuer: {e}")))?;
    let http = Http::new()?;
    let request = http::Request::get(url.as_str())
        .header(http::header::ACCEPT, "application/json")
        .body(Vec::new())
        .map_err(|e| LoginError::Discovery(format!("{url}: {e}")))?;
    let response = http.send(request).await.map_err(|e| match e {
        HttpError::Timeout => LoginError::Timeout,
        e => LoginError::Network(e.to_string()),
    })?;
    if response.status() != StatusCode::OK {
        return Err(LoginError::Discovery(format!(
            "{url} answered HTTP {}",
            response.status().as_u16()
        )));
    }
    let metadata: Metadata = serde_json::from_slice(response.body())
        .map_err(|e| LoginError::Discovery(format!("{url} is not an OpenID configuration: {e}")))?;
    if !same_issuer(&metadata.issuer, issuer.as_str()) {
        return Err(LoginError::Discovery(format!(
            "{url} names issuer {}, not {issuer}",
            clean(&metadata.issuer)
        )));
    }
    require_secure(
        &metadata.authorization_endpoint,
        "the authorization endpoint",
    )?;
    require_secure(&metadata.token_endpoint, "the token endpoint")?;
    if let Some(endpoint) = &metadata.device_authorization_endpoint {
        require_secure(endpoint, "the device authorization endpoint")?;
    }
    debug!(%issuer, device = metadata.device_authorization_endpoint.is_some(), "discovered the identity provider");
    Ok(Provider {
        issuer: issuer.clone(),
        authorization_endpoint: metadata.authorization_endpoint,
        token_endpoint: metadata.token_endpoint,
        device_authorization_endpoint: metadata.device_authorization_endpoint,
        client_id: client_id.to_owned(),
        scopes: scopes.to_vec(),
    })
}

/// Issuers compare as strings (OpenID Connect Discovery §4.3), but `Url` adds a `/` to a bare
/// origin and some providers publish one: a trailing `/` is not a difference.
pub(super) fn same_issuer(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Tokens travel to and from these URLs: `https://` only, except on this machine.
fn require_secure(url: &Url, what: &str) -> Result<(), LoginError> {
    let loopback = match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        Some(Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    match url.scheme() {
        "https" if url.host().is_some() => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(LoginError::Discovery(format!(
            "{what} {url} is not an https:// URL (plain http:// is allowed only on a loopback address)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http_is_accepted() {
        let ok = |s: &str| require_secure(&Url::parse(s).unwrap(), "x").is_ok();
        assert!(ok("https://id.example/realms/a"));
        assert!(ok("http://127.0.0.1:8080"));
        assert!(ok("http://127.1.2.3"));
        assert!(ok("http://[::1]:9"));
        assert!(ok("http://localhost:3000"));
        assert!(!ok("http://id.example"));
        assert!(!ok("http://10.0.0.1"));
        assert!(!ok("ftp://127.0.0.1"));
    }

    #[test]
    fn issuers_differ_only_beyond_a_trailing_slash() {
        assert!(same_issuer("https://a.example/", "https://a.example"));
        assert!(same_issuer("https://a.example/r", "https://a.example/r/"));
        assert!(!same_issuer("https://a.example/r", "https://a.example/s"));
        assert!(!same_issuer("https://a.example", "https://b.example"));
    }
}
