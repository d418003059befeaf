//! The launchd property lists in `packaging/macos/` are well-formed XML that a strict parser
//! accepts (launchd's own, Python's `plistlib`, `xmllint`), and hold what launchd needs to run
//! cloudllm: the label, the program, and for the daemon an exit timeout longer than its drain.
//!
//! A lenient parser is not enough: the `plist` crate reads a comment holding `--` without a
//! word, while `plutil -lint` and `plistlib` refuse the whole file.

use std::path::{Path, PathBuf};

use cloudllm_daemon::DaemonConfig;
use quick_xml::events::Event;

/// `packaging/macos/` in the workspace.
fn macos_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("packaging/macos")
}

/// Every `.plist` in `packaging/macos/`, sorted.
fn plists() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(macos_dir())
        .expect("packaging/macos")
        .map(|entry| entry.expect("listing packaging/macos").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "plist"))
        .collect();
    found.sort();
    found
}

/// Reads `text` as XML with every check quick-xml offers (comments, end tag names) and
/// returns the name of the root element, or where and why the text is not well-formed.
fn strict_root(text: &str) -> Result<String, String> {
    let mut reader = quick_xml::Reader::from_str(text);
    let config = reader.config_mut();
    config.check_comments = true;
    config.check_end_names = true;
    let mut depth = 0usize;
    let mut root = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|err| format!("at byte {}: {err}", reader.error_position()))?;
        match event {
            Event::Start(start) => {
                if depth == 0 && root.is_some() {
                    return Err("two root elements".to_owned());
                }
                if depth == 0 {
                    root = Some(start.name().into_inner().to_owned());
                }
                depth += 1;
            }
            Event::End(_) => depth -= 1,
            Event::Eof => break,
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unclosed elements".to_owned());
    }
    root.ok_or_else(|| "no root element".to_owned())
}

#[test]
fn the_strict_check_refuses_a_double_hyphen_in_a_comment() {
    let bad = "<?xml version=\"1.0\"?>\n<!-- run `cloudllm service install --user` -->\n<plist></plist>\n";
    let err = strict_root(bad).unwrap_err();
    assert!(err.contains("--"), "{err}");
    let good = bad.replace(" --user", "");
    assert_eq!(strict_root(&good).as_deref(), Ok("plist"));
}

#[test]
fn every_launchd_plist_is_well_formed_and_names_its_label_program_and_exit_timeout() {
    let found = plists();
    let names: Vec<String> = found
        .iter()
        .filter_map(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "com.cloudllm.tray.plist",
            "launch-agent.plist",
            "launch-daemon.plist"
        ],
        "a new plist needs its expectations here"
    );
    // launchd sends SIGKILL after ExitTimeOut: the daemon's drain must fit well inside it.
    let grace = DaemonConfig::default().shutdown_grace.as_secs();
    for path in &found {
        let text = std::fs::read_to_string(path).expect("reading the plist");
        let root = strict_root(&text)
            .unwrap_or_else(|err| panic!("{} is not well-formed XML {err}", path.display()));
        assert_eq!(root, "plist", "{}", path.display());
        let dict = plist::Value::from_reader_xml(text.as_bytes())
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
            .into_dictionary()
            .unwrap_or_else(|| panic!("{}: no dictionary at the top", path.display()));
        let label = dict.get("Label").and_then(|v| v.as_string());
        let program: Vec<&str> = dict
            .get("ProgramArguments")
            .and_then(|v| v.as_array())
            .unwrap_or_else(|| panic!("{}: no ProgramArguments", path.display()))
            .iter()
            .map(|v| v.as_string().expect("ProgramArguments holds strings"))
            .collect();
        let exit_timeout = dict.get("ExitTimeOut").and_then(|v| v.as_signed_integer());
        match path.file_name().and_then(|n| n.to_str()) {
            Some("com.cloudllm.tray.plist") => {
                assert_eq!(label, Some("com.cloudllm.tray"));
                assert_eq!(program, ["/usr/local/bin/cloudllm-tray"]);
            }
            Some(name) => {
                assert_eq!(label, Some("com.cloudllm.cloudllmd"), "{name}");
                let args: &[&str] = if name == "launch-daemon.plist" {
                    &["/usr/local/bin/cloudllmd", "--system"]
                } else {
                    &["/usr/local/bin/cloudllmd"]
                };
                assert_eq!(program, args, "{name}");
                let exit_timeout = exit_timeout.unwrap_or_else(|| panic!("{name}: no ExitTimeOut"));
                assert!(
                    u64::try_from(exit_timeout).is_ok_and(|t| t >= grace + 10),
                    "{name}: ExitTimeOut {exit_timeout} s leaves no room after a {grace} s drain"
                );
            }
            None => unreachable!("listed files have names"),
        }
    }
}
