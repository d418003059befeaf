//! [`Scratch`]: a private temporary directory for the benchmark's own files (daemon sockets and
//! state, the relay process's config file with the benchmark's secret, its log), removed when
//! dropped.

use std::path::PathBuf;

use anyhow::Context;

/// A private (0700) directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// Creates `cloudllm-bench-<what>-<pid>` in the temporary directory, private to the user.
    pub fn create(what: &str) -> anyhow::Result<Scratch> {
        let dir =
            std::env::temp_dir().join(format!("cloudllm-bench-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
