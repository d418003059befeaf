//! Config files, as an operator (or a careless edit) could write them: the relay's
//! `RelayConfig` and the daemon's `DaemonConfig`, from TOML through the presets to
//! `validate()`, and the daemon's settings as `cloudllm config get` shows them.
//!
//! Never panics: every mistake is an error message.

#![no_main]

use cloudllm_daemon::DaemonConfig;
use cloudllm_daemon::config::SETTINGS;
use cloudllm_relay::RelayConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mut config) = toml::from_str::<RelayConfig>(text) {
        // `[tls]` makes `validate()` read the files it names: not the parser's business, and a
        // fuzzer that finds `/dev/zero` would hang on it.
        config.tls = None;
        if config.apply_presets().is_ok() {
            let _ = config.validate();
            let _ = config.claim_rules();
            let _ = config.tier(Some("premium"));
            let _ = config.tier(None);
            let _ = config.liveness();
        }
    }
    if let Ok(config) = toml::from_str::<DaemonConfig>(text) {
        let _ = config.validate();
        for key in SETTINGS {
            let _ = config.get(key);
        }
    }
});
