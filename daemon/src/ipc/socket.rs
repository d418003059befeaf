//! The socket itself and who is on the other end: creating it with the right mode and owner
//! (never taking over a live daemon's), reading the peer's uid and gid, and deciding whose
//! requests may change the daemon's state (its own user, root, or its operator group).

use std::path::Path;

use anyhow::Context;
use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::traits::tokio::Stream as _;
use interprocess::local_socket::{ListenerOptions, Name};
use tracing::info;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
}

/// Whose requests may change the daemon's state.
#[derive(Debug, Clone, Copy)]
pub(super) struct Operators {
    pub(super) daemon_uid: Option<u32>,
    pub(super) group: Option<u32>,
}

impl Operators {
    pub(super) fn allow(&self, peer: Peer) -> bool {
        if cfg!(not(unix)) {
            // Named pipes are limited to the creating user and administrators by their ACL.
            return true;
        }
        match (peer.uid, self.group) {
            (Some(0), _) => true,
            (Some(uid), _) if Some(uid) == self.daemon_uid => true,
            (_, None) => false,
            (uid, Some(group)) => {
                peer.gid == Some(group) || uid.is_some_and(|u| member_of(u, group))
            }
        }
    }
}

/// Whether the user `uid` is a member of group `gid` in the group database (as a supplementary
/// group: `usermod -aG`). The socket's peer credentials carry only the effective group.
#[cfg(unix)]
fn member_of(uid: u32, gid: u32) -> bool {
    use nix::unistd::{Gid, Uid, User, getgrouplist};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return false;
    };
    getgrouplist(&name, user.gid).is_ok_and(|groups| groups.contains(&Gid::from_raw(gid)))
}

#[cfg(not(unix))]
fn member_of(_uid: u32, _gid: u32) -> bool {
    false
}

fn socket_name(path: &Path) -> std::io::Result<Name<'_>> {
    #[cfg(unix)]
    {
        use interprocess::local_socket::{GenericFilePath, ToFsName};
        path.to_fs_name::<GenericFilePath>()
    }
    #[cfg(not(unix))]
    {
        use interprocess::local_socket::{GenericNamespaced, ToNsName};
        cloudllm_proto::ipc::pipe_name(path).to_ns_name::<GenericNamespaced>()
    }
}

/// Creates the IPC socket at `path`. A socket file left by a dead daemon is replaced; a live
/// daemon's socket is never taken over. A user daemon's socket is 0600. A system daemon's is
/// 0660 and owned by `operator_group` when that group exists (only root and operators can
/// connect), else 0666 (anyone may read; changes are checked per request).
pub(crate) async fn bind(
    path: &Path,
    system: bool,
    operator_group: Option<&str>,
) -> anyhow::Result<Listener> {
    let group = if system {
        operator_group.and_then(group_id)
    } else {
        None
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        #[cfg(unix)]
        if !system {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        match Stream::connect(socket_name(path)?).await {
            Ok(_) => anyhow::bail!(
                "another cloudllmd is already running on {} (stop it first, or set socket_path)",
                path.display()
            ),
            Err(_) => {
                info!(socket = %path.display(), "replacing the stale socket of a daemon that is gone");
                std::fs::remove_file(path)
                    .with_context(|| format!("removing stale {}", path.display()))?;
            }
        }
    }
    let mode = match (system, group) {
        (false, _) => 0o600,
        (true, Some(_)) => 0o660,
        (true, None) => 0o666,
    };
    let options = ListenerOptions::new()
        .name(socket_name(path)?)
        .reclaim_name(true);
    #[cfg(unix)]
    let options = {
        use interprocess::os::unix::local_socket::ListenerOptionsExt;
        options.mode(mode)
    };
    let listener = options
        .create_tokio()
        .with_context(|| format!("creating the IPC socket {}", path.display()))?;
    // The process umask narrows the mode given at creation; set it exactly.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("giving {} to the operator group", path.display()))?;
        }
    }
    #[cfg(not(unix))]
    let _ = mode;
    Ok(listener)
}

pub(super) fn peer_of(stream: &Stream) -> Peer {
    #[cfg(unix)]
    {
        use interprocess::local_socket::traits::StreamCommon;
        if let Ok(creds) = stream.peer_creds() {
            return Peer {
                uid: creds.euid(),
                gid: creds.egid(),
            };
        }
    }
    let _ = stream;
    Peer {
        uid: None,
        gid: None,
    }
}

#[cfg(unix)]
pub(super) fn current_uid() -> Option<u32> {
    Some(nix::unistd::geteuid().as_raw())
}

#[cfg(not(unix))]
pub(super) fn current_uid() -> Option<u32> {
    None
}

#[cfg(unix)]
pub(super) fn group_id(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

#[cfg(not(unix))]
pub(super) fn group_id(_name: &str) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_root_and_operators_may_change_state() {
        let operators = Operators {
            daemon_uid: Some(1000),
            group: Some(50),
        };
        let peer = |uid, gid| Peer {
            uid: Some(uid),
            gid: Some(gid),
        };
        assert!(operators.allow(peer(0, 0)));
        assert!(operators.allow(peer(1000, 1000)));
        assert!(operators.allow(peer(1001, 50)));
        assert!(!operators.allow(peer(1001, 1001)));
        assert!(!operators.allow(Peer {
            uid: None,
            gid: None
        }));
    }

    #[cfg(unix)]
    #[test]
    fn group_membership_comes_from_the_group_database() {
        // root's own group is in its group list; nobody is not in root's group, and a user
        // that does not exist is in none.
        assert!(member_of(0, 0));
        assert!(!member_of(65534, 0));
        assert!(!member_of(4_000_000_000, 0));
        let operators = Operators {
            daemon_uid: Some(1000),
            group: Some(0),
        };
        assert!(!operators.allow(Peer {
            uid: Some(65534),
            gid: Some(65534)
        }));
    }
}
