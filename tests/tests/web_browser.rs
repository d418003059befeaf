//! The web page in headless Chromium (Debian's `chromium`, driven by `playwright-core` from
//! `web/e2e/run.mjs`) against a real relay and two real daemons started here: device
//! `desktop` in front of the genuine Ollama (`scripts/real-ollama`, model `smollm2:135m`) and
//! device `laptop` in front of a fake chat backend (`cloudllm_e2e::browser::FakeChat`, a fake,
//! named so: it answers a fixed Markdown text with `<script>` and `<img onerror>`, an echo of
//! the question numbered per request, a vision model that keeps the images it receives, and a
//! never-ending stream that records when the client goes away, for the Stop check).
//!
//! `web/e2e/run.mjs` covers sign-in, streaming, Stop (against the fake and against the real
//! Ollama, whose log must show the request ended long before its `num_predict` could be
//! reached), Markdown, reload, themes, sign-out, users, CORS and the one-time code;
//! `web/e2e/features.mjs` covers images for vision models, a 413 and a 429 (on a tier with tiny
//! limits), regenerate, edit and resend, and export then import.
//!
//! A second test needs no real Ollama: two daemons of one user, each in front of a fake of its
//! own, for `web/e2e/conversations.mjs`: the device and model picked are the ones that answer,
//! the conversation list (search, rename, delete), a conversation's system prompt, and a
//! reasoning model's thinking (shown folded, never sent back), checked on what each fake
//! received.
//!
//! Needs `chromium` (Debian: `apt-get install chromium`) and the page's packages
//! (`npm ci --prefix web`, run here when `web/node_modules` is missing). Set
//! `CLOUDLLM_SKIP_WEB_TEST=1` to skip knowingly; otherwise a missing tool fails the test with
//! what to install. Screenshots land in `target/web-screenshots/`. Sign-in through an identity
//! provider has its own run (`web_oidc.rs`), and so has `cloudllm open` (`cli/tests/open.rs`).

use std::time::Duration;

use base64::Engine as _;
use cloudllm_e2e::browser::{FakeChat, assert_screenshots, run_script, tools_ready};
use cloudllm_e2e::{TestDaemon, TestRelay, daemon_config, real_ollama, relay_config, token};
use cloudllm_relay::config::TierLimits;
use cloudllm_relay::{Keys, Scope};

/// The whole browser run: a dozen checks, two of them waiting for a real model on a CPU.
const BROWSER_RUN: Duration = Duration::from_secs(480);
/// The run of `features.mjs`: fake models only, but one wait for a rate limit to lift.
const FEATURES_RUN: Duration = Duration::from_secs(300);
/// The run of `conversations.mjs`: fake models only, a dozen short answers.
const CONVERSATIONS_RUN: Duration = Duration::from_secs(240);

/// A tier whose limits the page meets at once: a 4 KiB body (a long message is a 413) and
/// 5 requests a minute (a few messages are a 429 with a wait of about 12 s).
const TIGHT_TIER: &str = "tight";
/// [`TIGHT_TIER`]'s body limit.
const TIGHT_BODY_BYTES: u64 = 4096;
/// [`TIGHT_TIER`]'s requests per minute: the page's first load takes two (models, then the
/// model's capabilities), the 413 and the message after it two more, which leaves one or two
/// messages before the 429.
const TIGHT_PER_MINUTE: u32 = 5;

/// The image the page attaches for the vision model: a 24×24 PNG, as the page sends it
/// (base64, no `data:` prefix).
const TEST_PNG_BASE64: &str = "iVBORw0KGgoAAAANSUhEUgAAABgAAAAYCAIAAABvFaqvAAAALklEQVR42mN4FqCBhjQqnqEhYtQwjBpER4PI04apZtQgeho0mrJH89qoQXQxCABjx0CuiySNGQAAAABJRU5ErkJggg==";

/// One Chromium at a time: on two cores a second browser run beside the real Ollama's slows
/// its tokens past the Stop check's bounds, so the two tests of this file take turns.
static ONE_CHROMIUM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_in_chromium() {
    if !tools_ready().await {
        return;
    }
    let _turn = ONE_CHROMIUM.lock().await;
    let Some(ollama) = real_ollama::url().await else {
        eprintln!(
            "skipping the browser test: CLOUDLLM_SKIP_REAL_OLLAMA=1 (it needs the real Ollama)"
        );
        return;
    };
    cloudllm_e2e::init_logs();
    // The "other app" origin the relay allows: a port reserved here, served by the browser run.
    let cors_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("reserve a port");
        probe.local_addr().unwrap().port()
    };
    let mut config = relay_config();
    config.allowed_origins = vec![format!("http://127.0.0.1:{cors_port}")];
    config.tiers.insert(
        TIGHT_TIER.to_owned(),
        TierLimits {
            requests_per_minute: TIGHT_PER_MINUTE,
            max_body_bytes: TIGHT_BODY_BYTES,
            ..TierLimits::premium()
        },
    );
    let relay = TestRelay::start(config).await;
    let (fake_url, fake, _fake_task) = FakeChat::start().await;
    let _desktop = TestDaemon::start(daemon_config(&relay.url(), "alice", "desktop", &ollama));
    let _laptop = TestDaemon::start(daemon_config(&relay.url(), "alice", "laptop", &fake_url));
    relay.wait_for_devices("alice", 2).await;
    relay
        .wait_for_models("alice", "laptop", &FakeChat::MODELS)
        .await;

    let other_keys = Keys::new(&cloudllm_proto::Secret::new(
        "another-relay-secret-another-relay-secret",
    ));
    let forged = other_keys
        .issue("alice", Scope::Client, None, Duration::from_secs(3600))
        .expect("a token of another relay");
    let expired = cloudllm_e2e::keys()
        .issue("alice", Scope::Client, None, Duration::ZERO)
        .expect("an expired token");
    let ollama_log = real_ollama::log(&ollama);
    if ollama_log.is_none() {
        eprintln!(
            "the real Ollama was started elsewhere: Stop is checked against its log only when scripts/real-ollama started it"
        );
    }
    let run_config = serde_json::json!({
        "real_ollama_log": ollama_log.map(|p| p.display().to_string()),
        "relay": relay.url().as_str(),
        "alice": token("alice", Scope::Client),
        "alice_agent": token("alice", Scope::Agent),
        "bob": token("bob", Scope::Client),
        "forged": forged,
        "expired": expired,
        "real_model": real_ollama::MODEL,
        "real_device": "desktop",
        "fake_device": "laptop",
        "cors_port": cors_port,
    });
    run_script("run.mjs", run_config, BROWSER_RUN).await;
    // Stop reached the backend: the endless stream's client went away.
    fake.wait_cancelled().await;

    let image = cloudllm_e2e::scratch_dir().join("attach.png");
    let png = base64::engine::general_purpose::STANDARD
        .decode(TEST_PNG_BASE64)
        .expect("the test image decodes");
    std::fs::write(&image, png).expect("write the test image");
    let alice_tight = cloudllm_e2e::keys()
        .issue(
            "alice",
            Scope::Client,
            Some(TIGHT_TIER),
            Duration::from_secs(3600),
        )
        .expect("a token of the tight tier");
    let images_before = fake.images.lock().map(|i| i.len()).unwrap_or(0);
    assert_eq!(images_before, 0, "no image reached the backend before");
    let features_config = serde_json::json!({
        "relay": relay.url().as_str(),
        "alice": token("alice", Scope::Client),
        "alice_tight": alice_tight,
        "tight_body_bytes": TIGHT_BODY_BYTES,
        "fake_device": "laptop",
        "image": image.display().to_string(),
    });
    run_script("features.mjs", features_config, FEATURES_RUN).await;
    // The image reached the backend as Ollama takes it: base64 in the message's `images`.
    let images = fake.images.lock().map(|i| i.clone()).unwrap_or_default();
    assert!(
        !images.is_empty() && images.iter().all(|i| i == TEST_PNG_BASE64),
        "the vision model received {} images, not the attached one",
        images.len()
    );

    assert_screenshots(&[
        "signin",
        "chat",
        "markdown",
        "chat-dark",
        "phone",
        "offline",
        "stopped",
        "vision",
        "too-large",
        "rate-limited",
        "edited",
        "imported",
    ]);
    relay.stop().await;
}

/// Whether `fake` received a chat request whose last message is `question`.
fn asked(fake: &FakeChat, question: &str) -> bool {
    let requests = fake.requests.lock().map(|r| r.clone()).unwrap_or_default();
    requests.iter().any(|r| {
        r["messages"]
            .as_array()
            .and_then(|m| m.last())
            .is_some_and(|m| m["content"] == question)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_conversations_and_thinking_in_chromium() {
    if !tools_ready().await {
        return;
    }
    let _turn = ONE_CHROMIUM.lock().await;
    cloudllm_e2e::init_logs();
    let relay = TestRelay::start(relay_config()).await;
    let (desktop_url, desktop, _desktop_task) =
        FakeChat::start_labelled("the desktop's fake").await;
    let (laptop_url, laptop, _laptop_task) = FakeChat::start_labelled("the laptop's fake").await;
    let _desktop = TestDaemon::start(daemon_config(
        &relay.url(),
        "alice",
        "desktop",
        &desktop_url,
    ));
    let _laptop = TestDaemon::start(daemon_config(&relay.url(), "alice", "laptop", &laptop_url));
    relay.wait_for_devices("alice", 2).await;
    for device in ["desktop", "laptop"] {
        relay
            .wait_for_models("alice", device, &FakeChat::MODELS)
            .await;
    }
    let config = serde_json::json!({
        "relay": relay.url().as_str(),
        "alice": token("alice", Scope::Client),
        "fakes": { "desktop": desktop_url.as_str(), "laptop": laptop_url.as_str() },
        "labels": { "desktop": desktop.label, "laptop": laptop.label },
    });
    run_script("conversations.mjs", config, CONVERSATIONS_RUN).await;
    // Each question reached the device picked for it, and only that one.
    assert!(asked(&desktop, "Which device are you?") && !asked(&laptop, "Which device are you?"));
    assert!(asked(&laptop, "And which one are you?") && !asked(&desktop, "And which one are you?"));
    assert_screenshots(&["devices", "search", "system-prompt", "thinking"]);
    relay.stop().await;
}
