//! The connections being served, counted per user, so that any local user may connect to a
//! system daemon's socket and yet no other account can take the slots root and the daemon's
//! own user need to reach it.

use std::sync::Arc;

/// Most IPC connections served at once: clients are a CLI or two and a tray; 64 leaves room and
/// bounds a local process opening connections in a loop.
pub const MAX_CONNECTIONS: usize = 64;

/// Most connections one user other than root and the daemon's own may hold: a tray (its
/// watch, and one per menu action), a `status --watch`, a `logs --follow` and a few commands
/// come to well under 16.
pub const MAX_CONNECTIONS_PER_USER: usize = 16;

/// Slots of the [`MAX_CONNECTIONS`] that only root and the daemon's own user may take, so
/// that other users together can never fill the socket: 8 is room for an operator's status,
/// disconnect and logs while something else holds all the rest.
pub const RESERVED_FOR_OWNER: usize = 8;

/// The connections being served, counted per user so that no other user can take the slots
/// root and the daemon's own user need (see [`RESERVED_FOR_OWNER`]).
pub(super) struct Slots {
    owner: Option<u32>,
    counts: std::sync::Mutex<SlotCounts>,
}

#[derive(Default)]
struct SlotCounts {
    total: usize,
    /// Connections of users other than root and the owner, by uid (`None`: unknown).
    by_user: std::collections::HashMap<Option<u32>, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Every slot is taken.
    Full,
    /// The slots other users may take are all taken.
    OthersFull,
    /// This user holds [`MAX_CONNECTIONS_PER_USER`] already.
    UserFull,
}

impl Refusal {
    pub(super) fn message(self) -> String {
        match self {
            Refusal::Full => format!(
                "cloudllmd is serving {MAX_CONNECTIONS} connections already; try again shortly"
            ),
            Refusal::OthersFull => format!(
                "cloudllmd is serving {} connections of other users already (the rest are kept for \
                 root and its own user); try again shortly",
                MAX_CONNECTIONS - RESERVED_FOR_OWNER
            ),
            Refusal::UserFull => format!(
                "you hold {MAX_CONNECTIONS_PER_USER} connections to cloudllmd already: close some \
                 (a `cloudllm status --watch`, `logs --follow` or tray) and try again"
            ),
        }
    }
}

/// One connection's place in [`Slots`], given back when dropped.
pub(super) struct Slot {
    slots: Arc<Slots>,
    user: Option<Option<u32>>,
}

impl Slots {
    pub(super) fn new(owner: Option<u32>) -> Slots {
        Slots {
            owner,
            counts: std::sync::Mutex::new(SlotCounts::default()),
        }
    }

    /// Root and the daemon's own user; everyone where there are no uids (Windows' named pipe
    /// admits only its creator and administrators).
    fn privileged(&self, uid: Option<u32>) -> bool {
        cfg!(not(unix)) || uid == Some(0) || (uid.is_some() && uid == self.owner)
    }

    pub(super) fn acquire(self: &Arc<Self>, uid: Option<u32>) -> Result<Slot, Refusal> {
        let privileged = self.privileged(uid);
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if counts.total >= MAX_CONNECTIONS {
            return Err(Refusal::Full);
        }
        if privileged {
            counts.total += 1;
            return Ok(Slot {
                slots: self.clone(),
                user: None,
            });
        }
        let others: usize = counts.by_user.values().sum();
        if others >= MAX_CONNECTIONS - RESERVED_FOR_OWNER {
            return Err(Refusal::OthersFull);
        }
        let mine = counts.by_user.entry(uid).or_default();
        if *mine >= MAX_CONNECTIONS_PER_USER {
            return Err(Refusal::UserFull);
        }
        *mine += 1;
        counts.total += 1;
        Ok(Slot {
            slots: self.clone(),
            user: Some(uid),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self
            .slots
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        if let Some(uid) = self.user
            && let Some(count) = counts.by_user.get_mut(&uid)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.by_user.remove(&uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_users_cannot_take_the_owners_slots() {
        let slots = Arc::new(Slots::new(Some(1000)));
        // One user fills its share and no more.
        let mut held: Vec<Slot> = (0..MAX_CONNECTIONS_PER_USER)
            .map(|_| slots.acquire(Some(2000)).unwrap())
            .collect();
        assert_eq!(slots.acquire(Some(2000)).err(), Some(Refusal::UserFull));
        // Other users fill what is left to them, and no more.
        let mut uid = 3000;
        while held.len() < MAX_CONNECTIONS - RESERVED_FOR_OWNER {
            match slots.acquire(Some(uid)) {
                Ok(slot) => held.push(slot),
                Err(Refusal::UserFull) => uid += 1,
                Err(other) => panic!("{other:?}"),
            }
        }
        assert_eq!(slots.acquire(Some(9999)).err(), Some(Refusal::OthersFull));
        assert_eq!(slots.acquire(None).err(), Some(Refusal::OthersFull));
        // Root and the owner still get in, up to the total.
        held.push(slots.acquire(Some(0)).unwrap());
        while held.len() < MAX_CONNECTIONS {
            held.push(slots.acquire(Some(1000)).unwrap());
        }
        assert_eq!(slots.acquire(Some(0)).err(), Some(Refusal::Full));
        // Slots come back when connections end.
        held.truncate(MAX_CONNECTIONS_PER_USER);
        assert_eq!(
            slots.acquire(Some(2000)).err(),
            Some(Refusal::UserFull),
            "still at its share"
        );
        assert!(slots.acquire(Some(3000)).is_ok());
        held.clear();
        assert!(slots.acquire(Some(2000)).is_ok());
        let counts = slots.counts.lock().unwrap();
        assert_eq!(counts.total, 0, "the temporary slot was given back");
        assert!(counts.by_user.is_empty());
    }
}
