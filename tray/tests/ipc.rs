//! The tray's IPC side without a display: against a real daemon (in this process, tunnelled to
//! a real relay on loopback) and against a socket where no daemon listens.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudllm_e2e::{
    STEP, Stack, TestDaemon, daemon_config, init_logs, relay_config, wait_for_socket,
};
use cloudllm_proto::ipc::Connection;
use cloudllm_relay::RelayConfig;
use cloudllm_tray::daemon::{
    Event, REDIAL, perform, save_logs, sign_in_link, spawn, watch, web_page,
};
use cloudllm_tray::menu::Action;
use cloudllm_tray::view::TrayState;

/// Runs [`watch`] until `done` holds for the states it published; returns them.
async fn watch_until(
    socket: &std::path::Path,
    done: impl Fn(&[TrayState]) -> bool,
) -> Vec<TrayState> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let publish = {
        let seen = seen.clone();
        move |state| seen.lock().expect("lock").push(state)
    };
    let deadline = tokio::time::Instant::now() + STEP;
    let watcher = watch(socket, &publish);
    tokio::pin!(watcher);
    loop {
        tokio::select! {
            () = &mut watcher => unreachable!("watch never returns"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let states = seen.lock().expect("lock").clone();
        if done(&states) {
            return states;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never got there: {states:?}"
        );
    }
}

fn connected(state: &TrayState) -> bool {
    matches!(state, TrayState::Daemon(status) if matches!(status.connection, Connection::Connected { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn menu_actions_reach_the_daemon_and_logs_land_in_a_file() {
    init_logs();
    let stack = Stack::start().await;

    let states = watch_until(&stack.socket, |states| states.iter().any(connected)).await;
    let TrayState::Daemon(status) = states.iter().find(|s| connected(s)).expect("connected") else {
        unreachable!()
    };
    assert_eq!(status.user.as_deref(), Some("alice"));
    assert_eq!(status.device_name, "laptop");

    perform(&stack.socket, Action::Disconnect)
        .await
        .expect("disconnect");
    stack.relay.wait_for_devices("alice", 0).await;
    perform(&stack.socket, Action::Connect)
        .await
        .expect("connect");
    stack.relay.wait_for_devices("alice", 1).await;

    let file = cloudllm_e2e::scratch_dir().join("cache/daemon-log.txt");
    let written = save_logs(&stack.socket, &file).await.expect("save logs");
    assert_eq!(written, file);
    let text = std::fs::read_to_string(&file).expect("the log file");
    assert!(text.contains("tunnel up"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    stack.daemon.stop().await.expect("daemon stop");
    stack.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_web_page_is_looked_up_once_connected() {
    let page = "https://relay.example.com/account";
    let stack = Stack::with_relay_config(RelayConfig {
        web_url: Some(page.parse().expect("URL")),
        ..relay_config()
    })
    .await;
    assert_eq!(web_page(&stack.socket).await.as_deref(), Some(page));

    // The IPC thread asks by itself once it sees the tunnel up.
    let events = Arc::new(Mutex::new(Vec::new()));
    let _actions = spawn(stack.socket.clone(), {
        let events = events.clone();
        move |event| events.lock().expect("lock").push(event)
    })
    .expect("IPC thread");
    let deadline = tokio::time::Instant::now() + STEP;
    while !events
        .lock()
        .expect("lock")
        .contains(&Event::WebPage(Some(page.to_owned())))
    {
        assert!(tokio::time::Instant::now() < deadline, "{events:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.daemon.stop().await.expect("daemon stop");
    stack.relay.stop().await;

    // A relay without a page: none.
    let stack = Stack::start().await;
    assert_eq!(web_page(&stack.socket).await, None);
    stack.daemon.stop().await.expect("daemon stop");
    stack.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_web_page_gets_a_one_time_link_to_the_relays_own_page() {
    let Stack {
        relay,
        backend,
        daemon,
        socket,
        ..
    } = Stack::start().await;

    let link = sign_in_link(&socket).await.expect("a link");
    let (page, code) = link.expose().split_once("#open=").expect("a code");
    assert_eq!(page, relay.url().as_str());
    // It signs a browser in, once: what the page does with it.
    assert_eq!(relay.exchange_open_code(code).await.status(), 200);
    assert_eq!(
        relay.exchange_open_code(code).await.status(),
        401,
        "a link works once"
    );

    // Logged out, the daemon says so instead.
    perform(&socket, Action::Disconnect)
        .await
        .expect("disconnect");
    daemon.stop().await.expect("daemon stop");
    let mut config = daemon_config(&relay.url(), "alice", "laptop", &backend.url());
    config.token = None;
    let socket = config.socket_path.clone().expect("socket");
    let daemon = TestDaemon::start(config);
    wait_for_socket(&socket).await;
    let refused = sign_in_link(&socket).await;
    assert_eq!(
        refused.err().as_deref(),
        Some("not logged in: run `cloudllm login --relay URL` first")
    );
    daemon.stop().await.expect("daemon stop");
    relay.stop().await;
}

#[tokio::test]
async fn a_missing_daemon_is_a_state_and_is_dialled_again() {
    let socket = cloudllm_e2e::scratch_dir().join("nobody.sock");
    let started = tokio::time::Instant::now();
    let states = watch_until(&socket, |states| states.len() >= 2).await;
    for state in &states {
        let TrayState::NoDaemon { reason } = state else {
            panic!("{state:?}");
        };
        assert_eq!(reason, &format!("no socket at {}", socket.display()));
    }
    assert!(started.elapsed() >= REDIAL, "the second dial waited");

    let refused = perform(&socket, Action::Disconnect)
        .await
        .expect_err("no daemon");
    assert!(refused.contains("not running"), "{refused}");
}
