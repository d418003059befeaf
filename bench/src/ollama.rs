//! The same small-request and streaming runs against a real Ollama, directly and through
//! cloudllm (relay and daemon in this process, as in the tunnel benchmark). Start one with
//! `scripts/real-ollama start` (then `--ollama 127.0.0.1:11535`) or point at any Ollama that has
//! the model [`MODEL`].
//!
//! A real model on a CPU makes a few tokens per second, so the figures here say what cloudllm
//! adds to a real server's answers (status, headers, streaming), not how fast tunnels are.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use crate::client::{self, STEP, Target};
use crate::figures::{Figure, Figures};
use crate::stack::{Handles, Stack};

/// The model asked for: the small one `scripts/real-ollama` installs.
pub const MODEL: &str = "smollm2:135m";

/// Tokens per generation: a real model on a CPU makes a few per second; keep runs short.
const NUM_PREDICT: u32 = 16;

/// Sequential `GET /api/version` per side.
const SMALL_REQUESTS: usize = 200;

/// Generations per side.
const GENERATIONS: usize = 3;

/// Longest pause between a real model's lines: 60 s, for a loaded CPU.
const TOKEN_STALL: Duration = Duration::from_secs(60);

/// Measures the real Ollama at `ollama` directly and through cloudllm.
pub async fn run(
    ollama: SocketAddr,
    handles: &Handles,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let stack = Stack::start(handles, ollama).await?;
    let direct = Target::direct(ollama)?;
    let through = Target::through(stack.relay_addr, &stack.client_token)?;
    let outcome = async {
        for (side, target) in [("direct", &direct), ("through cloudllm", &through)] {
            let latency = crate::load::sequential(target.clone(), 20, SMALL_REQUESTS).await?;
            figures.figures.push(Figure::info(
                "real Ollama",
                format!("GET /api/version p50, {side}"),
                latency.p50.as_secs_f64() * 1e3,
                "ms",
            ));
        }
        for (side, target) in [("direct", &direct), ("through cloudllm", &through)] {
            let (mut first, mut total, mut lines) = (Vec::new(), Vec::new(), 0);
            for _ in 0..GENERATIONS {
                let (f, t, n) = generate(target).await?;
                first.push(f);
                total.push(t);
                lines += n;
            }
            first.sort_unstable();
            total.sort_unstable();
            let ms = |d: &[Duration]| d[d.len() / 2].as_secs_f64() * 1e3;
            figures.figures.extend([
                Figure::info(
                    "real Ollama",
                    format!("generate ({NUM_PREDICT} tokens) first line, {side}"),
                    ms(&first),
                    "ms",
                ),
                Figure::info(
                    "real Ollama",
                    format!("generate ({NUM_PREDICT} tokens) last line, {side}"),
                    ms(&total),
                    "ms",
                ),
                Figure::info(
                    "real Ollama",
                    format!("generate lines per run, {side}"),
                    lines as f64 / GENERATIONS as f64,
                    "lines",
                ),
            ]);
        }
        figures.setup.push(format!(
            "real Ollama at {ollama} (model {MODEL}): {SMALL_REQUESTS} sequential GET \
             /api/version and {GENERATIONS} streamed generates of {NUM_PREDICT} tokens each way; \
             relay and daemon in-process"
        ));
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(err) = stack.stop().await {
        tracing::warn!(error = format!("{err:#}"), "stopping relay and daemon");
    }
    outcome
}

/// One streamed generate: time to the first line, to the last, and the line count. Checks that
/// every line is JSON and that the last says `done`.
async fn generate(target: &Target) -> anyhow::Result<(Duration, Duration, usize)> {
    let mut conn = target.connect().await?;
    let body = serde_json::json!({
        "model": MODEL,
        "prompt": "Say hello.",
        "stream": true,
        "options": { "num_predict": NUM_PREDICT, "temperature": 0 },
    });
    let start = Instant::now();
    let response = conn.start("/api/generate", &body, None).await?;
    let mut text = Vec::new();
    let arrivals = client::read_lines(response, STEP + TOKEN_STALL, |chunk| {
        text.extend_from_slice(chunk);
        Ok(())
    })
    .await?;
    let mut done = false;
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let value: serde_json::Value =
            serde_json::from_slice(line).context("a generate line is not JSON")?;
        done = value["done"] == true;
    }
    anyhow::ensure!(done, "the stream did not end with done: true");
    let first = arrivals.first().context("no lines")?.duration_since(start);
    let last = arrivals.last().context("no lines")?.duration_since(start);
    Ok((first, last, arrivals.len()))
}
