//! The relay and its descriptor budget: the systemd unit gives it room for its tunnels and
//! clients beyond the cap on unauthenticated connections, and a relay started under a low
//! open-file limit lowers that cap to half the limit and says so.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use cloudllm_relay::RelayConfig;

const BIN: &str = env!("CARGO_BIN_EXE_cloudllm-relay");

const RELAY_UNIT: &str = include_str!("../../systemd/cloudllm-relay.service");

/// Tunnels one relay is sized for (see the architecture notes: ~10,000 idle tunnels per relay).
const TUNNELS: u64 = 10_000;

#[test]
fn the_unit_gives_room_for_tunnels_and_twice_the_unauthenticated_cap() {
    let limit: u64 = RELAY_UNIT
        .lines()
        .find_map(|line| line.trim().strip_prefix("LimitNOFILE="))
        .expect("the relay's unit sets LimitNOFILE (its system-call filter stops it raising it)")
        .parse()
        .expect("one number: soft and hard limit alike");
    let cap = u64::from(RelayConfig::default().max_unauthenticated_connections);
    assert!(
        limit >= TUNNELS + 2 * cap,
        "LimitNOFILE={limit} leaves too little beside {cap} unauthenticated connections"
    );
}

#[test]
fn under_a_low_open_file_limit_the_cap_is_lowered_with_a_warning() {
    // The shell's `ulimit` sets the soft limit for the relay it then becomes.
    let mut child = Command::new("sh")
        .args([
            "-c",
            "ulimit -n 256 && exec \"$0\" serve --listen 127.0.0.1:0 --dev",
            BIN,
        ])
        .env_remove("CLOUDLLM_RELAY_SECRET")
        .env_remove("CLOUDLLM_RELAY_CONFIG")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the relay starts");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut warning = None;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        if line.contains("max_unauthenticated_connections is above half") {
            warning = Some(line);
        } else if line.contains("relay listening") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let warning = warning.expect("a warning before the relay listens");
    assert!(
        warning.contains("lowered_to=128") && warning.contains("open_files=256"),
        "{warning}"
    );
    assert!(warning.contains("LimitNOFILE"), "it says how: {warning}");
}
