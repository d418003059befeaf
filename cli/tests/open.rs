//! `cloudllm open` with the real CLI, daemon and relay: the link it prints opens the web page
//! in headless Chromium signed in as the daemon's user, once (`web/e2e/open.mjs`); the link is
//! in no log; and what goes wrong is said in the user's terms (not logged in, relay offline, a
//! relay that signs in only through its identity provider).

mod common;

use std::time::Duration;

use cloudllm_e2e::browser::{run_script, tools_ready};
use cloudllm_e2e::oidc::{AUDIENCE, Browser, OidcProvider, User, device_login};
use cloudllm_e2e::{STEP, TestDaemon, TestRelay, client, daemon_config};
use cloudllm_proto::Secret;
use cloudllm_relay::RelayConfig;
use common::*;

/// The browser run: one sign-in and one refusal, each waiting at most a minute for the page,
/// with room for Chromium to start, so that a failing run still prints its report.
const BROWSER_RUN: Duration = Duration::from_secs(180);

/// Runs `cloudllm open --print`: its exit code, standard output and standard error.
async fn open_print(socket: &std::path::Path) -> (Option<i32>, String, String) {
    let output = run(socket, &["open", "--print"]).await;
    (output.status.code(), stdout(&output), stderr(&output))
}

/// The one-time code in a link `RELAY/#open=CODE`.
fn code_of(link: &str) -> &str {
    link.rsplit_once("#open=")
        .map(|(_, code)| code)
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_prints_a_link_that_signs_the_browser_in_once() {
    let f = Fixture::start().await;
    f.login().await;
    wait_connection(&f.socket, "connected").await;

    let (code, out, err) = open_print(&f.socket).await;
    assert_eq!(code, Some(0), "{err}");
    let link = out.trim();
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    assert!(
        link.starts_with(&format!("{}#open=", f.relay.url())),
        "{link}"
    );
    let one_time = code_of(link);
    assert!(
        one_time.len() == 64 && one_time.bytes().all(|b| b.is_ascii_hexdigit()),
        "{link}"
    );

    if tools_ready().await {
        let run_config = serde_json::json!({
            "link": link,
            "user": "alice",
            "device": "laptop",
        });
        run_script("open.mjs", run_config, BROWSER_RUN).await;
    } else {
        // Without a browser, the page's two requests by hand: the code works once.
        let relay = &f.relay;
        let exchange = |code: String| async move {
            tokio::time::timeout(
                STEP,
                client()
                    .post(relay.api("/cloudllm/open/exchange"))
                    .json(&serde_json::json!({ "code": code }))
                    .send(),
            )
            .await
            .expect("exchange timed out")
            .expect("exchange")
            .status()
        };
        assert_eq!(exchange(one_time.to_owned()).await, 200);
        assert_eq!(exchange(one_time.to_owned()).await, 401);
    }

    // A second `cloudllm open` gives another link.
    let (code, again, err) = open_print(&f.socket).await;
    assert_eq!(code, Some(0), "{err}");
    assert_ne!(code_of(again.trim()), one_time);

    // The daemon said it made links, and never what they were.
    let logs = stdout(&run(&f.socket, &["logs", "-n", "1000"]).await);
    assert!(logs.contains("made a one-time link"), "{logs}");
    assert!(
        !logs.contains(one_time) && !logs.contains(code_of(again.trim())),
        "a link in the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_says_what_is_wrong_in_the_users_terms() {
    let f = Fixture::start().await;
    let (code, out, err) = open_print(&f.socket).await;
    assert_eq!((code, out.as_str()), (Some(1), ""), "{err}");
    assert_eq!(
        err.trim(),
        "cloudllm: not logged in: run `cloudllm login --relay URL` first"
    );

    f.login().await;
    let relay = f.relay.url();
    f.relay.stop().await;
    let (code, out, err) = open_print(&f.socket).await;
    assert_eq!((code, out.as_str()), (Some(1), ""), "{err}");
    assert!(
        err.starts_with(&format!("cloudllm: cannot reach the relay at {relay} (")),
        "{err}"
    );
    assert!(err.contains("check the network"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_signs_in_only_through_its_identity_provider_says_so() {
    cloudllm_e2e::init_logs();
    let Some(idp) = OidcProvider::start(&[]).await else {
        return;
    };
    let issuer = idp.issuer.as_str().trim_end_matches('/');
    // No secret of its own: it cannot sign a client token for a code.
    let config: RelayConfig = toml::from_str(&format!(
        r#"
listen = "127.0.0.1:0"
[jwks]
url = "{issuer}/jwks"
issuer = "{issuer}"
audience = "{AUDIENCE}"
"#
    ))
    .expect("relay config");
    let relay = TestRelay::start(config).await;
    let browser = Browser::new(
        reqwest::Client::builder()
            .cookie_store(true)
            .no_proxy()
            .build()
            .expect("browser"),
    );
    let (tokens, _, _) = device_login(&idp.discover().await, &browser, User::Approves).await;
    let tokens = tokens.expect("device login");
    let backend = cloudllm_e2e::FakeOllama::start().await;
    let mut config = daemon_config(&relay.url(), "alice", "laptop", &backend.url());
    config.token = Some(Secret::new(tokens.access_token.expose()));
    let socket = config.socket_path.clone().expect("socket");
    let _daemon = TestDaemon::start(config);
    // The provider's token works on this relay: the tunnel comes up with it.
    relay.wait_for_devices("alice", 1).await;

    let (code, out, err) = open_print(&socket).await;
    assert_eq!((code, out.as_str()), (Some(1), ""), "{err}");
    assert_eq!(
        err.trim(),
        format!(
            "cloudllm: this relay signs you in only through its identity provider: open {} in your browser and sign in there",
            relay.url()
        )
    );
}
