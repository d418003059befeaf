//! `docs/cloudllmd.example.toml` is the daemon's settings reference: as shipped (every line
//! commented) it loads to the defaults, and with every setting uncommented it loads and sets
//! every field the file may set. A field added to `DaemonConfig` stops this test from
//! compiling until the example (and this list) names it, so the docs cannot drift.

use std::path::{Path, PathBuf};

use cloudllm_daemon::DaemonConfig;
use cloudllm_daemon::config::{SETTINGS, StoreChoice};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cloudllmd.example.toml")
}

/// The example with `# key = value` lines turned into settings.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if is_setting(rest) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_setting(line: &str) -> bool {
    line.split_once(" = ").is_some_and(|(key, _)| {
        !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    })
}

fn load(text: &str) -> DaemonConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloudllmd.toml");
    std::fs::write(&path, text).unwrap();
    DaemonConfig::load(&path).unwrap_or_else(|err| panic!("{err:#}"))
}

#[test]
fn as_shipped_it_is_all_defaults() {
    let text = std::fs::read_to_string(example()).unwrap();
    let shipped = load(&text);
    let defaults = DaemonConfig::default();
    assert_eq!(shipped.relay_url, defaults.relay_url);
    assert_eq!(shipped.ollama_url, defaults.ollama_url);
    assert_eq!(shipped.reconnect_max, defaults.reconnect_max);
}

#[test]
fn every_setting_is_named_and_loads() {
    let text = std::fs::read_to_string(example()).unwrap();
    let config = load(&uncommented(&text));
    let defaults = DaemonConfig::default();
    // Exhaustive on purpose: a new field is a compile error here until it is documented.
    let DaemonConfig {
        relay_url,
        ollama_url,
        token: _, // never from the file
        device_name,
        device_id,
        ca_file,
        allow_model_management: _, // its default is what the example shows
        ping_interval,
        ping_timeout,
        reconnect_max,
        shutdown_grace,
        socket_path,
        state_dir,
        operator_group,
        credential_store,
        system: _,           // a flag, not a setting
        ipc_idle_timeout: _, // for tests only
        file: _,             // where the settings came from
    } = config;
    assert!(relay_url.is_some());
    assert!(device_id.is_some());
    assert!(ca_file.is_some());
    assert!(socket_path.is_some());
    assert!(state_dir.is_some());
    assert!(operator_group.is_some());
    assert_ne!(device_name, "");
    // The defaults the example states are the code's.
    assert_eq!(ollama_url, defaults.ollama_url);
    assert_eq!(ping_interval, defaults.ping_interval);
    assert_eq!(ping_timeout, defaults.ping_timeout);
    assert_eq!(reconnect_max, defaults.reconnect_max);
    assert_eq!(shutdown_grace, defaults.shutdown_grace);
    assert_eq!(credential_store, StoreChoice::Auto);
    // Every setting `cloudllm config` knows is shown (commented) in the example.
    for key in SETTINGS {
        assert!(
            text.contains(&format!("# {key} = ")),
            "the example does not show {key}"
        );
    }
}
