//! Where the daemon keeps the user's tokens: the OS keyring when one answers, else a private file.
//!
//! The keyring (Secret Service on Linux, Keychain on macOS, Credential Manager on Windows) is
//! the right home for a token: other programs of the same user cannot read it without asking.
//! Headless servers have no keyring service (no D-Bus session, no Secret Service), so there the
//! credentials go to `credentials.json`, mode 0600, in the daemon's state directory, written
//! atomically (`cloudllm_atomic_write`: a temp file private from its first byte, fsync, rename)
//! so a crash never leaves half a token behind. Which of
//! the two is in use is part of [`StoreKind`], so `status` can tell the user plainly.
//!
//! Every call here blocks (D-Bus round trips, file I/O, fsync): async callers run them through
//! `tokio::task::spawn_blocking`.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use cloudllm_proto::Secret;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// The keyring service name every entry of the daemon lives under; the account is the user's.
pub const KEYRING_SERVICE: &str = "cloudllm";

/// The name of the fallback file inside the state directory.
pub const CREDENTIALS_FILE: &str = "credentials.json";

/// Probe entries are named this plus a random suffix, so daemons probing at once never touch
/// each other's entry.
const PROBE_ACCOUNT_PREFIX: &str = "cloudllm-keyring-probe-";

/// 20 s: a working keyring answers the probe in milliseconds (D-Bus activation of
/// gnome-keyring takes about a second), and a locked one shows an unlock prompt that a person
/// needs some seconds to answer; a keyring silent longer than that is stuck, and the daemon must
/// not hang at start-up waiting for it.
const KEYRING_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// 64 KiB: two JWTs and a few URLs take 2–4 KiB; anything far larger is not ours and is
/// refused rather than read whole into memory.
const MAX_CREDENTIALS_BYTES: usize = 64 * 1024;

/// Owner read and write only: the file holds the tokens. (Ignored on Windows, where the user
/// profile's ACL keeps other users out.)
const PRIVATE_MODE: u32 = 0o600;

/// What the daemon stores: serialized as JSON into the keyring entry or the file.
///
/// `Debug` shows no token: both tokens are [`Secret`]s, whose `Debug` prints `***`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    /// The relay these tokens are for.
    pub relay_url: String,
    /// The agent token that opens the tunnel.
    pub access_token: Secret,
    /// The OAuth refresh token, if the login gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// When the access token expires, in Unix seconds; `None` = unknown or non-expiring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The OAuth token endpoint to refresh at (`None` for `--with-token` logins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint: Option<String>,
    /// The OAuth client id to refresh with (`None` for `--with-token` logins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// Which store holds the credentials; `Display` is the phrase `status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum StoreKind {
    /// The OS keyring (Secret Service, Keychain, Credential Manager).
    Keyring,
    /// A 0600 file, because no keyring service answered (or the config asked for a file).
    File {
        /// Where the file is.
        path: PathBuf,
    },
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Keyring => f.write_str("OS keyring"),
            StoreKind::File { path } => write!(
                f,
                "file {} (no keyring service on this machine)",
                path.display()
            ),
        }
    }
}

/// The daemon's credential store: one keyring entry or one file, chosen once by [`open`].
///
/// [`open`]: CredentialStore::open
pub struct CredentialStore {
    kind: StoreKind,
    backend: Backend,
}

/// The handle behind a [`StoreKind`].
enum Backend {
    Keyring {
        entry: keyring::Entry,
        account: String,
    },
    File {
        path: PathBuf,
    },
}

impl fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialStore")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl CredentialStore {
    /// Picks the OS keyring when a keyring service answers, else the file under `state_dir`.
    ///
    /// The probe stores, reads back and removes an entry of its own: if that works, so will
    /// the real one. No D-Bus session, no Secret Service, no usable collection, no access, or
    /// no answer within the probe timeout (20 s, time to answer an unlock prompt) means the
    /// file. `account` names the keyring entry (the daemon passes the OS user name).
    ///
    /// The keyring crate connects to the Secret Service once per process, so a daemon that
    /// started before the session's keyring did keeps using the file until it restarts.
    pub fn open(state_dir: &Path, account: &str) -> Self {
        match probe_keyring(account) {
            Ok(entry) => {
                let stale = state_dir.join(CREDENTIALS_FILE);
                if stale.exists() {
                    warn!(
                        path = %stale.display(),
                        "ignoring the credentials file: the OS keyring is in use (log in again to store them there)"
                    );
                }
                info!(store = "OS keyring", account, "credential store chosen");
                CredentialStore {
                    kind: StoreKind::Keyring,
                    backend: Backend::Keyring {
                        entry,
                        account: account.to_owned(),
                    },
                }
            }
            Err(reason) => {
                let store = Self::file_only(state_dir);
                info!(
                    store = %store.kind,
                    reason = format!("{reason:#}"),
                    "no keyring service: keeping credentials in a file"
                );
                store
            }
        }
    }

    /// A store that never uses the keyring: `credentials.json` under `state_dir` (for tests and
    /// for `credential_store = "file"`). Nothing is touched until the first call.
    pub fn file_only(state_dir: &Path) -> Self {
        let path = state_dir.join(CREDENTIALS_FILE);
        CredentialStore {
            kind: StoreKind::File { path: path.clone() },
            backend: Backend::File { path },
        }
    }

    /// Which store is in use.
    pub fn kind(&self) -> &StoreKind {
        &self.kind
    }

    /// The stored credentials, or `None` if there are none. A corrupt entry or file is an
    /// error that names where it is.
    pub fn load(&self) -> anyhow::Result<Option<Credentials>> {
        let bytes = match &self.backend {
            Backend::Keyring { entry, .. } => match entry.get_secret() {
                Ok(bytes) => bytes,
                Err(keyring::Error::NoEntry) => return Ok(None),
                Err(err) => {
                    return Err(err)
                        .with_context(|| format!("reading credentials from {}", self.location()));
                }
            },
            Backend::File { path } => match read_private_file(path)? {
                Some(bytes) => bytes,
                None => return Ok(None),
            },
        };
        if bytes.len() > MAX_CREDENTIALS_BYTES {
            bail!(
                "the credentials in {} are larger than {MAX_CREDENTIALS_BYTES} bytes: not ours; run `cloudllm logout` and log in again",
                self.location()
            );
        }
        let credentials = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the credentials in {} are corrupt; run `cloudllm logout` and log in again",
                self.location()
            )
        })?;
        Ok(Some(credentials))
    }

    /// Stores `credentials`, replacing any before. The file is replaced atomically: a reader
    /// (or a crash) sees the old contents or the new, never a mix.
    pub fn save(&self, credentials: &Credentials) -> anyhow::Result<()> {
        let json = serde_json::to_vec(credentials).context("serializing credentials")?;
        match &self.backend {
            Backend::Keyring { entry, .. } => match entry.set_secret(&json) {
                Ok(()) => Ok(()),
                // Windows' Credential Manager holds at most 2,560 bytes; long refresh tokens
                // (Keycloak's are JWTs) can exceed that.
                Err(err @ keyring::Error::TooLong(..)) => Err(err).with_context(|| {
                    format!(
                        "saving credentials ({} bytes) in {}: too long for this keyring; \
                         set credential_store = \"file\" in the daemon's config",
                        json.len(),
                        self.location()
                    )
                }),
                Err(err) => {
                    Err(err).with_context(|| format!("saving credentials in {}", self.location()))
                }
            },
            Backend::File { path } => write_private_file(path, &json)
                .with_context(|| format!("saving credentials in {}", path.display())),
        }
    }

    /// Removes the credentials (and, for the file, any temp file an interrupted save left).
    /// Removing what is not there is not an error.
    pub fn clear(&self) -> anyhow::Result<()> {
        match &self.backend {
            Backend::Keyring { entry, .. } => match entry.delete_credential() {
                Ok(()) | Err(keyring::Error::NoEntry) => Ok(()),
                Err(err) => Err(err)
                    .with_context(|| format!("removing credentials from {}", self.location())),
            },
            Backend::File { path } => {
                remove_if_present(path)?;
                // An interrupted save's temp file may hold part of a token.
                cloudllm_atomic_write::remove_leftovers(path)
                    .with_context(|| format!("removing the temp files beside {}", path.display()))
            }
        }
    }

    /// Where the credentials are, for error messages.
    fn location(&self) -> String {
        match &self.backend {
            Backend::Keyring { account, .. } => {
                format!("the OS keyring (service {KEYRING_SERVICE}, account {account})")
            }
            Backend::File { path } => path.display().to_string(),
        }
    }
}

/// Opens the keyring entry for `account` if a keyring service answers within
/// [`KEYRING_PROBE_TIMEOUT`]; otherwise says why not.
///
/// The probe runs on a thread of its own because a D-Bus call has no timeout of ours; a probe
/// that never answers leaves that thread blocked, which costs less than a daemon that hangs.
fn probe_keyring(account: &str) -> anyhow::Result<keyring::Entry> {
    let (tx, rx) = mpsc::sync_channel(1);
    let account = account.to_owned();
    thread::Builder::new()
        .name("keyring-probe".into())
        .spawn(move || {
            // The receiver is gone if the probe timed out; then nobody wants the answer.
            let _ = tx.send(probe_keyring_blocking(&account));
        })
        .context("starting the keyring probe")?;
    match rx.recv_timeout(KEYRING_PROBE_TIMEOUT) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(anyhow!(
            "the keyring service did not answer within {KEYRING_PROBE_TIMEOUT:?}"
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(anyhow!("the keyring probe failed")),
    }
}

/// The probe itself: writes, reads back and deletes an entry of its own (blocking D-Bus, or
/// Keychain, or Credential Manager calls).
///
/// A read alone is not enough: a Secret Service that D-Bus can start but that has no usable
/// collection (gnome-keyring installed on a machine reached over SSH) answers reads with "no
/// entry" and then fails every write, which would leave the user unable to log in.
fn probe_keyring_blocking(account: &str) -> anyhow::Result<keyring::Entry> {
    let probe_account = format!("{PROBE_ACCOUNT_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let probe = new_entry(&probe_account)?;
    let written = b"probe";
    probe
        .set_secret(written)
        .context("the OS keyring refused a test entry")?;
    let read = probe.get_secret();
    if let Err(err) = probe.delete_credential() {
        warn!(
            account = probe_account,
            error = %err,
            "could not remove the keyring's test entry"
        );
    }
    match read {
        Ok(read) if read == written => new_entry(account),
        Ok(_) => bail!("the OS keyring returned something else than was stored"),
        Err(err) => Err(err).context("the OS keyring lost a test entry"),
    }
}

/// The keyring entry for `account`, with the real reason when the keyring could not start
/// (the crate reports only "no default store" and keeps the cause aside).
fn new_entry(account: &str) -> anyhow::Result<keyring::Entry> {
    keyring::Entry::new(KEYRING_SERVICE, account).map_err(|err| {
        match (&err, keyring::Entry::store_status()) {
            (keyring::Error::NoDefaultStore, Err(cause)) => {
                anyhow!("no OS keyring service: {cause}")
            }
            _ => anyhow::Error::new(err).context("opening the OS keyring entry"),
        }
    })
}

/// The file's bytes, `None` if it does not exist; refuses a file larger than we ever write.
fn read_private_file(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("opening {}", path.display())),
    };
    warn_if_exposed(path, &file);
    let mut bytes = Vec::new();
    // One byte past the limit is enough to tell an oversized file without reading it whole.
    file.take(MAX_CREDENTIALS_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(bytes))
}

/// Warns when other users could have read the file (someone loosened its mode by hand).
#[cfg(unix)]
fn warn_if_exposed(path: &Path, file: &File) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = file.metadata() {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "the credentials file is readable by other users: chmod 600 it, and consider logging in again"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_exposed(_path: &Path, _file: &File) {}

/// Writes `bytes` to `path` atomically with mode 0600 (see `cloudllm_atomic_write`), in a
/// directory only the owner may write to.
fn write_private_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    ensure_private_dir(dir)?;
    Ok(cloudllm_atomic_write::write(path, PRIVATE_MODE, bytes)?)
}

/// Creates `dir` with mode 0700, or checks the existing one: a directory that others may
/// write to lets them swap the file for theirs, so it is refused, never silently chmod-ed
/// (it may be shared on purpose, like `/tmp`).
#[cfg(unix)]
fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => bail!("{} is not a directory", dir.display()),
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o022 != 0 {
                bail!(
                    "refusing to keep credentials in {}: other users may write to it (mode {mode:o}); run `chmod 700 {}` or choose another state directory",
                    dir.display(),
                    dir.display()
                );
            }
            Ok(())
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display())),
        Err(err) => Err(err).with_context(|| format!("checking {}", dir.display())),
    }
}

#[cfg(not(unix))]
fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Removes `path`; a file that is not there is already removed.
fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", path.display())),
    }
}
