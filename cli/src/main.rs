//! `cloudllm`: the command-line client of the cloudllm daemon.
//!
//! It will talk to `cloudllmd` over its local IPC socket (login, status, connect …). Until that
//! socket exists it only says where things stand.

fn main() {
    eprintln!(
        "cloudllm: the command-line client is not built yet. Run the daemon directly: `cloudllmd --help`."
    );
    std::process::exit(2);
}
