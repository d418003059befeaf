//! `cloudllm connect`, `disconnect` and `logout`: one request each that changes the daemon's
//! session with the relay, answered by one line. The daemon remembers connect and disconnect
//! across restarts; logout forgets the credentials.

use cloudllm_ipc_client::Client;
use cloudllm_proto::ipc::Request;

use crate::exit::{Failure, check};
use crate::output::outln;

/// `cloudllm connect`: open the tunnel.
pub async fn connect(client: &mut Client) -> Result<u8, Failure> {
    simple(client, Request::Connect, "Connecting.").await
}

/// `cloudllm disconnect`: close the tunnel.
pub async fn disconnect(client: &mut Client) -> Result<u8, Failure> {
    simple(client, Request::Disconnect, "Disconnected.").await
}

/// `cloudllm logout`: forget the credentials and close the tunnel.
pub async fn logout(client: &mut Client) -> Result<u8, Failure> {
    simple(client, Request::Logout, "Logged out.").await
}

/// Sends `request`, and says `done` once the daemon has carried it out.
async fn simple(client: &mut Client, request: Request, done: &str) -> Result<u8, Failure> {
    check(client.call(&request).await?)?;
    outln!("{done}");
    Ok(0)
}
