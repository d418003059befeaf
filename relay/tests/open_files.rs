//! The relay and its descriptor budget: the systemd unit gives it room for its tunnels and
//! clients beyond the cap on unauthenticated connections, and a relay started under a low
//! open-file limit lowers that cap to half the limit and says so.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use cloudllm_relay::RelayConfig;
use common::{BIN, lines_of, wait_listening, with_piped_log};

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
    let mut child = with_piped_log(Command::new("sh").args([
        "-c",
        "ulimit -n 256 && exec \"$0\" serve --listen 127.0.0.1:0 --dev",
        BIN,
    ]))
    .env_remove("CLOUDLLM_RELAY_SECRET")
    .env_remove("CLOUDLLM_RELAY_CONFIG")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .spawn()
    .expect("the relay starts");
    let log = lines_of(child.stderr.take().expect("a piped log"));
    let (_, before) = wait_listening(&log, Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let warning = before
        .into_iter()
        .find(|line| line.contains("max_unauthenticated_connections is above half"))
        .expect("a warning before the relay listens");
    assert!(
        warning.contains("lowered_to=128") && warning.contains("open_files=256"),
        "{warning}"
    );
    assert!(warning.contains("LimitNOFILE"), "it says how: {warning}");
}
