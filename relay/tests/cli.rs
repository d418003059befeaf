//! The `cloudllm-relay` binary as an operator meets it: refusing to start without a secret,
//! dev mode with working tokens, `token issue` (and its refusal on a `[jwks]`-only relay),
//! config errors, and a clean exit on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudllm_proto::Secret;
use cloudllm_relay::{Keys, Scope};
use common::{BIN, Scratch, lines_of, wait_listening};
const SECRET: &str = "cli-test-secret-cli-test-secret-01234";

fn relay() -> Command {
    let mut command = Command::new(BIN);
    command
        .env_remove("CLOUDLLM_RELAY_SECRET")
        .env_remove("CLOUDLLM_RELAY_CONFIG");
    command
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_without_a_secret_refuses_and_says_how_to_set_one() {
    let output = relay()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("CLOUDLLM_RELAY_SECRET") && stderr.contains("--dev"),
        "{stderr}"
    );
}

#[test]
fn token_issue_mints_tokens_the_relay_accepts() {
    let output = relay()
        .env("CLOUDLLM_RELAY_SECRET", SECRET)
        .args([
            "token", "issue", "--user", "u1", "--scope", "client", "--tier", "premium", "--ttl",
            "2h",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let claims = runtime
        .block_on(Keys::new(&Secret::new(SECRET)).verify(token.trim()))
        .unwrap();
    assert_eq!(claims.sub, "u1");
    assert_eq!(claims.scope, Scope::Client.into());
    // One scope, as a plain string, as before.
    let payload = token.trim().split('.').nth(1).unwrap();
    use base64::Engine;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(payload["scope"], "client");
    assert_eq!(claims.string_at("tier"), Some("premium"));
    assert!((7100..=7200).contains(&(claims.exp - claims.iat)));

    let bad_scope = relay()
        .env("CLOUDLLM_RELAY_SECRET", SECRET)
        .args(["token", "issue", "--user", "u1", "--scope", "root"])
        .output()
        .unwrap();
    assert!(!bad_scope.status.success());
    assert!(String::from_utf8_lossy(&bad_scope.stderr).contains("--scope"));
}

#[test]
fn token_issue_on_a_jwks_only_relay_says_it_cannot() {
    let dir = Scratch::new();
    let path = dir.write(
        "relay.toml",
        "[jwks]\nurl = \"https://idp.example.com/jwks\"\nissuer = \"https://idp.example.com\"\naudience = \"cloudllm\"\n",
    );
    let output = relay()
        .args([
            "token", "issue", "--user", "u1", "--scope", "agent", "--config",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("[jwks]") && stderr.contains("CLOUDLLM_RELAY_SECRET"),
        "{stderr}"
    );
}

#[test]
fn config_file_errors_name_the_file_and_the_key() {
    let dir = Scratch::new();
    let path = dir.write(
        "relay.toml",
        "listen = \"127.0.0.1:0\"\nmax_body_byte = 5\n",
    );
    let output = relay()
        .env("CLOUDLLM_RELAY_SECRET", SECRET)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("relay.toml") && stderr.contains("max_body_byte"),
        "{stderr}"
    );
}

#[test]
fn dev_mode_prints_working_tokens_and_sigterm_stops_it_cleanly() {
    let mut child = relay()
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut curl_line = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line.contains("curl -H") {
            curl_line = Some(line);
            break;
        }
    }
    let line = curl_line.expect("dev mode prints a curl line");
    let token = line
        .split("Bearer ")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap()
        .to_owned();
    let url = line.rsplit(' ').next().unwrap().to_owned();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(get_status(&url, &token));
    // No daemon is connected: the token was accepted and the relay says the device is offline.
    assert_eq!(status, 503, "{url}");

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}

#[test]
fn dev_mode_with_nobody_reading_its_output_keeps_serving_and_stops_on_sigterm() {
    // `serve --dev | head -1`: standard output is a pipe whose reader has gone. Reading end
    // dropped before the relay starts, so its first write meets EPIPE for certain.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = relay()
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines_rx = lines_of(child.stderr.take().expect("a piped log"));
    let (addr, seen) = wait_listening(&lines_rx, Duration::from_secs(10));
    // Still serving after its dev text met the closed pipe.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let health = runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    });
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    // The relay has exited: its log ends, and so does this.
    let rest: Vec<String> = lines_rx.iter().collect();
    assert!(
        !seen.iter().chain(&rest).any(|l| l.contains("panicked")),
        "{seen:#?} {rest:#?}"
    );
    // Standard error is a pipe here, as under journald or in a file: no colour codes.
    assert!(
        !seen.iter().chain(&rest).any(|l| l.contains('\x1b')),
        "{seen:#?} {rest:#?}"
    );
    assert!(status.success(), "exit status {status}");
}

/// A GET with a bearer token over a plain TCP socket, returning the status code.
async fn get_status(url: &str, token: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!(
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response.split(' ').nth(1).unwrap().parse().unwrap()
}

#[test]
fn check_config_accepts_a_good_file_and_names_what_is_wrong_in_a_bad_one() {
    let dir = Scratch::new();
    let good = dir.write(
        "good.toml",
        "listen = \"0.0.0.0:9000\"\naudit_log = \"-\"\n",
    );
    let output = relay()
        .env("CLOUDLLM_RELAY_SECRET", SECRET)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("ok") && text.contains("0.0.0.0:9000") && text.contains("own HS256 secret"),
        "{text}"
    );

    // Without a secret: refused, saying how to set one.
    let output = relay().arg("check-config").arg(&good).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("CLOUDLLM_RELAY_SECRET"));

    let bad = dir.write(
        "bad.toml",
        "[jwks]\nurl = \"ftp://idp\"\nissuer = \"x\"\naudience = \"y\"\n",
    );
    let output = relay()
        .env("CLOUDLLM_RELAY_SECRET", SECRET)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("[jwks]"), "{err}");
}
