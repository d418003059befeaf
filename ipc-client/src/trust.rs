//! Who listens on a socket, and whether to trust it with a secret.
//!
//! A socket is a name in the file system, and whoever binds the name first gets the
//! connections. Before a request that hands the daemon a secret (a token) or that makes the
//! user act on the daemon's word (the interactive login, whose URL the user opens and signs in
//! at), the client checks who is listening: the socket's owner and the peer's credentials must
//! be this user, root, or the system daemon's user ([`SYSTEM_DAEMON_USER`]).

use std::path::Path;

use cloudllm_proto::ipc::Request;
use interprocess::local_socket::tokio::Stream;

use crate::SOCKET_ENV;

/// The account the system daemon runs as (systemd's `User=`, created by the package's
/// sysusers.d file): besides this user and root, the only owner trusted with a secret.
pub const SYSTEM_DAEMON_USER: &str = "cloudllm";

/// Whether a request trusts the daemon with something: a secret it sends, or a login whose
/// URL the user will open and sign in at.
pub(crate) fn needs_trusted_daemon(request: &Request) -> bool {
    matches!(
        request,
        Request::LoginWithToken { .. } | Request::Login { .. }
    )
}

/// Who listens on a socket, as far as the platform tells.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Listener {
    /// The socket file's owner.
    owner: Option<u32>,
    /// The listening process's effective uid (peer credentials).
    peer: Option<u32>,
}

impl Listener {
    /// Who listens at `path`, connected as `stream`.
    #[cfg(unix)]
    pub(crate) fn of(path: &Path, stream: &Stream) -> Listener {
        use interprocess::local_socket::traits::StreamCommon;
        use std::os::unix::fs::MetadataExt;
        Listener {
            owner: std::fs::metadata(path).ok().map(|meta| meta.uid()),
            peer: stream.peer_creds().ok().and_then(|creds| creds.euid()),
        }
    }

    /// Named pipes tell nothing here.
    #[cfg(not(unix))]
    pub(crate) fn of(_path: &Path, _stream: &Stream) -> Listener {
        Listener::default()
    }

    /// `Ok` when whoever listens at `path` is trusted; else an error of kind
    /// [`std::io::ErrorKind::PermissionDenied`] that says who it is and what to do.
    pub(crate) fn ensure_trusted(self, path: &Path) -> std::io::Result<()> {
        self.check().map_err(|uid| {
            std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "refusing to log in through {}: it belongs to {}, not to you, root or the \
                     system daemon's user `{SYSTEM_DAEMON_USER}`, so another user may be posing \
                     as the daemon to catch your token. Use your own daemon's socket (--socket \
                     PATH or {SOCKET_ENV}), or find out who created this one",
                    path.display(),
                    describe_uid(uid),
                ),
            )
        })
    }

    /// `Ok` when every uid known is trusted ([`trusted_uid`]), else the first one that is not.
    /// Unix sockets always give peer credentials; with none at all, nothing is trusted.
    #[cfg(unix)]
    fn check(self) -> Result<(), u32> {
        if self.owner.is_none() && self.peer.is_none() {
            return Err(u32::MAX);
        }
        for uid in [self.peer, self.owner].into_iter().flatten() {
            if !trusted_uid(uid) {
                return Err(uid);
            }
        }
        Ok(())
    }

    /// Named pipes carry no uid here; their name space is the machine's.
    #[cfg(not(unix))]
    fn check(self) -> Result<(), u32> {
        Ok(())
    }
}

/// This user, root, or the system daemon's user.
#[cfg(unix)]
fn trusted_uid(uid: u32) -> bool {
    use nix::unistd::{User, geteuid};
    uid == 0
        || uid == geteuid().as_raw()
        || User::from_name(SYSTEM_DAEMON_USER)
            .ok()
            .flatten()
            .is_some_and(|user| user.uid.as_raw() == uid)
}

/// A uid as people know it: `name (uid N)`.
#[cfg(unix)]
fn describe_uid(uid: u32) -> String {
    if uid == u32::MAX {
        return "an unknown user".to_owned();
    }
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("user {} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}

#[cfg(not(unix))]
fn describe_uid(uid: u32) -> String {
    format!("uid {uid}")
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// The uid of `nobody` on Linux and the BSDs: never this user, root or the daemon's.
    const NOBODY: u32 = 65534;

    #[test]
    fn only_secrets_and_logins_need_a_trusted_daemon() {
        let token = Request::LoginWithToken {
            relay_url: None,
            token: cloudllm_proto::Secret::new("t"),
        };
        assert!(needs_trusted_daemon(&token));
        assert!(needs_trusted_daemon(&Request::Login {
            relay_url: None,
            flow: cloudllm_proto::ipc::LoginFlow::Auto,
        }));
        assert!(!needs_trusted_daemon(&Request::Status));
        assert!(!needs_trusted_daemon(&Request::Connect));
    }

    #[test]
    fn a_socket_of_another_user_or_of_no_one_known_is_not_trusted() {
        let me = nix::unistd::geteuid().as_raw();
        let mine = Listener {
            owner: Some(me),
            peer: Some(me),
        };
        assert!(mine.ensure_trusted(Path::new("/run/mine.sock")).is_ok());
        let root = Listener {
            owner: Some(0),
            peer: Some(0),
        };
        assert!(root.check().is_ok());
        let posing = Listener {
            owner: Some(me),
            peer: Some(NOBODY),
        };
        assert_eq!(posing.check(), Err(NOBODY));
        let err = posing
            .ensure_trusted(Path::new("/tmp/cloudllm.sock"))
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("/tmp/cloudllm.sock"), "{err}");
        assert!(err.to_string().contains(SOCKET_ENV), "{err}");
        assert_eq!(Listener::default().check(), Err(u32::MAX));
    }
}
