//! What `cloudllm login --with-token` checks before it says "Logged in", so that a mistake is
//! named at once, with what to do, instead of being stored and retried for ever as "HTTP 403"
//! or "connection refused".
//!
//! Checked, in this order, before anything is stored:
//! - the token is a JWT whose claims can be read (the relay takes nothing else);
//! - its scope: a *client* token (for API clients, the one `scripts/dev` prints) is the likely
//!   first mistake and is named as such; a token that names no cloudllm scope is let through,
//!   since a relay may grant scopes to every token of its identity provider;
//! - it names a user and an expiry, and has not expired (with the relay's leeway);
//! - the URL is a cloudllm relay's: its `/.well-known/cloudllm` answers (under the URL's path,
//!   where the tunnel is dialled too) and speaks this daemon's tunnel protocol. Ollama's
//!   address, the relay's `/v1` or `/api` URL instead of its base URL, and a relay that is not
//!   running each get an error that says so.
//!
//! Taken on trust: the signature. Only the relay holds the key (its own secret, or its identity
//! provider's key set), so a token signed for another relay passes here; the relay refuses it
//! at the first dial, and `cloudllm status` then says "login required" and why.

use cloudllm_proto::{PROTOCOL_VERSION, RelayInfo, Secret};
use url::Url;

use super::claims::{ShownClaims, unverified_claims};
use crate::login;

/// How long past its `exp` the relay still accepts a token (the relay's `auth::LEEWAY_SECS`):
/// a token refused here would be refused there too.
const RELAY_LEEWAY_SECS: u64 = 30;

/// What to run for an agent token, in the user's terms.
const ISSUE_AGENT_TOKEN: &str = "`cloudllm-relay token issue --scope agent --user USER` on the relay's machine, or \
     ask the relay's operator";

/// Checks `token` as far as the daemon can without the relay's key (see the module docs), at
/// `now` (Unix seconds). Returns its claims; the error says what is wrong and what to do.
pub(super) fn check_token(token: &Secret, now: u64) -> Result<ShownClaims, String> {
    let text = token.expose();
    if text.is_empty() || text.contains(char::is_whitespace) {
        return Err("that is not a token: it is empty or has spaces in it".into());
    }
    let claims = unverified_claims(text).ok_or_else(|| {
        format!(
            "that is not a cloudllm token: an agent token is a JWT, three parts joined by dots \
             (it starts with `eyJ`); copy the whole token. To make one: {ISSUE_AGENT_TOKEN}"
        )
    })?;
    if claims.has_scope("client") && !claims.has_scope("agent") {
        return Err(format!(
            "this is a client token, for sending requests through the relay (as API clients do); \
             `cloudllm login` needs an agent token, which lets this machine open the tunnel: \
             {ISSUE_AGENT_TOKEN}"
        ));
    }
    if claims.sub.as_deref().is_none_or(str::is_empty) {
        return Err(format!(
            "this token names no user (no `sub` claim), so no relay accepts it: {ISSUE_AGENT_TOKEN}"
        ));
    }
    let Some(exp) = claims.exp else {
        return Err(format!(
            "this token has no expiry (no `exp` claim), so no relay accepts it: {ISSUE_AGENT_TOKEN}"
        ));
    };
    if exp.saturating_add(RELAY_LEEWAY_SECS) < now {
        let ago = std::time::Duration::from_secs(now - exp);
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp);
        return Err(format!(
            "this token expired {} ago (at {}); get a new agent token: {ISSUE_AGENT_TOKEN}",
            humantime::format_duration(ago),
            humantime::format_rfc3339_seconds(at)
        ));
    }
    Ok(claims)
}

/// Checks that `relay` is a running cloudllm relay this daemon can use; `ollama` is the
/// daemon's own Ollama URL, named when the user gave that instead.
pub(super) async fn check_relay(relay: &Url, ollama: &Url) -> Result<RelayInfo, String> {
    let info = match login::fetch_relay_info(&fetchable(relay)).await {
        Ok(info) => info,
        Err(err) => return Err(not_a_relay(relay, ollama, &err)),
    };
    if info.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "the relay at {relay} speaks tunnel protocol {}, this cloudllmd {PROTOCOL_VERSION}: \
             update whichever is older",
            info.protocol_version
        ));
    }
    Ok(info)
}

/// `relay` with a scheme that HTTP can fetch: `ws://` and `wss://` name the same relay as
/// `http://` and `https://`.
pub(super) fn fetchable(relay: &Url) -> Url {
    let mut url = relay.clone();
    let scheme = match relay.scheme() {
        "ws" => "http",
        "wss" => "https",
        _ => return url,
    };
    // Special schemes with the same default ports: this cannot fail.
    let _ = url.set_scheme(scheme);
    url
}

/// Why the relay's description could not be fetched, with what to do.
fn not_a_relay(relay: &Url, ollama: &Url, err: &anyhow::Error) -> String {
    let io_kind = err
        .chain()
        .find_map(|cause| cause.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    let transport = err
        .chain()
        .find_map(|cause| cause.downcast_ref::<reqwest::Error>());
    let address = relay.authority();
    if io_kind == Some(std::io::ErrorKind::ConnectionRefused) {
        return format!(
            "no cloudllm relay is running at {relay}: nothing listens on {address} (connection \
             refused). Start the relay (`cloudllm-relay serve`, or `scripts/dev` for one on this \
             machine), or check the address and port"
        );
    }
    if transport.is_some_and(|e| e.is_connect() || e.is_timeout()) {
        return format!(
            "cannot reach {relay}: {err:#}. Check the address and the network connection"
        );
    }
    let same_place = |a: &Url, b: &Url| {
        a.host_str() == b.host_str() && a.port_or_known_default() == b.port_or_known_default()
    };
    if same_place(relay, ollama) {
        return format!(
            "{relay} is Ollama's address (this daemon's `ollama_url`), not a cloudllm relay's: the \
             daemon reaches Ollama there by itself. `--relay` takes the relay's URL, e.g. the one \
             `cloudllm-relay serve` or `scripts/dev` printed"
        );
    }
    if let Some(base) = api_base(relay) {
        return format!(
            "{relay} is one of the relay's APIs, for API clients, not its base URL: run \
             `cloudllm login --relay {base} --with-token`"
        );
    }
    let hint = if relay.port() == Some(OLLAMA_PORT) {
        format!(
            "port {OLLAMA_PORT} is Ollama's; `--relay` takes the relay's URL, e.g. the one \
             `cloudllm-relay serve` or `scripts/dev` printed"
        )
    } else {
        "`--relay` takes the relay's base URL, e.g. https://relay.example.com".to_owned()
    };
    format!("{relay} is not a cloudllm relay ({err:#}); {hint}")
}

/// Ollama's default port, which users may type out of habit.
const OLLAMA_PORT: u16 = 11434;

/// For a URL of one of the relay's APIs (`…/v1`, `…/api`, as API clients are given), the base
/// URL the daemon needs.
fn api_base(relay: &Url) -> Option<Url> {
    let path = relay.path().trim_end_matches('/');
    let (parent, last) = path.rsplit_once('/')?;
    if !matches!(last, "v1" | "api") {
        return None;
    }
    let mut base = relay.clone();
    base.set_path(&format!("{parent}/"));
    base.set_query(None);
    base.set_fragment(None);
    Some(base)
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn jwt(claims: &str) -> Secret {
        let b64 = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        Secret::new(format!(
            "{}.{}.signature",
            b64(r#"{"alg":"HS256","typ":"JWT"}"#),
            b64(claims)
        ))
    }

    #[test]
    fn agent_tokens_pass_and_their_claims_come_back() {
        let claims = check_token(
            &jwt(r#"{"sub":"alice","scope":"agent","exp":1800000600,"tier":"premium"}"#),
            NOW,
        )
        .unwrap();
        assert_eq!(claims.sub.as_deref(), Some("alice"));
        // Both scopes, or none named (a relay may grant them to all of its provider's tokens).
        for claims in [
            r#"{"sub":"a","scope":"openid agent client","exp":1800000600}"#,
            r#"{"sub":"a","exp":1800000600}"#,
        ] {
            assert!(check_token(&jwt(claims), NOW).is_ok(), "{claims}");
        }
        // Within the relay's leeway.
        let late = jwt(r#"{"sub":"a","scope":"agent","exp":1799999980}"#);
        assert!(check_token(&late, NOW).is_ok());
    }

    #[test]
    fn what_no_relay_accepts_is_refused_saying_why() {
        let refused = |token: Secret| check_token(&token, NOW).unwrap_err();
        let client = refused(jwt(r#"{"sub":"a","scope":"client","exp":1800000600}"#));
        assert!(
            client.contains("client token") && client.contains("--scope agent"),
            "{client}"
        );
        let expired = refused(jwt(r#"{"sub":"a","scope":"agent","exp":1799996400}"#));
        assert!(
            expired.contains("expired 1h ago") && expired.contains("2027-01-15T07:00:00Z"),
            "{expired}"
        );
        assert!(refused(jwt(r#"{"scope":"agent","exp":1800000600}"#)).contains("no user"));
        assert!(refused(jwt(r#"{"sub":"a","scope":"agent"}"#)).contains("no expiry"));
        for garbage in ["", "two words", "opaque-api-key", "a.b", "h.!!!.s"] {
            let error = refused(Secret::new(garbage));
            assert!(error.contains("not a"), "{garbage:?}: {error}");
        }
    }

    #[test]
    fn api_urls_are_told_apart_from_base_urls() {
        let base = |url: &str| api_base(&Url::parse(url).unwrap()).map(|u| u.to_string());
        assert_eq!(
            base("http://127.0.0.1:8080/v1").as_deref(),
            Some("http://127.0.0.1:8080/")
        );
        assert_eq!(
            base("https://example.com/cloudllm/api/").as_deref(),
            Some("https://example.com/cloudllm/")
        );
        assert_eq!(base("https://relay.example.com/"), None);
        assert_eq!(base("https://example.com/cloudllm"), None);
        assert_eq!(
            fetchable(&Url::parse("wss://relay.example.com/x").unwrap()).as_str(),
            "https://relay.example.com/x"
        );
    }
}
