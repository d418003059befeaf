//! The tray's autostart files under `packaging/` are valid for their platform and start the
//! tray binary: the XDG autostart entry (checked with `desktop-file-validate` from
//! `desktop-file-utils`), the macOS LaunchAgent (parsed as a property list) and the Windows
//! per-user Run entry (a `.reg` file).

use std::path::PathBuf;

fn packaging(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(path)
}

#[test]
fn the_xdg_autostart_entry_is_valid_and_starts_the_tray() {
    let path = packaging("linux/cloudllm-tray.desktop");
    let text = std::fs::read_to_string(&path).expect("the desktop file");
    let keys: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    let value = |key: &str| keys.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    assert_eq!(value("Type"), Some("Application"));
    assert_eq!(value("Exec"), Some("cloudllm-tray"));
    assert_eq!(value("Terminal"), Some("false"));
    assert_eq!(value("X-GNOME-Autostart-enabled"), Some("true"));

    let validate = std::process::Command::new("desktop-file-validate")
        .arg(&path)
        .output();
    let output = match validate {
        Ok(output) => output,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
            "`desktop-file-validate` is missing: `apt-get install desktop-file-utils` (.ci/run does)"
        ),
        Err(err) => panic!("running desktop-file-validate: {err}"),
    };
    assert!(
        output.status.success() && output.stdout.is_empty(),
        "desktop-file-validate: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn the_launch_agent_starts_the_tray_at_login_and_respects_quit() {
    let agent: plist::Dictionary =
        plist::from_file(packaging("macos/com.cloudllm.tray.plist")).expect("a property list");
    assert_eq!(
        agent.get("Label").and_then(|v| v.as_string()),
        Some("com.cloudllm.tray")
    );
    let program = agent
        .get("ProgramArguments")
        .and_then(|v| v.as_array())
        .and_then(|args| args.first())
        .and_then(|v| v.as_string())
        .expect("a program");
    assert!(program.ends_with("/cloudllm-tray"), "{program}");
    assert_eq!(
        agent.get("RunAtLoad").and_then(|v| v.as_boolean()),
        Some(true)
    );
    // Restarted after a crash, not after Quit (which exits 0).
    let keep_alive = agent
        .get("KeepAlive")
        .and_then(|v| v.as_dictionary())
        .expect("KeepAlive");
    assert_eq!(
        keep_alive
            .get("SuccessfulExit")
            .and_then(|v| v.as_boolean()),
        Some(false)
    );
    assert_eq!(
        agent
            .get("LimitLoadToSessionType")
            .and_then(|v| v.as_string()),
        Some("Aqua"),
        "only in a graphical login"
    );
}

#[test]
fn the_windows_run_entry_is_per_user_and_starts_the_tray() {
    let text = std::fs::read_to_string(packaging("windows/cloudllm-tray-autostart.reg"))
        .expect("the .reg file");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "Windows Registry Editor Version 5.00");
    assert!(text.contains("\r\n"), "regedit expects CRLF line ends");
    let key = lines
        .iter()
        .position(|line| line.starts_with('['))
        .expect("a key");
    assert_eq!(
        lines[key],
        r"[HKEY_CURRENT_USER\Software\Microsoft\Windows\CurrentVersion\Run]"
    );
    let (name, value) = lines[key + 1].split_once('=').expect("a value");
    assert_eq!(name, "\"cloudllm-tray\"");
    assert!(
        value.ends_with(r#"\\cloudllm-tray.exe\"""#),
        "a quoted path to the tray: {value}"
    );
}
