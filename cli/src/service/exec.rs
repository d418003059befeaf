//! Carrying a plan out on this machine: files written atomically with their modes (left alone
//! when already right), commands run with the terminal inherited, privileges checked first.

use std::path::Path;
use std::process::Command;

use super::{Action, OnFailure, Plan, Platform, Scope, Target, When};

/// Why a plan could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The plan needs root or an administrator, and this process is neither.
    #[error("{0}")]
    NotPrivileged(String),
    /// A file could not be written or removed.
    #[error("{action}: {source}")]
    File {
        /// The step.
        action: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A command could not start, or failed.
    #[error("`{command}` {what}")]
    Command {
        /// The command line.
        command: String,
        /// How it failed.
        what: String,
    },
}

/// Whether this process runs as root (Unix) or as an administrator (Windows: `net session`
/// succeeds only for one).
pub fn is_admin() -> bool {
    #[cfg(unix)]
    {
        nix::unistd::geteuid().is_root()
    }
    #[cfg(not(unix))]
    {
        Command::new("net")
            .arg("session")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// Refuses a plan that needs more privileges than `admin`, saying how to get them; also refuses
/// a user service for root on Unix, which would install it for root rather than for the person
/// at the keyboard.
pub fn check_privileges(plan: &Plan, target: &Target, admin: bool) -> Result<(), ExecError> {
    let unix = target.platform != Platform::Windows;
    if plan.needs_admin && !admin {
        return Err(ExecError::NotPrivileged(if unix {
            "a system service needs root: run it with sudo (or use --user for your own daemon)"
                .to_owned()
        } else {
            "a system service needs an administrator: run it from an elevated prompt (or use --user)"
                .to_owned()
        }));
    }
    let installs = plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::Write { .. } | Action::Remove { .. }));
    if unix && admin && target.scope == Scope::User && installs {
        return Err(ExecError::NotPrivileged(
            "as root, a user service would be root's own: use --system, or run without sudo for your user"
                .to_owned(),
        ));
    }
    Ok(())
}

/// What [`execute`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether any file was written or removed.
    pub changed: bool,
    /// The exit code of the last command run (a status query's answer).
    pub last_exit: Option<i32>,
}

/// Carries out `plan`, printing each step to `out`. Commands inherit the terminal, so their
/// own messages (and `status` output) reach the user.
pub fn execute(plan: &Plan, out: &mut impl std::io::Write) -> Result<Outcome, ExecError> {
    let mut outcome = Outcome::default();
    for action in &plan.actions {
        match action {
            Action::Write {
                path,
                mode,
                contents,
                keep_existing,
                ..
            } => {
                let fail = |source| ExecError::File {
                    action: action.to_string(),
                    source,
                };
                let existing = std::fs::read_to_string(path).ok();
                if *keep_existing && path.exists() {
                    let _ = writeln!(out, "kept {}", path.display());
                } else if existing.as_deref() == Some(contents.as_str()) {
                    set_mode(path, *mode).map_err(fail)?;
                    let _ = writeln!(out, "unchanged {}", path.display());
                } else {
                    write_file(path, contents, *mode).map_err(fail)?;
                    outcome.changed = true;
                    let _ = writeln!(out, "wrote {}", path.display());
                }
            }
            Action::Remove { path } => match std::fs::remove_file(path) {
                Ok(()) => {
                    outcome.changed = true;
                    let _ = writeln!(out, "removed {}", path.display());
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    let _ = writeln!(out, "absent {}", path.display());
                }
                Err(source) => {
                    return Err(ExecError::File {
                        action: action.to_string(),
                        source,
                    });
                }
            },
            Action::Run {
                program,
                args,
                on_failure,
                when,
            } => {
                if *when == When::Changed && !outcome.changed {
                    continue;
                }
                let command = std::iter::once(program.as_str())
                    .chain(args.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(" ");
                let _ = writeln!(out, "running {command}");
                let _ = out.flush();
                let status = Command::new(program).args(args).status();
                let failure = match status {
                    Ok(status) => {
                        outcome.last_exit = status.code();
                        (!status.success()).then(|| format!("failed ({status})"))
                    }
                    Err(err) => {
                        outcome.last_exit = None;
                        Some(format!("could not start: {err}"))
                    }
                };
                if let Some(what) = failure {
                    if *on_failure == OnFailure::Stop {
                        return Err(ExecError::Command { command, what });
                    }
                    let _ = writeln!(out, "(ignored: `{command}` {what})");
                }
            }
            Action::Note(text) => {
                let _ = writeln!(out, "note: {text}");
            }
        }
    }
    Ok(outcome)
}

/// Writes `contents` to `path` in one step (`cloudllm_atomic_write`: a temp file with `mode`
/// from the start, fsync, rename): the service manager never reads a half-written unit.
fn write_file(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    cloudllm_atomic_write::write(path, mode, contents.as_bytes())
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, mode);
        Ok(())
    }
}
