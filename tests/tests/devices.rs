//! Several devices of one user: the relay learns each device's models (at connect and when the
//! daemon reports a change), merges them in `/api/tags` and `/v1/models`, and routes a request
//! to the device named by `x-cloudllm-device`, else to a device that has the model, least busy
//! first; 404 in the API's shape when none has it.

use std::collections::BTreeSet;
use std::time::Duration;

use cloudllm_e2e::{
    FakeOllama, STEP, TestDaemon, TestRelay, client, daemon_config, relay_config, token,
};
use cloudllm_relay::Scope;

struct TwoDevices {
    relay: TestRelay,
    laptop: FakeOllama,
    desktop: FakeOllama,
    _daemons: (TestDaemon, TestDaemon),
}

async fn two_devices() -> TwoDevices {
    let relay = TestRelay::start(relay_config()).await;
    let laptop = FakeOllama::start().await;
    laptop.set_models(&["llama3.2:latest", "shared:7b"]);
    let desktop = FakeOllama::start().await;
    desktop.set_models(&["qwen2.5:latest", "shared:7b"]);
    let daemons = (
        TestDaemon::start(daemon_config(
            &relay.url(),
            "alice",
            "laptop",
            &laptop.url(),
        )),
        TestDaemon::start(daemon_config(
            &relay.url(),
            "alice",
            "desktop",
            &desktop.url(),
        )),
    );
    relay.wait_for_devices("alice", 2).await;
    relay
        .wait_for_models("alice", "laptop", &["llama3.2:latest", "shared:7b"])
        .await;
    relay
        .wait_for_models("alice", "desktop", &["qwen2.5:latest", "shared:7b"])
        .await;
    TwoDevices {
        relay,
        laptop,
        desktop,
        _daemons: daemons,
    }
}

impl TwoDevices {
    fn post(&self, path: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
        client()
            .post(self.relay.api(path))
            .bearer_auth(token("alice", Scope::Client))
            .json(&body)
    }

    /// Which fake served a quick generate of `model` (with `device` named, if any).
    async fn served_by(&self, model: &str, device: Option<&str>) -> &'static str {
        let (laptop, desktop) = (
            self.laptop.records.hit_count(),
            self.desktop.records.hit_count(),
        );
        let mut request = self.post(
            "/api/generate",
            serde_json::json!({"model": model, "prompt": "p", "options": {"num_predict": 1}}),
        );
        if let Some(device) = device {
            request = request.header(cloudllm_proto::HEADER_DEVICE, device);
        }
        let response = tokio::time::timeout(STEP, request.send())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 200, "{model}");
        response.bytes().await.unwrap();
        match (
            self.laptop.records.hit_count() - laptop,
            self.desktop.records.hit_count() - desktop,
        ) {
            (1, 0) => "laptop",
            (0, 1) => "desktop",
            other => panic!("{model} reached {other:?} devices"),
        }
    }
}

fn names(list: &serde_json::Value, field: &str, key: &str) -> BTreeSet<String> {
    list[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {list}"))
        .iter()
        .map(|m| m[key].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_lists_are_merged_across_devices() {
    let devices = two_devices().await;
    let expected: BTreeSet<String> = ["llama3.2:latest", "qwen2.5:latest", "shared:7b"]
        .map(String::from)
        .into();
    let tags: serde_json::Value = devices
        .relay
        .get_as("alice", "/api/tags")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(names(&tags, "models", "name"), expected);
    assert_eq!(
        tags["models"].as_array().unwrap().len(),
        3,
        "shared:7b once"
    );
    let models: serde_json::Value = devices
        .relay
        .get_as("alice", "/v1/models")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(names(&models, "data", "id"), expected);

    // With the device named, only that device's list.
    let laptop: serde_json::Value = client()
        .get(devices.relay.api("/api/tags"))
        .bearer_auth(token("alice", Scope::Client))
        .header(cloudllm_proto::HEADER_DEVICE, "laptop")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        names(&laptop, "models", "name"),
        ["llama3.2:latest", "shared:7b"].map(String::from).into()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_a_device_that_has_the_model() {
    let devices = two_devices().await;
    assert_eq!(devices.served_by("llama3.2", None).await, "laptop");
    assert_eq!(devices.served_by("llama3.2:latest", None).await, "laptop");
    assert_eq!(devices.served_by("qwen2.5", None).await, "desktop");
    // The header wins over the model.
    assert_eq!(
        devices.served_by("llama3.2", Some("desktop")).await,
        "desktop"
    );

    // No device has it: 404 in each API's shape.
    let missing = devices
        .post(
            "/api/generate",
            serde_json::json!({"model": "nope", "prompt": "p"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("\"nope\"") && message.contains("laptop"),
        "{message}"
    );
    let missing = devices
        .post(
            "/v1/chat/completions",
            serde_json::json!({"model": "nope", "messages": []}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert!(body["error"]["message"].as_str().is_some(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_on_both_devices_goes_to_the_least_busy() {
    let devices = two_devices().await;
    for (busy, fake, other) in [
        ("laptop", &devices.laptop, "desktop"),
        ("desktop", &devices.desktop, "laptop"),
    ] {
        let tag = format!("busy-{busy}");
        let long = devices
            .post(
                "/api/generate",
                serde_json::json!({
                    "model": "shared:7b", "prompt": tag,
                    "options": {"num_predict": 100}, "fake_interval_ms": 50
                }),
            )
            .header(cloudllm_proto::HEADER_DEVICE, busy)
            .send()
            .await
            .unwrap();
        assert_eq!(long.status(), 200);
        for _ in 0..3 {
            assert_eq!(devices.served_by("shared:7b", None).await, other);
        }
        drop(long);
        fake.records.wait_end(&tag).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_change_reported_by_the_daemon_reroutes() {
    let devices = two_devices().await;
    devices
        .laptop
        .set_models(&["llama3.2:latest", "new:latest", "shared:7b"]);
    // The daemon notices at its next poll of Ollama and tells the relay.
    devices
        .relay
        .wait_for_models(
            "alice",
            "laptop",
            &["llama3.2:latest", "new:latest", "shared:7b"],
        )
        .await;
    assert_eq!(devices.served_by("new", None).await, "laptop");
    devices.desktop.set_models(&[]);
    devices.relay.wait_for_models("alice", "desktop", &[]).await;
    let missing = devices
        .post(
            "/api/generate",
            serde_json::json!({"model": "qwen2.5", "prompt": "p"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    tokio::time::sleep(Duration::ZERO).await;
}
