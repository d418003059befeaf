//! The daemon's IPC socket under misuse: garbage, oversized lines, the wrong version, another
//! user, a socket file left behind by a dead daemon, a flood of connections from another user,
//! idle connections, a socket another user bound, and a user with no private directory.

#![cfg(unix)]

mod common;

use std::path::Path;
use std::time::Duration;

use cloudllm_e2e::{FakeOllama, STEP, Stack, TestDaemon, TestRelay, daemon_config, relay_config};
use cloudllm_ipc_client::Client;
use cloudllm_proto::ipc::{self, ErrorCode, IPC_VERSION, Request, Response};
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::tokio::Stream as _;
use interprocess::local_socket::{GenericFilePath, ToFsName};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use common::{cli, cli_as, output_with_stdin, run, run_as, stderr};

/// [`Stack`] with alice's user daemon, or a system daemon (open to every user) if `system`.
async fn start_daemon(system: bool) -> Stack {
    Stack::with_configs(relay_config(), |config| config.system = system).await
}

/// A raw connection to the daemon's socket, with no client library in between: lines in,
/// lines out.
struct Raw {
    reader: BufReader<tokio::io::ReadHalf<Stream>>,
    writer: tokio::io::WriteHalf<Stream>,
}

impl Raw {
    async fn connect(socket: &Path) -> Raw {
        let stream = Stream::connect(socket.to_fs_name::<GenericFilePath>().unwrap())
            .await
            .unwrap();
        let (reader, writer) = tokio::io::split(stream);
        Raw {
            reader: BufReader::new(reader),
            writer,
        }
    }

    /// Sends `bytes` as they are.
    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// Sends `request` and reads the reply.
    async fn ask(&mut self, request: &Request) -> Option<Response> {
        self.send(&ipc::to_line(request)).await;
        self.read().await
    }

    /// The next response line, or `None` once the daemon has closed the connection.
    async fn read(&mut self) -> Option<Response> {
        let mut line = String::new();
        let read = tokio::time::timeout(STEP, self.reader.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        (read > 0).then(|| serde_json::from_str(&line).expect("a response line"))
    }
}

/// The hello of a client that speaks this IPC version.
const HELLO: Request = Request::Hello {
    version: IPC_VERSION,
};

/// Asks the daemon at `socket` for its status through the IPC client, which must answer.
async fn assert_answers(socket: &Path) {
    let mut client = tokio::time::timeout(STEP, Client::connect(socket))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        client.call(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversized_lines_and_wrong_versions_get_error_replies_and_the_daemon_lives_on() {
    let stack = start_daemon(false).await;
    let socket = stack.socket.clone();

    // Garbage before hello: an error reply, and the connection stays usable.
    let mut raw = Raw::connect(&socket).await;
    raw.send(b"this is not json\n").await;
    let reply = raw.read().await.unwrap();
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
    raw.send(b"{\"method\":\"format_disk\"}\n").await;
    assert!(matches!(
        raw.read().await.unwrap(),
        Response::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    assert!(matches!(
        raw.ask(&HELLO).await.unwrap(),
        Response::Hello { .. }
    ));
    assert!(matches!(
        raw.ask(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));

    // A request before hello is refused and the connection closed.
    let mut raw = Raw::connect(&socket).await;
    assert!(matches!(
        raw.ask(&Request::Disconnect).await.unwrap(),
        Response::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    assert!(raw.read().await.is_none(), "closed after a missing hello");

    // Another IPC version: told so, then closed.
    let mut raw = Raw::connect(&socket).await;
    let reply = raw.ask(&Request::Hello { version: 999 }).await.unwrap();
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
    let mut raw = Raw::connect(&socket).await;
    let huge = vec![b'x'; ipc::MAX_LINE_BYTES * 4];
    let _ = raw.writer.write_all(&huge).await;
    let reply = raw.read().await.unwrap();
    assert!(
        matches!(reply, Response::Error { code: ErrorCode::BadRequest, ref message } if message.contains("longer than")),
        "{reply:?}"
    );

    // Random bytes, then hang up mid-line.
    let Raw { mut writer, .. } = Raw::connect(&socket).await;
    let noise: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = writer.write_all(&noise).await;
    drop(writer);

    // The daemon still answers properly.
    assert_answers(&socket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_may_read_but_not_change_a_system_daemon() {
    let stack = start_daemon(true).await;
    let socket = stack.socket.clone();
    let status = run_as(65534, &socket, &["status", "--json"]).await;
    assert_eq!(
        status.status.code(),
        Some(0),
        "reading works: {}",
        stderr(&status)
    );
    let parsed: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(parsed["connection"]["state"], "connected");

    for change in [
        &["disconnect"][..],
        &["logout"],
        &["config", "set", "device_name", "x"],
    ] {
        let output = run_as(65534, &socket, change).await;
        assert_eq!(output.status.code(), Some(5), "{change:?}");
        let err = stderr(&output);
        assert!(err.contains("permission denied"), "{err}");
    }
    // Nothing changed.
    assert_eq!(stack.relay.relay.registry.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_cannot_open_a_user_daemons_socket() {
    let stack = start_daemon(false).await;
    let socket = stack.socket.clone();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "user daemon socket is private");
    }
    let output = run_as(65534, &socket, &["status"]).await;
    assert_eq!(output.status.code(), Some(5));
    assert!(stderr(&output).contains("permission denied opening"));
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
    assert_answers(&socket).await;

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
    assert_answers(&socket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_group_member_may_change_a_system_daemon_and_others_cannot_open_it() {
    let stack = Stack::with_configs(relay_config(), |config| {
        config.system = true;
        config.operator_group = Some("nogroup".to_owned());
    })
    .await;
    let socket = stack.socket.clone();
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(&socket).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), 65534, "owned by the operator group");
    }
    // A stranger (another uid and gid) cannot even connect.
    let stranger = run_as(65533, &socket, &["status"]).await;
    assert_eq!(stranger.status.code(), Some(5));
    // A member of the operator group may change the daemon.
    let operator = run_as(65534, &socket, &["disconnect"]).await;
    assert!(operator.status.success(), "{}", stderr(&operator));
    stack.relay.wait_for_devices("alice", 0).await;
}

/// Set (to `MODE:ARGUMENT`) when this test binary runs again as another user to play a part
/// in a test above: see [`helper`].
const HELPER_ENV: &str = "CLOUDLLM_TEST_IPC_HELPER";

/// What starts each line the helper prints for the test.
const HELPER_SAYS: &str = "helper says: ";

/// A uid with no entry in the user database, hence no home directory.
const HOMELESS_UID: u32 = 4242;

/// Runs this test binary's [`helper`] as user and group `id`, in `mode` with `argument`. It
/// prints lines with [`HELPER_SAYS`] and runs until its standard input closes.
fn spawn_helper(id: u32, mode: &str, argument: &Path) -> tokio::process::Child {
    let exe = std::env::current_exe().expect("the test binary's path");
    tokio::process::Command::new("setpriv")
        .arg(format!("--reuid={id}"))
        .arg(format!("--regid={id}"))
        .arg("--clear-groups")
        .arg(exe)
        .args(["--exact", "helper", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, format!("{mode}:{}", argument.display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running setpriv")
}

/// What the helper prints next.
async fn helper_says(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> String {
    loop {
        let line = tokio::time::timeout(STEP, lines.next_line())
            .await
            .expect("the helper said nothing")
            .expect("reading the helper")
            .expect("the helper ended");
        // libtest may print its own words on the same line first.
        if let Some((_, said)) = line.split_once(HELPER_SAYS) {
            return said.to_owned();
        }
    }
}

/// Not a test: the part another user plays when [`HELPER_ENV`] is set (a no-op otherwise).
/// `flood:SOCKET` opens connections to SOCKET that say hello and then idle, and prints how many
/// the daemon kept; `fake_daemon:SOCKET` binds SOCKET, answers like a daemon, and prints every
/// request line it gets.
#[tokio::test]
async fn helper() {
    let Ok(task) = std::env::var(HELPER_ENV) else {
        return;
    };
    let (mode, path) = task.split_once(':').expect("MODE:ARGUMENT");
    let path = std::path::PathBuf::from(path);
    let mut keep = Vec::new();
    match mode {
        "flood" => {
            let (mut held, mut refused) = (0, 0);
            for _ in 0..cloudllm_daemon::ipc::MAX_CONNECTIONS {
                let Ok(stream) =
                    Stream::connect(path.as_path().to_fs_name::<GenericFilePath>().unwrap()).await
                else {
                    refused += 1;
                    continue;
                };
                let (reader, mut writer) = tokio::io::split(stream);
                let mut reader = BufReader::new(reader);
                let hello = ipc::to_line(&Request::Hello {
                    version: IPC_VERSION,
                });
                let mut line = String::new();
                let answered = writer.write_all(&hello).await.is_ok()
                    && tokio::time::timeout(STEP, reader.read_line(&mut line))
                        .await
                        .is_ok_and(|read| read.is_ok_and(|n| n > 0));
                match serde_json::from_str::<Response>(&line) {
                    Ok(Response::Hello { .. }) if answered => {
                        held += 1;
                        keep.push((reader, writer));
                    }
                    _ => refused += 1,
                }
            }
            println!("{HELPER_SAYS}held {held} refused {refused}");
        }
        "fake_daemon" => {
            let listener = tokio::net::UnixListener::bind(&path).expect("binding the socket");
            println!("{HELPER_SAYS}ready");
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let (reader, mut writer) = tokio::io::split(stream);
                        let mut lines = BufReader::new(reader).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            println!("{HELPER_SAYS}line {line}");
                            let reply = match serde_json::from_str::<Request>(&line) {
                                Ok(Request::Hello { .. }) => Response::Hello {
                                    version: IPC_VERSION,
                                    daemon_version: "fake".into(),
                                },
                                _ => Response::LoginDone {
                                    user: Some("caught".into()),
                                },
                            };
                            if writer.write_all(&ipc::to_line(&reply)).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
        other => panic!("unknown helper mode {other}"),
    }
    // Hold everything until the test closes standard input.
    let mut rest = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut rest).await;
    drop(keep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_another_user_leaves_room_for_root_and_other_users() {
    // A system daemon without an operator group: its socket is 0666, open to every user.
    let stack = start_daemon(true).await;
    let socket = stack.socket.clone();
    let mut flood = spawn_helper(65534, "flood", &socket);
    let mut said = BufReader::new(flood.stdout.take().unwrap()).lines();
    let counts = helper_says(&mut said).await;
    assert_eq!(
        counts,
        format!(
            "held {} refused {}",
            cloudllm_daemon::ipc::MAX_CONNECTIONS_PER_USER,
            cloudllm_daemon::ipc::MAX_CONNECTIONS - cloudllm_daemon::ipc::MAX_CONNECTIONS_PER_USER
        ),
        "one user gets its share of the connections, no more"
    );

    // While nobody holds its connections: root (here also the daemon's own user) is served …
    let output = run(&socket, &["status", "--json"]).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "root is locked out: {}",
        stderr(&output)
    );
    // … and so is another user.
    let other = run_as(65533, &socket, &["status", "--json"]).await;
    assert_eq!(other.status.code(), Some(0), "{}", stderr(&other));
    // The flooding user hears why it gets no more.
    let refused = run_as(65534, &socket, &["status"]).await;
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("connections to cloudllmd already"), "{err}");

    // Once the flood ends, its slots come back.
    drop(flood.stdin.take());
    tokio::time::timeout(STEP, flood.wait())
        .await
        .unwrap()
        .unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let again = run_as(65534, &socket, &["status", "--json"]).await;
        if again.status.code() == Some(0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slots never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_a_watching_one_is_not() {
    let idle_timeout = Duration::from_millis(500);
    let stack = Stack::with_configs(relay_config(), |config| {
        config.ipc_idle_timeout = Some(idle_timeout);
    })
    .await;
    let socket = stack.socket.clone();

    let mut watching = Raw::connect(&socket).await;
    assert!(matches!(
        watching.ask(&HELLO).await,
        Some(Response::Hello { .. })
    ));
    assert!(matches!(
        watching.ask(&Request::Watch).await,
        Some(Response::Status(_))
    ));

    let mut idle = Raw::connect(&socket).await;
    assert!(matches!(
        idle.ask(&HELLO).await,
        Some(Response::Hello { .. })
    ));
    let since = tokio::time::Instant::now();
    // A request resets the clock; then nothing more is asked.
    assert!(matches!(
        idle.ask(&Request::Status).await,
        Some(Response::Status(_))
    ));
    assert!(
        idle.read().await.is_none(),
        "the daemon closes the idle connection"
    );
    assert!(since.elapsed() >= idle_timeout, "closed too early");

    // The watcher, idle just as long, still gets the next change.
    assert!(run(&socket, &["disconnect"]).await.status.success());
    loop {
        match watching.read().await {
            Some(Response::Status(status))
                if status.connection == ipc::Connection::Disconnected =>
            {
                break;
            }
            Some(_) => {}
            None => panic!("the watching connection was closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_a_token_only_to_a_socket_of_its_own_user_root_or_the_system_daemon() {
    // Another user (nobody) binds a socket and plays the daemon.
    let dir = cloudllm_e2e::scratch_dir();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let socket = dir.join("cloudllmd.sock");
    let mut fake = spawn_helper(65534, "fake_daemon", &socket);
    let mut said = BufReader::new(fake.stdout.take().unwrap()).lines();
    assert_eq!(helper_says(&mut said).await, "ready");

    // root's CLI refuses to hand it a token or to run a login through it.
    let relay = ["--relay", "http://127.0.0.1:9"];
    for flags in [
        &["--with-token"][..],
        &["--device"],
        &["--browser", "--no-browser"],
    ] {
        let output = output_with_stdin(
            cli(&socket).arg("login").args(relay).args(flags),
            "eyJroot-secret",
        )
        .await;
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(5), "{flags:?}: {err}");
        assert!(
            err.contains("refusing to log in through") && err.contains("uid 65534"),
            "{err}"
        );
    }
    // A request that hands over nothing still goes through.
    let output = run(&socket, &["logout"]).await;
    assert!(output.status.success(), "{}", stderr(&output));

    // The socket's own user may log in through it (the check is about who, not where).
    let output = output_with_stdin(
        cli_as(65534, &socket)
            .args(["login", "--with-token"])
            .args(relay),
        "nobodys-own-token",
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));

    // What the impostor got: hellos, the logout, nobody's own token, and never root's.
    let mut lines = Vec::new();
    loop {
        let line = helper_says(&mut said).await;
        let done = line.contains("nobodys-own-token");
        lines.push(line);
        if done {
            break;
        }
    }
    drop(fake.stdin.take());
    let _ = tokio::time::timeout(STEP, fake.wait()).await;
    let received = lines.join("\n");
    assert!(!received.contains("root-secret"), "{received}");
    assert!(!received.contains("\"login\""), "{received}");
    assert!(received.contains("\"logout\""), "{received}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_home_or_runtime_dir_the_cli_names_what_to_set_instead_of_using_tmp() {
    // A user with no home directory and an empty environment: no private place for a socket.
    let output = tokio::time::timeout(
        STEP,
        tokio::process::Command::new("setpriv")
            .arg(format!("--reuid={HOMELESS_UID}"))
            .arg(format!("--regid={HOMELESS_UID}"))
            .args(["--clear-groups", common::BIN, "login", "--with-token"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    if Path::new(ipc::SYSTEM_SOCKET).exists() {
        // A system daemon runs on this machine: the CLI rightly uses it.
        return;
    }
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("XDG_RUNTIME_DIR") && err.contains("--socket"),
        "{err}"
    );
    assert!(!err.contains("/tmp/cloudllmd.sock"), "{err}");
}
