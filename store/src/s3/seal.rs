//! Encryption at rest of the S3 tier, with keys the backup's operator
//! holds and the object store never sees.
//!
//! A key file (`remus key new`) holds numbered 256-bit keys, one per
//! line (`<id> <64 hex digits>`); the highest id encrypts, every one
//! decrypts, so a key is rotated by adding one and retired once no
//! object names it. Each object gets a key of its own, derived from the
//! file's key and a random 32-byte salt it carries (blake3 keyed hash),
//! under which it is sealed with AES-256-GCM:
//!
//! - an index, segment, checkpoint or bridge is one envelope:
//!   ```text
//!   0..4 b"RMSE", 4 version (1), 5..8 reserved
//!   8    key id u32 | 12 salt [32]
//!   44   ciphertext of the plain object | tag [16]
//!        (nonce 0; associated data: bytes 0..44 and the object's key
//!        under the prefix, so an object moved to another key fails)
//!   ```
//! - a pack seals each chunk value on its own (nonce: the value's offset
//!   in the pack), so a ranged read of one chunk still works; its key id
//!   and salt are in its header and in its (sealed) index.
//!
//! What the store learns: object keys (guest ids, epoch numbers), sizes
//! and times. Not chunk ids (packs are named by the hash of their sealed
//! bytes; ids are inside sealed indexes and segments) nor any content.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use remus_types::format;

use crate::error::StoreError;

const ENVELOPE_MAGIC: [u8; 4] = *b"RMSE";
const VERSION: u8 = 1;
/// Bytes before an envelope's ciphertext.
const ENVELOPE_HEADER: usize = format::PREFIX_LEN + 4 + 32;
/// Bytes an AEAD tag adds to what it seals.
pub const TAG_LEN: usize = 16;

/// Domain of the per-object keys of envelopes.
const ENVELOPE_DOMAIN: &[u8] = b"remus s3 envelope v1";
/// Domain of the per-pack keys of chunk values.
const PACK_DOMAIN: &[u8] = b"remus s3 pack v1";

/// How a pack's values are sealed: the key id and the pack's salt.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PackSeal {
    /// The key file's key the pack's key derives from.
    pub key: u32,
    /// The pack's salt.
    pub salt: [u8; 32],
}

/// A key file's keys.
pub struct Keyring {
    path: PathBuf,
    keys: BTreeMap<u32, [u8; 32]>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({}, keys {:?})", self.path.display(), self.keys.keys().collect::<Vec<_>>())
    }
}

fn keys_error(msg: String) -> StoreError {
    StoreError::Keys(msg)
}

fn salt() -> [u8; 32] {
    let mut s = [0u8; 32];
    SystemRandom::new().fill(&mut s).expect("the system's random source");
    s
}

fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; NONCE_LEN];
    b[..8].copy_from_slice(&n.to_le_bytes());
    Nonce::assume_unique_for_key(b)
}

impl Keyring {
    /// Reads a key file. It must be readable by its owner alone.
    ///
    /// # Errors
    /// [`StoreError::Keys`] naming the file and what is wrong with it.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        let bad = |why: String| keys_error(format!("key file {}: {why}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(bad(format!("readable by others (mode {:o}); chmod 600 it", meta.permissions().mode() & 0o777)));
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut keys = BTreeMap::new();
        for (n, line) in text.lines().enumerate().map(|(n, l)| (n + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, hex) = line.split_once(' ').ok_or_else(|| bad(format!("line {n}: not `<id> <64 hex digits>`")))?;
            let id: u32 = id.parse().map_err(|_| bad(format!("line {n}: key id {id:?} is not a number")))?;
            let key = decode_hex(hex.trim()).ok_or_else(|| bad(format!("line {n}: key {id} is not 64 hex digits")))?;
            if keys.insert(id, key).is_some() {
                return Err(bad(format!("line {n}: key {id} given twice")));
            }
        }
        if keys.is_empty() {
            return Err(bad("holds no key".into()));
        }
        Ok(Self { path: path.to_path_buf(), keys })
    }

    /// Adds a fresh key to the file at `path` (creating it, mode 600):
    /// from now on it encrypts; the older ones still decrypt. Returns its id.
    ///
    /// # Errors
    /// [`StoreError::Keys`] for an unreadable or damaged file, or one that
    /// cannot be written.
    pub fn add_key(path: &Path) -> Result<u32, StoreError> {
        let id = match path.exists() {
            true => Self::load(path)?.current() + 1,
            false => 1,
        };
        let key = salt();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let mut text = String::new();
        if id == 1 {
            text.push_str(
                "# remus S3 encryption keys: the highest id encrypts, every one decrypts. Keep a copy apart from the backup site.\n",
            );
        }
        text.push_str(&format!("{id} {hex}\n"));
        let bad = |e: std::io::Error| keys_error(format!("key file {}: {e}", path.display()));
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path).map_err(bad)?
        };
        f.write_all(text.as_bytes()).map_err(bad)?;
        f.sync_all().map_err(bad)?;
        Ok(id)
    }

    /// The id of the key that encrypts.
    #[must_use]
    pub fn current(&self) -> u32 {
        *self.keys.keys().next_back().expect("a keyring holds a key")
    }

    /// Every key id, ascending.
    #[must_use]
    pub fn ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// The key of one object: `domain` and `salt` under key `id`.
    fn derive(&self, id: u32, domain: &[u8], salt: &[u8; 32]) -> Result<LessSafeKey, StoreError> {
        let master = self.keys.get(&id).ok_or_else(|| {
            keys_error(format!("key {id} is not in {} (it holds {:?}): was it retired too soon?", self.path.display(), self.ids()))
        })?;
        let k = blake3::Hasher::new_keyed(master).update(domain).update(salt).finalize();
        Ok(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k.as_bytes()).expect("a 256-bit key")))
    }

    /// `plain` sealed in an envelope bound to `rel` (its key under the
    /// prefix).
    #[must_use]
    pub fn seal_object(&self, rel: &str, plain: &[u8]) -> Vec<u8> {
        let (id, salt) = (self.current(), salt());
        let key = self.derive(id, ENVELOPE_DOMAIN, &salt).expect("the current key is in the ring");
        let mut out = Vec::with_capacity(ENVELOPE_HEADER + plain.len() + TAG_LEN);
        out.extend_from_slice(&format::prefix(&ENVELOPE_MAGIC, VERSION));
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&salt);
        let aad = [&out[..], rel.as_bytes()].concat();
        out.extend_from_slice(plain);
        let tag = key.seal_in_place_separate_tag(nonce(0), Aad::from(&aad), &mut out[ENVELOPE_HEADER..]).expect("sealing cannot fail");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// The plain object of an envelope read at `rel`.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when it is damaged, was moved from another
    /// key, or was sealed under another key of the same id;
    /// [`StoreError::Keys`] when its key id is not in the ring.
    pub fn open_object(&self, rel: &str, mut sealed: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let what = format!("s3 {rel}");
        format::check_prefix("sealed object", &ENVELOPE_MAGIC, VERSION..=VERSION, &sealed).map_err(|e| StoreError::corrupt(&what, e))?;
        if sealed.len() < ENVELOPE_HEADER + TAG_LEN {
            return Err(StoreError::corrupt(what, format::FormatError::Truncated { need: ENVELOPE_HEADER + TAG_LEN, have: sealed.len() }));
        }
        let id = u32::from_le_bytes(sealed[8..12].try_into().expect("4 bytes"));
        let salt: [u8; 32] = sealed[12..44].try_into().expect("32 bytes");
        let key = self.derive(id, ENVELOPE_DOMAIN, &salt)?;
        let aad = [&sealed[..ENVELOPE_HEADER], rel.as_bytes()].concat();
        let len = key
            .open_in_place(nonce(0), Aad::from(&aad), &mut sealed[ENVELOPE_HEADER..])
            .map_err(|_| StoreError::malformed(&what, format!("does not decrypt with key {id} (altered, moved, or another key {id})")))?
            .len();
        sealed.drain(..ENVELOPE_HEADER);
        sealed.truncate(len);
        Ok(sealed)
    }

    /// A new pack's seal and the key that seals its values.
    #[must_use]
    pub fn pack_sealer(&self) -> PackSealer {
        let seal = PackSeal { key: self.current(), salt: salt() };
        PackSealer { key: self.derive(seal.key, PACK_DOMAIN, &seal.salt).expect("the current key is in the ring"), seal }
    }

    /// A chunk value sealed at `offset` of the pack `seal` describes.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] (naming `pack`) when it does not
    /// authenticate; [`StoreError::Keys`] for a key not in the ring.
    pub fn open_value(&self, pack: &str, seal: &PackSeal, offset: u64, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        let key = self.derive(seal.key, PACK_DOMAIN, &seal.salt)?;
        let mut v = sealed.to_vec();
        let len = key
            .open_in_place(nonce(offset), Aad::empty(), &mut v)
            .map_err(|_| {
                StoreError::malformed(format!("s3 pack {pack}"), format!("the value at {offset} does not decrypt with key {}", seal.key))
            })?
            .len();
        v.truncate(len);
        Ok(v)
    }
}

/// Seals the values of one pack.
#[derive(Debug)]
pub struct PackSealer {
    /// What the pack's header and index record.
    pub seal: PackSeal,
    key: LessSafeKey,
}

impl PackSealer {
    /// Appends `value` sealed at offset `out.len()` (its nonce).
    pub fn seal_onto(&self, out: &mut Vec<u8>, value: &[u8]) {
        let at = out.len();
        out.extend_from_slice(value);
        let tag = self.key.seal_in_place_separate_tag(nonce(at as u64), Aad::empty(), &mut out[at..]).expect("sealing cannot fail");
        out.extend_from_slice(tag.as_ref());
    }
}

/// Whether an object's bytes are an envelope.
#[must_use]
pub fn is_sealed(b: &[u8]) -> bool {
    format::check_magic(&ENVELOPE_MAGIC, b).is_ok()
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_at(dir: &Path) -> (PathBuf, Keyring) {
        let path = dir.join("s3.keys");
        assert_eq!(Keyring::add_key(&path).unwrap(), 1);
        (path.clone(), Keyring::load(&path).unwrap())
    }

    #[test]
    fn an_envelope_opens_only_at_its_own_key_with_its_own_keys_and_unaltered() {
        let dir = tempfile::tempdir().unwrap();
        let (_, ring) = ring_at(dir.path());
        let plain = b"RMSG segment body naming chunk ids".to_vec();
        let sealed = ring.seal_object("segments/a/1", &plain);
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(8).any(|w| w == b"RMSG seg"), "the plain bytes do not show");
        assert_eq!(ring.open_object("segments/a/1", sealed.clone()).unwrap(), plain);
        // Two seals of one object differ (a fresh salt each).
        assert_ne!(ring.seal_object("segments/a/1", &plain), sealed);
        let moved = ring.open_object("segments/a/2", sealed.clone()).unwrap_err().to_string();
        assert!(moved.contains("does not decrypt with key 1"), "{moved}");
        for at in [5, 9, 20, ENVELOPE_HEADER + 3, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(ring.open_object("segments/a/1", bad).is_err(), "byte {at}");
        }
        assert!(ring.open_object("segments/a/1", sealed[..30].to_vec()).is_err());
        // Another key file whose key 1 is another key.
        let other = tempfile::tempdir().unwrap();
        let (_, theirs) = ring_at(other.path());
        let err = theirs.open_object("segments/a/1", sealed).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt, "{err}");
    }

    #[test]
    fn a_rotated_ring_seals_with_its_newest_key_and_opens_with_every_one() {
        let dir = tempfile::tempdir().unwrap();
        let (path, one) = ring_at(dir.path());
        let old = one.seal_object("index/x", b"old");
        assert_eq!(Keyring::add_key(&path).unwrap(), 2);
        let two = Keyring::load(&path).unwrap();
        assert_eq!((two.current(), two.ids()), (2, vec![1, 2]));
        let new = two.seal_object("index/x", b"new");
        assert_eq!(u32::from_le_bytes(new[8..12].try_into().unwrap()), 2);
        assert_eq!(two.open_object("index/x", old).unwrap(), b"old");
        let retired = one.open_object("index/x", new).unwrap_err();
        assert!(matches!(retired, StoreError::Keys(ref m) if m.contains("key 2 is not in")), "{retired}");
    }

    #[test]
    fn pack_values_open_only_at_their_own_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (_, ring) = ring_at(dir.path());
        let sealer = ring.pack_sealer();
        let mut pack = vec![0u8; 44];
        sealer.seal_onto(&mut pack, b"\x00first value");
        let second = pack.len();
        sealer.seal_onto(&mut pack, b"\x00second value");
        assert_eq!(ring.open_value("p", &sealer.seal, second as u64, &pack[second..]).unwrap(), b"\x00second value");
        assert_eq!(ring.open_value("p", &sealer.seal, 44, &pack[44..second]).unwrap(), b"\x00first value");
        assert!(ring.open_value("p", &sealer.seal, 44, &pack[second..]).is_err(), "a value moved to another offset");
        let other = PackSeal { salt: [7; 32], ..sealer.seal };
        assert!(ring.open_value("p", &other, 44, &pack[44..second]).is_err(), "another pack's key");
    }

    #[test]
    fn a_key_file_others_can_read_or_that_is_damaged_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = ring_at(dir.path());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keyring::load(&path).unwrap_err().to_string();
        assert!(err.contains("readable by others") && err.contains("chmod 600"), "{err}");
        for (text, why) in
            [("", "holds no key"), ("1 abcd\n", "not 64 hex digits"), ("x 00\n", "not a number"), ("nonsense\n", "not `<id>")]
        {
            let p = dir.path().join("bad.keys");
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = Keyring::load(&p).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err}");
        }
        assert!(Keyring::load(&dir.path().join("absent")).is_err());
    }
}
