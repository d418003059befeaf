//! `cloudllm-bench web`: the web page's figures in headless Chromium, through the DevTools
//! protocol (`web/e2e/bench.mjs`, playwright-core): first-load bytes as sent (compressed), the
//! time to open a 500-message conversation (target ≤ 300 ms) and the main thread's busy time
//! per token while a 2,000-token answer streams in (target ≤ 2 ms). The page talks to a real
//! relay and daemon (this process's); the model is the script's fake, which streams canned
//! tokens every 2 ms so that rendering, not the model, is what is measured.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use cloudllm_bench::stack::{Runtimes, Stack};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The whole browser run: three measurements, the stream taking about 5 s.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Budgets from the issue, printed next to the figures.
const FIRST_LOAD_BUDGET: u64 = 150 * 1024;
const OPEN_BUDGET_MS: f64 = 300.0;
const PER_TOKEN_BUDGET_MS: f64 = 2.0;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the measurement and returns the figures as text and JSON.
pub fn run() -> anyhow::Result<(String, serde_json::Value)> {
    let runtimes = Runtimes::new()?;
    let handles = runtimes.handles();
    let result = runtimes.load.block_on(async {
        let script = repo().join("web/e2e/bench.mjs");
        anyhow::ensure!(
            repo().join("web/node_modules/playwright-core").exists(),
            "the web benchmark needs the page's packages: run `npm ci --prefix web`"
        );
        let chromium =
            std::env::var("CLOUDLLM_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut child = tokio::process::Command::new("node")
            .arg(&script)
            .current_dir(repo().join("web"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("running node (Debian: apt-get install nodejs)")?;
        let mut stdout = BufReader::new(child.stdout.take().context("node's stdout")?).lines();
        let mut stdin = child.stdin.take().context("node's stdin")?;
        let first = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .context("the benchmark script did not start")??
            .context("the benchmark script ended at once")?;
        let backend = first
            .strip_prefix("ollama http://")
            .context("the benchmark script's first line names its fake Ollama")?
            .parse()
            .context("the fake Ollama's address")?;
        let stack = Stack::start(&handles, backend).await?;
        let hello = serde_json::json!({
            "relay": format!("http://{}", stack.relay_addr),
            "token": stack.client_token,
            "chromium": chromium,
        });
        stdin.write_all(format!("{hello}\n").as_bytes()).await?;
        stdin.flush().await?;
        let figures = tokio::time::timeout(RUN_TIMEOUT, stdout.next_line())
            .await
            .context("the browser run timed out")??
            .context("the benchmark script ended without figures (see its errors above)")?;
        let _ = child.wait().await;
        stack.stop().await?;
        let json: serde_json::Value =
            serde_json::from_str(&figures).with_context(|| format!("figures: {figures}"))?;
        Ok(json)
    });
    runtimes.shutdown();
    let json = result?;
    let Some(bytes) = json["first_load_bytes"].as_u64() else {
        bail!("no first-load figure in {json}");
    };
    let open = json["open_500_ms"].as_f64().unwrap_or(f64::NAN);
    let per_token = json["main_thread_ms_per_token"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let verdict = |ok: bool| if ok { "within budget" } else { "OVER BUDGET" };
    let text = format!(
        "web page (headless Chromium, DevTools protocol)\n\
         first load, compressed:            {:>8.1} KiB  (budget {} KiB: {})\n\
         open a 500-message conversation:   {:>8.1} ms   (budget {OPEN_BUDGET_MS} ms: {})\n\
         main thread per streamed token:    {:>8.3} ms   (budget {PER_TOKEN_BUDGET_MS} ms: {}; script {:.3} ms; {} tokens in {} ms)\n",
        bytes as f64 / 1024.0,
        FIRST_LOAD_BUDGET / 1024,
        verdict(bytes <= FIRST_LOAD_BUDGET),
        open,
        verdict(open <= OPEN_BUDGET_MS),
        per_token,
        verdict(per_token <= PER_TOKEN_BUDGET_MS),
        json["script_ms_per_token"].as_f64().unwrap_or(f64::NAN),
        json["stream_tokens"],
        json["stream_ms"],
    );
    Ok((text, json))
}
