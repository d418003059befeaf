//! `cloudllm service`: the plans for Linux, macOS and Windows (checked on this machine, since
//! planning is pure), `systemd-analyze verify` on every unit as it would be installed, the
//! launchd plists read back as property lists, `--dry-run` output, the refusal without root,
//! and install / install again / uninstall / status carried out against a stand-in `systemctl`
//! (a script that records its arguments: this machine runs no systemd user manager).

#![cfg(unix)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use cloudllm_cli::service::{
    self, Action, LAUNCHD_LABEL, OnFailure, Operation, PlanError, Platform, Scope, Target, When,
};

const BIN: &str = env!("CARGO_BIN_EXE_cloudllm");
/// The relay's unit: not installed by `cloudllm service`, verified all the same.
const RELAY_UNIT: &str = include_str!("../../systemd/cloudllm-relay.service");
/// The uid the "another user" tests run as.
const NOBODY: u32 = 65534;

/// The built `cloudllm`, and `cloudllmd` when it was built beside it, placed once in a directory
/// outside any home, as a package puts them in `/usr/bin`: a system service refuses a daemon
/// under `/home` or `/root`, where this checkout and its build may well be. Returns the CLI's
/// path there; `cloudllm service` finds the daemon beside it, as it does once installed.
fn installed_cli() -> &'static Path {
    static CLI: OnceLock<PathBuf> = OnceLock::new();
    CLI.get_or_init(|| {
        let temp = std::env::temp_dir();
        let outside_home = if temp.starts_with("/home") || temp.starts_with("/root") {
            PathBuf::from("/tmp")
        } else {
            temp
        };
        let dir = outside_home.join(format!("cloudllm-service-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the installed binaries");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("a directory other users may enter");
        for name in ["cloudllm", "cloudllmd"] {
            let built = Path::new(BIN).with_file_name(name);
            let placed = dir.join(name);
            let _ = std::fs::remove_file(&placed);
            if built.exists() && std::fs::hard_link(&built, &placed).is_err() {
                std::fs::copy(&built, &placed).expect("copying a built binary");
            }
        }
        dir.join("cloudllm")
    })
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cloudllm-service-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn target(platform: Platform, scope: Scope, cloudllmd: &str) -> Target {
    Target {
        platform,
        scope,
        cloudllmd: PathBuf::from(cloudllmd),
        home: PathBuf::from("/home/ada"),
        config_home: PathBuf::from("/home/ada/.config"),
        uid: 501,
    }
}

/// The text a plan writes to `path`.
fn written(plan: &service::Plan, path: &str) -> String {
    plan.actions
        .iter()
        .find_map(|a| match a {
            Action::Write {
                path: p, contents, ..
            } if p == Path::new(path) => Some(contents.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the plan writes no {path}:\n{plan}"))
}

/// The commands a plan runs, as text.
fn commands(plan: &service::Plan) -> Vec<String> {
    plan.actions
        .iter()
        .filter(|a| matches!(a, Action::Run { .. }))
        .map(ToString::to_string)
        .collect()
}

#[test]
fn linux_system_plan_creates_the_user_and_enables_the_unit() {
    let t = target(Platform::Linux, Scope::System, "/usr/local/bin/cloudllmd");
    let plan = service::plan(Operation::Install, &t).unwrap();
    assert!(plan.needs_admin);
    let unit = written(&plan, "/etc/systemd/system/cloudllmd.service");
    assert_eq!(
        unit,
        service::SYSTEMD_SYSTEM_UNIT.replace("/usr/bin/cloudllmd", "/usr/local/bin/cloudllmd"),
        "the repository's unit, with the daemon's path put in"
    );
    assert!(unit.contains("\nExecStart=/usr/local/bin/cloudllmd --system\n"));
    assert_eq!(
        written(&plan, "/etc/sysusers.d/cloudllm.conf"),
        service::SYSUSERS
    );
    assert!(
        plan.actions.iter().any(|a| matches!(a,
            Action::Write { path, keep_existing: true, mode: 0o640, .. }
                if path == Path::new("/etc/cloudllm/cloudllmd.toml"))),
        "the settings file is written only if missing:\n{plan}"
    );
    assert_eq!(
        commands(&plan),
        [
            "run systemd-sysusers /etc/sysusers.d/cloudllm.conf",
            "run systemd-tmpfiles --create /etc/tmpfiles.d/cloudllm.conf",
            "run systemctl daemon-reload",
            "run systemctl enable --now cloudllmd.service",
            "run systemctl try-restart cloudllmd.service   (if a file changed)",
        ]
    );
    // The user and group exist before the unit that names them is enabled.
    let position = |needle: &str| {
        plan.actions
            .iter()
            .position(|a| a.to_string().contains(needle))
            .unwrap()
    };
    assert!(position("systemd-sysusers") < position("enable --now"));
    assert!(position("systemd-tmpfiles") < position("enable --now"));

    let uninstall = service::plan(Operation::Uninstall, &t).unwrap();
    assert_eq!(
        uninstall.actions[..3],
        [
            Action::Run {
                program: "systemctl".into(),
                args: vec!["disable".into(), "--now".into(), "cloudllmd.service".into()],
                on_failure: OnFailure::Continue,
                when: When::Always,
            },
            Action::Remove {
                path: "/etc/systemd/system/cloudllmd.service".into()
            },
            Action::Run {
                program: "systemctl".into(),
                args: vec!["daemon-reload".into()],
                on_failure: OnFailure::Stop,
                when: When::Always,
            },
        ]
    );
}

#[test]
fn linux_user_plan_writes_to_the_users_config_dir() {
    let t = target(Platform::Linux, Scope::User, "/usr/bin/cloudllmd");
    let plan = service::plan(Operation::Install, &t).unwrap();
    assert!(!plan.needs_admin);
    assert_eq!(
        written(&plan, "/home/ada/.config/systemd/user/cloudllmd.service"),
        service::SYSTEMD_USER_UNIT
    );
    assert_eq!(
        commands(&plan),
        [
            "run systemctl --user daemon-reload",
            "run systemctl --user enable --now cloudllmd.service",
            "run systemctl --user try-restart cloudllmd.service   (if a file changed)",
        ]
    );
    let status = service::plan(Operation::Status, &t).unwrap();
    assert_eq!(
        commands(&status),
        ["run systemctl --user status --no-pager --lines=0 cloudllmd.service"]
    );
}

#[test]
fn unusable_daemon_paths_are_refused() {
    let t = target(
        Platform::Linux,
        Scope::System,
        "/home/ada/.cargo/bin/cloudllmd",
    );
    assert!(matches!(
        service::plan(Operation::Install, &t),
        Err(PlanError::BinaryInHome(_))
    ));
    for odd in [
        "/opt/my apps/cloudllmd",
        "/opt/$HOME/cloudllmd",
        "/opt/a&b/cloudllmd",
        "",
    ] {
        for platform in [Platform::Linux, Platform::Macos] {
            let t = target(platform, Scope::User, odd);
            assert!(
                matches!(
                    service::plan(Operation::Install, &t),
                    Err(PlanError::OddPath(_))
                ),
                "{odd:?} on {platform:?}"
            );
        }
    }
    let t = target(
        Platform::Windows,
        Scope::System,
        r#"C:\evil" --other\cloudllmd.exe"#,
    );
    assert!(matches!(
        service::plan(Operation::Install, &t),
        Err(PlanError::OddPath(_))
    ));
}

/// Runs `systemd-analyze` with `args`; panics with its output unless it succeeds silently
/// (it reports unknown keys and bad values as warnings with exit code 0).
fn analyze(args: &[&str], runtime_dir: &Path) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .env("XDG_RUNTIME_DIR", runtime_dir)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("systemd-analyze (Debian package systemd; .ci/run installs it)")
}

fn assert_verifies(output: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {what}: {}\n{stderr}",
        output.status
    );
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let dir = scratch("verify");
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    // verify checks that ExecStart's program exists and is executable; the built CLI stands in
    // for the daemon and the relay, whose own binaries belong to other packages' builds.
    let exe = installed_cli().to_str().expect("a UTF-8 path");

    // The units exactly as `service install` would write them.
    let system = service::plan(
        Operation::Install,
        &target(Platform::Linux, Scope::System, exe),
    )
    .unwrap();
    let user = service::plan(
        Operation::Install,
        &target(Platform::Linux, Scope::User, exe),
    )
    .unwrap();
    let system_dir = dir.join("system");
    let user_dir = dir.join("user");
    std::fs::create_dir_all(&system_dir).unwrap();
    std::fs::create_dir_all(&user_dir).unwrap();
    std::fs::write(
        system_dir.join("cloudllmd.service"),
        written(&system, "/etc/systemd/system/cloudllmd.service"),
    )
    .unwrap();
    std::fs::write(
        system_dir.join("cloudllm-relay.service"),
        RELAY_UNIT.replace("/usr/bin/cloudllm-relay", exe),
    )
    .unwrap();
    std::fs::write(
        user_dir.join("cloudllmd.service"),
        written(&user, "/home/ada/.config/systemd/user/cloudllmd.service"),
    )
    .unwrap();

    for unit in ["cloudllmd.service", "cloudllm-relay.service"] {
        let path = system_dir.join(unit);
        let output = analyze(&["verify", path.to_str().unwrap()], &runtime);
        assert_verifies(&output, unit);
    }
    let path = user_dir.join("cloudllmd.service");
    let output = analyze(&["--user", "verify", path.to_str().unwrap()], &runtime);
    assert_verifies(&output, "user/cloudllmd.service");

    // The check is live: a typo and a bad value are reported.
    let bad = system_dir.join("bad.service");
    std::fs::write(
        &bad,
        format!("[Service]\nType=notfy\nExecStart={exe}\nProtectSystm=strict\n"),
    )
    .unwrap();
    let output = analyze(&["verify", bad.to_str().unwrap()], &runtime);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ProtectSystm") && stderr.contains("notfy"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn units_are_notify_services_with_restart_watchdog_and_hardening() {
    for (name, unit) in [
        ("cloudllmd.service", service::SYSTEMD_SYSTEM_UNIT),
        ("user/cloudllmd.service", service::SYSTEMD_USER_UNIT),
        ("cloudllm-relay.service", RELAY_UNIT),
    ] {
        let lines: Vec<&str> = unit.lines().map(str::trim).collect();
        for required in [
            "Type=notify",
            "Restart=on-failure",
            "WatchdogSec=30s",
            "NoNewPrivileges=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "SystemCallArchitectures=native",
        ] {
            assert!(lines.contains(&required), "{name} lacks {required}");
        }
        // The stop timeout covers the default drain (daemon 20 s, relay 25 s) with room.
        let stop = lines
            .iter()
            .find_map(|l| l.strip_prefix("TimeoutStopSec="))
            .and_then(|v| v.strip_suffix('s'))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name}: TimeoutStopSec in seconds"));
        assert!(stop >= 25 + 10, "{name}: TimeoutStopSec={stop}s");
    }
    for (name, unit) in [
        ("cloudllmd.service", service::SYSTEMD_SYSTEM_UNIT),
        ("cloudllm-relay.service", RELAY_UNIT),
    ] {
        for required in [
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
        ] {
            assert!(
                unit.lines().any(|l| l == required),
                "{name} lacks {required}"
            );
        }
    }
    // The relay keeps nothing: no writable directory of any kind.
    for key in [
        "StateDirectory",
        "CacheDirectory",
        "LogsDirectory",
        "RuntimeDirectory",
        "ConfigurationDirectory",
        "ReadWritePaths",
    ] {
        assert!(
            !RELAY_UNIT.lines().any(|l| l.starts_with(key)),
            "the relay unit has {key}"
        );
    }
    assert!(RELAY_UNIT.lines().any(|l| l == "DynamicUser=yes"));
    // The system daemon: its own user, state and runtime directories, no capabilities.
    for required in [
        "User=cloudllm",
        "StateDirectory=cloudllm",
        "RuntimeDirectory=cloudllm",
        "CapabilityBoundingSet=",
        "ExecStart=/usr/bin/cloudllmd --system",
    ] {
        assert!(
            service::SYSTEMD_SYSTEM_UNIT.lines().any(|l| l == required),
            "cloudllmd.service lacks {required}"
        );
    }
}

fn plist_dict(text: &str) -> plist::Dictionary {
    plist::Value::from_reader_xml(text.as_bytes())
        .expect("a property list")
        .into_dictionary()
        .expect("a dictionary at the top")
}

#[test]
fn macos_plans_write_plists_launchd_can_read() {
    for (scope, path, domain, args) in [
        (
            Scope::User,
            "/home/ada/Library/LaunchAgents/com.cloudllm.cloudllmd.plist",
            "gui/501",
            vec!["/opt/cloudllm/cloudllmd"],
        ),
        (
            Scope::System,
            "/Library/LaunchDaemons/com.cloudllm.cloudllmd.plist",
            "system",
            vec!["/opt/cloudllm/cloudllmd", "--system"],
        ),
    ] {
        let t = target(Platform::Macos, scope, "/opt/cloudllm/cloudllmd");
        let plan = service::plan(Operation::Install, &t).unwrap();
        assert_eq!(plan.needs_admin, scope == Scope::System);
        let dict = plist_dict(&written(&plan, path));
        assert_eq!(
            dict.get("Label").and_then(|v| v.as_string()),
            Some(LAUNCHD_LABEL)
        );
        let program: Vec<&str> = dict
            .get("ProgramArguments")
            .and_then(|v| v.as_array())
            .unwrap()
            .iter()
            .filter_map(|v| v.as_string())
            .collect();
        assert_eq!(program, args);
        assert_eq!(
            dict.get("RunAtLoad").and_then(|v| v.as_boolean()),
            Some(true)
        );
        let keep_alive = dict
            .get("KeepAlive")
            .and_then(|v| v.as_dictionary())
            .unwrap();
        assert_eq!(
            keep_alive
                .get("SuccessfulExit")
                .and_then(|v| v.as_boolean()),
            Some(false),
            "restarted after a failure, not after a clean stop"
        );
        let exit_timeout = dict
            .get("ExitTimeOut")
            .and_then(|v| v.as_signed_integer())
            .unwrap();
        assert!(exit_timeout >= 30, "{exit_timeout}");
        assert_eq!(
            commands(&plan),
            [
                format!(
                    "run launchctl bootout {domain}/com.cloudllm.cloudllmd   (a failure is ignored)"
                ),
                format!("run launchctl enable {domain}/com.cloudllm.cloudllmd"),
                format!("run launchctl bootstrap {domain} {path}"),
            ]
        );
        let uninstall = service::plan(Operation::Uninstall, &t).unwrap();
        assert!(
            uninstall
                .actions
                .contains(&Action::Remove { path: path.into() })
        );
    }
}

#[test]
fn windows_plans_register_the_service_or_the_login_entry() {
    let exe = r"C:\Program Files (x86)\cloudllm\cloudllmd.exe";
    let t = target(Platform::Windows, Scope::System, exe);
    let plan = service::plan(Operation::Install, &t).unwrap();
    assert!(plan.needs_admin);
    let create = plan
        .actions
        .iter()
        .find_map(|a| match a {
            Action::Run { program, args, .. } if program == "sc.exe" && args[0] == "create" => {
                Some(args.clone())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(
        create,
        [
            "create",
            "cloudllmd",
            "binPath=",
            &format!("\"{exe}\" --service"),
            "start=",
            "auto",
            "DisplayName=",
            "cloudllm daemon",
        ]
    );
    let runs = commands(&plan);
    assert!(
        runs.iter()
            .any(|c| c.starts_with("run sc.exe config cloudllmd binPath="))
    );
    assert!(
        runs.iter()
            .any(|c| c.contains("sc.exe failure cloudllmd reset= 86400 actions= restart/"))
    );
    assert!(
        runs.last()
            .unwrap()
            .starts_with("run sc.exe start cloudllmd")
    );

    let user = service::plan(
        Operation::Install,
        &target(Platform::Windows, Scope::User, exe),
    )
    .unwrap();
    assert!(!user.needs_admin);
    assert_eq!(
        commands(&user),
        [format!(
            r#"run reg add HKCU\Software\Microsoft\Windows\CurrentVersion\Run /v cloudllmd /t REG_SZ /d "\"{exe}\"" /f"#
        )]
    );
    let uninstall = service::plan(Operation::Uninstall, &t).unwrap();
    assert_eq!(
        commands(&uninstall),
        [
            "run sc.exe stop cloudllmd   (a failure is ignored)",
            "run sc.exe delete cloudllmd   (a failure is ignored)",
        ]
    );
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `cloudllm ARGS` with a scratch home, as `uid` when the tests run as root (via setpriv).
fn cloudllm(home: &Path, uid: Option<u32>, path: &str, args: &[&str]) -> Output {
    let mut command = match uid {
        Some(uid) if is_root() => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ]);
            c.arg(installed_cli());
            c
        }
        _ => Command::new(installed_cli()),
    };
    command
        .args(args)
        .env_clear()
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("PATH", path)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn dry_run_prints_each_platforms_plan_and_does_nothing() {
    let home = scratch("dry");
    let path = std::env::var("PATH").unwrap_or_default();
    let run = |args: &[&str]| {
        let output = cloudllm(&home, None, &path, args);
        assert!(output.status.success(), "{}", text(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let linux = run(&["service", "install", "--dry-run", "--os", "linux"]);
    assert!(
        linux.starts_with("Would install the systemd user service cloudllmd.service for "),
        "{linux}"
    );
    assert!(linux.contains(&format!(
        "write {}/config/systemd/user/cloudllmd.service (mode 0644) from systemd/user/cloudllmd.service",
        home.display()
    )), "{linux}");
    assert!(
        linux.contains("run systemctl --user enable --now cloudllmd.service\n"),
        "{linux}"
    );

    let system = run(&[
        "service",
        "install",
        "--system",
        "--dry-run",
        "--os",
        "linux",
    ]);
    assert!(system.contains("as root or administrator"), "{system}");
    assert!(
        system.contains("run systemd-sysusers /etc/sysusers.d/cloudllm.conf\n"),
        "{system}"
    );
    assert!(
        system.contains("run systemctl enable --now cloudllmd.service\n"),
        "{system}"
    );

    let macos = run(&["service", "install", "--dry-run", "--os", "macos"]);
    assert!(
        macos.contains(&format!(
            "write {}/Library/LaunchAgents/com.cloudllm.cloudllmd.plist (mode 0644)",
            home.display()
        )),
        "{macos}"
    );
    assert!(macos.contains("run launchctl bootstrap gui/"), "{macos}");

    let windows = run(&[
        "service",
        "install",
        "--system",
        "--dry-run",
        "--os",
        "windows",
    ]);
    assert!(
        windows.starts_with("Would install the Windows service cloudllmd for "),
        "{windows}"
    );
    assert!(
        windows.contains("run sc.exe create cloudllmd binPath="),
        "{windows}"
    );

    let removal = run(&[
        "service",
        "uninstall",
        "--system",
        "--dry-run",
        "--os",
        "macos",
    ]);
    assert!(
        removal.contains("remove /Library/LaunchDaemons/com.cloudllm.cloudllmd.plist"),
        "{removal}"
    );

    // Nothing was written.
    let left: Vec<_> = std::fs::read_dir(&home).unwrap().collect();
    assert!(left.is_empty(), "a dry run wrote {left:?}");
    // --os only goes with --dry-run.
    let output = cloudllm(&home, None, &path, &["service", "install", "--os", "macos"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let _ = std::fs::remove_dir_all(home);
}

#[test]
fn a_system_install_without_root_is_refused_and_changes_nothing() {
    let home = scratch("noroot");
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).ok();
    // As root, setpriv makes it `nobody`; otherwise the test already runs unprivileged.
    let path = std::env::var("PATH").unwrap_or_default();
    let output = cloudllm(
        &home,
        Some(NOBODY),
        &path,
        &["service", "install", "--system"],
    );
    assert_eq!(output.status.code(), Some(5), "{}", text(&output));
    let message = text(&output);
    assert!(
        message.contains("needs root") && message.contains("sudo"),
        "{message}"
    );
    assert!(!message.contains("wrote"), "{message}");
    let output = cloudllm(
        &home,
        Some(NOBODY),
        &path,
        &["service", "uninstall", "--system"],
    );
    assert_eq!(output.status.code(), Some(5), "{}", text(&output));

    if is_root() {
        // Root asking for a user service would get root's own: refused with the way out.
        let output = cloudllm(&home, None, &path, &["service", "install", "--user"]);
        assert_eq!(output.status.code(), Some(5), "{}", text(&output));
        assert!(text(&output).contains("--system"), "{}", text(&output));
    }
    let _ = std::fs::remove_dir_all(home);
}

/// A stand-in `systemctl` that appends its arguments to `calls.log` and answers `status` with
/// systemd's "not running" code (3).
fn fake_systemctl(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("systemctl");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\ncase \"$*\" in *status*) exit 3;; esac\nexit 0\n",
            dir.join("calls.log").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn user_install_twice_then_uninstall_with_a_stand_in_systemctl() {
    let home = scratch("idempotent");
    let bin = fake_systemctl(&home);
    if is_root() {
        for entry in [home.clone(), bin.clone(), bin.join("systemctl")] {
            std::os::unix::fs::chown(&entry, Some(NOBODY), Some(NOBODY)).unwrap();
        }
    }
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let unit = home.join("config/systemd/user/cloudllmd.service");

    let first = cloudllm(&home, Some(NOBODY), &path, &["service", "install"]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains(&format!("wrote {}", unit.display())),
        "{}",
        text(&first)
    );
    let installed = std::fs::read_to_string(&unit).unwrap();
    assert!(installed.contains("Type=notify"));
    let mode = std::fs::metadata(&unit).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    assert_eq!(
        calls(&home),
        [
            "--user daemon-reload",
            "--user enable --now cloudllmd.service",
            "--user try-restart cloudllmd.service",
        ]
    );

    // Again: the file is already right, so nothing is restarted.
    let second = cloudllm(&home, Some(NOBODY), &path, &["service", "install"]);
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains(&format!("unchanged {}", unit.display())),
        "{}",
        text(&second)
    );
    assert_eq!(std::fs::read_to_string(&unit).unwrap(), installed);
    assert_eq!(
        calls(&home)[3..],
        [
            "--user daemon-reload",
            "--user enable --now cloudllmd.service"
        ]
    );

    // The stand-in says "not running": status exits 1.
    let status = cloudllm(&home, Some(NOBODY), &path, &["service", "status"]);
    assert_eq!(status.status.code(), Some(1), "{}", text(&status));
    assert_eq!(
        calls(&home).last().unwrap(),
        "--user status --no-pager --lines=0 cloudllmd.service"
    );

    let removed = cloudllm(&home, Some(NOBODY), &path, &["service", "uninstall"]);
    assert!(removed.status.success(), "{}", text(&removed));
    assert!(!unit.exists());
    assert_eq!(
        calls(&home)[6..],
        [
            "--user disable --now cloudllmd.service",
            "--user daemon-reload"
        ]
    );
    // Uninstalling what is gone is fine too.
    let again = cloudllm(&home, Some(NOBODY), &path, &["service", "uninstall"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("absent"), "{}", text(&again));

    // A failing systemctl stops the install with its command line in the message.
    std::fs::write(bin.join("systemctl"), "#!/bin/sh\nexit 1\n").unwrap();
    let failed = cloudllm(&home, Some(NOBODY), &path, &["service", "install"]);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    assert!(
        text(&failed).contains("`systemctl --user daemon-reload` failed"),
        "{}",
        text(&failed)
    );
    let _ = std::fs::remove_dir_all(home);
}

#[test]
fn sysusers_and_tmpfiles_make_the_user_group_and_config_dir() {
    // systemd-sysusers and systemd-tmpfiles applied to an empty root directory, as the Debian
    // package's postinst and `service install --system` apply them to the machine.
    let root = scratch("sysroot");
    for (dir, text) in [
        ("usr/lib/sysusers.d", service::SYSUSERS),
        ("usr/lib/tmpfiles.d", service::TMPFILES),
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        std::fs::write(root.join(dir).join("cloudllm.conf"), text).unwrap();
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let root_arg = format!("--root={}", root.display());
    let run = |program: &str, args: &[&str]| {
        let output = Command::new(program).args(args).output().unwrap();
        assert!(output.status.success(), "{program}: {}", text(&output));
    };
    run("systemd-sysusers", &[&root_arg, "cloudllm.conf"]);
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("cloudllm:"))
        .unwrap_or_else(|| panic!("no cloudllm user: {passwd}"));
    let fields: Vec<&str> = user.split(':').collect();
    assert_eq!(fields[5], "/var/lib/cloudllm");
    assert!(fields[6].ends_with("nologin"), "{user}");
    let gid: u32 = fields[3].parse().unwrap();
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(
        group
            .lines()
            .any(|l| l.starts_with(&format!("cloudllm:x:{gid}:"))),
        "{group}"
    );

    run(
        "systemd-tmpfiles",
        &[&root_arg, "--create", "cloudllm.conf"],
    );
    let dir = std::fs::metadata(root.join("etc/cloudllm")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        dir.mode() & 0o7777,
        0o2770,
        "setgid, for the daemon's group"
    );
    assert_eq!((dir.uid(), dir.gid()), (0, gid));
    // The package's settings file, once there, is given to the daemon's group to read.
    std::fs::write(
        root.join("etc/cloudllm/cloudllmd.toml"),
        service::SYSTEM_CONFIG,
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("etc/cloudllm/cloudllmd.toml"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    run(
        "systemd-tmpfiles",
        &[&root_arg, "--create", "cloudllm.conf"],
    );
    let file = std::fs::metadata(root.join("etc/cloudllm/cloudllmd.toml")).unwrap();
    assert_eq!(file.mode() & 0o777, 0o640);
    assert_eq!(file.gid(), gid);
    let _ = std::fs::remove_dir_all(root);
}
