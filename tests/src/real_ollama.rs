//! The genuine Ollama server, for the tests that check the tunnel against the real thing:
//! `scripts/real-ollama start` installs it into the user's cache on first use and starts it (or
//! finds it running). `CLOUDLLM_REAL_OLLAMA_URL` points at one already running instead;
//! `CLOUDLLM_SKIP_REAL_OLLAMA=1` skips those tests knowingly. Otherwise a failure to start is a
//! test failure (they must run in CI), with the script's message saying what is missing.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::timeout;
use url::Url;

/// The model the script registers: SmolLM2-135M, quick on a CPU. It writes nonsense, so tests
/// check the protocol, never the words.
pub const MODEL: &str = "smollm2:135m";

/// The first start installs the server (about a minute); later starts take seconds.
const START_TIMEOUT: Duration = Duration::from_secs(600);

static OLLAMA: OnceCell<Option<Url>> = OnceCell::const_new();

/// The script that runs the server.
fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/real-ollama")
}

/// The server's base URL, started once per test binary; `None` (said on stderr) with
/// `CLOUDLLM_SKIP_REAL_OLLAMA=1`.
pub async fn url() -> Option<Url> {
    OLLAMA
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("CLOUDLLM_REAL_OLLAMA_URL") {
                return Some(Url::parse(&url).expect("CLOUDLLM_REAL_OLLAMA_URL is a URL"));
            }
            if std::env::var("CLOUDLLM_SKIP_REAL_OLLAMA").as_deref() == Ok("1") {
                eprintln!("skipping: CLOUDLLM_SKIP_REAL_OLLAMA=1");
                return None;
            }
            let tool = script();
            let start = tokio::process::Command::new(&tool).arg("start").output();
            let output = timeout(START_TIMEOUT, start)
                .await
                .expect("scripts/real-ollama start timed out")
                .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
            assert!(
                output.status.success(),
                "scripts/real-ollama start failed (CLOUDLLM_SKIP_REAL_OLLAMA=1 skips the tests that need it): {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let stdout = String::from_utf8_lossy(&output.stdout);
            let url = stdout
                .lines()
                .last()
                .expect("real-ollama printed its URL")
                .trim();
            Some(Url::parse(url).expect("real-ollama URL"))
        })
        .await
        .clone()
}

/// The server's log, when the script started the server at `ollama` (its GIN lines show when
/// each request ended): `None` for a server started elsewhere.
pub fn log(ollama: &Url) -> Option<PathBuf> {
    let output = std::process::Command::new(script())
        .arg("path")
        .output()
        .ok()?;
    let cache = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let log = std::path::Path::new(&cache).join(format!("serve-{}.log", ollama.port()?));
    log.exists().then_some(log)
}
