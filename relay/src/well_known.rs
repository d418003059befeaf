//! `GET /.well-known/cloudllm`: what a client needs to know before it has a token — the
//! protocol version and how to get an agent token (from the operator, or by logging in to an
//! OpenID Connect provider). Public by design: it is the first thing `cloudllm login --relay`
//! asks, and it names nothing secret.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use cloudllm_proto::{PROTOCOL_VERSION, RelayAuth, RelayInfo};
use http::{HeaderValue, StatusCode, header};

use crate::AppState;
use crate::config::RelayConfig;

/// Clients may cache the answer for 5 min: it changes only when the operator edits the config
/// and restarts, and a login a few minutes later sees the change.
const CACHE_CONTROL: &str = "public, max-age=300";

/// The relay's [`RelayInfo`] for `config`.
pub fn relay_info(config: &RelayConfig) -> RelayInfo {
    let auth = match &config.login {
        Some(login) => RelayAuth::Oidc {
            issuer: login.issuer.clone(),
            client_id: login.client_id.clone(),
            scopes: login.scopes.clone(),
        },
        None => RelayAuth::Token,
    };
    RelayInfo {
        protocol_version: PROTOCOL_VERSION,
        auth,
        web_url: config.web_url.as_ref().map(|url| url.to_string()),
    }
}

/// The handler.
pub async fn get(State(state): State<Arc<AppState>>) -> Response {
    match serde_json::to_string(&relay_info(&state.config)) {
        Ok(body) => (
            StatusCode::OK,
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static(CACHE_CONTROL),
                ),
            ],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LoginConfig;

    #[test]
    fn token_by_default_oidc_with_login() {
        let mut config = RelayConfig::default();
        assert_eq!(relay_info(&config).auth, RelayAuth::Token);
        config.login = Some(LoginConfig {
            issuer: "https://idp.example.com".into(),
            client_id: "cloudllmd".into(),
            scopes: vec!["openid".into(), "agent".into()],
        });
        let info = relay_info(&config);
        assert_eq!(info.protocol_version, PROTOCOL_VERSION);
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["auth"]["mode"], "oidc");
        assert_eq!(json["auth"]["issuer"], "https://idp.example.com");
        assert_eq!(json["auth"]["client_id"], "cloudllmd");
        assert_eq!(
            json["auth"]["scopes"],
            serde_json::json!(["openid", "agent"])
        );
        assert!(json.get("web_url").is_none(), "{json}");
    }

    #[test]
    fn the_web_page_is_published_when_set() {
        let config = RelayConfig {
            web_url: Some("https://relay.example.com/account".parse().unwrap()),
            ..RelayConfig::default()
        };
        assert_eq!(
            relay_info(&config).web_url.as_deref(),
            Some("https://relay.example.com/account")
        );
    }
}
