//! `cloudllm-tray`: the status icon of the cloudllm daemon (a thin client of its IPC socket).

fn main() {
    eprintln!(
        "cloudllm-tray: the tray icon is not built yet. Run the daemon directly: `cloudllmd --help`."
    );
    std::process::exit(2);
}
