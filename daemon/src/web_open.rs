//! `cloudllm open`: a link that opens the relay's web page already signed in as the logged-in
//! user, with nothing to copy.
//!
//! The daemon holds the agent token, so it asks the relay (`POST` [`OPEN_WEB_PATH`] with that
//! token) for a one-time code and builds `RELAY/#open=CODE`. The code sits in the fragment,
//! which browsers never send to a server; the page trades it once, within a minute, for a
//! client token that lasts hours and cannot open a tunnel. No long-lived secret travels in the
//! link. The link signs someone in, so it is a [`Secret`] here and is never logged.
//!
//! The request goes the way the tunnel goes: the relay's TLS settings (system roots plus
//! `ca_file`), no proxy, and no redirect followed (a redirect would carry the agent token
//! elsewhere). The answer is read with the shared bounded reader; what the relay says in an
//! error is shortened and stripped of control characters before the user sees it.

use std::time::Duration;

use cloudllm_proto::{OPEN_WEB_PATH, OpenWebCode, Secret};
use cloudllm_tunnel::body::{BodyError, read_limited};
use http::StatusCode;
use url::Url;

use tracing::info;

use crate::config::DaemonConfig;
use crate::dial::{relay_endpoint, tls_config};
use crate::login::{chain, client_builder, printable};
use crate::supervisor::{ControlError, Supervisor};

/// Time for the whole request, answer included: the relay answers from memory, so 15 s means
/// it is unreachable or overloaded, and the user waiting at a prompt hears so soon.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest answer read: a code, its lifetime and a path are about 200 bytes; an error a
/// sentence.
const MAX_ANSWER_BYTES: usize = 4 * 1024;

/// Longest relay message repeated to the user, in characters.
const MAX_RELAY_TEXT: usize = 300;

/// The shortest and longest code accepted, in hex digits: the relay's are 64 (256 bits), and
/// the page takes 16 to 128. Anything else is not a code the page could use.
const CODE_DIGITS: std::ops::RangeInclusive<usize> = 16..=128;

/// Why no link could be made, in the user's terms.
#[derive(Debug, thiserror::Error)]
pub enum OpenWebError {
    /// No credentials, or no relay configured.
    #[error("not logged in: run `cloudllm login --relay URL` first")]
    NotLoggedIn,
    /// The relay could not be reached.
    #[error(
        "cannot reach the relay at {relay} ({reason}): check the network, or `cloudllm status`"
    )]
    Offline {
        /// The relay's base URL.
        relay: Url,
        /// What failed.
        reason: String,
    },
    /// The relay refused the agent token.
    #[error("the relay refused this computer's login ({0}): run `cloudllm login` again")]
    Refused(String),
    /// The relay has no signing secret of its own (only `[jwks]`), so it cannot sign a browser
    /// in from a code.
    #[error(
        "this relay signs you in only through its identity provider: open {0} in your browser and sign in there"
    )]
    ProviderOnly(Url),
    /// The relay does not know `cloudllm open` (an older relay).
    #[error(
        "this relay cannot sign a browser in for you (it is older than `cloudllm open`): open {0} in your browser and sign in there"
    )]
    Unsupported(Url),
    /// Too many links at once.
    #[error("{0}")]
    Busy(String),
    /// Anything else the relay answered.
    #[error("the relay at {relay} answered {status}: {message}")]
    Unexpected {
        /// The relay's base URL.
        relay: Url,
        /// What it answered.
        status: StatusCode,
        /// Its explanation, cleaned.
        message: String,
    },
}

/// [`sign_in_link`] for the supervisor's relay and login: the answer to `Request::OpenWeb`.
pub(crate) async fn open_for(supervisor: &Supervisor) -> Result<Secret, ControlError> {
    let token = supervisor.agent_token();
    let link = sign_in_link(&supervisor.config(), token.as_ref()).await;
    // Never the link itself: it signs someone in.
    match &link {
        Ok(_) => info!("made a one-time link to the web page"),
        Err(err) => info!(error = %err, "no link to the web page"),
    }
    link.map_err(|err| match err {
        OpenWebError::NotLoggedIn => ControlError::NotLoggedIn,
        other => ControlError::Internal(other.into()),
    })
}

/// A link that signs a browser in on the web page of `config`'s relay as the user of `token`,
/// once, within the code's lifetime.
pub async fn sign_in_link(
    config: &DaemonConfig,
    token: Option<&Secret>,
) -> Result<Secret, OpenWebError> {
    let (Some(relay), Some(token)) = (config.relay_url.as_ref(), token) else {
        return Err(OpenWebError::NotLoggedIn);
    };
    let offline = |reason: String| OpenWebError::Offline {
        relay: relay.clone(),
        reason,
    };
    let tls = tls_config(config).map_err(|err| offline(format!("{err:#}")))?;
    let client = client_builder(OPEN_TIMEOUT)
        .use_preconfigured_tls((*tls).clone())
        .no_proxy()
        .build()
        .map_err(|err| offline(chain(&err)))?;
    let exchange = async {
        let response = client
            .post(relay_endpoint(relay, OPEN_WEB_PATH))
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(|err| offline(chain(&err)))?;
        let status = response.status();
        let body = read_limited(reqwest::Body::from(response), MAX_ANSWER_BYTES)
            .await
            .map_err(|err| match err {
                BodyError::TooLarge { limit } => OpenWebError::Unexpected {
                    relay: relay.clone(),
                    status,
                    message: format!("an answer over {limit} bytes: is this a cloudllm relay?"),
                },
                BodyError::Read(err) => offline(chain(&err)),
            })?;
        answer(relay, status, &body)
    };
    tokio::time::timeout(OPEN_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(offline(format!("no answer within {OPEN_TIMEOUT:?}"))))
}

/// The link from the relay's answer `body` with `status`, or what to tell the user.
fn answer(relay: &Url, status: StatusCode, body: &[u8]) -> Result<Secret, OpenWebError> {
    let message = || relay_message(body);
    match status {
        StatusCode::OK => {
            let minted: OpenWebCode =
                serde_json::from_slice(body).map_err(|_| OpenWebError::Unexpected {
                    relay: relay.clone(),
                    status,
                    message: "an answer that is not a sign-in code: is this a cloudllm relay?"
                        .into(),
                })?;
            link(relay, minted.code.expose()).ok_or_else(|| OpenWebError::Unexpected {
                relay: relay.clone(),
                status,
                message: "a sign-in code the page cannot take".into(),
            })
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(OpenWebError::Refused(message())),
        StatusCode::NOT_IMPLEMENTED => Err(OpenWebError::ProviderOnly(page(relay))),
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
            Err(OpenWebError::Unsupported(page(relay)))
        }
        StatusCode::TOO_MANY_REQUESTS => Err(OpenWebError::Busy(message())),
        _ if status.is_redirection() => Err(OpenWebError::Unexpected {
            relay: relay.clone(),
            status,
            message: "a redirect, which is not followed with your login: if the relay moved, \
                      log in again with `--relay` set to its new address"
                .into(),
        }),
        _ => Err(OpenWebError::Unexpected {
            relay: relay.clone(),
            status,
            message: message(),
        }),
    }
}

/// The web page of the relay at `relay`: its base URL, as a directory.
fn page(relay: &Url) -> Url {
    relay_endpoint(relay, "/")
}

/// `RELAY/#open=CODE`, built here from the relay's base URL rather than taken from the
/// answer's `path`, so that a relay behind a prefix (`https://example.com/cloudllm/`) gets its
/// page under that prefix and an answer can only ever point the browser at the relay the
/// daemon is logged in to. `None` when `code` is not one the page takes (hex, 16 to 128).
fn link(relay: &Url, code: &str) -> Option<Secret> {
    let valid = CODE_DIGITS.contains(&code.len())
        && code.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !valid {
        return None;
    }
    let mut url = page(relay);
    url.set_fragment(Some(&format!("open={code}")));
    Some(Secret::new(url.to_string()))
}

/// The relay's `{"error": "..."}` text (or the body's start), shortened, without control
/// characters: it is repeated to the user.
fn relay_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Error {
        error: String,
    }
    let text = match serde_json::from_slice::<Error>(body) {
        Ok(error) => error.error,
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    };
    let mut out = printable(&text, MAX_RELAY_TEXT);
    if out.is_empty() {
        out.push_str("no reason given");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(url: &str) -> Url {
        Url::parse(url).unwrap()
    }

    const CODE: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn the_link_is_the_relays_page_with_the_code_in_its_fragment() {
        let link = link(&relay("https://relay.example.com"), CODE).unwrap();
        assert_eq!(
            link.expose(),
            format!("https://relay.example.com/#open={CODE}")
        );
        // Behind a prefix, the page is under it.
        let link = super::link(&relay("https://example.com/cloudllm"), CODE).unwrap();
        assert_eq!(
            link.expose(),
            format!("https://example.com/cloudllm/#open={CODE}")
        );
        assert!(!format!("{link:?}").contains(CODE));
    }

    #[test]
    fn the_code_is_asked_for_under_the_relays_base_path() {
        assert_eq!(
            relay_endpoint(&relay("https://example.com/cloudllm/?x#y"), OPEN_WEB_PATH).as_str(),
            "https://example.com/cloudllm/cloudllm/open"
        );
        assert_eq!(
            relay_endpoint(&relay("http://127.0.0.1:8080"), OPEN_WEB_PATH).as_str(),
            "http://127.0.0.1:8080/cloudllm/open"
        );
    }

    #[test]
    fn codes_the_page_cannot_take_make_no_link() {
        let base = relay("https://relay.example.com/");
        assert!(link(&base, "").is_none());
        assert!(link(&base, "abc").is_none());
        assert!(link(&base, &"A".repeat(64)).is_none());
        assert!(link(&base, &format!("{}&x=1", &CODE[..60])).is_none());
        assert!(link(&base, &"a".repeat(129)).is_none());
    }

    #[test]
    fn the_relays_answers_become_the_users_words() {
        let base = relay("https://relay.example.com/");
        let minted = format!(r#"{{"code":"{CODE}","expires_in":60,"path":"/#open={CODE}"}}"#);
        assert!(answer(&base, StatusCode::OK, minted.as_bytes()).is_ok());
        let refused = answer(
            &base,
            StatusCode::UNAUTHORIZED,
            br#"{"error":"token expired"}"#,
        )
        .unwrap_err();
        assert!(matches!(refused, OpenWebError::Refused(ref m) if m == "token expired"));
        let only_idp = answer(&base, StatusCode::NOT_IMPLEMENTED, b"{}").unwrap_err();
        assert_eq!(
            only_idp.to_string(),
            "this relay signs you in only through its identity provider: open \
             https://relay.example.com/ in your browser and sign in there"
        );
        let garbage = answer(&base, StatusCode::OK, b"<html>").unwrap_err();
        assert!(
            garbage.to_string().contains("not a sign-in code"),
            "{garbage}"
        );
        let hostile = answer(
            &base,
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{{\"error\":\"bad\\u001b[31m{}\"}}", "x".repeat(1000)).as_bytes(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            !hostile.contains('\u{1b}') && hostile.len() < 500,
            "{hostile}"
        );
        let moved = answer(&base, StatusCode::FOUND, b"").unwrap_err();
        assert!(moved.to_string().contains("not followed"), "{moved}");
    }
}
