//! `cloudllm open`: opens the relay's web page in the browser, already signed in as the user
//! this computer is logged in as, with nothing to copy.
//!
//! The daemon asks the relay for a one-time code with its agent token and answers a link with
//! the code in its fragment (see the daemon's `web_open`); this command hands the link to the
//! platform's opener, or prints it with `--print` (for another browser, or a script). The link
//! signs someone in once, within a minute: it is printed only when asked for, or when no
//! browser could be started, and never logged.

use cloudllm_ipc_client::Client;
use cloudllm_proto::ipc::{ErrorCode, Request, Response};

use crate::exit::{Failure, check, fail};
use crate::output::outln;

/// Asks the daemon for the link and opens it (or, with `print`, prints it).
pub async fn run(client: &mut Client, print: bool) -> Result<u8, Failure> {
    let answer = client.call(&Request::OpenWeb).await?;
    if let Response::Error {
        code: ErrorCode::BadRequest,
        ..
    } = answer
    {
        return Err(fail(
            "this cloudllmd is older than `cloudllm open`: update it, or restart it if it was just updated",
        ));
    }
    let Response::WebUrl { url } = check(answer)? else {
        return Err(fail("unexpected answer to open"));
    };
    if print {
        outln!("{}", url.expose());
        return Ok(0);
    }
    match open::that_detached(url.expose()) {
        Ok(()) => {
            outln!("Opened the web page in your browser, signed in.");
            Ok(0)
        }
        // The code is minted: rather than ask for another, say where it leads.
        Err(err) => Err(fail(format!(
            "cannot start a browser ({err}); open this link in one within a minute (it works once): {}",
            url.expose()
        ))),
    }
}
