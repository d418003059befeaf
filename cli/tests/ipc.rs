//! The daemon's IPC socket under misuse: garbage, oversized lines, the wrong version, another
//! user, and a socket file left behind by a dead daemon.

#![cfg(unix)]

use std::path::Path;
use std::time::Duration;

use cloudllm_cli::Client;
use cloudllm_e2e::{FakeOllama, STEP, TestDaemon, TestRelay, daemon_config, relay_config};
use cloudllm_proto::ipc::{self, ErrorCode, IPC_VERSION, Request, Response};
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::tokio::Stream as _;
use interprocess::local_socket::{GenericFilePath, ToFsName};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_cloudllm");

async fn start_daemon(system: bool) -> (TestRelay, FakeOllama, TestDaemon, std::path::PathBuf) {
    start_daemon_with_group(system, None).await
}

async fn start_daemon_with_group(
    system: bool,
    operator_group: Option<&str>,
) -> (TestRelay, FakeOllama, TestDaemon, std::path::PathBuf) {
    let relay = TestRelay::start(relay_config()).await;
    let backend = FakeOllama::start().await;
    let mut config = daemon_config(&relay.url(), "alice", "laptop", &backend.url());
    config.system = system;
    config.operator_group = operator_group.map(str::to_owned);
    let socket = config.socket_path.clone().unwrap();
    let daemon = TestDaemon::start(config);
    relay.wait_for_devices("alice", 1).await;
    (relay, backend, daemon, socket)
}

/// A raw connection: lines in, lines out.
async fn raw(
    socket: &Path,
) -> (
    BufReader<tokio::io::ReadHalf<Stream>>,
    tokio::io::WriteHalf<Stream>,
) {
    let stream = Stream::connect(socket.to_fs_name::<GenericFilePath>().unwrap())
        .await
        .unwrap();
    let (reader, writer) = tokio::io::split(stream);
    (BufReader::new(reader), writer)
}

async fn read_response(reader: &mut BufReader<tokio::io::ReadHalf<Stream>>) -> Option<Response> {
    let mut line = String::new();
    let read = tokio::time::timeout(STEP, reader.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    (read > 0).then(|| serde_json::from_str(&line).expect("a response line"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversized_lines_and_wrong_versions_get_error_replies_and_the_daemon_lives_on() {
    let (_relay, _backend, _daemon, socket) = start_daemon(false).await;

    // Garbage before hello: an error reply, and the connection stays usable.
    let (mut reader, mut writer) = raw(&socket).await;
    writer.write_all(b"this is not json\n").await.unwrap();
    let reply = read_response(&mut reader).await.unwrap();
    assert!(
        matches!(
            reply,
            Response::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{reply:?}"
    );
    writer
        .write_all(b"{\"method\":\"format_disk\"}\n")
        .await
        .unwrap();
    assert!(matches!(
        read_response(&mut reader).await.unwrap(),
        Response::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    writer
        .write_all(&ipc::to_line(&Request::Hello {
            version: IPC_VERSION,
        }))
        .await
        .unwrap();
    assert!(matches!(
        read_response(&mut reader).await.unwrap(),
        Response::Hello { .. }
    ));
    writer
        .write_all(&ipc::to_line(&Request::Status))
        .await
        .unwrap();
    assert!(matches!(
        read_response(&mut reader).await.unwrap(),
        Response::Status(_)
    ));

    // A request before hello is refused and the connection closed.
    let (mut reader, mut writer) = raw(&socket).await;
    writer
        .write_all(&ipc::to_line(&Request::Disconnect))
        .await
        .unwrap();
    assert!(matches!(
        read_response(&mut reader).await.unwrap(),
        Response::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    assert!(
        read_response(&mut reader).await.is_none(),
        "closed after a missing hello"
    );

    // Another IPC version: told so, then closed.
    let (mut reader, mut writer) = raw(&socket).await;
    writer
        .write_all(&ipc::to_line(&Request::Hello { version: 999 }))
        .await
        .unwrap();
    let reply = read_response(&mut reader).await.unwrap();
    assert!(
        matches!(
            reply,
            Response::Error {
                code: ErrorCode::VersionMismatch,
                ..
            }
        ),
        "{reply:?}"
    );

    // An oversized line: an error reply, the connection closed, nothing buffered without end.
    let (mut reader, mut writer) = raw(&socket).await;
    let huge = vec![b'x'; ipc::MAX_LINE_BYTES * 4];
    let _ = writer.write_all(&huge).await;
    let reply = read_response(&mut reader).await.unwrap();
    assert!(
        matches!(reply, Response::Error { code: ErrorCode::BadRequest, ref message } if message.contains("longer than")),
        "{reply:?}"
    );

    // Random bytes, then hang up mid-line.
    let (_reader, mut writer) = raw(&socket).await;
    let noise: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = writer.write_all(&noise).await;
    drop(writer);

    // The daemon still answers properly.
    let mut client = tokio::time::timeout(STEP, Client::connect(&socket))
        .await
        .unwrap()
        .unwrap();
    let status = client.call(&Request::Status).await.unwrap();
    assert!(matches!(status, Response::Status(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_may_read_but_not_change_a_system_daemon() {
    let (relay, _backend, _daemon, socket) = start_daemon(true).await;
    let as_nobody = |args: &[&str]| {
        let mut command = tokio::process::Command::new("setpriv");
        command
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "--socket",
            ])
            .arg(&socket)
            .args(args)
            .env("NO_COLOR", "1")
            .kill_on_drop(true);
        command
    };
    let status = tokio::time::timeout(STEP, as_nobody(&["status", "--json"]).output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status.status.code(),
        Some(0),
        "reading works: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let parsed: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(parsed["connection"]["state"], "connected");

    for change in [
        &["disconnect"][..],
        &["logout"],
        &["config", "set", "device_name", "x"],
    ] {
        let output = tokio::time::timeout(STEP, as_nobody(change).output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(output.status.code(), Some(5), "{change:?}");
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.contains("permission denied"), "{err}");
    }
    // Nothing changed.
    assert_eq!(relay.relay.registry.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_cannot_open_a_user_daemons_socket() {
    let (_relay, _backend, _daemon, socket) = start_daemon(false).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "user daemon socket is private");
    }
    let output = tokio::time::timeout(
        STEP,
        tokio::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "--socket",
            ])
            .arg(&socket)
            .arg("status")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(output.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&output.stderr).contains("permission denied opening"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_live_one_is_not_taken() {
    let relay = TestRelay::start(relay_config()).await;
    let backend = FakeOllama::start().await;
    let config = daemon_config(&relay.url(), "alice", "laptop", &backend.url());
    let socket = config.socket_path.clone().unwrap();
    // A socket file whose daemon is gone: bound, then the listener dropped without cleanup.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let _daemon = TestDaemon::start(config.clone());
    relay.wait_for_devices("alice", 1).await;
    let mut client = tokio::time::timeout(STEP, Client::connect(&socket))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        client.call(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));

    // A second daemon on the live socket refuses to start, and the first keeps serving.
    let mut second = config.clone();
    second.device_id = Some("second".into());
    second.state_dir = Some(cloudllm_e2e::scratch_dir());
    let err = tokio::time::timeout(STEP, cloudllm_daemon::run(second, Default::default()))
        .await
        .unwrap()
        .unwrap_err();
    assert!(format!("{err:#}").contains("already running"), "{err:#}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut client = tokio::time::timeout(STEP, Client::connect(&socket))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        client.call(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));
}

/// Runs the CLI as user and group `id` (65534 is nobody/nogroup on Debian).
async fn as_user(id: u32, socket: &Path, args: &[&str]) -> std::process::Output {
    tokio::time::timeout(
        STEP,
        tokio::process::Command::new("setpriv")
            .arg(format!("--reuid={id}"))
            .arg(format!("--regid={id}"))
            .args(["--clear-groups", BIN, "--socket"])
            .arg(socket)
            .args(args)
            .env("NO_COLOR", "1")
            .output(),
    )
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_group_member_may_change_a_system_daemon_and_others_cannot_open_it() {
    let (relay, _backend, _daemon, socket) = start_daemon_with_group(true, Some("nogroup")).await;
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(&socket).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), 65534, "owned by the operator group");
    }
    // A stranger (another uid and gid) cannot even connect.
    let stranger = as_user(65533, &socket, &["status"]).await;
    assert_eq!(stranger.status.code(), Some(5));
    // A member of the operator group may change the daemon.
    let operator = as_user(65534, &socket, &["disconnect"]).await;
    assert!(
        operator.status.success(),
        "{}",
        String::from_utf8_lossy(&operator.stderr)
    );
    relay.wait_for_devices("alice", 0).await;
}
