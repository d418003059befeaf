//! The client side of the cloudllm daemon's IPC socket, shared by the `cloudllm` CLI, the tray
//! and the end-to-end tests. The wire types are `cloudllm_proto::ipc`; this crate only dials,
//! says hello, and carries [`Request`](cloudllm_proto::ipc::Request)s and
//! [`Response`](cloudllm_proto::ipc::Response)s, one JSON line each. It is apart from the CLI
//! so that other clients do not pull in the CLI's commands (as Tailscale keeps its local API
//! client apart from its CLI).
//!
//! Layout:
//! - [`socket`]: which socket to dial ([`socket_path`], [`SOCKET_ENV`]) and its platform name.
//! - [`client`]: [`Client`], one connection: connect and hello, send, receive, call; and
//!   [`ConnectError`], why the daemon could not be reached.
//! - [`trust`]: who listens on a socket, checked before a request hands the daemon a secret
//!   (a token) or makes the user act on its word (the interactive login).

#![forbid(unsafe_code)]

pub mod client;
pub mod socket;
pub mod trust;

pub use client::{Client, ConnectError};
pub use socket::{SOCKET_ENV, socket_path};
pub use trust::SYSTEM_DAEMON_USER;
