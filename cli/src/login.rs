//! `cloudllm login`: hands the daemon an agent token read from standard input
//! (`--with-token`), or starts the daemon's interactive login and shows its prompts — a URL to
//! open (in a browser opened for the user when there is a display) or a code to enter on
//! another device — until the daemon says the login is done.

use std::io::{IsTerminal, Read, Write};

use cloudllm_ipc_client::Client;
use cloudllm_proto::Secret;
use cloudllm_proto::ipc::{LoginFlow, Request, Response};

use crate::exit::{Failure, check, fail};
use crate::output::outln;

/// The most a token read from standard input may be: agent tokens are a few KiB at most, and
/// a file piped in by mistake is not read without end.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// `cloudllm login`'s options.
#[derive(clap::Args)]
pub struct LoginArgs {
    /// The relay's URL, e.g. https://relay.example.com [default: the configured one].
    #[arg(long)]
    pub relay: Option<String>,
    /// Read an agent token from standard input instead of logging in through a browser.
    #[arg(long)]
    pub with_token: bool,
    /// Use the device flow (a code to enter on another device).
    #[arg(long, conflicts_with_all = ["browser", "with_token"])]
    pub device: bool,
    /// Use the browser flow (a redirect to this machine).
    #[arg(long, conflicts_with = "with_token")]
    pub browser: bool,
    /// Print the login URL instead of opening a browser.
    #[arg(long)]
    pub no_browser: bool,
}

/// Runs `cloudllm login`.
pub async fn run(client: &mut Client, args: LoginArgs) -> Result<u8, Failure> {
    let LoginArgs {
        relay,
        with_token,
        device,
        browser,
        no_browser,
    } = args;
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
        .take(MAX_TOKEN_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| fail(format!("reading the token from standard input: {e}")))?;
    if text.trim().is_empty() {
        return Err(fail(
            "no token on standard input: pipe one in, e.g. `echo $TOKEN | cloudllm login --with-token`",
        ));
    }
    Ok(Secret::new(text.trim()))
}

/// Whether a browser could open here: on Linux and FreeBSD only with an X or Wayland display
/// (a server over SSH has none); elsewhere there always is one.
fn has_display() -> bool {
    if cfg!(target_os = "linux") || cfg!(target_os = "freebsd") {
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some()
    } else {
        true
    }
}
