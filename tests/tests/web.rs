//! The relay's web page and its endpoints, over HTTP as a browser sees them: the page served
//! from the binary (compressed as the browser accepts, cached by name, behind a strict CSP),
//! CORS for other origins on `/api/*` and `/v1/*` only, the device list the page shows, and the
//! one-time codes of `cloudllm open`. The page itself, in Chromium, is tested by `web_browser.rs`.

use cloudllm_e2e::{Stack, TestRelay, client, relay_config, send, send_for_json, token};
use cloudllm_relay::{LoginConfig, Scope, WebLoginConfig};
use reqwest::header;

/// The origin the tests' relays allow, where one does.
const CHAT_ORIGIN: &str = "https://chat.example.com";

/// The path of the page's script, read from its index.html.
fn script_of(html: &str) -> String {
    let start = html
        .find("src=\"/assets/")
        .expect("index.html names its script")
        + 5;
    let end = start + html[start..].find('"').expect("closing quote");
    html[start..end].to_owned()
}

#[tokio::test]
async fn the_page_is_served_compressed_cached_by_name_and_behind_a_strict_csp() {
    let relay = TestRelay::start(relay_config()).await;
    let http = client();

    let page = send(
        http.get(relay.api("/"))
            .header(header::ACCEPT_ENCODING, "gzip, br"),
    )
    .await;
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers[header::CONTENT_ENCODING], "br");
    assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self';",
        "style-src 'self';",
        "connect-src 'self';",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    let compressed = page.bytes().await.unwrap();

    // The same page for a client that accepts no compression.
    let plain = send(http.get(relay.api("/index.html"))).await;
    assert_eq!(plain.status(), 200);
    assert!(plain.headers().get(header::CONTENT_ENCODING).is_none());
    let etag = plain.headers()[header::ETAG].clone();
    let html = plain.text().await.unwrap();
    assert!(html.contains("<div id=\"app\">"), "{html}");
    assert!(
        compressed.len() < html.len(),
        "brotli {} vs {}",
        compressed.len(),
        html.len()
    );
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "no inline script or style: {html}"
    );

    // A revalidation with the ETag costs no body.
    let again = send(
        http.get(relay.api("/"))
            .header(header::IF_NONE_MATCH, etag.clone()),
    )
    .await;
    assert_eq!(again.status(), 304);
    assert!(
        again
            .headers()
            .contains_key(header::CONTENT_SECURITY_POLICY)
    );

    // The hashed script: gzip for a gzip-only client, cached for a year, immutable.
    let script = script_of(&html);
    let js = send(
        http.get(relay.api(&script))
            .header(header::ACCEPT_ENCODING, "gzip"),
    )
    .await;
    assert_eq!(js.status(), 200);
    assert_eq!(js.headers()[header::CONTENT_ENCODING], "gzip");
    assert_eq!(
        js.headers()[header::CONTENT_TYPE],
        "text/javascript; charset=utf-8"
    );
    assert_eq!(
        js.headers()[header::CACHE_CONTROL],
        "public, max-age=31536000, immutable"
    );
    assert_eq!(js.headers()[header::VARY], "accept-encoding");

    // Unknown assets are 404, not the page.
    let missing = send(http.get(relay.api("/assets/nope.js"))).await;
    assert_eq!(missing.status(), 404);
    relay.stop().await;
}

#[tokio::test]
async fn the_csp_lets_the_page_reach_the_identity_provider_when_login_is_configured() {
    let mut config = relay_config();
    config.login = Some(LoginConfig {
        issuer: "https://idp.example.com/realms/home".into(),
        client_id: "cloudllmd".into(),
        scopes: vec!["openid".into()],
    });
    config.web_login = Some(WebLoginConfig {
        client_id: "cloudllm-web".into(),
        scopes: vec!["openid".into(), "client".into()],
    });
    let relay = TestRelay::start(config).await;
    let page = send(client().get(relay.api("/"))).await;
    let csp = page.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("connect-src 'self' https://idp.example.com;"),
        "{csp}"
    );
    let web = send_for_json(client().get(relay.api("/cloudllm/web"))).await;
    assert_eq!(web["oidc"]["issuer"], "https://idp.example.com/realms/home");
    assert_eq!(web["oidc"]["client_id"], "cloudllm-web");
    assert_eq!(
        web["oidc"]["scopes"],
        serde_json::json!(["openid", "client"])
    );
    relay.stop().await;
}

/// The CORS preflight a page at `origin` sends before POSTing JSON with a token to `path`.
async fn preflight(relay: &TestRelay, path: &str, origin: &str) -> reqwest::Response {
    send(
        client()
            .request(reqwest::Method::OPTIONS, relay.api(path))
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                "authorization, content-type",
            ),
    )
    .await
}

/// Alice's `GET /api/tags` from a page at [`CHAT_ORIGIN`].
async fn tags_from_chat_origin(stack: &Stack) -> reqwest::Response {
    send(stack.get("/api/tags").header(header::ORIGIN, CHAT_ORIGIN)).await
}

/// Whether a page at another origin may read `response`.
fn readable_cross_origin(response: &reqwest::Response) -> bool {
    response
        .headers()
        .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
}

#[tokio::test]
async fn cors_is_closed_by_default() {
    let stack = Stack::start().await;
    let answer = preflight(&stack.relay, "/api/chat", CHAT_ORIGIN).await;
    assert_eq!(answer.status(), 403);
    assert!(!readable_cross_origin(&answer));
    let tags = tags_from_chat_origin(&stack).await;
    assert_eq!(tags.status(), 200);
    assert!(!readable_cross_origin(&tags));
}

#[tokio::test]
async fn allowed_origins_open_the_api_and_only_the_api() {
    let mut config = relay_config();
    config.allowed_origins = vec![CHAT_ORIGIN.into()];
    // A preflight is never a failed sign-in, however many come.
    config.auth_failures_per_minute = 1;
    let stack = Stack::with_relay_config(config).await;
    for path in ["/api/chat", "/v1/chat/completions", "/api/tags"] {
        for _ in 0..3 {
            let answer = preflight(&stack.relay, path, CHAT_ORIGIN).await;
            assert_eq!(answer.status(), 204, "{path}");
            let h = answer.headers();
            assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], CHAT_ORIGIN);
            let allowed = h[header::ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap();
            assert!(allowed.contains("authorization") && allowed.contains("x-cloudllm-device"));
            assert!(
                h[header::ACCESS_CONTROL_ALLOW_METHODS]
                    .to_str()
                    .unwrap()
                    .contains("POST")
            );
            assert!(!h.contains_key(header::ACCESS_CONTROL_ALLOW_CREDENTIALS));
        }
    }
    // Another origin: refused, and told why.
    let other = preflight(&stack.relay, "/api/chat", "https://evil.test").await;
    assert_eq!(other.status(), 403);
    assert!(other.text().await.unwrap().contains("allowed_origins"));
    // Not the relay's other routes.
    for path in ["/", "/healthz", "/cloudllm/devices", "/tunnel"] {
        let answer = preflight(&stack.relay, path, CHAT_ORIGIN).await;
        assert!(
            !readable_cross_origin(&answer),
            "{path} answered a preflight"
        );
    }
    // The request itself, with the token: readable by that origin, with the useful headers.
    let tags = tags_from_chat_origin(&stack).await;
    assert_eq!(tags.status(), 200);
    assert_eq!(
        tags.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        CHAT_ORIGIN
    );
    assert!(
        tags.headers()[header::ACCESS_CONTROL_EXPOSE_HEADERS]
            .to_str()
            .unwrap()
            .contains("retry-after")
    );
    // A refusal is readable too, so the app can show it.
    let refused = send(
        client()
            .get(stack.relay.api("/api/tags"))
            .header(header::ORIGIN, CHAT_ORIGIN),
    )
    .await;
    assert_eq!(refused.status(), 401);
    assert!(readable_cross_origin(&refused));
}

#[tokio::test]
async fn a_star_allows_any_origin_without_credentials() {
    let mut config = relay_config();
    config.allowed_origins = vec!["*".into()];
    let stack = Stack::with_relay_config(config).await;
    let answer = preflight(&stack.relay, "/v1/models", "https://any.test").await;
    assert_eq!(answer.status(), 204);
    assert_eq!(answer.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
}

#[tokio::test]
async fn a_bad_allowed_origin_stops_the_relay_from_starting() {
    let mut config = relay_config();
    config.allowed_origins = vec!["https://chat.example.com/app".into()];
    let shutdown = tokio_util::sync::CancellationToken::new();
    let err = match cloudllm_relay::serve(config, shutdown).await {
        Ok(_) => panic!("started with a path in allowed_origins"),
        Err(err) => format!("{err:#}"),
    };
    assert!(
        err.contains("allowed_origins") && err.contains("https://chat.example.com/app"),
        "{err}"
    );
}

#[tokio::test]
async fn devices_lists_the_callers_own_devices_and_their_models() {
    let stack = Stack::start().await;
    stack
        .relay
        .wait_for_models("alice", "laptop", &["fake:latest"])
        .await;
    let list = send_for_json(stack.get("/cloudllm/devices")).await;
    assert_eq!(list["devices"][0]["name"], "laptop");
    assert_eq!(
        list["devices"][0]["models"],
        serde_json::json!(["fake:latest"])
    );
    let bob = send_for_json(
        client()
            .get(stack.relay.api("/cloudllm/devices"))
            .bearer_auth(token("bob", Scope::Client)),
    )
    .await;
    assert_eq!(
        bob["devices"],
        serde_json::json!([]),
        "bob sees nothing of alice"
    );
    let anonymous = send(client().get(stack.relay.api("/cloudllm/devices"))).await;
    assert_eq!(anonymous.status(), 401);
}

/// `POST /cloudllm/open` (mint a one-time code) with `token`.
fn mint_open_code(stack: &Stack, token: &str) -> reqwest::RequestBuilder {
    client()
        .post(stack.relay.api("/cloudllm/open"))
        .bearer_auth(token)
}

#[tokio::test]
async fn cloudllm_open_codes_buy_one_short_client_token_once() {
    let stack = Stack::start().await;
    // Only the daemon's agent token mints codes.
    let as_client = send(mint_open_code(&stack, &token("alice", Scope::Client))).await;
    assert_eq!(as_client.status(), 403);
    let minted = send_for_json(mint_open_code(&stack, &token("alice", Scope::Agent))).await;
    let code = minted["code"].as_str().unwrap().to_owned();
    assert_eq!(
        minted["path"],
        format!("/#open={code}"),
        "the code rides in the fragment"
    );
    assert_eq!(minted["expires_in"], 60);

    let traded = stack.relay.exchange_open_code(&code).await;
    assert_eq!(traded.status(), 200);
    assert_eq!(traded.headers()[header::CACHE_CONTROL], "no-store");
    let body: serde_json::Value = traded.json().await.unwrap();
    assert_eq!(body["expires_in"], 12 * 3600);
    let fresh = body["token"].as_str().unwrap();
    let tags = send(
        client()
            .get(stack.relay.api("/api/tags"))
            .bearer_auth(fresh),
    )
    .await;
    assert_eq!(tags.status(), 200, "the token is alice's client token");
    let tunnel_with_it = send(mint_open_code(&stack, fresh)).await;
    assert_eq!(tunnel_with_it.status(), 403, "it is no agent token");

    let replay = stack.relay.exchange_open_code(&code).await;
    assert_eq!(replay.status(), 401, "a code works once");
    assert!(replay.text().await.unwrap().contains("cloudllm open"));
    let guessed = stack.relay.exchange_open_code(&"0".repeat(64)).await;
    assert_eq!(guessed.status(), 401);
}

#[tokio::test]
async fn wrong_codes_count_against_the_address() {
    let mut config = relay_config();
    config.auth_failures_per_minute = 3;
    let relay = TestRelay::start(config).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            relay
                .exchange_open_code(&"1".repeat(64))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses[..3], [401, 401, 401]);
    assert_eq!(statuses[4], 429, "{statuses:?}");
    relay.stop().await;
}
