//! HTTP for tests: a client that pools nothing across tests, requests bounded by [`STEP`], a
//! daemon's tunnel upgrade request, and readers of streamed responses that say how they ended.

use crate::{STEP, TestRelay};

/// An HTTP client that never pools connections across tests and has no proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()
        .expect("http client")
}

/// Sends `request`, bounded by [`STEP`]; panics if it gets no response.
pub async fn send(request: reqwest::RequestBuilder) -> reqwest::Response {
    tokio::time::timeout(STEP, request.send())
        .await
        .expect("request timed out")
        .expect("request")
}

/// Sends `request` and reads its answer as JSON.
pub async fn send_for_json(request: reqwest::RequestBuilder) -> serde_json::Value {
    tokio::time::timeout(STEP, send(request).await.json())
        .await
        .expect("response body timed out")
        .expect("a JSON answer")
}

/// Sends `request` and reads its answer to the end, all bounded by [`STEP`]; asserts that it
/// was served (200), saying `what` was not.
pub async fn served(request: reqwest::RequestBuilder, what: &str) {
    let response = send(request).await;
    assert_eq!(response.status(), 200, "{what}");
    tokio::time::timeout(STEP, response.bytes())
        .await
        .expect("response body timed out")
        .expect("the response body");
}

/// The next chunk of a streamed answer, `None` at its end; panics if none comes within
/// [`STEP`] or the stream fails.
pub async fn next_chunk(response: &mut reqwest::Response) -> Option<bytes::Bytes> {
    tokio::time::timeout(STEP, response.chunk())
        .await
        .expect("no chunk within the step")
        .expect("the stream")
}

/// A daemon's tunnel upgrade request to `relay` (a WebSocket upgrade at this protocol version),
/// as device `device_id` named `device_name`, without a token yet.
pub fn tunnel_upgrade(
    http: &reqwest::Client,
    relay: &TestRelay,
    device_id: &str,
    device_name: &str,
) -> reqwest::RequestBuilder {
    http.get(relay.api("/tunnel"))
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, "websocket")
        .header(http::header::SEC_WEBSOCKET_VERSION, "13")
        .header(http::header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
        .header(
            cloudllm_proto::HEADER_PROTOCOL,
            cloudllm_proto::PROTOCOL_VERSION.to_string(),
        )
        .header(cloudllm_proto::HEADER_DEVICE_ID, device_id)
        .header(cloudllm_proto::HEADER_DEVICE_NAME, device_name)
}

/// An HTTP client whose connections come from the loopback address `from`: all of 127/8 is
/// loopback on Linux, so each address acts as another client (for per-address limits).
pub fn client_from(from: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(
            from.parse::<std::net::IpAddr>()
                .expect("a loopback address"),
        )
        .timeout(STEP)
        .build()
        .expect("http client")
}

/// The WebSocket request a daemon opens its tunnel with, for tests that play the daemon
/// themselves: `user`'s agent token, this protocol version, and device `device_id` named
/// `device_name`.
pub fn tunnel_ws_request(
    relay: &TestRelay,
    user: &str,
    device_id: &str,
    device_name: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("ws://{}{}", relay.relay.addr, cloudllm_proto::TUNNEL_PATH);
    let mut request = url.into_client_request().expect("tunnel request");
    let headers = request.headers_mut();
    let header = |value: String| value.parse().expect("a header value");
    let bearer = format!(
        "Bearer {}",
        crate::token(user, cloudllm_relay::Scope::Agent)
    );
    headers.insert(http::header::AUTHORIZATION, header(bearer));
    headers.insert(
        cloudllm_proto::HEADER_PROTOCOL,
        header(cloudllm_proto::PROTOCOL_VERSION.to_string()),
    );
    headers.insert(
        cloudllm_proto::HEADER_DEVICE_ID,
        header(device_id.to_owned()),
    );
    headers.insert(
        cloudllm_proto::HEADER_DEVICE_NAME,
        header(device_name.to_owned()),
    );
    request
}

/// Asserts that `response` is a refusal with `status` and an error in Ollama's shape
/// (`{"error": "..."}`) that says `says`.
pub async fn assert_ollama_error(response: reqwest::Response, status: u16, says: &str) {
    assert_eq!(response.status(), status, "refused with {status}");
    let body: serde_json::Value = tokio::time::timeout(STEP, response.json())
        .await
        .expect("error body timed out")
        .expect("an error body in JSON");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains(says), "the error says {says:?}: {body}");
}

/// Reads a response until it ends; gives the bytes and whether it ended cleanly (a stream cut
/// by a fault must end with an error, never look complete). Panics if it neither ends nor
/// fails within [`STEP`].
pub async fn read_to_end(mut response: reqwest::Response) -> (Vec<u8>, Result<(), reqwest::Error>) {
    let mut buf = Vec::new();
    let outcome = tokio::time::timeout(STEP, async {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                Ok(None) => return Ok(()),
                Err(err) => return Err(err),
            }
        }
    })
    .await
    .expect("the response neither ended nor failed");
    (buf, outcome)
}

/// Reads a streamed NDJSON response to its end, noting when each line arrived (every read
/// bounded by [`STEP`]).
pub async fn timed_lines(
    mut response: reqwest::Response,
) -> Vec<(tokio::time::Instant, serde_json::Value)> {
    let mut buf = Vec::new();
    let mut received = Vec::new();
    while let Some(chunk) = tokio::time::timeout(STEP, response.chunk())
        .await
        .expect("a line within the step")
        .expect("the stream")
    {
        let now = tokio::time::Instant::now();
        buf.extend_from_slice(&chunk);
        for line in take_lines(&mut buf) {
            received.push((now, line));
        }
    }
    received
}

/// Splits a byte buffer into complete NDJSON lines, keeping the unfinished tail in `buf`.
pub fn take_lines(buf: &mut Vec<u8>) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    while let Some(end) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=end).collect();
        let text = &line[..line.len() - 1];
        if !text.is_empty() {
            lines.push(serde_json::from_slice(text).expect("an NDJSON line"));
        }
    }
    lines
}
