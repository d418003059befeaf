//! Tokens from an identity provider: the relay verifies them against the provider's published
//! keys (JWKS), follows key rotation, refuses forgeries, tells clients how to log in, and closes
//! tunnels whose token has expired.
//!
//! The key sets are served by a small HTTP server in the test, built from keys generated here
//! (RSA, P-256, Ed25519), so rotation and outages are under the test's control; one test uses
//! the real OpenID provider from `tests/oidc` (see `cloudllm_e2e::oidc`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cloudllm_e2e::oidc::{AUDIENCE, Browser, OidcProvider, User, device_login};
use cloudllm_e2e::{
    FakeOllama, STEP, TestDaemon, TestRelay, client, daemon_config, init_logs, keys, relay_config,
    token,
};
use cloudllm_proto::{RelayAuth, RelayInfo, Secret};
use cloudllm_relay::{JwksConfig, LoginConfig, RelayConfig, Scope};
use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

/// The issuer the test key sets stand for. The relay's config names it with a trailing `/`,
/// the tokens without: the two must still match.
const ISSUER: &str = "https://idp.cloudllm.test";

/// A short refetch interval, so rotation tests do not wait 30 s.
const REFETCH_MIN: Duration = Duration::from_millis(100);

/// Waited between changing a key set and presenting a token that needs the change: past
/// [`REFETCH_MIN`], so the relay is allowed to fetch again.
const PAST_REFETCH_MIN: Duration = Duration::from_millis(250);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A signing key and its public half as a JWK.
struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl TestKey {
    /// A P-256 key for ES256.
    fn ec(kid: &str) -> TestKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let point = pair.public_key_raw();
        // An uncompressed SEC1 point: 0x04, then x and y, 32 bytes each.
        assert_eq!((point.len(), point[0]), (65, 4));
        TestKey {
            kid: kid.to_owned(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..]),
            }),
        }
    }

    /// An Ed25519 key for EdDSA.
    fn ed(kid: &str) -> TestKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
        TestKey {
            kid: kid.to_owned(),
            alg: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_der(&pair.serialize_der()),
            jwk: json!({
                "kty": "OKP", "crv": "Ed25519", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(pair.public_key_raw()),
            }),
        }
    }

    /// Signs `claims` with this key, naming it in the header.
    fn sign(&self, claims: &Value) -> String {
        self.sign_as(self.alg, claims)
    }

    /// Signs `claims` with this key but claims algorithm `alg` in the header.
    fn sign_as(&self, alg: Algorithm, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("signing")
    }
}

/// An RSA key for RS256, with its public key in the forms an attacker might feed to HMAC.
struct RsaKey {
    key: TestKey,
    /// The public key as SPKI PEM, PKCS#1 PEM and PKCS#1 DER, and the bare modulus.
    public_forms: Vec<Vec<u8>>,
}

static RSA: OnceCell<Arc<RsaKey>> = OnceCell::const_new();

/// One RSA key per test binary: generating one takes seconds in a debug build.
async fn rsa_key() -> Arc<RsaKey> {
    RSA.get_or_init(|| async {
        tokio::task::spawn_blocking(|| {
            use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
            use rsa::pkcs8::{EncodePublicKey, LineEnding};
            use rsa::traits::PublicKeyParts;
            let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .expect("RSA key generation");
            let public = private.to_public_key();
            let kid = "rsa-a";
            let n = public.n().to_bytes_be();
            let key = TestKey {
                kid: kid.to_owned(),
                alg: Algorithm::RS256,
                encoding: EncodingKey::from_rsa_der(
                    private.to_pkcs1_der().expect("PKCS#1 DER").as_bytes(),
                ),
                jwk: json!({
                    "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                    "n": URL_SAFE_NO_PAD.encode(&n),
                    "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
                }),
            };
            let public_forms = vec![
                public
                    .to_public_key_pem(LineEnding::LF)
                    .expect("SPKI PEM")
                    .into_bytes(),
                public
                    .to_pkcs1_pem(LineEnding::LF)
                    .expect("PKCS#1 PEM")
                    .into_bytes(),
                public.to_pkcs1_der().expect("PKCS#1 DER").into_vec(),
                n,
            ];
            Arc::new(RsaKey { key, public_forms })
        })
        .await
        .expect("RSA key task")
    })
    .await
    .clone()
}

/// What the test key-set server answers.
#[derive(Clone)]
enum Answer {
    /// The key set with these JWKs.
    Keys(Vec<Value>),
    /// 503, like a provider that is down.
    Down,
    /// A body past the relay's 1 MiB cap.
    Huge,
}

/// An HTTP server on loopback serving a JWKS the test can change, counting fetches.
struct KeyServer {
    url: url::Url,
    state: Arc<KeyServerState>,
    task: JoinHandle<()>,
}

struct KeyServerState {
    answer: Mutex<Answer>,
    hits: AtomicUsize,
}

impl KeyServer {
    async fn start(answer: Answer) -> KeyServer {
        let state = Arc::new(KeyServerState {
            answer: Mutex::new(answer),
            hits: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/jwks", get(serve_jwks))
            .with_state(state.clone());
        let (addr, task) = cloudllm_e2e::serve_on_loopback(app, "key server").await;
        KeyServer {
            url: format!("http://{addr}/jwks").parse().expect("URL"),
            state,
            task,
        }
    }

    fn set(&self, answer: Answer) {
        *self.state.answer.lock().expect("answer") = answer;
    }

    fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// A `[jwks]` for this server: the test issuer and audience, every asymmetric algorithm
    /// the tests sign with.
    fn config(&self, refetch_min: Duration) -> JwksConfig {
        JwksConfig {
            url: self.url.clone(),
            issuer: format!("{ISSUER}/"),
            audience: AUDIENCE.to_owned(),
            algorithms: vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
            refresh: Duration::from_secs(600),
            refetch_min,
        }
    }
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_jwks(State(state): State<Arc<KeyServerState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let answer = state.answer.lock().expect("answer").clone();
    match answer {
        Answer::Keys(keys) => axum::Json(json!({ "keys": keys })).into_response(),
        Answer::Down => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Answer::Huge => {
            let padding = "x".repeat(2 * 1024 * 1024);
            axum::Json(json!({ "keys": [], "padding": padding })).into_response()
        }
    }
}

/// Claims of a good provider token for `sub` with `scope`.
fn claims(sub: &str, scope: &str) -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "scope": scope,
        "iat": now(), "exp": now() + 600,
    })
}

/// The status of `GET /api/tags` with `token`. With no device connected, 503 means the token
/// was accepted, 401 that it was not.
async fn tags_status(relay: &TestRelay, token: &str) -> u16 {
    timeout(
        STEP,
        client()
            .get(relay.api("/api/tags"))
            .bearer_auth(token)
            .send(),
    )
    .await
    .expect("request timed out")
    .expect("request")
    .status()
    .as_u16()
}

/// The status of a tunnel upgrade request with `token`.
async fn tunnel_status(relay: &TestRelay, token: &str) -> u16 {
    let request = client()
        .get(relay.api("/tunnel"))
        .bearer_auth(token)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("x-cloudllm-protocol", "1")
        .header("x-cloudllm-device-id", "probe")
        .header("x-cloudllm-device-name", "probe");
    timeout(STEP, request.send())
        .await
        .expect("upgrade timed out")
        .expect("upgrade request")
        .status()
        .as_u16()
}

fn jwks_relay_config(jwks: JwksConfig, secret: bool) -> RelayConfig {
    let mut config = relay_config();
    config.jwks = Some(jwks);
    if !secret {
        config.secret = None;
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_are_followed_and_withdrawn_keys_stop_verifying() {
    init_logs();
    let a = rsa_key().await;
    let a = &a.key;
    let b = TestKey::ec("ec-b");
    let c = TestKey::ed("ed-c");
    let server = KeyServer::start(Answer::Down).await;

    // The provider is down: the relay starts anyway and refuses what it cannot check.
    let relay = TestRelay::start(jwks_relay_config(server.config(REFETCH_MIN), false)).await;
    let token_a = a.sign(&claims("alice", "openid client"));
    assert_eq!(tags_status(&relay, &token_a).await, 401);
    server.set(Answer::Huge);
    sleep(PAST_REFETCH_MIN).await;
    assert_eq!(
        tags_status(&relay, &token_a).await,
        401,
        "oversized key set"
    );

    // It comes up: the next token with an unknown key fetches the set.
    server.set(Answer::Keys(vec![a.jwk.clone()]));
    sleep(PAST_REFETCH_MIN).await;
    assert_eq!(tags_status(&relay, &token_a).await, 503);

    // Rotation, step 1: B is published beside A. A B-token names a key the relay has not seen,
    // which makes it fetch the set again.
    server.set(Answer::Keys(vec![a.jwk.clone(), b.jwk.clone()]));
    sleep(PAST_REFETCH_MIN).await;
    let token_b = b.sign(&claims("alice", "client"));
    assert_eq!(tags_status(&relay, &token_b).await, 503);
    assert_eq!(tags_status(&relay, &token_a).await, 503);

    // Step 2: A is withdrawn, C is added. Until the relay fetches again, A still verifies;
    // the first C-token makes it fetch, and from then on A is refused.
    server.set(Answer::Keys(vec![b.jwk.clone(), c.jwk.clone()]));
    sleep(PAST_REFETCH_MIN).await;
    assert_eq!(
        tags_status(&relay, &token_a).await,
        503,
        "A is still cached"
    );
    let token_c = c.sign(&claims("alice", "client"));
    assert_eq!(tags_status(&relay, &token_c).await, 503);
    assert_eq!(tags_status(&relay, &token_a).await, 401, "A was withdrawn");
    let fresh_a = a.sign(&claims("alice", "client"));
    assert_eq!(tags_status(&relay, &fresh_a).await, 401);
    assert_eq!(tags_status(&relay, &token_b).await, 503);

    // The whole path with provider tokens: a daemon opens its tunnel with an EdDSA agent
    // token, and an ES256 client token reaches its Ollama.
    let backend = FakeOllama::start().await;
    let mut config = daemon_config(&relay.url(), "alice", "laptop", &backend.url());
    config.token = Some(Secret::new(c.sign(&claims("alice", "openid agent"))));
    let daemon = TestDaemon::start(config);
    relay.wait_for_devices("alice", 1).await;
    let response = timeout(
        STEP,
        client()
            .get(relay.api("/api/tags"))
            .bearer_auth(&token_b)
            .send(),
    )
    .await
    .expect("request timed out")
    .expect("request");
    assert_eq!(response.status(), 200);
    let body = timeout(STEP, response.text())
        .await
        .expect("body timed out")
        .expect("body");
    assert!(body.contains("fake:latest"), "{body}");

    daemon.stop().await.expect("daemon stop");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_misaddressed_tokens_get_401() {
    init_logs();
    let rsa = rsa_key().await;
    let a = &rsa.key;
    let b = TestKey::ec("ec-b");
    let server = KeyServer::start(Answer::Keys(vec![a.jwk.clone(), b.jwk.clone()])).await;
    // A long refetch interval: unknown key ids must not make the relay fetch again.
    let relay = TestRelay::start(jwks_relay_config(
        server.config(Duration::from_secs(3600)),
        true,
    ))
    .await;
    let jwks_only = TestRelay::start(jwks_relay_config(
        server.config(Duration::from_secs(3600)),
        false,
    ))
    .await;

    // What must work, so that the refusals below are about the forgery alone.
    let good = a.sign(&claims("alice", "openid client"));
    assert_eq!(tags_status(&relay, &good).await, 503);
    assert_eq!(tags_status(&jwks_only, &good).await, 503);
    let self_issued = token("alice", Scope::Client);
    assert_eq!(tags_status(&relay, &self_issued).await, 503);
    let mut as_array = claims("alice", "client");
    as_array["aud"] = json!(["other", AUDIENCE]);
    as_array["iss"] = json!(format!("{ISSUER}/"));
    assert_eq!(tags_status(&relay, &a.sign(&as_array)).await, 503);
    let mut within_leeway = claims("alice", "client");
    within_leeway["exp"] = json!(now() - 5);
    assert_eq!(tags_status(&relay, &b.sign(&within_leeway)).await, 503);

    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let with = |field: &str, value: Value| {
        let mut claims = claims("alice", "client");
        if value.is_null() {
            claims.as_object_mut().expect("object").remove(field);
        } else {
            claims[field] = value;
        }
        claims
    };
    let hmac = |secret: &[u8], kid: Option<&str>| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(
            &header,
            &claims("alice", "client"),
            &EncodingKey::from_secret(secret),
        )
        .expect("HS256")
    };
    let ghost = TestKey::ec("ghost");
    let mut forged: Vec<(String, String)> = Vec::new();
    for (i, form) in rsa.public_forms.iter().enumerate() {
        forged.push((
            format!("HS256 signed with the RSA public key (form {i})"),
            hmac(form, Some(&a.kid)),
        ));
        forged.push((
            format!("HS256 signed with the RSA public key (form {i}), no kid"),
            hmac(form, None),
        ));
    }
    for alg in ["none", "None", "NONE"] {
        let header = json!({"alg": alg, "typ": "JWT", "kid": a.kid});
        forged.push((
            format!("alg {alg}"),
            format!("{}.{}.", b64(&header), b64(&claims("alice", "client"))),
        ));
    }
    forged.extend([
        (
            "wrong issuer".into(),
            a.sign(&with("iss", json!("https://evil.test"))),
        ),
        (
            "issuer prefix".into(),
            a.sign(&with("iss", json!(format!("{ISSUER}.evil.test")))),
        ),
        ("no issuer".into(), a.sign(&with("iss", Value::Null))),
        (
            "wrong audience".into(),
            a.sign(&with("aud", json!("other"))),
        ),
        (
            "audience list without ours".into(),
            a.sign(&with("aud", json!(["other", "cloudllmd"]))),
        ),
        ("no audience".into(), a.sign(&with("aud", Value::Null))),
        (
            "expired beyond the leeway".into(),
            a.sign(&with("exp", json!(now() - 120))),
        ),
        (
            "not valid yet".into(),
            a.sign(&with("nbf", json!(now() + 600))),
        ),
        ("no expiry".into(), b.sign(&with("exp", Value::Null))),
        ("no subject".into(), b.sign(&with("sub", Value::Null))),
        ("empty subject".into(), b.sign(&with("sub", json!("")))),
        (
            "signed by a key the provider never published".into(),
            ghost.sign(&claims("alice", "client")),
        ),
        ("no kid".into(), {
            let header = Header::new(Algorithm::ES256);
            jsonwebtoken::encode(&header, &claims("alice", "client"), &b.encoding).expect("sign")
        }),
        (
            "RSA key under an algorithm not configured (PS256)".into(),
            a.sign_as(Algorithm::PS256, &claims("alice", "client")),
        ),
        ("EC kid under RS256".into(), {
            let mut header = Header::new(Algorithm::RS256);
            header.kid = Some(b.kid.clone());
            jsonwebtoken::encode(&header, &claims("alice", "client"), &a.encoding).expect("sign")
        }),
        ("tampered".into(), {
            let parts: Vec<&str> = good.split('.').collect();
            let claims = b64(&claims("mallory", "client"));
            format!("{}.{claims}.{}", parts[0], parts[2])
        }),
        ("garbage".into(), "garbage".into()),
        ("three dots of garbage".into(), "a.b.c".into()),
        (
            "a header that is not JSON".into(),
            format!(
                "{}.{}.c2ln",
                URL_SAFE_NO_PAD.encode("{"),
                b64(&claims("a", "client"))
            ),
        ),
    ]);
    for (what, token) in &forged {
        assert_eq!(tags_status(&relay, token).await, 401, "{what}");
        assert_eq!(tags_status(&jwks_only, token).await, 401, "{what}");
    }
    // The tunnel refuses them before any upgrade too.
    for (what, token) in forged.iter().take(6) {
        assert_eq!(tunnel_status(&relay, token).await, 401, "{what} on /tunnel");
    }

    // Without a secret, the relay's own tokens mean nothing.
    assert_eq!(tags_status(&jwks_only, &self_issued).await, 401);

    // Valid provider tokens with the other scope: known caller, not allowed. Without any
    // cloudllm scope it is another application's token: unknown caller.
    let agent_only = a.sign(&claims("alice", "openid agent"));
    assert_eq!(tags_status(&relay, &agent_only).await, 403);
    assert_eq!(tunnel_status(&relay, &good).await, 403);
    let no_scope = a.sign(&claims("alice", "openid profile"));
    assert_eq!(tags_status(&relay, &no_scope).await, 401);
    assert_eq!(tunnel_status(&relay, &no_scope).await, 401);

    // A flood of made-up key ids: each relay fetched the set at startup and at most once more.
    for i in 0..20 {
        let made_up = TestKey {
            kid: format!("made-up-{i}"),
            ..TestKey::ec("x")
        };
        assert_eq!(
            tags_status(&relay, &made_up.sign(&claims("alice", "client"))).await,
            401
        );
    }
    assert!(
        server.hits() <= 4,
        "{} fetches for two relays",
        server.hits()
    );
    relay.stop().await;
    jwks_only.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_login_token_from_a_real_provider_opens_a_tunnel() {
    init_logs();
    let Some(idp) = OidcProvider::start(&[]).await else {
        return;
    };
    let discovery: Value = timeout(STEP, async {
        client()
            .get(idp.issuer.join(".well-known/openid-configuration")?)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
            .map_err(anyhow::Error::from)
    })
    .await
    .expect("discovery timed out")
    .expect("discovery");
    let jwks_uri = discovery["jwks_uri"].as_str().expect("jwks_uri");
    assert_eq!(jwks_uri, idp.issuer.join("jwks").expect("URL").as_str());

    let mut config = relay_config();
    config.jwks = Some(JwksConfig {
        url: jwks_uri.parse().expect("jwks_uri is a URL"),
        issuer: idp.issuer.to_string(),
        audience: AUDIENCE.to_owned(),
        algorithms: vec![Algorithm::RS256],
        refresh: Duration::from_secs(600),
        refetch_min: Duration::from_secs(30),
    });
    let relay = TestRelay::start(config).await;

    let provider = idp.discover().await;
    let browser = Browser::new(
        reqwest::Client::builder()
            .cookie_store(true)
            .timeout(STEP)
            .build()
            .expect("browser client"),
    );
    let (tokens, _, _) = device_login(&provider, &browser, User::Approves).await;
    let tokens = tokens.expect("device login");
    let access = tokens.access_token.expose().to_owned();

    let backend = FakeOllama::start().await;
    let mut daemon = daemon_config(&relay.url(), "alice", "laptop", &backend.url());
    daemon.token = Some(Secret::new(access.clone()));
    let daemon = TestDaemon::start(daemon);
    relay.wait_for_devices("alice", 1).await;

    let response = timeout(
        STEP,
        client()
            .get(relay.api("/api/tags"))
            .bearer_auth(token("alice", Scope::Client))
            .send(),
    )
    .await
    .expect("request timed out")
    .expect("request");
    assert_eq!(response.status(), 200);
    let body = timeout(STEP, response.text())
        .await
        .expect("body timed out")
        .expect("body");
    assert!(body.contains("fake:latest"), "{body}");

    // The login granted `agent`, not `client`: the same token cannot call the API.
    assert_eq!(tags_status(&relay, &access).await, 403);
    // Another user's client token does not reach alice's device.
    assert_eq!(
        tags_status(&relay, &token("mallory", Scope::Client)).await,
        503
    );

    daemon.stop().await.expect("daemon stop");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_known_says_how_to_log_in() {
    init_logs();
    let fetch = |relay: &TestRelay| {
        let url = relay.api(cloudllm_proto::WELL_KNOWN_PATH);
        async move {
            let response = timeout(STEP, client().get(url).send())
                .await
                .expect("request timed out")
                .expect("request");
            assert_eq!(response.status(), 200);
            assert_eq!(
                response.headers()["content-type"],
                "application/json",
                "content type"
            );
            timeout(STEP, response.json::<RelayInfo>())
                .await
                .expect("body timed out")
                .expect("a RelayInfo")
        }
    };

    let plain = TestRelay::start(relay_config()).await;
    let info = fetch(&plain).await;
    assert_eq!(info.protocol_version, cloudllm_proto::PROTOCOL_VERSION);
    assert_eq!(info.auth, RelayAuth::Token);

    let mut config = relay_config();
    config.login = Some(LoginConfig {
        issuer: "https://idp.example.com".into(),
        client_id: "cloudllmd".into(),
        scopes: vec!["openid".into(), "offline_access".into(), "agent".into()],
    });
    let oidc = TestRelay::start(config).await;
    assert_eq!(
        fetch(&oidc).await.auth,
        RelayAuth::Oidc {
            issuer: "https://idp.example.com".into(),
            client_id: "cloudllmd".into(),
            scopes: vec!["openid".into(), "offline_access".into(), "agent".into()],
        }
    );
    plain.stop().await;
    oidc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_is_closed_once_its_token_expired_past_the_grace() {
    init_logs();
    let grace = Duration::from_secs(1);
    let relay = TestRelay::start(RelayConfig {
        token_grace: grace,
        ..relay_config()
    })
    .await;
    let backend = FakeOllama::start().await;

    // Erin's daemon has a token that expires in a few seconds and cannot renew it; Bob's is
    // good for an hour.
    let ttl = Duration::from_secs(4);
    let expiring = keys()
        .issue("erin", Scope::Agent, None, ttl)
        .expect("issue token");
    let expires_at = now() + ttl.as_secs();
    let mut config = daemon_config(&relay.url(), "erin", "laptop", &backend.url());
    config.token = Some(Secret::new(expiring.clone()));
    let erin = TestDaemon::start(config);
    let bob = TestDaemon::start(daemon_config(
        &relay.url(),
        "bob",
        "desktop",
        &backend.url(),
    ));
    relay.wait_for_devices("erin", 1).await;
    relay.wait_for_devices("bob", 1).await;

    // Bounded: the expiry, the grace, and a margin for the drain.
    let deadline = Instant::now() + ttl + grace + STEP;
    while relay.relay.registry.all().iter().any(|d| d.user == "erin") {
        assert!(
            Instant::now() < deadline,
            "erin's tunnel outlived its token"
        );
        sleep(Duration::from_millis(20)).await;
    }
    assert!(
        now() >= expires_at,
        "the tunnel was closed before its token expired"
    );

    // The daemon comes back with the same token at once, and is refused: it stays out.
    sleep(Duration::from_millis(1500)).await;
    assert!(
        !relay.relay.registry.all().iter().any(|d| d.user == "erin"),
        "an expired token opened a tunnel again"
    );
    assert_eq!(tunnel_status(&relay, &expiring).await, 401);
    assert_eq!(
        tags_status(&relay, &token("erin", Scope::Client)).await,
        503
    );
    // Bob is untouched.
    relay.wait_for_devices("bob", 1).await;

    drop(erin);
    bob.stop().await.expect("daemon stop");
    relay.stop().await;
}
