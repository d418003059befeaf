//! The `cloudllmd` binary refuses to start with a missing or bad setting, and says which one.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cloudllmd");

/// The daemon with an empty environment and a home of its own (so no user config is read).
fn daemon(home: &std::path::Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command
}

fn stderr_of(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn missing_and_bad_settings_are_named() {
    let home = std::env::temp_dir().join(format!("cloudllmd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();

    let err = stderr_of(&mut daemon(&home));
    assert!(
        err.contains("no relay URL") && err.contains("CLOUDLLM_RELAY_URL"),
        "{err}"
    );

    let err = stderr_of(daemon(&home).env("CLOUDLLM_RELAY_URL", "http://127.0.0.1:1"));
    assert!(
        err.contains("no agent token") && err.contains("CLOUDLLM_TOKEN"),
        "{err}"
    );

    let err = stderr_of(daemon(&home).env("CLOUDLLM_RELAY_URL", "relay.example.com"));
    assert!(
        err.contains("CLOUDLLM_RELAY_URL=\"relay.example.com\" is not a URL"),
        "{err}"
    );

    let config_dir = home.join(".config/cloudllm");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(
        config_dir.join("cloudllmd.toml"),
        "relay_url = \"http://127.0.0.1:1\"\nolama_url = \"x\"\n",
    )
    .unwrap();
    let err = stderr_of(&mut daemon(&home));
    assert!(
        err.contains("cloudllmd.toml") && err.contains("olama_url"),
        "{err}"
    );

    let _ = std::fs::remove_dir_all(home);
}
