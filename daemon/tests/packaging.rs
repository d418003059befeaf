//! The `cloudllm` Debian package, built as a release would build it (packaging/debian/build.sh
//! with cargo-deb, here from the dev profile to spare a release build) and read back with
//! `dpkg-deb`: its files, their modes and owners, its conffiles and maintainer scripts, and
//! that the units and completions inside are the repository's and the CLI's own.

#![cfg(unix)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The target directory this test was built into (`<target>/<profile>/deps/<test>`), and the
/// profile directory's name.
fn target_dir() -> (PathBuf, String) {
    let exe = std::env::current_exe().expect("test executable");
    let profile_dir = exe.ancestors().nth(2).expect("profile dir");
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile name")
        .to_owned();
    (
        profile_dir.parent().expect("target dir").to_path_buf(),
        profile,
    )
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One file of the package as `dpkg-deb -c` lists it.
#[derive(Debug)]
struct Entry {
    mode: String,
    owner: String,
}

fn contents(deb: &Path) -> BTreeMap<String, Entry> {
    run(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let path = fields.last()?.trim_start_matches('.').to_owned();
            Some((
                path,
                Entry {
                    mode: fields.first()?.to_string(),
                    owner: fields.get(1)?.to_string(),
                },
            ))
        })
        .collect()
}

fn file_in(deb: &Path, path: &str) -> String {
    let dir = std::env::temp_dir().join(format!("cloudllm-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&dir));
    let text = std::fs::read_to_string(dir.join(path.trim_start_matches('/')))
        .unwrap_or_else(|e| panic!("{path} in the package: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    text
}

fn control_file(deb: &Path, name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("cloudllm-deb-ctrl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&dir));
    let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    text
}

#[test]
fn the_debian_package_holds_binaries_units_completions_and_autostart() {
    let has_cargo_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_cargo_deb,
        "cargo-deb is missing: `cargo install cargo-deb --locked` (.ci/run installs it)"
    );
    let (target, profile) = target_dir();
    let profile_arg = if profile == "release" {
        "release"
    } else {
        "dev"
    };
    let out = run(Command::new("sh")
        .arg(root().join("packaging/debian/build.sh"))
        .arg(profile_arg)
        .current_dir(root())
        .env("CARGO_TARGET_DIR", &target));
    let deb = PathBuf::from(out.lines().last().expect("the .deb's path").trim());
    assert!(deb.exists(), "{}", deb.display());

    let files = contents(&deb);
    let expect = [
        ("/usr/bin/cloudllmd", "-rwxr-xr-x"),
        ("/usr/bin/cloudllm", "-rwxr-xr-x"),
        ("/usr/bin/cloudllm-tray", "-rwxr-xr-x"),
        ("/usr/lib/systemd/system/cloudllmd.service", "-rw-r--r--"),
        ("/usr/lib/systemd/user/cloudllmd.service", "-rw-r--r--"),
        ("/usr/lib/sysusers.d/cloudllm.conf", "-rw-r--r--"),
        ("/usr/lib/tmpfiles.d/cloudllm.conf", "-rw-r--r--"),
        ("/etc/cloudllm/cloudllmd.toml", "-rw-r-----"),
        ("/etc/xdg/autostart/cloudllm-tray.desktop", "-rw-r--r--"),
        (
            "/usr/share/bash-completion/completions/cloudllm",
            "-rw-r--r--",
        ),
        ("/usr/share/zsh/vendor-completions/_cloudllm", "-rw-r--r--"),
        (
            "/usr/share/fish/vendor_completions.d/cloudllm.fish",
            "-rw-r--r--",
        ),
    ];
    for (path, mode) in expect {
        let entry = files
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not in the package: {files:#?}"));
        assert_eq!(entry.mode, mode, "{path}");
    }
    for (path, entry) in &files {
        assert_eq!(entry.owner, "0/0", "{path} belongs to root");
        let bits: Vec<char> = entry.mode.chars().collect();
        assert!(
            bits[5] != 'w' && bits[8] != 'w',
            "{path} is writable by group or others: {}",
            entry.mode
        );
        assert!(
            !entry.mode.contains('s'),
            "{path} is setuid or setgid: {}",
            entry.mode
        );
    }

    // What is inside is the repository's units and the CLI's own completions.
    assert_eq!(
        file_in(&deb, "/usr/lib/systemd/system/cloudllmd.service"),
        std::fs::read_to_string(root().join("systemd/cloudllmd.service")).unwrap()
    );
    assert_eq!(
        file_in(&deb, "/usr/lib/systemd/user/cloudllmd.service"),
        std::fs::read_to_string(root().join("systemd/user/cloudllmd.service")).unwrap()
    );
    let cli = target.join(&profile).join("cloudllm");
    let bash = run(Command::new(&cli).args(["completions", "bash"]));
    assert_eq!(
        file_in(&deb, "/usr/share/bash-completion/completions/cloudllm"),
        bash
    );
    assert!(
        bash.contains("service"),
        "completions know `cloudllm service`"
    );

    let control = control_file(&deb, "control");
    assert!(control.contains("Package: cloudllm\n"), "{control}");
    let conffiles = control_file(&deb, "conffiles");
    assert!(
        conffiles
            .lines()
            .any(|l| l == "/etc/cloudllm/cloudllmd.toml"),
        "{conffiles}"
    );
    let postinst = control_file(&deb, "postinst");
    assert!(
        postinst.contains("systemd-sysusers cloudllm.conf")
            && postinst.contains("systemd-tmpfiles --create cloudllm.conf"),
        "postinst creates the user, group and config directory:\n{postinst}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let path = root().join("packaging/debian").join(script);
        run(Command::new("sh").arg("-n").arg(&path));
    }

    // The tray's autostart entry is a valid desktop entry.
    let desktop = root().join("packaging/linux/cloudllm-tray.desktop");
    let validated = Command::new("desktop-file-validate").arg(&desktop).output();
    let validated = validated
        .expect("desktop-file-validate (Debian package desktop-file-utils; .ci/run installs it)");
    assert!(
        validated.status.success() && validated.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&validated.stdout)
    );
}
