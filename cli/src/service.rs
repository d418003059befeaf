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

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The systemd system unit (`systemd/cloudllmd.service`).
pub const SYSTEMD_SYSTEM_UNIT: &str = include_str!("../../systemd/cloudllmd.service");
/// The systemd user unit (`systemd/user/cloudllmd.service`).
pub const SYSTEMD_USER_UNIT: &str = include_str!("../../systemd/user/cloudllmd.service");
/// The system daemon's user and group, for systemd-sysusers.
pub const SYSUSERS: &str = include_str!("../../packaging/linux/cloudllm.sysusers");
/// The system daemon's config directory, for systemd-tmpfiles.
pub const TMPFILES: &str = include_str!("../../packaging/linux/cloudllm.tmpfiles");
/// The system daemon's initial settings (the operator group).
pub const SYSTEM_CONFIG: &str = include_str!("../../packaging/linux/cloudllmd.toml");
/// The launchd LaunchDaemon (`packaging/macos/launch-daemon.plist`).
pub const LAUNCH_DAEMON: &str = include_str!("../../packaging/macos/launch-daemon.plist");
/// The launchd LaunchAgent (`packaging/macos/launch-agent.plist`).
pub const LAUNCH_AGENT: &str = include_str!("../../packaging/macos/launch-agent.plist");

/// The daemon's path in the systemd units (where the Debian package puts it).
pub const SYSTEMD_BIN: &str = "/usr/bin/cloudllmd";
/// The daemon's path in the launchd plists.
pub const LAUNCHD_BIN: &str = "/usr/local/bin/cloudllmd";
/// The systemd unit's name.
pub const UNIT: &str = "cloudllmd.service";
/// The launchd job's label.
pub const LAUNCHD_LABEL: &str = "com.cloudllm.cloudllmd";
/// The Windows service's name (as `cloudllmd --service` registers with the SCM).
pub const WINDOWS_SERVICE: &str = "cloudllmd";
/// The per-user log-in key where Windows starts a user's programs.
pub const WINDOWS_RUN_KEY: &str = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run";

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
                for arg in args {
                    if arg.is_empty() || arg.contains(char::is_whitespace) {
                        write!(f, " {arg:?}")?;
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
        (Platform::Linux, Operation::Install) => linux_install(target)?,
        (Platform::Linux, Operation::Uninstall) => linux_uninstall(target),
        (Platform::Linux, Operation::Status) => vec![systemctl(
            target.scope,
            &["status", "--no-pager", "--lines=0", UNIT],
        )],
        (Platform::Macos, Operation::Install) => macos_install(target)?,
        (Platform::Macos, Operation::Uninstall) => macos_uninstall(target),
        (Platform::Macos, Operation::Status) => vec![Action::run(
            "launchctl",
            &[
                "print",
                &format!("{}/{LAUNCHD_LABEL}", launchd_domain(target)),
            ],
        )],
        (Platform::Windows, Operation::Install) => windows_install(target)?,
        (Platform::Windows, Operation::Uninstall) => windows_uninstall(target),
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

fn systemctl(scope: Scope, args: &[&str]) -> Action {
    let mut all: Vec<&str> = Vec::new();
    if scope == Scope::User {
        all.push("--user");
    }
    all.extend_from_slice(args);
    Action::run("systemctl", &all)
}

fn linux_unit_path(target: &Target) -> PathBuf {
    match target.scope {
        Scope::System => PathBuf::from("/etc/systemd/system").join(UNIT),
        Scope::User => target.config_home.join("systemd/user").join(UNIT),
    }
}

fn linux_install(target: &Target) -> Result<Vec<Action>, PlanError> {
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
            path: linux_unit_path(target),
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
            "`sudo usermod -aG cloudllm USER` lets USER reach the socket; changes take root or `sg cloudllm -c \"cloudllm ...\"`"
                .to_owned(),
        ));
    }
    Ok(actions)
}

fn linux_uninstall(target: &Target) -> Vec<Action> {
    let scope = target.scope;
    let mut actions = vec![
        systemctl(scope, &["disable", "--now", UNIT]).tolerant(),
        Action::Remove {
            path: linux_unit_path(target),
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

fn launchd_domain(target: &Target) -> String {
    match target.scope {
        Scope::System => "system".to_owned(),
        Scope::User => format!("gui/{}", target.uid),
    }
}

fn plist_path(target: &Target) -> PathBuf {
    let name = format!("{LAUNCHD_LABEL}.plist");
    match target.scope {
        Scope::System => PathBuf::from("/Library/LaunchDaemons").join(name),
        Scope::User => target.home.join("Library/LaunchAgents").join(name),
    }
}

fn macos_install(target: &Target) -> Result<Vec<Action>, PlanError> {
    let bin = plain_path(target)?;
    let (template, source) = match target.scope {
        Scope::System => (LAUNCH_DAEMON, "packaging/macos/launch-daemon.plist"),
        Scope::User => (LAUNCH_AGENT, "packaging/macos/launch-agent.plist"),
    };
    let plist = plist_path(target);
    let domain = launchd_domain(target);
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

fn macos_uninstall(target: &Target) -> Vec<Action> {
    let domain = launchd_domain(target);
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

fn windows_install(target: &Target) -> Result<Vec<Action>, PlanError> {
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

fn windows_uninstall(target: &Target) -> Vec<Action> {
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

/// Why `cloudllm service` failed, with the exit code that says so.
#[derive(Debug)]
pub struct Failure {
    /// 1: failed; 5: not privileged.
    pub code: u8,
    /// What to tell the user.
    pub message: String,
}

/// Runs `cloudllm service …`, printing to standard output; returns the exit code.
pub fn run(command: ServiceCommand) -> Result<u8, Failure> {
    let (operation, options) = match command {
        ServiceCommand::Install(o) => (Operation::Install, o),
        ServiceCommand::Uninstall(o) => (Operation::Uninstall, o),
        ServiceCommand::Status(o) => (Operation::Status, o),
    };
    let failed = |message: String| Failure { code: 1, message };
    let platform = options
        .os
        .or_else(Platform::current)
        .ok_or_else(|| failed("no service manager known on this platform".to_owned()))?;
    let scope = if options.system {
        Scope::System
    } else {
        Scope::User
    };
    let target = Target::here(platform, scope);
    let plan = plan(operation, &target).map_err(|e| failed(e.to_string()))?;
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
        code: 5,
        message: e.to_string(),
    })?;
    let outcome = if operation == Operation::Status {
        execute(&plan, &mut std::io::sink())
    } else {
        execute(&plan, &mut std::io::stdout())
    }
    .map_err(|e| failed(e.to_string()))?;
    Ok(match operation {
        Operation::Status if outcome.last_exit != Some(0) => 1,
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
        {
            return Err(ExecError::NotPrivileged(
                "as root, a user service would be root's own: use --system, or run without sudo for your user"
                    .to_owned(),
            ));
        }
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

/// Writes `contents` to `path` through a temporary file in the same directory, then gives it
/// `mode`: the service manager never reads a half-written unit.
fn write_file(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = std::fs::write(&tmp, contents)
        .and_then(|()| set_mode(&tmp, mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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
