//! `cloudllm-relay serve` under systemd's `Type=notify`: `READY=1` once it listens, `WATCHDOG=1`
//! at half of `WATCHDOG_USEC`, `STOPPING=1` on SIGTERM, then exit 0. systemd is played by a Unix
//! datagram socket the test binds as `NOTIFY_SOCKET`.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cloudllm-relay");

/// Bound on every wait in this test.
const STEP: Duration = Duration::from_secs(20);

fn recv(socket: &UnixDatagram, limit: Duration) -> Option<String> {
    socket.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    socket
        .recv(&mut buf)
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

#[test]
fn ready_after_listening_watchdog_and_stopping() {
    let dir = std::env::temp_dir().join(format!("cloudllm-relay-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    // systemd names the watched process in WATCHDOG_PID; `exec` keeps the shell's pid.
    let mut child = Command::new("sh")
        .args([
            "-c",
            "WATCHDOG_PID=$$ exec \"$0\" serve --listen 127.0.0.1:0 --dev",
            BIN,
        ])
        .env_remove("CLOUDLLM_RELAY_SECRET")
        .env_remove("CLOUDLLM_RELAY_CONFIG")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    assert_eq!(recv(&notify, STEP).as_deref(), Some("READY=1"));
    // Dev mode prints the address it listens on; it accepts connections. The reader keeps
    // draining standard output, so the relay never writes into a closed pipe.
    let stdout = child.stdout.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .split("CLOUDLLM_RELAY_URL=http://")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
            {
                let _ = addr_tx.send(addr.to_owned());
            }
        }
    });
    let addr = addr_rx
        .recv_timeout(STEP)
        .expect("dev mode prints the relay's address");
    std::net::TcpStream::connect(&addr).expect("the relay listens once READY=1 is sent");

    let mut watchdogs = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while watchdogs < 2 && Instant::now() < deadline {
        if let Some(message) = recv(&notify, Duration::from_secs(1)) {
            assert_eq!(message, "WATCHDOG=1");
            watchdogs += 1;
        }
    }
    assert_eq!(watchdogs, 2, "WATCHDOG=1 at half of WATCHDOG_USEC");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut stopping = false;
    let deadline = Instant::now() + STEP;
    while !stopping && Instant::now() < deadline {
        stopping = recv(&notify, Duration::from_secs(1)).as_deref() == Some("STOPPING=1");
    }
    assert!(stopping, "STOPPING=1 when the drain begins");
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(dir);
}
