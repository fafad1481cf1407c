//! The lease record and where it is kept.

use parking_lot::Mutex;
use remus_s3::{S3Client, S3Error};
use remus_types::GuestId;
use std::collections::HashMap;

/// Version of the lease record's layout.
pub const LEASE_FORMAT: u32 = 1;

/// Who runs a guest, in which generation, under which lease period. Kept
/// as one small JSON object per guest (readable by an operator), changed
/// only by compare-and-swap.
///
/// The wall-clock times are claims for messages ("owned by … since …");
/// no decision depends on them, only on each side's own monotonic clock.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    /// [`LEASE_FORMAT`].
    pub format: u32,
    /// The guest.
    pub guest: GuestId,
    /// Generation: one more with every change of owner, never reused.
    pub generation: u64,
    /// The owner's name (a node, as configured).
    pub owner: String,
    /// The lease period the owner honours, ms: it stops releasing output
    /// this long (by its own clock, less the drift allowance) after the
    /// last renewal it sent that succeeded.
    pub lease_ms: u64,
    /// When this generation began (the owner's wall clock, Unix ms).
    pub since_unix_ms: u64,
    /// When it was last renewed (the owner's wall clock, Unix ms).
    pub renewed_unix_ms: u64,
    /// The committed epoch the generation started from (a takeover), if
    /// any.
    pub from_epoch: Option<u64>,
    /// Released by its owner (a planned move: its guest is held still for
    /// good and it releases no output of a later epoch): the next owner
    /// may take it at once instead of waiting a lease period out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

impl Lease {
    /// Generation `generation` of `guest` owned by `owner` from now.
    #[must_use]
    pub fn new(guest: GuestId, generation: u64, owner: &str, lease_ms: u64, from_epoch: Option<u64>) -> Self {
        let now = unix_ms();
        Self {
            format: LEASE_FORMAT,
            guest,
            generation,
            owner: owner.to_string(),
            lease_ms,
            since_unix_ms: now,
            renewed_unix_ms: now,
            from_epoch,
            released: false,
        }
    }

    /// The same lease, renewed now.
    #[must_use]
    pub fn renewed(&self) -> Self {
        Self { renewed_unix_ms: unix_ms(), ..self.clone() }
    }

    /// The same lease, released by its owner now (see [`Lease::released`]).
    #[must_use]
    pub fn released(&self) -> Self {
        Self { renewed_unix_ms: unix_ms(), released: true, ..self.clone() }
    }

    /// The object's bytes.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a lease serialises")
    }

    /// Decodes a lease object.
    ///
    /// # Errors
    /// [`WitnessError::Corrupt`] for bytes that are not a lease of a known
    /// format.
    pub fn from_bytes(b: &[u8]) -> Result<Self, WitnessError> {
        let l: Self = serde_json::from_slice(b).map_err(|e| WitnessError::Corrupt(format!("lease object: {e}")))?;
        if l.format != LEASE_FORMAT {
            return Err(WitnessError::Corrupt(format!("lease format {} (this build reads {LEASE_FORMAT})", l.format)));
        }
        Ok(l)
    }
}

impl std::fmt::Display for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let since = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.since_unix_ms);
        write!(f, "{} generation {} owned by {} since {}", self.guest, self.generation, self.owner, humantime::format_rfc3339_millis(since))
    }
}

/// Milliseconds since the Unix epoch (0 before it).
#[must_use]
pub fn unix_ms() -> u64 {
    remus_types::now_unix_nanos() / 1_000_000
}

/// A lease as read, with the tag a compare-and-swap must name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tagged {
    /// The lease.
    pub lease: Lease,
    /// Its version (an S3 entity tag).
    pub tag: String,
}

/// Errors of the witness.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// A compare-and-swap lost: the lease is not what the writer read (or
    /// exists where it expected none).
    #[error("{0}: the lease changed since it was read")]
    Lost(GuestId),
    /// The witness did not answer.
    #[error("witness unreachable: {0}")]
    Unreachable(String),
    /// The lease object is not a lease.
    #[error("corrupt lease: {0}")]
    Corrupt(String),
    /// Anything else the witness answered.
    #[error("witness: {0}")]
    Store(String),
}

/// Where leases are kept, changed only by compare-and-swap.
pub trait LeaseStore: Send + Sync {
    /// The guest's lease, if there is one.
    ///
    /// # Errors
    /// [`WitnessError::Unreachable`], [`WitnessError::Corrupt`], others.
    fn read(&self, guest: GuestId) -> Result<Option<Tagged>, WitnessError>;

    /// Creates the guest's first lease.
    ///
    /// # Errors
    /// [`WitnessError::Lost`] when a lease exists.
    fn create(&self, lease: &Lease) -> Result<Tagged, WitnessError>;

    /// Replaces the guest's lease if it is still the one tagged `expected`.
    ///
    /// # Errors
    /// [`WitnessError::Lost`] when it changed.
    fn replace(&self, lease: &Lease, expected: &str) -> Result<Tagged, WitnessError>;
}

/// Leases as S3 objects `leases/guest-G`, swapped with `If-None-Match: *`
/// and `If-Match: <etag>`.
pub struct S3Leases {
    client: S3Client,
}

impl S3Leases {
    /// Leases under `client`'s bucket and prefix.
    #[must_use]
    pub fn new(client: S3Client) -> Self {
        Self { client }
    }

    fn key(guest: GuestId) -> String {
        format!("leases/guest-{}", guest.0)
    }
}

fn s3_error(guest: GuestId, e: S3Error) -> WitnessError {
    match e {
        S3Error::Exists(_) | S3Error::Conflict(_) => WitnessError::Lost(guest),
        S3Error::Unreachable { .. } => WitnessError::Unreachable(e.to_string()),
        e => WitnessError::Store(e.to_string()),
    }
}

impl LeaseStore for S3Leases {
    fn read(&self, guest: GuestId) -> Result<Option<Tagged>, WitnessError> {
        match self.client.get_tagged(&Self::key(guest)) {
            Ok((bytes, tag)) => Ok(Some(Tagged { lease: Lease::from_bytes(&bytes)?, tag })),
            Err(S3Error::NotFound(_)) => Ok(None),
            Err(e) => Err(s3_error(guest, e)),
        }
    }

    fn create(&self, lease: &Lease) -> Result<Tagged, WitnessError> {
        let tag = self.client.put_new_tagged(&Self::key(lease.guest), lease.to_bytes()).map_err(|e| s3_error(lease.guest, e))?;
        Ok(Tagged { lease: lease.clone(), tag })
    }

    fn replace(&self, lease: &Lease, expected: &str) -> Result<Tagged, WitnessError> {
        let tag = self.client.put_if_match(&Self::key(lease.guest), lease.to_bytes(), expected).map_err(|e| s3_error(lease.guest, e))?;
        Ok(Tagged { lease: lease.clone(), tag })
    }
}

/// Leases in memory, for tests of what drives a [`LeaseStore`] (the S3
/// store is tested against a real S3 server).
#[derive(Default)]
pub struct MemoryLeases {
    leases: Mutex<HashMap<GuestId, Tagged>>,
    next_tag: Mutex<u64>,
}

impl MemoryLeases {
    fn tag(&self) -> String {
        let mut n = self.next_tag.lock();
        *n += 1;
        format!("\"{n}\"")
    }
}

impl LeaseStore for MemoryLeases {
    fn read(&self, guest: GuestId) -> Result<Option<Tagged>, WitnessError> {
        Ok(self.leases.lock().get(&guest).cloned())
    }

    fn create(&self, lease: &Lease) -> Result<Tagged, WitnessError> {
        let mut m = self.leases.lock();
        if m.contains_key(&lease.guest) {
            return Err(WitnessError::Lost(lease.guest));
        }
        let t = Tagged { lease: lease.clone(), tag: self.tag() };
        m.insert(lease.guest, t.clone());
        Ok(t)
    }

    fn replace(&self, lease: &Lease, expected: &str) -> Result<Tagged, WitnessError> {
        let mut m = self.leases.lock();
        match m.get(&lease.guest) {
            Some(cur) if cur.tag == expected => {
                let t = Tagged { lease: lease.clone(), tag: self.tag() };
                m.insert(lease.guest, t.clone());
                Ok(t)
            }
            _ => Err(WitnessError::Lost(lease.guest)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_round_trips_and_a_foreign_one_is_refused() {
        let l = Lease::new(GuestId(3), 7, "site-b", 500, Some(41));
        assert_eq!(Lease::from_bytes(&l.to_bytes()).unwrap(), l);
        let mut other = l.clone();
        other.format = 9;
        assert!(matches!(Lease::from_bytes(&other.to_bytes()), Err(WitnessError::Corrupt(m)) if m.contains("format 9")));
        assert!(matches!(Lease::from_bytes(b"{\"not\": 1}"), Err(WitnessError::Corrupt(_))));
    }

    #[test]
    fn memory_leases_swap_only_from_the_tag_read() {
        let s = MemoryLeases::default();
        let g = GuestId(1);
        assert_eq!(s.read(g).unwrap(), None);
        let a = s.create(&Lease::new(g, 1, "a", 500, None)).unwrap();
        assert!(matches!(s.create(&Lease::new(g, 1, "b", 500, None)), Err(WitnessError::Lost(_))));
        let b = s.replace(&Lease::new(g, 2, "b", 500, None), &a.tag).unwrap();
        assert!(matches!(s.replace(&a.lease.renewed(), &a.tag), Err(WitnessError::Lost(_))), "a stale tag loses");
        assert_eq!(s.read(g).unwrap().unwrap(), b);
    }
}
