//! The reference paths of `cloudllm-bench compare` as real processes: requests and streams go
//! through them, and the per-process counters see each process do the work.

use std::net::SocketAddr;
use std::time::Duration;

use cloudllm_bench::counters::{self, Snapshot, Source};
use cloudllm_bench::paths::{self, Running, hyper_proxy, nginx};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Bound on each exchange through a path: far above what loopback needs.
const LIMIT: Duration = Duration::from_secs(20);

/// Requests sent while counting.
const REQUESTS: u64 = 300;

async fn backend() -> (SocketAddr, CancellationToken) {
    let stop = CancellationToken::new();
    let addr = timeout(LIMIT, cloudllm_bench::backend::serve(stop.clone()))
        .await
        .expect("backend started in time")
        .expect("backend started");
    (addr, stop)
}

/// Sends requests and a stream through `path`; every one of its processes used CPU and made
/// read/write system calls and context switches for them, and the counters say so.
async fn carries_requests_and_is_counted(path: Running) {
    let sources: Vec<(String, Source)> = path
        .processes
        .iter()
        .map(|p| {
            let pid = p.pid().expect("the process runs");
            (
                p.label.clone(),
                Source::Processes(counters::process_ids(pid)),
            )
        })
        .collect();
    assert_eq!(sources.len(), 2, "two processes per path");
    let before: Vec<Snapshot> = sources.iter().map(|(_, s)| Snapshot::take(s)).collect();
    timeout(LIMIT, async {
        let mut conn = path.target.connect().await.unwrap();
        for _ in 0..REQUESTS {
            conn.version().await.unwrap();
        }
        let lines = conn.generate(200, Duration::ZERO).await.unwrap();
        assert_eq!(lines.len(), 200);
    })
    .await
    .expect("requests through the path finished");
    for ((label, source), before) in sources.iter().zip(&before) {
        let spent = Snapshot::take(source).since(before);
        assert!(spent.cpu_ns > 0, "{label}: {spent:?}");
        assert!(
            spent.voluntary > 0,
            "{label} waited for its sockets: {spent:?}"
        );
        // Each request is written on at least once by each hop (write/writev/sendmsg count as
        // syscw only for write and writev; both servers here use them).
        assert!(spent.syscr + spent.syscw > 0, "{label}: {spent:?}");
    }
    let pids: Vec<u32> = path.processes.iter().filter_map(|p| p.pid()).collect();
    path.stop().await;
    for pid in pids {
        assert!(
            Snapshot::take(&Source::Processes(vec![pid])).is_empty(),
            "process {pid} was stopped"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hyper_proxy_processes() {
    let (backend, stop) = backend().await;
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cloudllm-bench-proxy"));
    let path = timeout(LIMIT * 2, hyper_proxy::start_pair(binary, backend))
        .await
        .expect("proxies started in time")
        .expect("proxies started");
    carries_requests_and_is_counted(path).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nginx_where_installed() {
    let Some(binary) = paths::find_tool("nginx", None, &nginx::extra_dirs()) else {
        eprintln!("nginx not installed: skipped");
        return;
    };
    let (backend, stop) = backend().await;
    let path = timeout(LIMIT * 2, nginx::start_pair(&binary, backend))
        .await
        .expect("nginx started in time")
        .expect("nginx started");
    // The master and its workers are one process in the figures.
    let pid = path.processes[0].pid().unwrap();
    assert!(
        counters::process_ids(pid).len() >= 2,
        "nginx's workers are found beside its master"
    );
    carries_requests_and_is_counted(path).await;
    stop.cancel();
}
