//! The credential store keeps tokens where a user would want them: in the OS keyring when a
//! keyring service runs, else in a 0600 file that is never half-written, and never in `Debug`.
//!
//! Tests that need another environment (no D-Bus session, a real Secret Service, a crash in the
//! middle of a save) run this test binary again as a child process with a filter for one
//! `inner_*` test, which is `#[ignore]`d and does nothing unless the child's flag is set.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use cloudllm_daemon::credentials::{
    CREDENTIALS_FILE, CredentialStore, Credentials, KEYRING_SERVICE, StoreKind,
};
use cloudllm_proto::Secret;

/// Set in a child process to the name of the inner test it is meant to run.
const CHILD_FLAG: &str = "CLOUDLLM_CREDENTIALS_TEST_CHILD";
/// The state directory a child works in.
const CHILD_STATE_DIR: &str = "CLOUDLLM_CREDENTIALS_TEST_STATE_DIR";
/// The keyring account a child uses.
const CHILD_ACCOUNT: &str = "CLOUDLLM_CREDENTIALS_TEST_ACCOUNT";
/// Set to 1 to skip the Secret Service test on a machine without dbus and gnome-keyring.
const SKIP_KEYRING_TEST: &str = "CLOUDLLM_SKIP_KEYRING_TEST";

/// 60 s: a child starts a D-Bus session and gnome-keyring (about a second) and runs one small
/// test; a minute means it hangs.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// Credentials with tokens long enough to look real (a JWT is about a kilobyte).
fn sample(tag: &str) -> Credentials {
    Credentials {
        relay_url: "https://relay.invalid".into(),
        access_token: Secret::new(format!("access-{tag}-{}", "a".repeat(1000))),
        refresh_token: Some(Secret::new(format!("refresh-{tag}-{}", "r".repeat(200)))),
        expires_at: Some(1_900_000_000),
        token_endpoint: Some("https://idp.invalid/oauth/token".into()),
        client_id: Some("cloudllm-cli".into()),
    }
}

/// A keyring account no other test (or earlier run) uses.
fn unique_account() -> String {
    format!("cloudllm-test-{}", uuid::Uuid::new_v4().simple())
}

/// Names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[cfg(unix)]
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn file_store_round_trip_with_private_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state").join("cloudllm");
    let store = CredentialStore::file_only(&state);
    let path = state.join(CREDENTIALS_FILE);
    assert_eq!(store.kind(), &StoreKind::File { path: path.clone() });
    assert!(store.kind().to_string().contains("no keyring service"));

    assert_eq!(store.load().unwrap(), None, "nothing saved yet");
    assert!(!state.exists(), "a load creates nothing");

    let first = sample("one");
    store.save(&first).unwrap();
    assert_eq!(store.load().unwrap(), Some(first));
    #[cfg(unix)]
    {
        assert_eq!(mode_of(&path), 0o600, "file mode");
        assert_eq!(mode_of(&state), 0o700, "directory mode");
    }

    // Optional fields left out still load (as `--with-token` logins write them).
    let minimal = Credentials {
        relay_url: "http://127.0.0.1:1".into(),
        access_token: Secret::new("t"),
        refresh_token: None,
        expires_at: None,
        token_endpoint: None,
        client_id: None,
    };
    store.save(&minimal).unwrap();
    assert_eq!(store.load().unwrap(), Some(minimal));
    assert_eq!(names_in(&state), [CREDENTIALS_FILE], "no temp file stays");

    store.clear().unwrap();
    assert_eq!(store.load().unwrap(), None);
    assert!(!path.exists());
    store.clear().unwrap();
}

#[test]
fn file_store_reads_fields_it_does_not_know() {
    let tmp = tempfile::tempdir().unwrap();
    let store = CredentialStore::file_only(tmp.path());
    fs::write(
        tmp.path().join(CREDENTIALS_FILE),
        r#"{"relay_url":"https://r.invalid","access_token":"tok","added_later":1}"#,
    )
    .unwrap();
    let loaded = store.load().unwrap().unwrap();
    assert_eq!(loaded.access_token.expose(), "tok");
    assert_eq!(loaded.refresh_token, None);
}

#[test]
fn corrupt_or_oversized_file_is_an_error_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let store = CredentialStore::file_only(tmp.path());
    let path = tmp.path().join(CREDENTIALS_FILE);

    for garbage in [
        b"{\"relay_url\": \"https://r.invalid\", \"access_tok".to_vec(),
        b"\xff\xfe not json".to_vec(),
        b"{}".to_vec(),
        vec![b' '; 1024 * 1024],
    ] {
        fs::write(&path, &garbage).unwrap();
        let err = format!("{:#}", store.load().unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
    // A corrupt file does not stand in the way of logging out or in again.
    store.save(&sample("fresh")).unwrap();
    assert_eq!(store.load().unwrap(), Some(sample("fresh")));
    store.clear().unwrap();
}

#[test]
fn debug_output_shows_no_token() {
    let credentials = sample("debug");
    let debug = format!("{credentials:?} {credentials:#?}");
    assert!(!debug.contains("access-debug"), "{debug}");
    assert!(!debug.contains("refresh-debug"), "{debug}");
    assert!(
        debug.contains("relay.invalid"),
        "the rest is still there: {debug}"
    );

    let store = CredentialStore::file_only(Path::new("/nonexistent"));
    assert!(format!("{store:?}").contains("File"));
}

#[test]
fn store_can_move_to_a_blocking_task() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<CredentialStore>();
    send_sync::<Credentials>();
}

#[test]
fn readers_never_see_a_half_written_file() {
    const WRITERS: usize = 4;
    const SAVES_PER_WRITER: usize = 25;
    const READS: usize = 300;

    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().to_path_buf();
    CredentialStore::file_only(&state)
        .save(&sample("w0-0"))
        .unwrap();
    let expected: HashSet<String> = (0..WRITERS)
        .flat_map(|w| (0..SAVES_PER_WRITER).map(move |i| format!("w{w}-{i}")))
        .chain(["w0-0".to_string()])
        .map(|tag| sample(&tag).access_token.expose().to_owned())
        .collect();

    thread::scope(|scope| {
        for w in 0..WRITERS {
            let state = &state;
            scope.spawn(move || {
                let store = CredentialStore::file_only(state);
                for i in 0..SAVES_PER_WRITER {
                    store.save(&sample(&format!("w{w}-{i}"))).unwrap();
                }
            });
        }
        let store = CredentialStore::file_only(&state);
        for _ in 0..READS {
            let loaded = store
                .load()
                .expect("every read parses")
                .expect("the file never disappears");
            assert!(expected.contains(loaded.access_token.expose()));
        }
    });
    assert_eq!(names_in(&state), [CREDENTIALS_FILE], "no temp file stays");
}

#[test]
fn failed_save_leaves_no_temp_file() {
    let tmp = tempfile::tempdir().unwrap();
    let store = CredentialStore::file_only(tmp.path());
    // A directory where the file should be: the final rename fails.
    let blocker = tmp.path().join(CREDENTIALS_FILE);
    fs::create_dir(&blocker).unwrap();
    fs::write(blocker.join("keep"), b"x").unwrap();

    let err = format!("{:#}", store.save(&sample("x")).unwrap_err());
    assert!(err.contains(&blocker.display().to_string()), "{err}");
    assert_eq!(names_in(tmp.path()), [CREDENTIALS_FILE]);
    assert_eq!(names_in(&blocker), ["keep"]);
}

#[cfg(unix)]
#[test]
fn state_dir_writable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();

    let store = CredentialStore::file_only(&shared);
    let err = format!("{:#}", store.save(&sample("x")).unwrap_err());
    assert!(err.contains("other users may write"), "{err}");
    assert!(names_in(&shared).is_empty(), "nothing written");
    assert_eq!(
        mode_of(&shared),
        0o777,
        "not chmod-ed behind the user's back"
    );
}

/// A daemon killed while writing (here by the file-size limit, SIGXFSZ, in the middle of the
/// write) leaves the previous credentials readable; logging out then removes the leftovers.
#[cfg(unix)]
#[test]
fn crash_in_the_middle_of_a_save_keeps_the_old_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let store = CredentialStore::file_only(&state);
    let old = Credentials {
        refresh_token: None,
        token_endpoint: None,
        client_id: None,
        access_token: Secret::new("old"),
        ..sample("old")
    };
    store.save(&old).unwrap();

    // `ulimit -f 1`: files may grow to 512 bytes; the new credentials are over 1 KiB.
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"ulimit -f 1 && exec "$0" "$@""#)
        .arg(std::env::current_exe().unwrap());
    let (status, output) = run_inner(
        command,
        "inner_save_large_credentials",
        &state,
        "",
        tmp.path(),
    );
    {
        use std::os::unix::process::ExitStatusExt;
        /// SIGXFSZ, "file size limit exceeded", on Linux and macOS.
        const SIGXFSZ: i32 = 25;
        assert_eq!(status.signal(), Some(SIGXFSZ), "{output}");
    }

    assert_eq!(store.load().unwrap(), Some(old), "{output}");
    store.clear().unwrap();
    assert!(
        names_in(&state).is_empty(),
        "clear removes interrupted temp files too"
    );
}

#[test]
#[ignore = "run in a child by crash_in_the_middle_of_a_save_keeps_the_old_credentials"]
fn inner_save_large_credentials() {
    let Some(state) = child_state_dir("inner_save_large_credentials") else {
        return;
    };
    let large = Credentials {
        access_token: Secret::new("n".repeat(8 * 1024)),
        ..sample("new")
    };
    let _ = CredentialStore::file_only(&state).save(&large);
}

/// Without a D-Bus session (a headless server), `open` keeps the credentials in a file.
#[cfg(all(unix, not(target_os = "macos")))]
#[test]
fn open_without_a_session_bus_uses_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let runtime = tmp.path().join("run");
    fs::create_dir(&runtime).unwrap();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        // The bus would be at $XDG_RUNTIME_DIR/bus: an empty directory has none.
        .env("XDG_RUNTIME_DIR", &runtime);
    let state = tmp.path().join("state");
    let (status, output) = run_inner(
        command,
        "inner_open_headless",
        &state,
        &unique_account(),
        tmp.path(),
    );
    assert!(status.success(), "{output}");
}

#[test]
#[ignore = "run in a child by the open_with*_uses_the_file tests"]
fn inner_open_headless() {
    let Some(state) = child_state_dir("inner_open_headless") else {
        return;
    };
    let account = std::env::var(CHILD_ACCOUNT).unwrap();
    let started = Instant::now();
    let store = CredentialStore::open(&state, &account);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the probe is bounded"
    );
    let path = state.join(CREDENTIALS_FILE);
    assert_eq!(store.kind(), &StoreKind::File { path: path.clone() });
    assert_eq!(
        store.kind().to_string(),
        format!(
            "file {} (no keyring service on this machine)",
            path.display()
        )
    );
    store.save(&sample("headless")).unwrap();
    assert_eq!(store.load().unwrap(), Some(sample("headless")));
    assert!(path.exists());
    store.clear().unwrap();
}

/// With a real Secret Service (gnome-keyring in a private D-Bus session), `open` picks the
/// keyring and no file is written.
#[cfg(all(unix, not(target_os = "macos")))]
#[test]
fn open_with_secret_service_uses_the_keyring() {
    if !secret_service_tools_present() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let command = private_session(
        tmp.path(),
        r#"printf pw | gnome-keyring-daemon --unlock --components=secrets >/dev/null && exec "$0" "$@""#,
    );
    let state = tmp.path().join("state");
    let (status, output) = run_inner(
        command,
        "inner_keyring_round_trip",
        &state,
        &unique_account(),
        tmp.path(),
    );
    assert!(status.success(), "{output}");
}

/// A Secret Service that D-Bus starts on demand but that has no keyring to write to (a desktop
/// machine reached over SSH) is no keyring: `open` keeps the credentials in a file, so that
/// logging in works.
#[cfg(all(unix, not(target_os = "macos")))]
#[test]
fn open_with_an_unusable_secret_service_uses_the_file() {
    if !secret_service_tools_present() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // No gnome-keyring started by hand: the bus activates it at the first call, locked and
    // without a login keyring.
    let command = private_session(tmp.path(), r#"exec "$0" "$@""#);
    let state = tmp.path().join("state");
    let (status, output) = run_inner(
        command,
        "inner_open_headless",
        &state,
        &unique_account(),
        tmp.path(),
    );
    assert!(status.success(), "{output}");
}

/// Whether `dbus-run-session` and `gnome-keyring-daemon` are installed; panics saying which
/// Debian packages to install unless the test is to be skipped.
#[cfg(all(unix, not(target_os = "macos")))]
fn secret_service_tools_present() -> bool {
    let missing: Vec<&str> = [
        ("dbus-run-session", "dbus"),
        ("gnome-keyring-daemon", "gnome-keyring"),
    ]
    .into_iter()
    .filter(|(tool, _)| find_in_path(tool).is_none())
    .map(|(_, package)| package)
    .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var(SKIP_KEYRING_TEST).as_deref() == Ok("1") {
        eprintln!("skipped: {SKIP_KEYRING_TEST}=1 and no {missing:?}");
        return false;
    }
    panic!(
        "this test needs a Secret Service: install the Debian packages {} \
         (apt-get install -y dbus gnome-keyring), or set {SKIP_KEYRING_TEST}=1 to skip it",
        missing.join(" ")
    );
}

/// `dbus-run-session` running `script` in `sh` (which ends by exec-ing this test binary),
/// with a home and runtime directory of its own under `scratch`: gnome-keyring keeps its
/// keyrings under the home and its sockets in the runtime dir, so nothing of the machine's is
/// read or left behind.
#[cfg(all(unix, not(target_os = "macos")))]
fn private_session(scratch: &Path, script: &str) -> Command {
    use std::os::unix::fs::PermissionsExt;
    let home = scratch.join("home");
    let runtime = scratch.join("run");
    fs::create_dir(&home).unwrap();
    fs::create_dir(&runtime).unwrap();
    fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).unwrap();
    let mut command = Command::new("dbus-run-session");
    command
        .env("HOME", &home)
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("XDG_RUNTIME_DIR", &runtime)
        .args(["--", "sh", "-c", script])
        .arg(std::env::current_exe().unwrap());
    command
}

#[test]
#[ignore = "run in a child by open_with_secret_service_uses_the_keyring"]
fn inner_keyring_round_trip() {
    let Some(state) = child_state_dir("inner_keyring_round_trip") else {
        return;
    };
    let account = std::env::var(CHILD_ACCOUNT).unwrap();
    let store = CredentialStore::open(&state, &account);
    assert_eq!(store.kind(), &StoreKind::Keyring);
    assert_eq!(store.kind().to_string(), "OS keyring");

    assert_eq!(store.load().unwrap(), None);
    store.save(&sample("keyring")).unwrap();
    assert_eq!(store.load().unwrap(), Some(sample("keyring")));
    // A second store (the daemon after a restart) finds them.
    let again = CredentialStore::open(&state, &account);
    assert_eq!(again.load().unwrap(), Some(sample("keyring")));
    // Another account does not.
    let other = CredentialStore::open(&state, &unique_account());
    assert_eq!(other.load().unwrap(), None);
    assert!(
        !state.exists(),
        "no file is written when the keyring is in use"
    );

    // Garbage in the entry is an error that says where.
    keyring::Entry::new(KEYRING_SERVICE, &account)
        .unwrap()
        .set_secret(b"not json")
        .unwrap();
    let err = format!("{:#}", store.load().unwrap_err());
    assert!(
        err.contains("OS keyring") && err.contains(&account),
        "{err}"
    );

    store.clear().unwrap();
    assert_eq!(store.load().unwrap(), None);
    store.clear().unwrap();
    assert!(!state.exists());
}

/// The state directory when this process is the child meant to run `test`, else `None` (the
/// inner tests do nothing when run directly, e.g. with `--include-ignored`).
fn child_state_dir(test: &str) -> Option<PathBuf> {
    if std::env::var(CHILD_FLAG).as_deref() != Ok(test) {
        return None;
    }
    Some(PathBuf::from(std::env::var(CHILD_STATE_DIR).unwrap()))
}

/// Runs the inner test `test` through `command` (whose program ends by exec-ing this test
/// binary with the arguments added here), bounded by [`CHILD_TIMEOUT`]. Returns its status and
/// its output; a successful run must show that the inner test ran.
fn run_inner(
    mut command: Command,
    test: &str,
    state: &Path,
    account: &str,
    scratch: &Path,
) -> (ExitStatus, String) {
    let stdout_path = scratch.join(format!("{test}.stdout"));
    let stderr_path = scratch.join(format!("{test}.stderr"));
    // Files, not pipes: a daemon the child leaves behind could hold a pipe open forever.
    command
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_FLAG, test)
        .env(CHILD_STATE_DIR, state)
        .env(CHILD_ACCOUNT, account)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout_path).unwrap())
        .stderr(fs::File::create(&stderr_path).unwrap());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            kill_group(child.id());
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{test} did not finish within {CHILD_TIMEOUT:?}:\n{}",
                output_of(&stdout_path, &stderr_path)
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let output = output_of(&stdout_path, &stderr_path);
    if status.success() {
        assert!(
            output.contains(&format!("test {test} ... ok")) && output.contains("1 passed"),
            "the inner test did not run:\n{output}"
        );
    }
    (status, output)
}

/// Kills the whole process group of a timed-out child (the D-Bus daemon and keyring with it).
fn kill_group(pid: u32) {
    #[cfg(unix)]
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status();
    #[cfg(not(unix))]
    let _ = pid;
}

fn output_of(stdout: &Path, stderr: &Path) -> String {
    format!(
        "--- stdout\n{}\n--- stderr\n{}",
        fs::read_to_string(stdout).unwrap_or_default(),
        fs::read_to_string(stderr).unwrap_or_default()
    )
}

/// Where `tool` is on `PATH`, like `which`.
#[cfg(all(unix, not(target_os = "macos")))]
fn find_in_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
}
