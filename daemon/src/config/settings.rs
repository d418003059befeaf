//! The settings by name, as `cloudllm config get/set` reads and writes them: the table of
//! names, each setting's value as text, copying one setting between configs, and changing one
//! in the config file while keeping its comments, layout and mode.
//!
//! A new setting is added here (name, `get`, `copy_setting`) beside its field in
//! [`DaemonConfig`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use url::Url;

use super::{DaemonConfig, StoreChoice};

/// Settings `cloudllm config get/set` may read and change, in the order they are listed.
pub const SETTINGS: &[&str] = &[
    "relay_url",
    "ollama_url",
    "device_name",
    "device_id",
    "ca_file",
    "allow_model_management",
    "ping_interval",
    "ping_timeout",
    "reconnect_max",
    "shutdown_grace",
    "socket_path",
    "state_dir",
    "operator_group",
    "credential_store",
];

impl DaemonConfig {
    /// Takes setting `key` from `other`, leaving every other setting (including those that came
    /// from the environment or the command line) as it is.
    pub fn copy_setting(&mut self, key: &str, other: &DaemonConfig) {
        match key {
            "relay_url" => self.relay_url = other.relay_url.clone(),
            "ollama_url" => self.ollama_url = other.ollama_url.clone(),
            "device_name" => self.device_name = other.device_name.clone(),
            "device_id" => self.device_id = other.device_id.clone(),
            "ca_file" => self.ca_file = other.ca_file.clone(),
            "allow_model_management" => self.allow_model_management = other.allow_model_management,
            "ping_interval" => self.ping_interval = other.ping_interval,
            "ping_timeout" => self.ping_timeout = other.ping_timeout,
            "reconnect_max" => self.reconnect_max = other.reconnect_max,
            "shutdown_grace" => self.shutdown_grace = other.shutdown_grace,
            "socket_path" => self.socket_path = other.socket_path.clone(),
            "state_dir" => self.state_dir = other.state_dir.clone(),
            "operator_group" => self.operator_group = other.operator_group.clone(),
            "credential_store" => self.credential_store = other.credential_store,
            _ => {}
        }
    }

    /// A setting's value as it would be written in the config file ("" when unset).
    pub fn get(&self, key: &str) -> Option<String> {
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        let duration = |d: &Duration| humantime::format_duration(*d).to_string();
        Some(match key {
            "relay_url" => self
                .relay_url
                .as_ref()
                .map(Url::to_string)
                .unwrap_or_default(),
            "ollama_url" => self.ollama_url.to_string(),
            "device_name" => self.device_name.clone(),
            "device_id" => self.device_id.clone().unwrap_or_default(),
            "ca_file" => path(&self.ca_file),
            "allow_model_management" => self.allow_model_management.to_string(),
            "ping_interval" => duration(&self.ping_interval),
            "ping_timeout" => duration(&self.ping_timeout),
            "reconnect_max" => duration(&self.reconnect_max),
            "shutdown_grace" => duration(&self.shutdown_grace),
            "socket_path" => self
                .socket_path()
                .map(|path| path.display().to_string())
                .unwrap_or_default(),
            "state_dir" => self.state_dir().display().to_string(),
            "operator_group" => self.operator_group.clone().unwrap_or_default(),
            "credential_store" => match self.credential_store {
                StoreChoice::Auto => "auto".to_owned(),
                StoreChoice::File => "file".to_owned(),
            },
            _ => return None,
        })
    }
}

/// Sets `key` to `value` in the config file at `path` (created if missing), keeping the file's
/// comments and layout, and returns the config the file now holds. An empty value removes the
/// key (back to its default). Nothing is written unless the result parses and validates; the
/// file is replaced atomically.
pub fn set_in_file(path: &Path, key: &str, value: &str) -> anyhow::Result<DaemonConfig> {
    if !SETTINGS.contains(&key) {
        bail!("unknown setting {key:?}; settings: {}", SETTINGS.join(", "));
    }
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .with_context(|| format!("parsing {}", path.display()))?;
    if value.is_empty() {
        doc.remove(key);
    } else if key == "allow_model_management" {
        let flag: bool = value
            .parse()
            .map_err(|_| anyhow::anyhow!("{key} takes true or false, not {value:?}"))?;
        doc[key] = toml_edit::value(flag);
    } else {
        doc[key] = toml_edit::value(value);
    }
    let new_text = doc.to_string();
    let config: DaemonConfig =
        toml::from_str(&new_text).with_context(|| format!("{key} = {value:?} is not valid"))?;
    config.validate()?;
    write_atomically(path, new_text.as_bytes())?;
    Ok(config)
}

/// The mode of a config file `cloudllm config set` creates: readable by all, like the files in
/// `/etc` (it holds no secret: tokens never live in it). A file that exists keeps its own.
const NEW_CONFIG_MODE: u32 = 0o644;

/// Writes `data` to `path` in one step (`cloudllm_atomic_write`): the file is either the old
/// one or the new one, never half-written, and keeps the mode it had (a system config that an
/// operator made 0640 stays 0640).
fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mode = existing_mode(path).unwrap_or(NEW_CONFIG_MODE);
    cloudllm_atomic_write::write(path, mode, data)
        .with_context(|| format!("writing {}", path.display()))
}

/// The permission bits of the file at `path`, if there is one.
#[cfg(unix)]
fn existing_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .map(|meta| meta.permissions().mode() & 0o777)
}

#[cfg(not(unix))]
fn existing_mode(_path: &Path) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_in_file_keeps_comments_validates_and_removes() {
        let dir = std::env::temp_dir().join(format!("cloudllm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cloudllmd.toml");
        std::fs::write(&path, "# my settings\ndevice_name = \"old\"\n").unwrap();
        let config = set_in_file(&path, "device_name", "new-name").unwrap();
        assert_eq!(config.device_name, "new-name");
        let config = set_in_file(&path, "allow_model_management", "true").unwrap();
        assert!(config.allow_model_management);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# my settings"), "{text}");
        assert_eq!(config.get("device_name").unwrap(), "new-name");

        let before = std::fs::read_to_string(&path).unwrap();
        assert!(set_in_file(&path, "ollama_url", "ftp://nope").is_err());
        assert!(set_in_file(&path, "ping_interval", "soon").is_err());
        assert!(set_in_file(&path, "allow_model_management", "yes").is_err());
        let err = set_in_file(&path, "colour", "red").unwrap_err().to_string();
        assert!(
            err.contains("unknown setting") && err.contains("relay_url"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            before,
            "refused changes write nothing"
        );

        let config = set_in_file(&path, "allow_model_management", "").unwrap();
        assert!(!config.allow_model_management);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left behind");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[cfg(unix)]
    #[test]
    fn set_in_file_keeps_the_files_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cloudllm-config-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mode_of = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        let created = dir.join("new.toml");
        set_in_file(&created, "device_name", "box").unwrap();
        assert_eq!(mode_of(&created), NEW_CONFIG_MODE);

        let restricted = dir.join("cloudllmd.toml");
        std::fs::write(
            &restricted,
            "# for the cloudllm group only
",
        )
        .unwrap();
        std::fs::set_permissions(&restricted, std::fs::Permissions::from_mode(0o640)).unwrap();
        set_in_file(&restricted, "device_name", "box").unwrap();
        assert_eq!(mode_of(&restricted), 0o640, "an operator's 0640 stays 0640");
        let _ = std::fs::remove_dir_all(dir);
    }
}
