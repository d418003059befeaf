//! The verification tests: genuine, forged, expired, unsigned and odd tokens, with the
//! relay's secret and with an identity provider's keys.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};

use super::*;
use crate::config::JwksConfig;

fn keys() -> Keys {
    Keys::new(&Secret::new("a".repeat(32)))
}

fn headers(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    headers
}

fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn issued_tokens_verify_with_their_scope() {
    let keys = keys();
    let token = keys
        .issue(
            "alice",
            Scope::Client,
            Some("premium"),
            Duration::from_secs(60),
        )
        .unwrap();
    let id = keys
        .authenticate(&headers(&token), Scope::Client)
        .await
        .unwrap();
    assert_eq!(id.user, "alice");
    assert_eq!(id.tier.as_deref(), Some("premium"));
    assert_eq!(
        keys.authenticate(&headers(&token), Scope::Agent).await,
        Err(AuthError::WrongScope {
            need: "agent",
            got: "client"
        })
    );
}

#[tokio::test]
async fn multi_scope_tokens_and_tokens_without_a_cloudllm_scope() {
    let keys = keys();
    let secret = &keys.secret.as_ref().unwrap().encoding;
    let sign = |scope: serde_json::Value| {
        let mut claims = serde_json::json!({"sub": "alice", "exp": now() + 600});
        if !scope.is_null() {
            claims["scope"] = scope;
        }
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, secret).unwrap()
    };
    let both = sign("openid agent client".into());
    for need in [Scope::Agent, Scope::Client] {
        assert!(keys.authenticate(&headers(&both), need).await.is_ok());
    }
    let array = sign(serde_json::json!(["agent"]));
    assert!(
        keys.authenticate(&headers(&array), Scope::Agent)
            .await
            .is_ok()
    );
    let client_only = sign("openid client".into());
    let err = keys
        .authenticate(&headers(&client_only), Scope::Agent)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AuthError::WrongScope {
            need: "agent",
            got: "client"
        }
    );
    assert_eq!(err.status(), http::StatusCode::FORBIDDEN);
    assert_eq!(
        err.to_string(),
        "this is a client token; this endpoint needs an agent token"
    );
    for none in [
        sign("openid".into()),
        sign("admin".into()),
        sign(serde_json::Value::Null),
    ] {
        let err = keys
            .authenticate(&headers(&none), Scope::Agent)
            .await
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid);
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn missing_forged_expired_and_unsigned_tokens_are_rejected() {
    let keys = keys();
    assert_eq!(
        keys.authenticate(&HeaderMap::new(), Scope::Client).await,
        Err(AuthError::Missing)
    );
    let other = Keys::new(&Secret::new("b".repeat(32)));
    let forged = other
        .issue("alice", Scope::Client, None, Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        keys.authenticate(&headers(&forged), Scope::Client).await,
        Err(AuthError::Invalid)
    );

    let now = now();
    let expired = Claims {
        sub: "alice".into(),
        scope: Scope::Client.into(),
        exp: now - 2 * LEEWAY_SECS,
        iat: now - 3600,
        iss: ISSUER.into(),
        other: Default::default(),
    };
    let expired = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &expired,
        &keys.secret.as_ref().unwrap().encoding,
    )
    .unwrap();
    assert_eq!(
        keys.authenticate(&headers(&expired), Scope::Client).await,
        Err(AuthError::Expired)
    );

    let claims = format!(r#"{{"sub":"alice","scope":"client","exp":{}}}"#, now + 600);
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.as_bytes())
    );
    assert_eq!(
        keys.authenticate(&headers(&unsigned), Scope::Client).await,
        Err(AuthError::Invalid)
    );

    for garbage in ["x", "a.b.c", "Bearer", &"A".repeat(MAX_TOKEN_BYTES + 1)] {
        assert_eq!(
            keys.authenticate(&headers(garbage), Scope::Client).await,
            Err(AuthError::Invalid)
        );
    }
}

/// Signs `claims` with the test secret under `header`.
fn sign_hs256(header: serde_json::Value, claims: serde_json::Value) -> String {
    let message = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let key = EncodingKey::from_secret("a".repeat(32).as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{message}.{signature}")
}

#[tokio::test]
async fn nbf_is_checked_on_hs256_tokens_with_the_same_leeway_as_exp() {
    let keys = keys();
    let header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
    let claims = |nbf: u64| serde_json::json!({"sub": "alice", "scope": "client", "exp": now() + 3600, "nbf": nbf});
    let later = sign_hs256(header.clone(), claims(now() + 600));
    let err = keys.verify(&later).await.unwrap_err();
    assert_eq!(err, AuthError::NotYetValid);
    assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
    assert!(err.to_string().contains("nbf"), "{err}");
    // Within the leeway, a clock a little ahead is forgiven; so is any past nbf.
    let skewed = sign_hs256(header.clone(), claims(now() + LEEWAY_SECS / 2));
    assert!(keys.verify(&skewed).await.is_ok());
    let past = sign_hs256(header.clone(), claims(now() - 60));
    assert!(keys.verify(&past).await.is_ok());
    // A nbf that is not a number is no valid token either.
    let garbled = sign_hs256(
        header,
        serde_json::json!({"sub": "alice", "scope": "client", "exp": now() + 3600, "nbf": "soon"}),
    );
    assert_eq!(keys.verify(&garbled).await.unwrap_err(), AuthError::Invalid);
}

#[tokio::test]
async fn tokens_with_critical_header_extensions_are_refused() {
    let keys = keys();
    let claims = serde_json::json!({"sub": "alice", "scope": "client", "exp": now() + 3600});
    let plain = sign_hs256(serde_json::json!({"alg": "HS256"}), claims.clone());
    assert!(keys.verify(&plain).await.is_ok());
    for crit in [
        serde_json::json!({"alg": "HS256", "crit": ["exp-policy"], "exp-policy": 1}),
        serde_json::json!({"alg": "HS256", "crit": ["b64"], "b64": false}),
        serde_json::json!({"alg": "HS256", "crit": []}),
    ] {
        let token = sign_hs256(crit.clone(), claims.clone());
        let err = keys.verify(&token).await.unwrap_err();
        assert_eq!(err, AuthError::CriticalExtension, "{crit}");
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
    }
    // Not even a list: not a token.
    let token = sign_hs256(serde_json::json!({"alg": "HS256", "crit": "b64"}), claims);
    assert_eq!(keys.verify(&token).await.unwrap_err(), AuthError::Invalid);
}

#[tokio::test]
async fn subjects_that_would_break_a_log_line_are_refused() {
    let keys = keys();
    let header = serde_json::json!({"alg": "HS256"});
    let with_sub = |sub: &str| {
        sign_hs256(
            header.clone(),
            serde_json::json!({"sub": sub, "scope": "client", "exp": now() + 3600}),
        )
    };
    let longest = "u".repeat(MAX_SUBJECT_BYTES);
    for good in [
        "alice",
        "auth0|5f7c8ec7c33c6c004bbafe82",
        "ünïcödé user",
        &longest,
    ] {
        assert_eq!(keys.verify(&with_sub(good)).await.unwrap().sub, good);
    }
    let too_long = "u".repeat(MAX_SUBJECT_BYTES + 1);
    for bad in [
        "alice\nINFO forged line",
        "alice\r",
        "tab\there",
        "nul\0",
        "esc\u{1b}[31m",
        "del\u{7f}",
        "c1\u{85}",
        "line\u{2028}sep",
        "bidi\u{202e}txt.exe",
        "",
        &too_long,
    ] {
        let err = keys.verify(&with_sub(bad)).await.unwrap_err();
        assert_eq!(err, AuthError::BadSubject, "{bad:?}");
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
        assert!(err.to_string().contains("`sub`"), "{err}");
    }
    // Nor can the relay mint one.
    let err = keys
        .issue("alice\nbob", Scope::Client, None, Duration::from_secs(60))
        .unwrap_err();
    assert!(err.to_string().contains("control characters"), "{err}");
}

#[tokio::test]
async fn cached_only_verification_never_calls_the_identity_provider() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A "provider" that counts the connections made to it and answers none.
    let provider = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", provider.local_addr().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = provider.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    let jwks = Jwks::new(&JwksConfig {
        url: url.parse().unwrap(),
        issuer: "https://idp.example.com".into(),
        audience: "cloudllm".into(),
        algorithms: vec![Algorithm::RS256],
        refresh: Duration::from_secs(600),
        refetch_min: Duration::from_millis(1),
    })
    .unwrap();
    let keys = Keys::verifying(None, Some(jwks));
    let claims = format!(r#"{{"sub":"alice","scope":"agent","exp":{}}}"#, now() + 600);
    let token = format!(
        "{}.{}.c2ln",
        b64(br#"{"alg":"RS256","kid":"made-up"}"#),
        b64(claims.as_bytes())
    );
    assert_eq!(
        keys.verify_with(&token, KeyFetch::CachedOnly)
            .await
            .unwrap_err(),
        AuthError::Invalid
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0, "no fetch for cached-only");
    assert_eq!(
        keys.verify_with(&token, KeyFetch::Allowed)
            .await
            .unwrap_err(),
        AuthError::Invalid
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "an unknown kid fetches once"
    );
}

#[tokio::test]
async fn algorithms_the_config_does_not_pin_are_refused() {
    // A key set at an address where nothing listens: whatever the token says, no key.
    let config = JwksConfig {
        url: "http://127.0.0.1:9/jwks".parse().unwrap(),
        issuer: "https://idp.example.com".into(),
        audience: "cloudllm".into(),
        algorithms: vec![Algorithm::RS256],
        refresh: Duration::from_secs(600),
        refetch_min: Duration::from_secs(600),
    };
    let jwks = Jwks::new(&config).unwrap();
    let hs = keys();
    let self_issued = hs
        .issue("alice", Scope::Agent, None, Duration::from_secs(60))
        .unwrap();

    // Without a secret, HS256 is not an option at all, even with a known-looking kid.
    let jwks_only = Keys::verifying(None, Some(jwks.clone()));
    assert_eq!(
        jwks_only.verify(&self_issued).await.unwrap_err(),
        AuthError::Invalid
    );
    assert!(
        jwks_only
            .issue("alice", Scope::Agent, None, Duration::from_secs(60))
            .is_err()
    );

    // With both, self-issued tokens keep working.
    let both = Keys::verifying(Some(&Secret::new("a".repeat(32))), Some(jwks));
    assert_eq!(both.verify(&self_issued).await.unwrap().sub, "alice");

    let claims = format!(
        r#"{{"sub":"alice","scope":"agent","exp":{},"iss":"https://idp.example.com","aud":"cloudllm"}}"#,
        now() + 600
    );
    for header in [
        r#"{"alg":"none","kid":"k"}"#,
        r#"{"alg":"ES256","kid":"k"}"#,
        r#"{"alg":"HS512","kid":"k"}"#,
        r#"{"alg":"RS256"}"#,
        r#"{"alg":"RS256","kid":"k"}"#,
    ] {
        let token = format!("{}.{}.c2ln", b64(header.as_bytes()), b64(claims.as_bytes()));
        assert_eq!(
            both.verify(&token).await.unwrap_err(),
            AuthError::Invalid,
            "{header}"
        );
    }
}

#[test]
fn only_bearer_scheme_counts() {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        "Basic YWxpY2U6cHc=".parse().unwrap(),
    );
    assert_eq!(bearer_token(&h), None);
    h.insert(http::header::AUTHORIZATION, "bearer  tok ".parse().unwrap());
    assert_eq!(bearer_token(&h), Some("tok"));
}

#[tokio::test]
async fn the_tier_comes_from_the_configured_claim_path_and_scopes_may_be_implicit() {
    let secret = Secret::new("a".repeat(32));
    let now = now();
    let encoding = EncodingKey::from_secret(secret.expose().as_bytes());
    // A provider's token: no cloudllm scope, the tier nested in app_metadata.
    let provider_token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({
            "sub": "alice", "exp": now + 60, "role": "authenticated",
            "app_metadata": {"tier": "premium"}, "user_metadata": {"tier": "hacked"}
        }),
        &encoding,
    )
    .unwrap();
    // Without implicit scopes such a token is some other application's.
    assert_eq!(
        Keys::new(&secret)
            .authenticate(&headers(&provider_token), Scope::Client)
            .await,
        Err(AuthError::Invalid)
    );
    let keys = Keys::new(&secret).with_rules(ClaimRules {
        tier_path: "app_metadata.tier".into(),
        implicit_scopes: Scopes::ALL,
    });
    for need in [Scope::Agent, Scope::Client] {
        let id = keys
            .authenticate(&headers(&provider_token), need)
            .await
            .unwrap();
        assert_eq!(id.tier.as_deref(), Some("premium"));
    }
    // A token that names its scopes keeps them: implicit scopes only fill a gap.
    let client_only = keys
        .issue("bob", Scope::Client, None, Duration::from_secs(60))
        .unwrap();
    assert!(matches!(
        keys.authenticate(&headers(&client_only), Scope::Agent)
            .await,
        Err(AuthError::WrongScope { .. })
    ));
    // A path that leads nowhere, or to a non-string, means no tier.
    let claims = keys.verify(&provider_token).await.unwrap();
    assert_eq!(claims.string_at("app_metadata"), None);
    assert_eq!(claims.string_at("app_metadata.tier.x"), None);
    assert_eq!(claims.string_at("nothing.here"), None);
}

#[tokio::test]
async fn a_cached_token_with_a_forged_signature_beside_it_is_refused() {
    let keys = keys();
    let claims = serde_json::json!({"sub": "alice", "scope": "client", "exp": now() + 600});
    let token = sign_hs256(serde_json::json!({"alg": "HS256", "typ": "JWT"}), claims);
    assert_eq!(keys.verify(&token).await.unwrap().sub, "alice");
    assert_eq!(keys.verified.len(), 1, "the genuine token is cached");
    // The same header and claims, another signature: a different token, verified in full.
    let (message, _) = token.rsplit_once('.').unwrap();
    let forged = format!("{message}.{}", b64(&[0u8; 32]));
    assert_eq!(keys.verify(&forged).await.unwrap_err(), AuthError::Invalid);
    assert_eq!(keys.verified.len(), 1, "a refused token is not cached");
    // And the genuine one still verifies, from the cache.
    assert_eq!(keys.verify(&token).await.unwrap().sub, "alice");
}
