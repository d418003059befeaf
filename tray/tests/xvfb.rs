//! The real `cloudllm-tray` binary on a real X display (Xvfb) with a real tray host (`trayer`,
//! through AppIndicator's XEmbed fallback), following a real daemon that tunnels to a real
//! relay (both in this process, on loopback) in front of the fake Ollama.
//!
//! The test looks at the screen as a user would: it finds the icon by its colour in
//! screenshots, opens the menu with a mouse click, picks items with the keyboard, and checks
//! the effect both on screen and on the daemon and relay. Needs `Xvfb`, `trayer`, `xdotool`,
//! ImageMagick's `import` and `xclip` (`.ci/run` installs them); `CLOUDLLM_SKIP_TRAY_TEST=1`
//! skips it knowingly.

#![cfg(all(feature = "gui", target_os = "linux"))]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cloudllm_e2e::{Stack, TestDaemon, init_logs, relay_config};
use cloudllm_ipc_client::Client;
use cloudllm_proto::ipc::{Connection, Request, Response, Status};
use cloudllm_relay::RelayConfig;
use cloudllm_tray::icon::colour;
use cloudllm_tray::view::Look;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_cloudllm-tray");

/// Bound on every wait in this test.
const STEP: Duration = Duration::from_secs(20);

/// The product's promise: the icon follows a change of the daemon's state within a second.
const UPDATE_BOUND: Duration = Duration::from_secs(1);

/// The web page the test relay publishes.
const WEB_PAGE: &str = "https://relay.example.com/account";

/// Screen size: room for the tray bar and the menu below it.
const WIDTH: usize = 640;
const HEIGHT: usize = 300;

/// Fewer pixels of a look's colour than this means its icon is not on screen; the smallest
/// icon (the ring, at trayer's size) has well over a hundred.
const MIN_ICON_PIXELS: usize = 40;

/// Whether to run, or why not. Missing tools fail the test unless skipping was asked for.
fn should_run() -> bool {
    if std::env::var("CLOUDLLM_SKIP_TRAY_TEST").as_deref() == Ok("1") {
        eprintln!("tray test skipped: CLOUDLLM_SKIP_TRAY_TEST=1");
        return false;
    }
    for (tool, package) in [
        ("Xvfb", "xvfb"),
        ("trayer", "trayer"),
        ("xdotool", "xdotool"),
        ("import", "imagemagick"),
        ("xclip", "xclip"),
    ] {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).exists()));
        assert!(
            found,
            "`{tool}` is missing: `apt-get install {package}` (the tray test needs Xvfb, trayer, \
             xdotool, imagemagick and xclip), or set CLOUDLLM_SKIP_TRAY_TEST=1 to skip it"
        );
    }
    true
}

/// A private X server on a display number it picks itself.
async fn start_xvfb() -> (Child, String) {
    let mut xvfb = Command::new("Xvfb")
        .args(["-displayfd", "1", "-nolisten", "tcp", "-screen", "0"])
        .arg(format!("{WIDTH}x{HEIGHT}x24"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting Xvfb");
    let mut lines = tokio::io::BufReader::new(xvfb.stdout.take().expect("Xvfb's stdout")).lines();
    let number = tokio::time::timeout(STEP, lines.next_line())
        .await
        .expect("Xvfb did not say its display in time")
        .expect("reading Xvfb's display")
        .expect("Xvfb exited");
    (xvfb, format!(":{}", number.trim()))
}

/// A desktop for one test: a private X server with a tray host on it.
struct Desktop {
    /// The X display, as `DISPLAY` takes it.
    display: String,
    _xvfb: Child,
    _trayer: Child,
}

impl Desktop {
    /// Starts the desktop, with daemon logs captured for the tray's "Save logs"; `None` if
    /// the test is to be skipped (see [`should_run`]).
    async fn start() -> Option<Desktop> {
        if !should_run() {
            return None;
        }
        init_logs();
        let (xvfb, display) = start_xvfb().await;
        let trayer = start_trayer(&display);
        Some(Desktop {
            display,
            _xvfb: xvfb,
            _trayer: trayer,
        })
    }
}

/// `trayer`: an XEmbed system tray along the top edge.
fn start_trayer(display: &str) -> Child {
    Command::new("trayer")
        .args(["--edge", "top", "--align", "left", "--widthtype", "request"])
        .args([
            "--height",
            "32",
            "--transparent",
            "false",
            "--tint",
            "0x202020",
        ])
        .env("DISPLAY", display)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting trayer")
}

/// The tray binary on `display`, without a session bus (so AppIndicator falls back to XEmbed).
/// What it asks the desktop to open is written to `opened`, one line each, by a stand-in
/// `xdg-open` found first on its `PATH`.
fn start_tray(
    display: &str,
    socket: &Path,
    log: &Path,
    opened: &Path,
    runtime_dir: &Path,
) -> Child {
    let bin = opened.with_file_name("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let opener = bin.join("xdg-open");
    std::fs::write(
        &opener,
        format!("#!/bin/sh\necho \"$1\" >> '{}'\n", opened.display()),
    )
    .expect("writing the opener");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&opener, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    Command::new(BIN)
        .env("PATH", path)
        .arg("--socket")
        .arg(socket)
        .env("DISPLAY", display)
        .env("XDG_RUNTIME_DIR", runtime_dir)
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("tray log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("starting cloudllm-tray")
}

/// Waits until the stand-in opener has been called `count` times; returns what it was given.
async fn wait_for_opened(opened: &Path, count: usize) -> Vec<String> {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(opened).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= count {
            return lines;
        }
        assert!(
            started.elapsed() < STEP,
            "the opener was called {} times, not {count}: {lines:?}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A screenshot: RGB, rows top to bottom.
struct Shot {
    rgb: Vec<u8>,
}

/// A rectangle of the screen: left, top, right, bottom (inclusive).
#[derive(Debug, Clone, Copy)]
struct Rect(usize, usize, usize, usize);

impl Shot {
    async fn take(display: &str) -> Shot {
        let output = tokio::time::timeout(
            STEP,
            Command::new("import")
                .args([
                    "-silent", "-window", "root", "-depth", "8", "-display", display, "ppm:-",
                ])
                .output(),
        )
        .await
        .expect("import timed out")
        .expect("running import");
        assert!(output.status.success(), "import failed: {output:?}");
        Shot {
            rgb: parse_ppm(&output.stdout),
        }
    }

    fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let at = (y * WIDTH + x) * 3;
        [self.rgb[at], self.rgb[at + 1], self.rgb[at + 2]]
    }

    /// Pixels of `rgb` (give or take scaling's rounding) inside `region`, or on the whole screen.
    fn count(&self, rgb: [u8; 3], region: Option<Rect>) -> usize {
        let Rect(left, top, right, bottom) = region.unwrap_or(Rect(0, 0, WIDTH - 1, HEIGHT - 1));
        (top..=bottom)
            .flat_map(|y| (left..=right).map(move |x| (x, y)))
            .filter(|&(x, y)| close(self.pixel(x, y), rgb))
            .count()
    }

    /// The smallest rectangle holding every pixel of `rgb`.
    fn bounds(&self, rgb: [u8; 3]) -> Option<Rect> {
        let mut found: Option<Rect> = None;
        for y in 0..HEIGHT {
            for x in 0..WIDTH {
                if close(self.pixel(x, y), rgb) {
                    let r = found.get_or_insert(Rect(x, y, x, y));
                    *r = Rect(r.0.min(x), r.1.min(y), r.2.max(x), r.3.max(y));
                }
            }
        }
        found
    }

    /// How many pixels differ from `other` outside `region`.
    fn changed_outside(&self, other: &Shot, region: Rect) -> usize {
        let Rect(left, top, right, bottom) = region;
        (0..HEIGHT)
            .flat_map(|y| (0..WIDTH).map(move |x| (x, y)))
            .filter(|&(x, y)| !(left..=right).contains(&x) || !(top..=bottom).contains(&y))
            .filter(|&(x, y)| self.pixel(x, y) != other.pixel(x, y))
            .count()
    }

    /// The pixels of `region`, for comparing one state's icon with another's.
    fn region(&self, region: Rect) -> Vec<[u8; 3]> {
        let Rect(left, top, right, bottom) = region;
        (top..=bottom)
            .flat_map(|y| (left..=right).map(move |x| (x, y)))
            .map(|(x, y)| self.pixel(x, y))
            .collect()
    }
}

fn close(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter().zip(b).all(|(a, b)| a.abs_diff(b) <= 6)
}

/// Reads a binary PPM (P6, 8 bits) of the screen's size.
fn parse_ppm(data: &[u8]) -> Vec<u8> {
    let mut fields = Vec::new();
    let mut at = 0;
    while fields.len() < 4 {
        while data[at].is_ascii_whitespace() {
            at += 1;
        }
        let start = at;
        while !data[at].is_ascii_whitespace() {
            at += 1;
        }
        fields.push(std::str::from_utf8(&data[start..at]).expect("PPM header"));
    }
    assert_eq!(fields[0], "P6", "not a binary PPM");
    assert_eq!(
        fields[1..],
        [WIDTH.to_string(), HEIGHT.to_string(), "255".into()]
    );
    let pixels = data[at + 1..].to_vec();
    assert_eq!(pixels.len(), WIDTH * HEIGHT * 3);
    pixels
}

/// Waits until `look`'s icon is on screen (in `region` if given); returns the screenshot and
/// how long it took. On failure the panic says which looks the last screen held and what the
/// tray (whose standard error is `tray_log`) had logged, and keeps that screen for a look.
async fn wait_for_look(
    display: &str,
    look: Look,
    region: Option<Rect>,
    tray_log: &Path,
) -> (Shot, Duration) {
    let started = Instant::now();
    loop {
        let shot = Shot::take(display).await;
        if shot.count(colour(look), region) >= MIN_ICON_PIXELS {
            return (shot, started.elapsed());
        }
        if started.elapsed() >= STEP {
            let path = scratch_file("last-screen.ppm");
            let header = format!("P6\n{WIDTH} {HEIGHT}\n255\n");
            let _ = std::fs::write(&path, [header.as_bytes(), &shot.rgb].concat());
            let seen: Vec<(Look, usize)> = Look::ALL
                .into_iter()
                .map(|other| (other, shot.count(colour(other), None)))
                .filter(|&(_, pixels)| pixels > 0)
                .collect();
            let logged = std::fs::read_to_string(tray_log).unwrap_or_default();
            panic!(
                "the {look:?} icon never showed (in {region:?}); pixels of each look on the \
                 last screen: {seen:?} (kept in {}); the tray logged:\n{logged}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn xdotool(display: &str, args: &[&str]) {
    let status = tokio::time::timeout(
        STEP,
        Command::new("xdotool")
            .args(args)
            .env("DISPLAY", display)
            .status(),
    )
    .await
    .expect("xdotool timed out")
    .expect("running xdotool");
    assert!(status.success(), "xdotool {args:?} failed");
}

/// Clicks the icon and waits until its menu covers part of the screen.
async fn open_menu(display: &str, icon: Rect) {
    let before = Shot::take(display).await;
    let (x, y) = ((icon.0 + icon.2) / 2, (icon.1 + icon.3) / 2);
    xdotool(
        display,
        &["mousemove", &x.to_string(), &y.to_string(), "click", "1"],
    )
    .await;
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if Shot::take(display).await.changed_outside(&before, icon) > 2000 {
            return;
        }
        assert!(started.elapsed() < STEP, "clicking the icon opened no menu");
    }
}

async fn status(socket: &Path) -> Status {
    let mut client = tokio::time::timeout(STEP, Client::connect(socket))
        .await
        .expect("connect timed out")
        .expect("connect to the daemon");
    match tokio::time::timeout(STEP, client.call(&Request::Status))
        .await
        .expect("status timed out")
        .expect("status")
    {
        Response::Status(status) => status,
        other => panic!("unexpected answer: {other:?}"),
    }
}

/// Polls the daemon until its connection satisfies `done`; returns when it first did.
async fn wait_for_connection(socket: &Path, done: impl Fn(&Connection) -> bool) -> Instant {
    let started = Instant::now();
    loop {
        if done(&status(socket).await.connection) {
            return Instant::now();
        }
        assert!(started.elapsed() < STEP, "the daemon never got there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn clipboard(display: &str) -> String {
    let output = tokio::time::timeout(
        STEP,
        Command::new("xclip")
            .args(["-o", "-selection", "clipboard"])
            .env("DISPLAY", display)
            .output(),
    )
    .await
    .expect("xclip timed out")
    .expect("running xclip");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn scratch_file(name: &str) -> PathBuf {
    cloudllm_e2e::scratch_dir().join(name)
}

/// The tray binary running on a test's desktop.
struct Tray {
    process: Child,
    /// Its standard error.
    log: PathBuf,
    /// What it asked the desktop to open (see [`start_tray`]).
    opened: PathBuf,
    /// Where its icon is on the screen.
    icon: Rect,
    /// Its `XDG_RUNTIME_DIR`.
    runtime_dir: PathBuf,
}

impl Tray {
    /// Starts the tray on `desktop` for the daemon at `socket` and waits until its icon shows
    /// a connected daemon; gives the tray and the screenshot that showed it.
    async fn start_connected(desktop: &Desktop, socket: &Path) -> (Tray, Shot) {
        let log = scratch_file("tray.log");
        let opened = scratch_file("opened.txt");
        let runtime_dir = cloudllm_e2e::scratch_dir();
        let process = start_tray(&desktop.display, socket, &log, &opened, &runtime_dir);
        eprintln!("tray log: {}", log.display());
        let (shot, _) = wait_for_look(&desktop.display, Look::Connected, None, &log).await;
        let icon = shot
            .bounds(colour(Look::Connected))
            .expect("the icon's pixels");
        let tray = Tray {
            process,
            log,
            opened,
            icon,
            runtime_dir,
        };
        (tray, shot)
    }

    /// The tray's icon directories and any shared `tray-icon` directory in its runtime
    /// directory, by name (the desktop libraries may keep other things there).
    fn icon_dirs(&self) -> Vec<String> {
        std::fs::read_dir(&self.runtime_dir)
            .expect("the tray's runtime directory")
            .map(|entry| {
                entry
                    .expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|name| name.starts_with("cloudllm-tray-") || name.starts_with("tray-icon"))
            .collect()
    }

    /// What the tray has logged so far.
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_icon_follows_the_daemon_and_its_menu_drives_it() {
    let Some(desktop) = Desktop::start().await else {
        return;
    };
    let display = &desktop.display;

    let Stack {
        relay,
        backend: _backend,
        daemon,
        socket,
        daemon_config: config,
        ..
    } = Stack::with_relay_config(RelayConfig {
        web_url: Some(WEB_PAGE.parse().expect("URL")),
        ..relay_config()
    })
    .await;

    // Connected: a green filled circle appears in the tray bar.
    let (mut tray, shot) = Tray::start_connected(&desktop, &socket).await;
    let icon = tray.icon;
    assert!(
        icon.3 < 40,
        "the icon is in the tray bar at the top: {icon:?}"
    );
    let connected_pixels = shot.region(icon);

    // The images handed to the desktop are in a directory of the tray's own, not in the
    // `tray-icon` directory every program built on the same library shares.
    let entries = tray.icon_dirs();
    assert!(
        matches!(&entries[..], [name] if name.starts_with("cloudllm-tray-")),
        "the runtime directory holds {entries:?}"
    );
    let icon_dir = tray.runtime_dir.join(&entries[0]);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&icon_dir)
            .expect("icon dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{}", icon_dir.display());
    }
    assert!(
        std::fs::read_dir(&icon_dir)
            .expect("icon dir")
            .any(|entry| entry
                .expect("an entry")
                .file_name()
                .to_string_lossy()
                .ends_with(".png")),
        "no icon image in {}",
        icon_dir.display()
    );

    // "Disconnect" (the first item that can be picked) closes the daemon's tunnel.
    open_menu(display, icon).await;
    xdotool(display, &["key", "Down", "Return"]).await;
    let disconnected_at =
        wait_for_connection(&socket, |c| matches!(c, Connection::Disconnected)).await;
    relay.wait_for_devices("alice", 0).await;
    let (shot, _) = wait_for_look(display, Look::Disconnected, Some(icon), &tray.log).await;
    let shown_after = disconnected_at.elapsed();
    assert!(
        shown_after <= UPDATE_BOUND,
        "the icon changed {shown_after:?} after the daemon did"
    );
    assert_eq!(shot.count(colour(Look::Connected), None), 0);
    assert_ne!(
        shot.region(icon),
        connected_pixels,
        "the icon region changed"
    );

    // A change made elsewhere (`cloudllm connect`) shows within the bound too.
    let mut client = Client::connect(&socket).await.expect("connect");
    let answer = tokio::time::timeout(STEP, client.call(&Request::Connect))
        .await
        .expect("connect timed out")
        .expect("connect");
    assert_eq!(answer, Response::Ok);
    let connected_at =
        wait_for_connection(&socket, |c| matches!(c, Connection::Connected { .. })).await;
    relay.wait_for_devices("alice", 1).await;
    wait_for_look(display, Look::Connected, Some(icon), &tray.log).await;
    let shown_after = connected_at.elapsed();
    assert!(
        shown_after <= UPDATE_BOUND,
        "the icon changed {shown_after:?} after the daemon did"
    );

    // "Copy API URL" (the second item) puts the relay's OpenAI base URL on the clipboard.
    open_menu(display, icon).await;
    xdotool(display, &["key", "Down", "Down", "Return"]).await;
    let expected = format!("{}/v1", relay.url().as_str().trim_end_matches('/'));
    let started = Instant::now();
    while clipboard(display).await != expected {
        assert!(
            started.elapsed() < STEP,
            "clipboard holds {:?}, not {expected}",
            clipboard(display).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // "Open web page" (the third item, there because the relay publishes a page) hands the
    // page to the desktop's opener; "Show logs" (the fourth) hands it a file of the daemon's
    // log lines. The opener here is a stand-in `xdg-open` that writes down what it was given.
    tokio::time::sleep(Duration::from_millis(500)).await;
    open_menu(display, icon).await;
    xdotool(display, &["key", "Down", "Down", "Down", "Return"]).await;
    assert_eq!(wait_for_opened(&tray.opened, 1).await[0], WEB_PAGE);
    open_menu(display, icon).await;
    xdotool(display, &["key", "Down", "Down", "Down", "Down", "Return"]).await;
    let log_file = wait_for_opened(&tray.opened, 2).await[1].clone();
    let lines = std::fs::read_to_string(&log_file).expect("the log file");
    assert!(lines.contains("tunnel up"), "{log_file}: {lines}");

    // The daemon dies: the tray shows it, stays up, and picks the daemon up again when it is back.
    drop(daemon);
    wait_for_look(display, Look::NoDaemon, Some(icon), &tray.log).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        tray.process.try_wait().expect("tray status").is_none(),
        "the tray exited when the daemon died: {}",
        tray.log_text()
    );
    // Back, but with its Ollama down: the error triangle.
    let mut config = config;
    config.ollama_url = closed_port_url();
    let daemon = TestDaemon::start(config);
    relay.wait_for_devices("alice", 1).await;
    wait_for_look(display, Look::Error, Some(icon), &tray.log).await;

    // The relay goes away: the daemon keeps re-dialling, shown as the ring.
    relay.stop().await;
    wait_for_look(display, Look::Connecting, Some(icon), &tray.log).await;

    // "Quit" (the last item) ends the tray, not the daemon.
    open_menu(display, icon).await;
    xdotool(display, &["key", "Up", "Return"]).await;
    let exit = tokio::time::timeout(STEP, tray.process.wait())
        .await
        .expect("the tray did not quit")
        .expect("tray status");
    assert!(exit.success(), "tray exit: {exit:?}\n{}", tray.log_text());
    assert_eq!(
        tray.icon_dirs(),
        Vec::<String>::new(),
        "the icon directory outlived the tray"
    );
    assert!(matches!(
        status(&socket).await.connection,
        Connection::Reconnecting { .. }
    ));
    assert!(!daemon.is_finished());
    daemon.stop().await.expect("daemon stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_web_page_signs_the_browser_in_on_a_relay_without_a_page_of_its_own() {
    let Some(desktop) = Desktop::start().await else {
        return;
    };
    let display = &desktop.display;
    let stack = Stack::start().await;
    let (tray, _) = Tray::start_connected(&desktop, &stack.socket).await;
    let icon = tray.icon;

    // "Open web page" (the third item: the relay publishes no page, so it is the relay's own)
    // hands the opener a one-time link that signs a browser in.
    tokio::time::sleep(Duration::from_millis(500)).await;
    open_menu(display, icon).await;
    xdotool(display, &["key", "Down", "Down", "Down", "Return"]).await;
    let link = wait_for_opened(&tray.opened, 1).await[0].clone();
    let code = link
        .strip_prefix(&format!("{}#open=", stack.relay.url()))
        .unwrap_or_else(|| panic!("not a sign-in link of the relay: {link}"))
        .to_owned();
    let exchange = stack.relay.exchange_open_code(&code).await;
    assert_eq!(exchange.status(), 200, "the link did not sign in");
    assert!(
        !tray.log_text().contains(&code),
        "the link is in the tray's log"
    );
    stack.daemon.stop().await.expect("daemon stop");
}

/// A loopback URL where nothing listens (a port the system gave out and took back).
fn closed_port_url() -> url::Url {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    drop(listener);
    url::Url::parse(&format!("http://127.0.0.1:{port}")).expect("URL")
}

#[tokio::test]
async fn without_a_display_or_a_tray_host_it_exits_with_one_line() {
    if !should_run() {
        return;
    }
    let socket = scratch_file("none.sock");
    let no_display = tokio::time::timeout(
        STEP,
        Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .output(),
    )
    .await
    .expect("the tray did not exit")
    .expect("running the tray");
    assert!(!no_display.status.success());
    let said = String::from_utf8_lossy(&no_display.stderr);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.contains("no display"), "{said}");

    // A display but no panel: nothing owns the system tray selection, no session bus.
    let (_xvfb, display) = start_xvfb().await;
    let no_tray = tokio::time::timeout(
        STEP,
        Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .args(["--wait-for-tray", "500ms"])
            .env("DISPLAY", &display)
            .env_remove("WAYLAND_DISPLAY")
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .output(),
    )
    .await
    .expect("the tray did not exit")
    .expect("running the tray");
    assert!(!no_tray.status.success());
    let said = String::from_utf8_lossy(&no_tray.stderr);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.contains("no system tray"), "{said}");
}
