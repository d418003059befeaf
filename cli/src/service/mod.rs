//! `cloudllm service install|uninstall|status`: makes `cloudllmd` a service of the platform's
//! service manager — systemd on Linux, launchd on macOS, the service control manager (or the
//! log-in `Run` key) on Windows — for one user (`--user`) or the whole machine (`--system`).
//!
//! Planning is pure: [`plan`] turns an operation and a [`Target`] (platform, scope, where the
//! daemon binary and the user's directories are) into a [`Plan`], a list of [`Action`]s — write
//! this file with this mode, run this command — that `--dry-run` prints and the tests check for
//! every platform on any machine. [`execute`] carries a plan out on this machine. The unit and
//! plist texts are the files under `systemd/` and `packaging/`, embedded at build time, so the
//! repository's files are what gets installed (only the daemon's path is put in).
//!
//! Installing twice is harmless: a file whose content is already right is left alone, enabling
//! an enabled service changes nothing, and the service is restarted only when a file changed.
//!
//! `linux`, `macos` and `windows` plan for their platform; `exec` carries a plan out.

mod exec;
mod linux;
mod macos;
mod windows;

use std::fmt;
use std::path::PathBuf;

use crate::exit::{EXIT_FAILED, EXIT_PERMISSION, Failure, fail};

pub use exec::{ExecError, Outcome, check_privileges, execute, is_admin};
pub use linux::{
    SYSTEM_CONFIG, SYSTEMD_BIN, SYSTEMD_SYSTEM_UNIT, SYSTEMD_USER_UNIT, SYSUSERS, TMPFILES, UNIT,
};
pub use macos::{LAUNCH_AGENT, LAUNCH_DAEMON, LAUNCHD_BIN, LAUNCHD_LABEL};
pub use windows::{WINDOWS_RUN_KEY, WINDOWS_SERVICE};

/// A platform whose service manager this module knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Platform {
    /// systemd.
    Linux,
    /// launchd.
    Macos,
    /// The service control manager, or the log-in Run key for one user.
    Windows,
}

impl Platform {
    /// The platform this program runs on, if it is one of the three.
    pub fn current() -> Option<Platform> {
        match std::env::consts::OS {
            "linux" => Some(Platform::Linux),
            "macos" => Some(Platform::Macos),
            "windows" => Some(Platform::Windows),
            _ => None,
        }
    }
}

/// Whose service: one user's, started at log-in, or the machine's, started at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The current user's daemon (systemd user unit, LaunchAgent, log-in Run key).
    User,
    /// The machine's daemon (systemd system unit, LaunchDaemon, Windows service).
    System,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Write and enable the service, and start it.
    Install,
    /// Stop and remove the service (settings and credentials stay).
    Uninstall,
    /// Ask the service manager about the service.
    Status,
}

/// Where things are on the machine a plan is for.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its platform.
    pub platform: Platform,
    /// User or system.
    pub scope: Scope,
    /// The `cloudllmd` binary the service runs.
    pub cloudllmd: PathBuf,
    /// The user's home directory (user scope on macOS).
    pub home: PathBuf,
    /// The user's config directory (`$XDG_CONFIG_HOME`, user scope on Linux).
    pub config_home: PathBuf,
    /// The user's id (the launchd `gui/UID` domain).
    pub uid: u32,
}

impl Target {
    /// This machine and user, with `cloudllmd` beside the running program (else the platform's
    /// usual place).
    pub fn here(platform: Platform, scope: Scope) -> Target {
        let home = std::env::var_os("HOME")
            .or_else(|| std::env::var_os("USERPROFILE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/"));
        let config_home = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| home.join(".config"));
        Target {
            platform,
            scope,
            cloudllmd: daemon_binary(platform),
            home,
            config_home,
            uid: current_uid(),
        }
    }
}

/// `cloudllmd` beside the running program when it is there, else where packages put it.
fn daemon_binary(platform: Platform) -> PathBuf {
    let name = match platform {
        Platform::Windows => "cloudllmd.exe",
        _ => "cloudllmd",
    };
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|path| path.exists() && Platform::current() == Some(platform));
    beside.unwrap_or_else(|| match platform {
        Platform::Linux => PathBuf::from(SYSTEMD_BIN),
        Platform::Macos => PathBuf::from(LAUNCHD_BIN),
        Platform::Windows => PathBuf::from(r"C:\Program Files\cloudllm\cloudllmd.exe"),
    })
}

#[cfg(unix)]
fn current_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

#[cfg(not(unix))]
fn current_uid() -> u32 {
    0
}

/// What to do when a command of the plan fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Stop and report: the service is not in the state asked for.
    Stop,
    /// Go on: the command only tidies up something that may not be there (a job not loaded,
    /// a service already running).
    Continue,
}

/// When a command of the plan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Every time.
    Always,
    /// Only if an earlier step changed a file (restarting a service running an old unit).
    Changed,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write `contents` to `path` with `mode` (Unix permission bits), creating its directory.
    Write {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Its text.
        contents: String,
        /// Leave an existing file as it is (settings the user may have changed).
        keep_existing: bool,
        /// Where the text comes from in the repository, for `--dry-run`.
        source: &'static str,
    },
    /// Remove `path` if it exists.
    Remove {
        /// The file.
        path: PathBuf,
    },
    /// Run a command.
    Run {
        /// The program.
        program: String,
        /// Its arguments.
        args: Vec<String>,
        /// Stop or go on if it fails.
        on_failure: OnFailure,
        /// Always, or only after a change.
        when: When,
    },
    /// Tell the user something (what is kept, what to do next).
    Note(String),
}

impl Action {
    fn run(program: &str, args: &[&str]) -> Action {
        Action::Run {
            program: program.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            on_failure: OnFailure::Stop,
            when: When::Always,
        }
    }

    fn tolerant(mut self) -> Action {
        if let Action::Run { on_failure, .. } = &mut self {
            *on_failure = OnFailure::Continue;
        }
        self
    }

    fn if_changed(mut self) -> Action {
        if let Action::Run { when, .. } = &mut self {
            *when = When::Changed;
        }
        self
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Write {
                path,
                mode,
                keep_existing,
                source,
                ..
            } => {
                write!(
                    f,
                    "write {} (mode {mode:04o}) from {source}",
                    path.display()
                )?;
                if *keep_existing {
                    write!(f, ", unless it exists")?;
                }
                Ok(())
            }
            Action::Remove { path } => write!(f, "remove {}", path.display()),
            Action::Run {
                program,
                args,
                on_failure,
                when,
            } => {
                write!(f, "run {program}")?;
                // Quoted as a shell or cmd.exe user would type it: "a b", inner quotes as \".
                for arg in args {
                    if arg.is_empty() || arg.contains(char::is_whitespace) || arg.contains('"') {
                        write!(f, " \"{}\"", arg.replace('"', "\\\""))?;
                    } else {
                        write!(f, " {arg}")?;
                    }
                }
                if *when == When::Changed {
                    write!(f, "   (if a file changed)")?;
                }
                if *on_failure == OnFailure::Continue {
                    write!(f, "   (a failure is ignored)")?;
                }
                Ok(())
            }
            Action::Note(text) => write!(f, "note: {text}"),
        }
    }
}

/// The steps of one operation, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The steps.
    pub actions: Vec<Action>,
    /// Whether carrying it out takes root or an administrator.
    pub needs_admin: bool,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for action in &self.actions {
            writeln!(f, "{action}")?;
        }
        Ok(())
    }
}

/// Why no plan can be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The daemon's path cannot go into a unit or plist as it is.
    #[error(
        "cloudllmd is at {0:?}, a path with spaces or odd characters; install it somewhere plain (e.g. /usr/local/bin)"
    )]
    OddPath(String),
    /// A system service cannot run a binary inside a home directory.
    #[error(
        "cloudllmd is at {0}, inside a home directory, which a system service may not read (ProtectHome); copy it to /usr/local/bin and run this command from there"
    )]
    BinaryInHome(String),
}

/// Makes the plan for `operation` on `target`.
pub fn plan(operation: Operation, target: &Target) -> Result<Plan, PlanError> {
    let actions = match (target.platform, operation) {
        (Platform::Linux, Operation::Install) => linux::install(target)?,
        (Platform::Linux, Operation::Uninstall) => linux::uninstall(target),
        (Platform::Linux, Operation::Status) => vec![linux::systemctl(
            target.scope,
            &["status", "--no-pager", "--lines=0", UNIT],
        )],
        (Platform::Macos, Operation::Install) => macos::install(target)?,
        (Platform::Macos, Operation::Uninstall) => macos::uninstall(target),
        (Platform::Macos, Operation::Status) => vec![Action::run(
            "launchctl",
            &[
                "print",
                &format!("{}/{LAUNCHD_LABEL}", macos::domain(target)),
            ],
        )],
        (Platform::Windows, Operation::Install) => windows::install(target)?,
        (Platform::Windows, Operation::Uninstall) => windows::uninstall(target),
        (Platform::Windows, Operation::Status) => match target.scope {
            Scope::System => vec![Action::run("sc.exe", &["query", WINDOWS_SERVICE])],
            Scope::User => vec![Action::run(
                "reg",
                &["query", WINDOWS_RUN_KEY, "/v", WINDOWS_SERVICE],
            )],
        },
    };
    Ok(Plan {
        actions,
        needs_admin: target.scope == Scope::System && operation != Operation::Status,
    })
}

/// The daemon's path as text that can go into a unit or plist as it is: no quoting or escaping
/// rules of systemd, XML or the shell to get wrong. Windows paths are quoted by the plan, so
/// spaces and parentheses (`Program Files (x86)`) are fine there.
fn plain_path(target: &Target) -> Result<String, PlanError> {
    let text = target.cloudllmd.to_string_lossy().into_owned();
    let extra = match target.platform {
        Platform::Windows => " ()",
        Platform::Linux | Platform::Macos => "",
    };
    let plain = |c: char| c.is_alphanumeric() || "/\\:._-+".contains(c) || extra.contains(c);
    if text.is_empty() || target.cloudllmd.to_str().is_none() || !text.chars().all(plain) {
        return Err(PlanError::OddPath(text));
    }
    Ok(text)
}

/// A unit or plist with the daemon's path put in place of `default`.
fn with_binary(template: &str, default: &str, path: &str) -> String {
    template.replace(default, path)
}

/// `cloudllm service …`.
#[derive(Debug, clap::Subcommand)]
pub enum ServiceCommand {
    /// Write, enable and start the service (run again, it brings the service up to date).
    Install(Options),
    /// Stop and remove the service; settings and credentials stay.
    Uninstall(Options),
    /// Show what the service manager says about the service (exit 0: it runs).
    Status(Options),
}

/// Options of every `cloudllm service` command.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// This user's daemon, started at log-in (the default).
    #[arg(long, conflicts_with = "system")]
    pub user: bool,
    /// The machine's daemon, started at boot (needs root or an administrator).
    #[arg(long)]
    pub system: bool,
    /// Print what would be done, and do nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Plan for another platform (with --dry-run) [default: this one].
    #[arg(long, value_enum, requires = "dry_run")]
    pub os: Option<Platform>,
}

/// Runs `cloudllm service …`, printing to standard output; returns the exit code (a failure
/// exits 1, or 5 without the privileges a system service needs).
pub fn run(command: ServiceCommand) -> Result<u8, Failure> {
    let (operation, options) = match command {
        ServiceCommand::Install(o) => (Operation::Install, o),
        ServiceCommand::Uninstall(o) => (Operation::Uninstall, o),
        ServiceCommand::Status(o) => (Operation::Status, o),
    };
    let platform = options
        .os
        .or_else(Platform::current)
        .ok_or_else(|| fail("no service manager known on this platform"))?;
    let scope = if options.system {
        Scope::System
    } else {
        Scope::User
    };
    let target = Target::here(platform, scope);
    let plan = plan(operation, &target).map_err(|e| fail(e.to_string()))?;
    if options.dry_run {
        let verb = match operation {
            Operation::Install => "install",
            Operation::Uninstall => "uninstall",
            Operation::Status => "query",
        };
        println!(
            "Would {verb} {} for {} (dry run: nothing is done){}:",
            describe(&target),
            target.cloudllmd.display(),
            if plan.needs_admin {
                ", as root or administrator"
            } else {
                ""
            }
        );
        print!("{plan}");
        return Ok(0);
    }
    check_privileges(&plan, &target, is_admin()).map_err(|e| Failure {
        code: EXIT_PERMISSION,
        message: e.to_string(),
    })?;
    let outcome = if operation == Operation::Status {
        execute(&plan, &mut std::io::sink())
    } else {
        execute(&plan, &mut std::io::stdout())
    }
    .map_err(|e| fail(e.to_string()))?;
    Ok(match operation {
        Operation::Status if outcome.last_exit != Some(0) => EXIT_FAILED,
        Operation::Install => {
            println!("Installed {}.", describe(&target));
            0
        }
        Operation::Uninstall => {
            println!("Uninstalled {}.", describe(&target));
            0
        }
        Operation::Status => 0,
    })
}

/// "the systemd user service cloudllmd.service", and so on.
pub fn describe(target: &Target) -> String {
    match (target.platform, target.scope) {
        (Platform::Linux, Scope::User) => format!("the systemd user service {UNIT}"),
        (Platform::Linux, Scope::System) => format!("the systemd system service {UNIT}"),
        (Platform::Macos, Scope::User) => format!("the launchd agent {LAUNCHD_LABEL}"),
        (Platform::Macos, Scope::System) => format!("the launchd daemon {LAUNCHD_LABEL}"),
        (Platform::Windows, Scope::User) => {
            format!("cloudllmd at log-in ({WINDOWS_RUN_KEY}\\{WINDOWS_SERVICE})")
        }
        (Platform::Windows, Scope::System) => format!("the Windows service {WINDOWS_SERVICE}"),
    }
}
