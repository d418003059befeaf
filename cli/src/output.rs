//! Standard output that a reader may close early (`cloudllm status | head -1`): `println!`
//! would panic there, so every line goes through [`write()`] (or the crate's `outln!` and
//! `out!` macros), which ends the program quietly when nobody reads any more.

use std::io::Write;

use crate::exit::EXIT_FAILED;

/// `println!` to standard output through [`write()`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write(format!("{}\n", format_args!($($arg)*)).as_bytes())
    };
}

/// `outln!` without the newline.
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write(format!($($arg)*).as_bytes()) };
}

pub(crate) use {out, outln};

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
            std::process::exit(i32::from(EXIT_FAILED));
        }
    }
}
