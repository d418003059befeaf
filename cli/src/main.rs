//! `cloudllm`: the command-line client of the cloudllm daemon. It only talks to `cloudllmd`
//! over its local socket; the daemon does the work.
//!
//! Exit codes: 0 success (for `status`: connected); 1 the request failed; 2 bad usage;
//! 3 the daemon is not running; 4 `status`: not connected; 5 permission denied.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use cloudllm_cli::service::{self, ServiceCommand};
use cloudllm_cli::{Client, ConnectError, SOCKET_ENV, socket_path};
use cloudllm_proto::Secret;
use cloudllm_proto::ipc::{Connection, ErrorCode, LoginFlow, Ollama, Request, Response, Status};

/// Exit code: the request failed.
const EXIT_FAILED: u8 = 1;
/// Exit code: the daemon is not running.
const EXIT_NO_DAEMON: u8 = 3;
/// Exit code of `status`: the tunnel is not connected.
const EXIT_NOT_CONNECTED: u8 = 4;
/// Exit code: the daemon refused the request to this user.
const EXIT_PERMISSION: u8 = 5;

#[derive(Parser)]
#[command(
    name = "cloudllm",
    version,
    about = "Reach the Ollama on this machine from anywhere, through a cloudllm relay",
    after_help = "Exit codes: 0 ok (status: connected), 1 failed, 2 usage, 3 daemon not running, \
                  4 status: not connected, 5 permission denied."
)]
struct Cli {
    /// The daemon's socket [default: the user daemon's, else the system daemon's].
    #[arg(long, global = true, env = SOCKET_ENV)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Log in to a relay; the daemon then connects.
    Login {
        /// The relay's URL, e.g. https://relay.example.com [default: the configured one].
        #[arg(long)]
        relay: Option<String>,
        /// Read an agent token from standard input instead of logging in through a browser.
        #[arg(long)]
        with_token: bool,
        /// Use the device flow (a code to enter on another device).
        #[arg(long, conflicts_with_all = ["browser", "with_token"])]
        device: bool,
        /// Use the browser flow (a redirect to this machine).
        #[arg(long, conflicts_with = "with_token")]
        browser: bool,
        /// Print the login URL instead of opening a browser.
        #[arg(long)]
        no_browser: bool,
    },
    /// Forget the credentials and close the tunnel.
    Logout,
    /// Show the daemon's state; exits 4 when not connected.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Keep printing every change (one line, or one JSON document, each).
        #[arg(long)]
        watch: bool,
    },
    /// Open the tunnel (and keep it open across restarts).
    Connect,
    /// Close the tunnel (and keep it closed across restarts).
    Disconnect,
    /// Show the daemon's recent log lines.
    Logs {
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// How many recent lines.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
    },
    /// Read or change the daemon's settings.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// List the local Ollama's models, as the relay will see them.
    Models {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the daemon in the foreground (`cloudllmd`).
    Daemon {
        /// Arguments for cloudllmd (e.g. --config FILE).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install, remove or query cloudllmd as a service (systemd, launchd, Windows service).
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print one setting, or all.
    Get {
        /// The setting [default: all].
        key: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a setting (an empty value restores the default).
    Set {
        /// The setting.
        key: String,
        /// Its new value.
        value: String,
    },
    /// Print the config file's path.
    Path,
}

/// What went wrong, and the exit code that says so.
struct Failure {
    code: u8,
    message: String,
}

impl From<ConnectError> for Failure {
    fn from(err: ConnectError) -> Self {
        let code = match err {
            ConnectError::NotRunning(_) => EXIT_NO_DAEMON,
            ConnectError::PermissionDenied(_) => EXIT_PERMISSION,
            _ => EXIT_FAILED,
        };
        Failure {
            code,
            message: err.to_string(),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        // The client refused to trust the socket's owner with a request: said as it is.
        if err.kind() == std::io::ErrorKind::PermissionDenied {
            return Failure {
                code: EXIT_PERMISSION,
                message: err.to_string(),
            };
        }
        Failure {
            code: EXIT_FAILED,
            message: format!("lost the daemon: {err}"),
        }
    }
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_FAILED,
        message: message.into(),
    }
}

/// Turns an error response into a failure; passes other responses through.
fn check(response: Response) -> Result<Response, Failure> {
    match response {
        Response::Error { code, message } => Err(Failure {
            code: if code == ErrorCode::PermissionDenied {
                EXIT_PERMISSION
            } else {
                EXIT_FAILED
            },
            message,
        }),
        other => Ok(other),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cloudllm: {err}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("cloudllm: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// Standard output that a reader may close early (`cloudllm status | head -1`): `println!`
/// would panic there, so every line goes through [`output::write`], which ends the program
/// quietly when nobody reads any more.
macro_rules! outln {
    ($($arg:tt)*) => { output::write(format!("{}\n", format_args!($($arg)*)).as_bytes()) };
}

/// [`outln!`] without the newline.
macro_rules! out {
    ($($arg:tt)*) => { output::write(format!($($arg)*).as_bytes()) };
}

mod output {
    use std::io::Write;

    /// Writes and flushes `bytes` (every line reaches a `watch` or `logs -f` reader at once).
    /// A reader that has gone away ends the program with success: it wanted no more. Any other
    /// failure ends it with an error.
    pub fn write(bytes: &[u8]) {
        let mut out = std::io::stdout().lock();
        match out.write_all(bytes).and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
            Err(err) => {
                eprintln!("cloudllm: writing to standard output: {err}");
                std::process::exit(i32::from(super::EXIT_FAILED));
            }
        }
    }
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    match cli.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "cloudllm", &mut script);
            output::write(&script);
            return Ok(0);
        }
        Command::Daemon { args } => return run_daemon(&args),
        Command::Service { command } => {
            return service::run(command).map_err(|f| Failure {
                code: f.code,
                message: f.message,
            });
        }
        _ => {}
    }
    let path = socket_path(cli.socket)?;
    let mut client = Client::connect(&path).await?;
    let style = Style::detect();
    match cli.command {
        Command::Status { json, watch: false } => {
            let Response::Status(status) = check(client.call(&Request::Status).await?)? else {
                return Err(fail("unexpected answer to status"));
            };
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            } else {
                out!("{}", describe(&status, style));
            }
            Ok(
                if matches!(status.connection, Connection::Connected { .. }) {
                    0
                } else {
                    EXIT_NOT_CONNECTED
                },
            )
        }
        Command::Status { json, watch: true } => {
            client.send(&Request::Watch).await?;
            loop {
                let Response::Status(status) = check(client.recv().await?)? else {
                    continue;
                };
                if json {
                    outln!("{}", serde_json::to_string(&status).unwrap_or_default());
                } else {
                    outln!("{}", one_line(&status, style));
                }
            }
        }
        Command::Connect => simple(&mut client, Request::Connect, "Connecting.").await,
        Command::Disconnect => simple(&mut client, Request::Disconnect, "Disconnected.").await,
        Command::Logout => simple(&mut client, Request::Logout, "Logged out.").await,
        Command::Logs { follow, lines } => {
            client.send(&Request::Logs { lines, follow }).await?;
            loop {
                match check(client.recv().await?)? {
                    Response::Log { line } => outln!("{line}"),
                    _ => return Ok(0),
                }
            }
        }
        Command::Models { json } => {
            let Response::Models { models } = check(client.call(&Request::Models).await?)? else {
                return Err(fail("unexpected answer to models"));
            };
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&models).unwrap_or_default()
                );
            } else if models.is_empty() {
                outln!("Ollama has no models yet: `ollama pull MODEL` on this machine.");
            } else {
                models.iter().for_each(|m| outln!("{m}"));
            }
            Ok(0)
        }
        Command::Config { command } => config(&mut client, command).await,
        Command::Login {
            relay,
            with_token,
            device,
            browser,
            no_browser,
        } => {
            if with_token {
                let token = read_token()?;
                let response = check(
                    client
                        .call(&Request::LoginWithToken {
                            relay_url: relay,
                            token,
                        })
                        .await?,
                )?;
                print_logged_in(&response);
                return Ok(0);
            }
            let flow = match (device, browser) {
                (true, _) => LoginFlow::Device,
                (_, true) => LoginFlow::Browser,
                _ => LoginFlow::Auto,
            };
            client
                .send(&Request::Login {
                    relay_url: relay,
                    flow,
                })
                .await?;
            loop {
                match check(client.recv().await?)? {
                    Response::LoginPrompt(prompt) => {
                        match &prompt.user_code {
                            Some(code) => {
                                outln!("To log in, open {} and enter the code {code}", prompt.url);
                                if let Some(complete) = &prompt.url_complete {
                                    outln!("(or open {complete})");
                                }
                            }
                            None => {
                                let opened = !no_browser
                                    && has_display()
                                    && open::that_detached(&prompt.url).is_ok();
                                if opened {
                                    outln!(
                                        "Your browser was opened to log in. If it was not, open:\n  {}",
                                        prompt.url
                                    );
                                } else {
                                    outln!(
                                        "To log in, open this URL in a browser on this machine:\n  {}",
                                        prompt.url
                                    );
                                }
                            }
                        }
                        outln!("Waiting for you to finish…");
                        let _ = std::io::stdout().flush();
                    }
                    response @ Response::LoginDone { .. } => {
                        print_logged_in(&response);
                        return Ok(0);
                    }
                    _ => {}
                }
            }
        }
        Command::Completions { .. } | Command::Daemon { .. } | Command::Service { .. } => Ok(0),
    }
}

async fn simple(client: &mut Client, request: Request, done: &str) -> Result<u8, Failure> {
    check(client.call(&request).await?)?;
    outln!("{done}");
    Ok(0)
}

async fn config(client: &mut Client, command: ConfigCommand) -> Result<u8, Failure> {
    let (request, json) = match command {
        ConfigCommand::Get { key, json } => (Request::ConfigGet { key }, json),
        ConfigCommand::Set { key, value } => (Request::ConfigSet { key, value }, false),
        ConfigCommand::Path => {
            let Response::Config { path, .. } =
                check(client.call(&Request::ConfigGet { key: None }).await?)?
            else {
                return Err(fail("unexpected answer to config"));
            };
            outln!("{path}");
            return Ok(0);
        }
    };
    let Response::Config { values, .. } = check(client.call(&request).await?)? else {
        return Err(fail("unexpected answer to config"));
    };
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&values).unwrap_or_default()
        );
    } else if values.len() == 1 {
        values.values().for_each(|v| outln!("{v}"));
    } else {
        let width = values.keys().map(String::len).max().unwrap_or(0);
        for (key, value) in &values {
            outln!("{key:width$}  {value}");
        }
    }
    Ok(0)
}

fn print_logged_in(response: &Response) {
    match response {
        Response::LoginDone { user: Some(user) } => outln!("Logged in as {user}. Connecting…"),
        _ => outln!("Logged in. Connecting…"),
    }
}

/// Reads an agent token from standard input (all of it, trimmed).
fn read_token() -> Result<Secret, Failure> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Paste the agent token and press Enter: ");
        let mut line = String::new();
        stdin
            .read_line(&mut line)
            .map_err(|e| fail(format!("reading the token: {e}")))?;
        return Ok(Secret::new(line.trim()));
    }
    let mut text = String::new();
    stdin
        .lock()
        .take(64 * 1024)
        .read_to_string(&mut text)
        .map_err(|e| fail(format!("reading the token from standard input: {e}")))?;
    if text.trim().is_empty() {
        return Err(fail(
            "no token on standard input: pipe one in, e.g. `echo $TOKEN | cloudllm login --with-token`",
        ));
    }
    Ok(Secret::new(text.trim()))
}

fn has_display() -> bool {
    if cfg!(target_os = "linux") || cfg!(target_os = "freebsd") {
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some()
    } else {
        true
    }
}

/// Runs `cloudllmd` in the foreground: the one next to this binary, else from `PATH`.
fn run_daemon(args: &[String]) -> Result<u8, Failure> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.parent()
                .map(|dir| dir.join(format!("cloudllmd{}", std::env::consts::EXE_SUFFIX)))
        })
        .filter(|path| path.exists());
    let program = beside.unwrap_or_else(|| PathBuf::from("cloudllmd"));
    let cannot = |e: std::io::Error| {
        fail(format!(
            "cannot run {}: {e} (is cloudllmd installed?)",
            program.display()
        ))
    };
    // On Unix `cloudllm daemon` becomes `cloudllmd` (same pid), so `kill $!` and Ctrl-C reach
    // the daemon itself; a child left behind by a killed wrapper would run on as an orphan.
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        Err(cannot(
            std::process::Command::new(&program).args(args).exec(),
        ))
    }
    #[cfg(not(unix))]
    {
        let status = std::process::Command::new(&program)
            .args(args)
            .status()
            .map_err(cannot)?;
        Ok(status
            .code()
            .map_or(EXIT_FAILED, |c| u8::try_from(c).unwrap_or(EXIT_FAILED)))
    }
}

/// Whether to colour output: only on a terminal, and never with `NO_COLOR` set.
#[derive(Clone, Copy)]
struct Style {
    color: bool,
}

impl Style {
    fn detect() -> Self {
        Style::for_output(
            std::io::stdout().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        )
    }

    /// Colour only on a terminal, and never when `NO_COLOR` is set to anything non-empty
    /// (no-color.org).
    fn for_output(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> Self {
        Style {
            color: terminal && no_color.is_none_or(|v| v.is_empty()),
        }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

fn connection_text(connection: &Connection, relay: Option<&str>, style: Style) -> String {
    let relay = relay.unwrap_or("the relay");
    match connection {
        Connection::LoggedOut => style.paint("31", "logged out: run `cloudllm login --relay URL`"),
        Connection::LoginRequired { reason } => style.paint(
            "31",
            &format!("login required: {}", cloudllm_proto::printable(reason)),
        ),
        Connection::Disconnected => style.paint("33", "disconnected (run `cloudllm connect`)"),
        Connection::Connecting => style.paint("33", &format!("connecting to {relay}")),
        Connection::Connected { since, rtt_ms } => {
            let rtt = rtt_ms
                .map(|ms| format!(", rtt {ms} ms"))
                .unwrap_or_default();
            let ago = now().saturating_sub(*since);
            style.paint(
                "32",
                &format!("connected to {relay} for {}{rtt}", human_duration(ago)),
            )
        }
        Connection::Reconnecting {
            attempt,
            next_try,
            last_error,
        } => {
            let wait = next_try.saturating_sub(now());
            style.paint(
                "33",
                &format!(
                    "reconnecting (attempt {attempt}, next in {wait} s): {}",
                    cloudllm_proto::printable(last_error)
                ),
            )
        }
        Connection::Replaced { at } => style.paint("31", &replaced_text(*at, now())),
    }
}

/// What `status` says of a tunnel another connection with the same device id replaced at
/// `at`, seen at `now` (Unix seconds).
fn replaced_text(at: u64, now: u64) -> String {
    let when = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(at),
    );
    format!(
        "replaced by another connection with the same device id at {when} ({} ago); \
         run `cloudllm connect` to take it back",
        human_duration(now.saturating_sub(at))
    )
}

fn ollama_text(ollama: &Ollama, style: Style) -> String {
    match ollama {
        Ollama::Unknown => "checking…".to_owned(),
        Ollama::Up { version, models } => style.paint(
            "32",
            &format!(
                "up, version {version}, {models} model{}",
                if *models == 1 { "" } else { "s" }
            ),
        ),
        Ollama::Down { error } => style.paint("31", &format!("down: {error}")),
    }
}

fn describe(status: &Status, style: Style) -> String {
    let user = match (&status.user, &status.tier) {
        (Some(user), Some(tier)) => format!("{user} ({tier})"),
        (Some(user), None) => user.clone(),
        _ => "—".to_owned(),
    };
    format!(
        "Tunnel:       {}\nUser:         {user}\nDevice:       {}\nOllama:       {}\nRequests:     {} in flight, {} total\nCredentials:  {}\nDaemon:       cloudllmd {}\n",
        connection_text(&status.connection, status.relay_url.as_deref(), style),
        status.device_name,
        ollama_text(&status.ollama, style),
        status.requests_in_flight,
        status.requests_total,
        status.credential_store,
        status.daemon_version,
    )
}

fn one_line(status: &Status, style: Style) -> String {
    format!(
        "{} · Ollama {} · {} in flight, {} total",
        connection_text(&status.connection, status.relay_url.as_deref(), style),
        ollama_text(&status.ollama, style),
        status.requests_in_flight,
        status.requests_total
    )
}

fn human_duration(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3600 => format!("{} min", seconds / 60),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let none = None;
        let set = Some(std::ffi::OsStr::new("1"));
        let empty = Some(std::ffi::OsStr::new(""));
        assert!(Style::for_output(true, none).color);
        assert!(Style::for_output(true, empty).color);
        assert!(!Style::for_output(true, set).color);
        assert!(!Style::for_output(false, none).color);
        let plain = Style::for_output(false, none);
        assert_eq!(plain.paint("32", "connected"), "connected");
        assert_eq!(
            Style::for_output(true, none).paint("32", "up"),
            "\x1b[32mup\x1b[0m"
        );
    }

    #[test]
    fn a_replaced_tunnel_says_when_and_how_to_take_it_back() {
        let text = replaced_text(1_767_225_600, 1_767_225_600 + 300);
        assert_eq!(
            text,
            "replaced by another connection with the same device id at 2026-01-01T00:00:00Z \
             (5 min ago); run `cloudllm connect` to take it back"
        );
        let plain = Style::for_output(false, None);
        let shown = connection_text(&Connection::Replaced { at: 5 }, None, plain);
        assert!(
            shown.starts_with("replaced by another connection"),
            "{shown}"
        );
        // Whatever reached the daemon from the network, the terminal gets no escape codes.
        let hostile = Connection::Reconnecting {
            attempt: 1,
            next_try: 0,
            last_error: "closed (\u{1b}[2Jbye\nforged)".into(),
        };
        let shown = connection_text(&hostile, None, plain);
        assert!(!shown.contains(['\u{1b}', '\n']), "{shown}");
    }

    #[test]
    fn one_model_is_not_one_models() {
        let plain = Style::for_output(false, None);
        let up = |models| Ollama::Up {
            version: "0.5.4".into(),
            models,
        };
        assert_eq!(ollama_text(&up(1), plain), "up, version 0.5.4, 1 model");
        assert_eq!(ollama_text(&up(2), plain), "up, version 0.5.4, 2 models");
    }

    #[test]
    fn durations_read_like_a_person_would_say_them() {
        assert_eq!(human_duration(5), "5 s");
        assert_eq!(human_duration(125), "2 min");
        assert_eq!(human_duration(3 * 3600 + 120), "3 h 2 min");
    }
}
