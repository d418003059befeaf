//! Keepalive before the first token: every connection the relay accepts carries TCP keepalive
//! with the configured interval, so a request waiting a long time for its first byte keeps its
//! NAT and firewall state (the relay sends nothing invented meanwhile). Read from the kernel
//! with `ss` (iproute2).

use std::time::Duration;

use cloudllm_e2e::{STEP, TestRelay, init_logs, relay_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_connections_have_tcp_keepalive_at_the_configured_interval() {
    init_logs();
    let mut config = relay_config();
    config.tcp_keepalive = Duration::from_secs(120);
    let relay = TestRelay::start(config).await;
    let port = relay.relay.addr.port();
    // An idle connection, like one whose request waits for a model to load.
    let _idle = tokio::net::TcpStream::connect(relay.relay.addr)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let out = std::process::Command::new("ss")
            .args([
                "-tnoH",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ])
            .output()
            .expect("ss (Debian package iproute2) is installed");
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(timer) = text.lines().find_map(|l| l.split("timer:(").nth(1)) {
            // timer:(keepalive,1min59sec,0), or keepalive,2min,0 when ss reads it in the same
            // tick the relay set it: the first probe is due within the interval (and not at the
            // kernel's default of 2 hours, `120min`).
            assert!(
                timer.starts_with("keepalive,1min") || timer.starts_with("keepalive,2min,"),
                "{text}"
            );
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no keepalive timer on the relay's side of the connection: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
