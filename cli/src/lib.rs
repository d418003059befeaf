//! `cloudllm`, the command-line client of the cloudllm daemon. It only talks to `cloudllmd`
//! over its local socket (through `cloudllm_ipc_client`); the daemon does the work.
//!
//! Layout: `main.rs` parses the command line ([`args`]) and dispatches to one module per
//! command — [`status`] (with its words and colours in [`render`]), [`login`], [`session`]
//! (connect, disconnect, logout), [`logs`], [`config`], [`models`], [`open`] (the web page,
//! signed in), [`daemon`], [`completions`] and [`service`] (install the daemon as a service;
//! its own submodules per platform). Every command returns `Result<u8, `[`exit::Failure`]`>`, the exit code or what
//! went wrong with its code; [`output`] writes standard output so that a reader that closes
//! the pipe early ends the program quietly.
//!
//! Exit codes: 0 success (for `status`: connected); 1 the request failed; 2 bad usage;
//! 3 the daemon is not running; 4 `status`: not connected; 5 permission denied.

pub mod output;

pub mod args;
pub mod completions;
pub mod config;
pub mod daemon;
pub mod exit;
pub mod login;
pub mod logs;
pub mod models;
pub mod open;
pub mod render;
pub mod service;
pub mod session;
pub mod status;
