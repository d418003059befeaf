//! Windows: the machine's service registered with the service control manager (`sc.exe`), or
//! one user's daemon started at log-in from the `Run` registry key.

use super::{Action, PlanError, Scope, Target, plain_path};

/// The Windows service's name (as `cloudllmd --service` registers with the SCM).
pub const WINDOWS_SERVICE: &str = "cloudllmd";
/// The per-user log-in key where Windows starts a user's programs.
pub const WINDOWS_RUN_KEY: &str = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run";

/// Install: create or update the service and start it, or add the log-in entry.
pub(super) fn install(target: &Target) -> Result<Vec<Action>, PlanError> {
    let bin = plain_path(target)?;
    Ok(match target.scope {
        Scope::System => {
            let bin_path = format!("\"{bin}\" --service");
            vec![
                // Fails when the service exists already; `config` then brings it up to date.
                Action::run(
                    "sc.exe",
                    &[
                        "create",
                        WINDOWS_SERVICE,
                        "binPath=",
                        &bin_path,
                        "start=",
                        "auto",
                        "DisplayName=",
                        "cloudllm daemon",
                    ],
                )
                .tolerant(),
                Action::run(
                    "sc.exe",
                    &[
                        "config",
                        WINDOWS_SERVICE,
                        "binPath=",
                        &bin_path,
                        "start=",
                        "auto",
                    ],
                ),
                Action::run(
                    "sc.exe",
                    &[
                        "description",
                        WINDOWS_SERVICE,
                        "Tunnel from this machine's Ollama to a cloudllm relay",
                    ],
                ),
                // Restart on failure: after 5 s twice, then after 30 s; the count resets daily.
                Action::run(
                    "sc.exe",
                    &[
                        "failure",
                        WINDOWS_SERVICE,
                        "reset=",
                        "86400",
                        "actions=",
                        "restart/5000/restart/5000/restart/30000",
                    ],
                ),
                // Fails when it runs already.
                Action::run("sc.exe", &["start", WINDOWS_SERVICE]).tolerant(),
            ]
        }
        Scope::User => vec![
            Action::run(
                "reg",
                &[
                    "add",
                    WINDOWS_RUN_KEY,
                    "/v",
                    WINDOWS_SERVICE,
                    "/t",
                    "REG_SZ",
                    "/d",
                    &format!("\"{bin}\""),
                    "/f",
                ],
            ),
            Action::Note(
                "cloudllmd starts at your next log-in; start it now with `cloudllm daemon`"
                    .to_owned(),
            ),
        ],
    })
}

/// Uninstall: stop and delete the service, or remove the log-in entry.
pub(super) fn uninstall(target: &Target) -> Vec<Action> {
    match target.scope {
        Scope::System => vec![
            Action::run("sc.exe", &["stop", WINDOWS_SERVICE]).tolerant(),
            Action::run("sc.exe", &["delete", WINDOWS_SERVICE]).tolerant(),
        ],
        Scope::User => vec![
            Action::run(
                "reg",
                &["delete", WINDOWS_RUN_KEY, "/v", WINDOWS_SERVICE, "/f"],
            )
            .tolerant(),
        ],
    }
}
