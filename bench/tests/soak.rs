//! A short soak: real daemons that restart, clients that hang up, every response checked.
//! The long one is `cloudllm-bench soak --duration 1h` (see the README).

use std::time::Duration;

use cloudllm_bench::soak::{self, Counts};

#[test]
fn a_short_soak_loses_and_misroutes_nothing() {
    let options = soak::Options {
        users: 2,
        devices_per_user: 2,
        workers_per_user: 3,
        disconnect_share: 0.2,
        restart_every: Duration::from_secs(4),
        // The relay in this process: tests of this crate have no relay binary at hand.
        relay_binary: None,
        // Sessions close between a device's requests and reopen all the time.
        session_idle: Duration::from_millis(2),
        ..soak::Options::new(Duration::from_secs(20))
    };
    // The soak bounds itself (duration plus start-up and shutdown limits).
    let outcome = soak::run(&options).expect("the soak ran");
    let counts = &outcome.counts;
    let text = format!("{}\n{:?}", outcome.figures, outcome.failures);
    assert_eq!(Counts::value(&counts.lost), 0, "{text}");
    assert_eq!(Counts::value(&counts.misrouted), 0, "{text}");
    assert!(outcome.passed());
    // The run did what it claims: traffic, deliberate hang-ups and restarts.
    assert!(Counts::value(&counts.completed) >= 50, "{text}");
    assert!(Counts::value(&counts.cut_by_client) >= 1, "{text}");
    assert!(Counts::value(&counts.restarts) >= 2, "{text}");
    assert!(
        outcome.sessions > 2 * 4,
        "sessions closed and reopened on the four devices: {text}"
    );
    assert!(outcome.rss.len() >= 10, "{text}");
    let accounted = Counts::value(&counts.completed)
        + Counts::value(&counts.cut_by_client)
        + Counts::value(&counts.cut_by_restart);
    assert_eq!(accounted, Counts::value(&counts.requests), "{text}");
}
