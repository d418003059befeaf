//! The repository's own scripts, run as a person would: `scripts/test --list-missing` names
//! what a bare machine lacks (and leaves out what a skip variable skips), and
//! `scripts/real-ollama` says which tools it needs and shares one server between callers that
//! start it at the same moment (two test binaries do).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use cloudllm_e2e::scratch_dir;
use tokio::process::Command;
use tokio::time::timeout;

/// `--list-missing` runs a few dozen `pkg-config`/`python3` checks: seconds at most, a minute
/// on a loaded machine.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// A first start installs the server (a minute or two on a fresh cache).
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// `stop` waits up to 10 s for the server, then kills it.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The Debian packages behind checks that a PATH without the tools cannot pass. (`nginx` and
/// `ca-certificates` are also found by absolute path, so whether they are listed depends on
/// this machine.)
const PACKAGES_ON_PATH: &[&str] = &[
    "gcc",
    "pkg-config",
    "libgtk-3-dev",
    "libayatana-appindicator3-dev",
    "procps",
    "util-linux",
    "iproute2",
    "systemd",
    "desktop-file-utils",
    "dpkg",
    "python3",
    "python3-venv",
    "unzip",
    "curl",
    "nodejs",
    "npm",
    "dbus",
    "gnome-keyring",
    "xvfb",
    "trayer",
    "xdotool",
    "imagemagick",
    "xclip",
];

/// The skip variables and the packages only their tests need.
const SKIPPABLE: &[(&[&str], &[&str])] = &[
    (&["CLOUDLLM_SKIP_REAL_OLLAMA"], &["unzip", "curl"]),
    // Node.js serves both the OpenID provider and the browser test.
    (
        &["CLOUDLLM_SKIP_OIDC_TEST", "CLOUDLLM_SKIP_WEB_TEST"],
        &["nodejs", "npm"],
    ),
    (&["CLOUDLLM_SKIP_WEB_TEST"], &["chromium"]),
    (&["CLOUDLLM_SKIP_KEYRING_TEST"], &["dbus", "gnome-keyring"]),
    (
        &["CLOUDLLM_SKIP_TRAY_TEST"],
        &["xvfb", "trayer", "xdotool", "imagemagick", "xclip"],
    ),
    (&["CLOUDLLM_SKIP_NGINX_TEST"], &["nginx"]),
    (&["CLOUDLLM_SKIP_CLUSTER_TEST"], &["redis-server"]),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository's root")
}

/// A directory holding only what the scripts themselves run (bash and three coreutils), as
/// the whole PATH of a machine that lacks every tool the tests need.
fn bare_path(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bare PATH dir");
    let path = std::env::var_os("PATH").expect("PATH is set");
    for program in ["bash", "sed", "cat", "dirname"] {
        let found = std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{program} is on PATH"));
        std::os::unix::fs::symlink(&found, bin.join(program)).expect("symlink into bare PATH");
    }
    bin
}

/// A machine that lacks every tool the tests need: a scratch home, and a PATH of only what the
/// scripts themselves run (see [`bare_path`]). The home is removed when dropped.
struct BareMachine {
    home: PathBuf,
    path: PathBuf,
}

impl BareMachine {
    fn new() -> BareMachine {
        let home = scratch_dir();
        let path = bare_path(&home);
        BareMachine { home, path }
    }

    /// Runs a script of the repository here, with only `PATH`, `HOME` and `vars` set.
    async fn run(&self, script: &str, args: &[&str], vars: &[(&str, &str)]) -> Output {
        let mut command = Command::new(repo().join(script));
        command
            .args(args)
            .env_clear()
            .env("PATH", &self.path)
            .env("HOME", &self.home)
            .envs(vars.iter().copied())
            .kill_on_drop(true);
        timeout(LIST_TIMEOUT, command.output())
            .await
            .unwrap_or_else(|_| panic!("{script} {args:?} timed out"))
            .unwrap_or_else(|e| panic!("running {script}: {e}"))
    }
}

impl Drop for BareMachine {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// Asserts that a script succeeded, showing what it said on standard error otherwise.
fn assert_success(output: &Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}: {stderr}", output.status);
}

/// The packages on `--list-missing`'s "Debian packages:" line.
fn listed_packages(output: &Output) -> BTreeSet<String> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("Debian packages: "))
        .unwrap_or_else(|| panic!("no Debian packages line in:\n{stdout}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn list_missing_names_every_package_and_tool_a_bare_machine_lacks() {
    let bare = BareMachine::new();
    let output = bare.run("scripts/test", &["--list-missing"], &[]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed = listed_packages(&output);
    for package in PACKAGES_ON_PATH {
        assert!(listed.contains(*package), "{package} not listed:\n{stdout}");
    }
    // Each package once, however many of its commands are missing.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("Debian packages: "))
        .unwrap();
    assert_eq!(line.matches(" util-linux").count(), 1, "{line}");
    // And what does not come from Debian, with where it goes. (tests/oidc/node_modules is
    // listed too if this working tree lacks it.)
    for tool in ["cargo-deb", "hadolint", "Node.js 20.19", "the real Ollama"] {
        assert!(stdout.contains(tool), "{tool} not listed:\n{stdout}");
    }
    assert!(
        stdout.contains(&format!("{}/.cache/cloudllm/hadolint", bare.home.display())),
        "{stdout}"
    );
}

#[tokio::test]
async fn the_skip_variables_drop_what_only_their_tests_need() {
    let bare = BareMachine::new();
    let all: Vec<(&str, &str)> = SKIPPABLE
        .iter()
        .flat_map(|(vars, _)| vars.iter().map(|var| (*var, "1")))
        .collect();
    for (vars, packages) in SKIPPABLE {
        let set: Vec<(&str, &str)> = vars.iter().map(|var| (*var, "1")).collect();
        let var = vars.join("=1 ");
        let output = bare.run("scripts/test", &["--list-missing"], &set).await;
        let listed = listed_packages(&output);
        for package in *packages {
            assert!(
                !listed.contains(*package),
                "{var}=1 still lists {package}: {listed:?}"
            );
        }
    }
    let output = bare.run("scripts/test", &["--list-missing"], &all).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let listed = listed_packages(&output);
    // What every run needs stays: the build's compiler and libraries, and hadolint's Python.
    for package in ["gcc", "libgtk-3-dev", "python3", "python3-venv", "systemd"] {
        assert!(listed.contains(package), "{package} not listed:\n{stdout}");
    }
    assert!(!stdout.contains("the real Ollama"), "{stdout}");
    assert!(!stdout.contains("Node.js"), "{stdout}");
}

/// Without apt-get (not Debian or Ubuntu), it installs nothing: it says what to install, under
/// Debian's names, and stops.
#[tokio::test]
async fn elsewhere_it_prints_what_to_install_and_stops() {
    let bare = BareMachine::new();
    let output = bare.run("scripts/test", &["--install-only"], &[]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("this is not Debian or Ubuntu"), "{stderr}");
    for needed in [
        "gcc (Debian: gcc)",
        "the pkg-config module gtk+-3.0 (Debian: libgtk-3-dev)",
        "Xvfb (Debian: xvfb)",
        "setpriv (Debian: util-linux)",
    ] {
        assert!(stderr.contains(needed), "{needed} not said:\n{stderr}");
    }
    assert!(
        !bare.home.join(".cache/cloudllm").exists(),
        "it went on to install tools into the cache"
    );
}

#[tokio::test]
async fn real_ollama_names_the_tools_it_lacks() {
    let bare = BareMachine::new();
    let cache = bare.home.join("cache");
    let cache = cache.to_str().expect("UTF-8 scratch path");
    let output = bare
        .run(
            "scripts/real-ollama",
            &["start"],
            &[("CLOUDLLM_REAL_OLLAMA_CACHE", cache)],
        )
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for needed in [
        "python3 (Debian: python3)",
        "gcc (Debian: gcc)",
        "unzip (Debian: unzip)",
        "curl (Debian: curl)",
        "flock (Debian: util-linux)",
        "scripts/test installs them",
    ] {
        assert!(stderr.contains(needed), "{needed} not said:\n{stderr}");
    }
    assert!(output.stdout.is_empty(), "printed a URL though it failed");
}

/// Two callers start the server at the same moment on one port: both get its URL, the model is
/// there, and `stop` stops it.
#[tokio::test]
async fn real_ollama_started_twice_at_once_is_one_server() {
    if std::env::var("CLOUDLLM_SKIP_REAL_OLLAMA").as_deref() == Ok("1")
        || std::env::var_os("CLOUDLLM_REAL_OLLAMA_URL").is_some()
    {
        eprintln!("skipping: CLOUDLLM_SKIP_REAL_OLLAMA=1 or CLOUDLLM_REAL_OLLAMA_URL set");
        return;
    }
    // A port of its own, so that a server the other tests (or a developer) use is left alone.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
        .to_string();
    let script = repo().join("scripts/real-ollama");
    let start = || {
        let mut command = Command::new(&script);
        command.args(["start", &port]).kill_on_drop(true);
        timeout(START_TIMEOUT, command.output())
    };
    let (a, b) = tokio::join!(start(), start());
    let mut urls = Vec::new();
    for output in [a, b] {
        let output = output
            .expect("real-ollama start timed out")
            .expect("running real-ollama");
        assert_success(&output);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        urls.push(stdout.lines().last().expect("a URL").trim().to_owned());
    }
    assert_eq!(urls[0], format!("http://127.0.0.1:{port}"));
    assert_eq!(urls[0], urls[1]);

    let http = reqwest::Client::new();
    let tags: serde_json::Value = timeout(STOP_TIMEOUT, async {
        http.get(format!("{}/api/tags", urls[0]))
            .send()
            .await?
            .json()
            .await
    })
    .await
    .expect("/api/tags timed out")
    .expect("/api/tags");
    assert!(tags.to_string().contains("\"smollm2:135m\""), "{tags}");

    let mut stop = Command::new(&script);
    stop.args(["stop", &port]).kill_on_drop(true);
    let stopped = timeout(STOP_TIMEOUT, stop.output())
        .await
        .expect("real-ollama stop timed out")
        .expect("running real-ollama stop");
    assert_success(&stopped);
    let refused = http
        .get(format!("{}/api/version", urls[0]))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        refused.is_err_and(|e| e.is_connect()),
        "the server still answers after stop"
    );
}
