//! launchd on macOS: a LaunchAgent (one user, at log-in) or a LaunchDaemon (the machine, at
//! boot), loaded with `launchctl bootstrap`.

use std::path::PathBuf;

use super::{Action, PlanError, Scope, Target, plain_path, with_binary};

/// The launchd LaunchDaemon (`packaging/macos/launch-daemon.plist`).
pub const LAUNCH_DAEMON: &str = include_str!("../../../packaging/macos/launch-daemon.plist");
/// The launchd LaunchAgent (`packaging/macos/launch-agent.plist`).
pub const LAUNCH_AGENT: &str = include_str!("../../../packaging/macos/launch-agent.plist");
/// The daemon's path in the launchd plists.
pub const LAUNCHD_BIN: &str = "/usr/local/bin/cloudllmd";
/// The launchd job's label.
pub const LAUNCHD_LABEL: &str = "com.cloudllm.cloudllmd";

/// The launchd domain: `system`, or the user's `gui/UID`.
pub(super) fn domain(target: &Target) -> String {
    match target.scope {
        Scope::System => "system".to_owned(),
        Scope::User => format!("gui/{}", target.uid),
    }
}

/// Where the plist goes: `/Library/LaunchDaemons/` or `~/Library/LaunchAgents/`.
fn plist_path(target: &Target) -> PathBuf {
    let name = format!("{LAUNCHD_LABEL}.plist");
    match target.scope {
        Scope::System => PathBuf::from("/Library/LaunchDaemons").join(name),
        Scope::User => target.home.join("Library/LaunchAgents").join(name),
    }
}

/// Install: write the plist and (re)load it.
pub(super) fn install(target: &Target) -> Result<Vec<Action>, PlanError> {
    let bin = plain_path(target)?;
    let (template, source) = match target.scope {
        Scope::System => (LAUNCH_DAEMON, "packaging/macos/launch-daemon.plist"),
        Scope::User => (LAUNCH_AGENT, "packaging/macos/launch-agent.plist"),
    };
    let plist = plist_path(target);
    let domain = domain(target);
    let plist_text = plist.to_string_lossy().into_owned();
    Ok(vec![
        Action::Write {
            path: plist.clone(),
            mode: 0o644,
            contents: with_binary(template, LAUNCHD_BIN, &bin),
            keep_existing: false,
            source,
        },
        // Unloading first makes a second install load the current plist instead of failing.
        Action::run(
            "launchctl",
            &["bootout", &format!("{domain}/{LAUNCHD_LABEL}")],
        )
        .tolerant(),
        Action::run(
            "launchctl",
            &["enable", &format!("{domain}/{LAUNCHD_LABEL}")],
        ),
        Action::run("launchctl", &["bootstrap", &domain, &plist_text]),
    ])
}

/// Uninstall: unload the job and remove its plist.
pub(super) fn uninstall(target: &Target) -> Vec<Action> {
    let domain = domain(target);
    vec![
        Action::run(
            "launchctl",
            &["bootout", &format!("{domain}/{LAUNCHD_LABEL}")],
        )
        .tolerant(),
        Action::Remove {
            path: plist_path(target),
        },
    ]
}
