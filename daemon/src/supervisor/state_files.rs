//! What the daemon keeps in its state directory besides the credentials: this device's id and
//! the user's connect/disconnect preference. Both are small, not secret, and written in one
//! step (`cloudllm_atomic_write`), so a crash leaves the old file or the new one.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Preferences that survive restarts.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Prefs {
    /// `cloudllm connect` / `disconnect`.
    pub(super) connect: bool,
}

/// Creates `dir` (and parents) readable only by its owner.
pub(super) fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating state dir {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", dir.display()))?;
    }
    Ok(())
}

/// This machine's device id: made once and kept in the state dir, so the relay recognises the
/// device across restarts.
pub(super) fn stable_device_id(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join("device-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if cloudllm_proto::valid_device_field(id) {
            return Ok(id.to_owned());
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    cloudllm_atomic_write::write(&path, STATE_FILE_MODE, id.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

pub(super) fn read_prefs(state_dir: &Path) -> Prefs {
    std::fs::read(state_dir.join("prefs.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(Prefs { connect: true })
}

/// Replaces `prefs.json` in one step (two `cloudllm connect` at once each write their own temp
/// file).
pub(super) fn write_prefs(state_dir: &Path, prefs: &Prefs) -> anyhow::Result<()> {
    let path = state_dir.join("prefs.json");
    cloudllm_atomic_write::write(&path, STATE_FILE_MODE, &serde_json::to_vec(prefs)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// The mode of `device-id` and `prefs.json`: neither is a secret (the relay shows the device
/// id to the user), and the state directory around them is the daemon's own.
const STATE_FILE_MODE: u32 = 0o644;
