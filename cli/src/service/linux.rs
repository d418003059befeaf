//! systemd on Linux: the system unit (with the `cloudllm` user, group and `/etc/cloudllm` from
//! sysusers.d and tmpfiles.d) or the user unit, enabled and started with `systemctl`.

use std::path::PathBuf;

use super::{Action, PlanError, Scope, Target, plain_path, with_binary};

/// The systemd system unit (`systemd/cloudllmd.service`).
pub const SYSTEMD_SYSTEM_UNIT: &str = include_str!("../../../systemd/cloudllmd.service");
/// The systemd user unit (`systemd/user/cloudllmd.service`).
pub const SYSTEMD_USER_UNIT: &str = include_str!("../../../systemd/user/cloudllmd.service");
/// The system daemon's user and group, for systemd-sysusers.
pub const SYSUSERS: &str = include_str!("../../../packaging/linux/cloudllm.sysusers");
/// The system daemon's config directory, for systemd-tmpfiles.
pub const TMPFILES: &str = include_str!("../../../packaging/linux/cloudllm.tmpfiles");
/// The system daemon's initial settings (the operator group).
pub const SYSTEM_CONFIG: &str = include_str!("../../../packaging/linux/cloudllmd.toml");
/// The daemon's path in the systemd units (where the Debian package puts it).
pub const SYSTEMD_BIN: &str = "/usr/bin/cloudllmd";
/// The systemd unit's name.
pub const UNIT: &str = "cloudllmd.service";

/// `systemctl ARGS`, with `--user` for a user service.
pub(super) fn systemctl(scope: Scope, args: &[&str]) -> Action {
    let mut all: Vec<&str> = Vec::new();
    if scope == Scope::User {
        all.push("--user");
    }
    all.extend_from_slice(args);
    Action::run("systemctl", &all)
}

/// Where the unit goes: `/etc/systemd/system/` or the user's `~/.config/systemd/user/`.
fn unit_path(target: &Target) -> PathBuf {
    match target.scope {
        Scope::System => PathBuf::from("/etc/systemd/system").join(UNIT),
        Scope::User => target.config_home.join("systemd/user").join(UNIT),
    }
}

/// Install: for the system also its user, group, config directory and settings file.
pub(super) fn install(target: &Target) -> Result<Vec<Action>, PlanError> {
    let bin = plain_path(target)?;
    let scope = target.scope;
    let mut actions = Vec::new();
    let unit = match scope {
        Scope::System => {
            if bin.starts_with("/home/") || bin.starts_with("/root/") {
                return Err(PlanError::BinaryInHome(bin));
            }
            actions.extend([
                Action::Write {
                    path: "/etc/sysusers.d/cloudllm.conf".into(),
                    mode: 0o644,
                    contents: SYSUSERS.to_owned(),
                    keep_existing: false,
                    source: "packaging/linux/cloudllm.sysusers",
                },
                Action::run("systemd-sysusers", &["/etc/sysusers.d/cloudllm.conf"]),
                Action::Write {
                    path: "/etc/tmpfiles.d/cloudllm.conf".into(),
                    mode: 0o644,
                    contents: TMPFILES.to_owned(),
                    keep_existing: false,
                    source: "packaging/linux/cloudllm.tmpfiles",
                },
                Action::run(
                    "systemd-tmpfiles",
                    &["--create", "/etc/tmpfiles.d/cloudllm.conf"],
                ),
                Action::Write {
                    path: "/etc/cloudllm/cloudllmd.toml".into(),
                    mode: 0o640,
                    contents: SYSTEM_CONFIG.to_owned(),
                    keep_existing: true,
                    source: "packaging/linux/cloudllmd.toml",
                },
            ]);
            (SYSTEMD_SYSTEM_UNIT, "systemd/cloudllmd.service")
        }
        Scope::User => (SYSTEMD_USER_UNIT, "systemd/user/cloudllmd.service"),
    };
    actions.extend([
        Action::Write {
            path: unit_path(target),
            mode: 0o644,
            contents: with_binary(unit.0, SYSTEMD_BIN, &bin),
            keep_existing: false,
            source: unit.1,
        },
        systemctl(scope, &["daemon-reload"]),
        systemctl(scope, &["enable", "--now", UNIT]),
        systemctl(scope, &["try-restart", UNIT]).if_changed(),
    ]);
    if scope == Scope::System {
        actions.push(Action::Note(
            "`sudo usermod -aG cloudllm USER` lets USER reach and change the daemon (after a new login)"
                .to_owned(),
        ));
    }
    Ok(actions)
}

/// Uninstall: the unit only; settings, credentials and the user stay.
pub(super) fn uninstall(target: &Target) -> Vec<Action> {
    let scope = target.scope;
    let mut actions = vec![
        systemctl(scope, &["disable", "--now", UNIT]).tolerant(),
        Action::Remove {
            path: unit_path(target),
        },
        systemctl(scope, &["daemon-reload"]),
    ];
    if scope == Scope::System {
        actions.push(Action::Note(
            "kept /etc/cloudllm (settings), /var/lib/cloudllm (credentials) and the cloudllm user"
                .to_owned(),
        ));
    }
    actions
}
