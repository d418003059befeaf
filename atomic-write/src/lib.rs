//! Replacing a file in one step, for every file cloudllm writes on the user's machine: the
//! daemon's credentials (`credentials.json`), its config (`cloudllm config set` rewriting
//! `cloudllmd.toml`), its state (`prefs.json`, `device-id`), and the service files that
//! `cloudllm service install` writes.
//!
//! One recipe, so they all get the same guarantees:
//! 1. a temp file in the target's directory (a rename is atomic only within one file system),
//!    under a unique name created exclusively, so two writers never share one;
//! 2. its mode set before the first byte goes in, so a secret is never readable by others,
//!    not even for an instant;
//! 3. the bytes, then an fsync of the file, so the rename never exposes a file whose data is
//!    still only in the page cache (after a power cut, an empty file);
//! 4. a rename over the target: a reader, or a crash, sees the old file or the new one, never a
//!    mix;
//! 5. an fsync of the directory, without which the rename itself may not survive a power cut.
//!
//! A write that fails at any step removes its temp file; only a crash of the process can leave
//! one behind, and [`remove_leftovers`] clears those.
//!
//! Everything here blocks: async callers run it through `tokio::task::spawn_blocking` (or
//! accept a short block for a small file).

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Temp files end with this; they start with `.`, the target's name and `.`, so
/// `.credentials.json.Xy3kQ9.tmp` belongs to `credentials.json` and is hidden from `ls`.
const TEMP_SUFFIX: &str = ".tmp";

/// Replaces `path` with `bytes`, giving the new file `mode` (Unix permission bits; ignored
/// elsewhere). The directory must exist. See the crate's documentation for the steps.
///
/// Errors name the step and the path that failed.
pub fn write(path: &Path, mode: u32, bytes: &[u8]) -> io::Result<()> {
    write_with(path, mode, |file| file.write_all(bytes))
}

/// Like [`write`], but `fill` writes the contents into the temp file, which already has `mode`.
/// If `fill` fails (or panics), `path` is left as it was and the temp file is removed.
pub fn write_with<F>(path: &Path, mode: u32, fill: F) -> io::Result<()>
where
    F: FnOnce(&mut File) -> io::Result<()>,
{
    let dir = parent_dir(path);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", path.display()),
        )
    })?;
    let prefix = temp_prefix(&name.to_string_lossy());
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(TEMP_SUFFIX);
    // Created with `mode` (the umask can only narrow it): never more open than asked.
    #[cfg(unix)]
    builder.permissions(permissions(mode));
    let mut temp = builder.tempfile_in(dir).map_err(|err| {
        annotate(
            err,
            format_args!("creating a temporary file in {}", dir.display()),
        )
    })?;
    let temp_path = temp.path().to_path_buf();
    // Exactly `mode` now, whatever the umask took away, and still before any byte is written.
    #[cfg(unix)]
    temp.as_file()
        .set_permissions(permissions(mode))
        .map_err(|err| {
            annotate(
                err,
                format_args!("setting the mode of {}", temp_path.display()),
            )
        })?;
    #[cfg(not(unix))]
    let _ = mode;
    fill(temp.as_file_mut())
        .and_then(|()| temp.as_file().sync_all())
        .map_err(|err| annotate(err, format_args!("writing {}", temp_path.display())))?;
    // On failure the temp file comes back inside the error, and dropping it removes it.
    temp.persist(path).map_err(|err| {
        annotate(
            err.error,
            format_args!("renaming {} to {}", temp_path.display(), path.display()),
        )
    })?;
    sync_dir(dir)
}

/// Removes the temp files that writes of `path` interrupted by a crash left beside it (they
/// may hold part of a secret). Only files named like this crate's temp files for `path` are
/// touched; a directory that is not there has none.
///
/// Not for use while another writer of `path` may be running: its temp file would go too.
pub fn remove_leftovers(path: &Path) -> io::Result<()> {
    let dir = parent_dir(path);
    let Some(name) = path.file_name() else {
        return Ok(());
    };
    let prefix = temp_prefix(&name.to_string_lossy());
    for found in leftovers(dir, &prefix)? {
        match std::fs::remove_file(&found) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(annotate(err, format_args!("removing {}", found.display()))),
        }
    }
    Ok(())
}

/// The temp files in `dir` whose names start with `prefix`.
fn leftovers(dir: &Path, prefix: &str) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(annotate(err, format_args!("listing {}", dir.display()))),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|err| annotate(err, format_args!("listing {}", dir.display())))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.len() > prefix.len() + TEMP_SUFFIX.len()
            && name.starts_with(prefix)
            && name.ends_with(TEMP_SUFFIX)
        {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// How the temp files of a target named `name` start.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.")
}

/// The directory `path` is in; `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `err` with `what` in front, keeping its kind so callers can still match on it.
fn annotate(err: io::Error, what: std::fmt::Arguments<'_>) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

#[cfg(unix)]
fn permissions(mode: u32) -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    std::fs::Permissions::from_mode(mode)
}

/// Makes the rename durable: on Unix a rename is on disk only once its directory is synced.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|err| annotate(err, format_args!("syncing {}", dir.display())))
}

/// Windows cannot open a directory as a file to sync it; NTFS journals the rename itself.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Bound on waiting for the other writer in the concurrency test.
    const MEET: Duration = Duration::from_secs(20);

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A directory holding one file, `name`, that says "old".
    fn old_file(name: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, "old").unwrap();
        (dir, path)
    }

    /// Asserts that the file of [`old_file`] still says "old" and nothing is beside it.
    fn assert_untouched(dir: &tempfile::TempDir, path: &Path) {
        assert_eq!(std::fs::read_to_string(path).unwrap(), "old");
        let name = path.file_name().unwrap().to_string_lossy();
        assert_eq!(names(dir.path()), [name], "no temp file left");
    }

    #[test]
    fn replaces_the_file_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloudllmd.toml");
        write(&path, 0o644, b"first").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        write(&path, 0o644, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(names(dir.path()), ["cloudllmd.toml"]);
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_file_is_private_before_its_first_byte() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, path) = old_file("credentials.json");
        std::fs::set_permissions(&path, permissions(0o644)).unwrap();
        write_with(&path, 0o600, |file| {
            let temps = leftovers(dir.path(), ".credentials.json.").unwrap();
            assert_eq!(temps.len(), 1, "{temps:?}");
            let meta = std::fs::metadata(&temps[0]).unwrap();
            assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
            assert_eq!(meta.len(), 0, "nothing written yet");
            assert_eq!(temps[0].parent(), Some(dir.path()), "beside the target");
            file.write_all(b"token")
        })
        .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "was 0644");
        assert_eq!(std::fs::read(&path).unwrap(), b"token");
    }

    #[cfg(unix)]
    #[test]
    fn the_mode_asked_for_is_the_mode_given() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o600, 0o755] {
            let path = dir.path().join("unit");
            write(&path, mode, b"x").unwrap();
            let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(got, mode, "asked {mode:o}, got {got:o}");
        }
    }

    #[test]
    fn a_writer_that_fails_midway_keeps_the_old_file_and_leaves_no_temp() {
        let (dir, path) = old_file("credentials.json");
        let err = write_with(&path, 0o600, |file| {
            file.write_all(b"half a tok")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(err.to_string().contains("writing"), "{err}");
        assert_untouched(&dir, &path);
    }

    #[test]
    fn a_writer_that_panics_keeps_the_old_file_and_leaves_no_temp() {
        let (dir, path) = old_file("prefs.json");
        let result = std::panic::catch_unwind(|| {
            write_with(&path, 0o600, |file| {
                file.write_all(b"{\"conn").unwrap();
                panic!("serializer bug");
            })
        });
        assert!(result.is_err());
        assert_untouched(&dir, &path);
    }

    #[test]
    fn two_writers_at_once_each_keep_their_own_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefs.json");
        // Each writer tells the other it holds its temp file open, then waits for the other:
        // both temp files exist at the same time.
        let (to_b, from_a) = mpsc::channel();
        let (to_a, from_b) = mpsc::channel();
        let writer = |contents: &'static [u8], tell: mpsc::Sender<()>, hear: mpsc::Receiver<()>| {
            let path = path.clone();
            std::thread::spawn(move || {
                write_with(&path, 0o600, |file| {
                    file.write_all(&contents[..3])?;
                    tell.send(()).unwrap();
                    hear.recv_timeout(MEET)
                        .expect("the other writer never started");
                    file.write_all(&contents[3..])
                })
            })
        };
        let a = writer(b"aaaaaaaa", to_b, from_b);
        let b = writer(b"bbbbbbbbbbbb", to_a, from_a);
        a.join().unwrap().unwrap();
        b.join().unwrap().unwrap();
        let result = std::fs::read(&path).unwrap();
        assert!(
            result == b"aaaaaaaa" || result == b"bbbbbbbbbbbb",
            "{}",
            String::from_utf8_lossy(&result)
        );
        assert_eq!(names(dir.path()), ["prefs.json"]);
    }

    #[test]
    fn leftovers_of_the_target_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        for name in [
            "credentials.json",
            ".credentials.json.Ab12Cd.tmp",
            ".credentials.json.Zz99Yy.tmp",
            ".credentials.json.tmp",
            ".prefs.json.Ab12Cd.tmp",
            "notes.tmp",
        ] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        remove_leftovers(&path).unwrap();
        assert_eq!(
            names(dir.path()),
            [
                ".credentials.json.tmp",
                ".prefs.json.Ab12Cd.tmp",
                "credentials.json",
                "notes.tmp"
            ]
        );
        remove_leftovers(&dir.path().join("gone/credentials.json")).unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nowhere/cloudllmd.toml");
        let err = write(&path, 0o644, b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("nowhere"), "{err}");
    }
}
