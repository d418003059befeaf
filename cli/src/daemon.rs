//! `cloudllm daemon`: runs `cloudllmd` in the foreground, so one command name is enough to
//! remember. The daemon is its own program; this only finds and starts it.

use std::path::PathBuf;

use crate::exit::{Failure, fail};

/// Runs `cloudllmd` with `args`: the one next to this binary, else from `PATH`.
pub fn run(args: &[String]) -> Result<u8, Failure> {
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
        use crate::exit::EXIT_FAILED;
        let status = std::process::Command::new(&program)
            .args(args)
            .status()
            .map_err(cannot)?;
        Ok(status
            .code()
            .map_or(EXIT_FAILED, |c| u8::try_from(c).unwrap_or(EXIT_FAILED)))
    }
}
