//! Local pack files: where the chunks of large commits live.
//!
//! A commit of many new chunks (the first full copy of a guest, a burst of
//! writes) appends them to the current pack file `packs/NNNNNNNN.pack` in
//! one write and syncs it; RocksDB then gets only each chunk's location
//! (see [`Location`]), in the synced batch that makes the epoch visible.
//! Through RocksDB itself every byte would be written twice (WAL, then
//! blob file), and copied through a memtable on the way.
//!
//! A record is `id [32] | codec u8 | len u32 LE | bytes`; a location names
//! the bytes. Reads check the record's header against the id asked for,
//! so a stale location (a chunk removed by GC, its range punched out) or a
//! truncated pack reads as corrupt, never as other content.
//!
//! Crash safety: the pack is synced before the index batch, so an index
//! entry never names bytes that are not durable; bytes appended by a
//! commit that did not reach its index are unreferenced, and the next
//! append goes after them. GC deletes index entries (synced), then frees
//! the records' space by punching holes into the pack.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use remus_sys::Mapping;
use remus_types::ChunkId;

use crate::error::StoreError;

/// Record header: id, codec, length.
pub(crate) const HEADER: usize = 32 + 1 + 4;

/// A pack is closed for appends once it reaches this size (small in
/// tests, so they can fill several).
const PACK_ROLL: u64 = if cfg!(test) { 8 << 20 } else { 1 << 30 };

/// Where a packed chunk's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    pub pack: u32,
    /// Offset of the bytes (the header is just before).
    pub offset: u64,
    pub len: u32,
    /// Codec of the bytes (plain or zstd).
    pub codec: u8,
}

impl Location {
    pub(crate) const LEN: usize = 4 + 8 + 4 + 1;

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pack.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out.push(self.codec);
    }

    pub(crate) fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::LEN {
            return None;
        }
        Some(Self {
            pack: u32::from_be_bytes(b[0..4].try_into().ok()?),
            offset: u64::from_be_bytes(b[4..12].try_into().ok()?),
            len: u32::from_be_bytes(b[12..16].try_into().ok()?),
            codec: b[16],
        })
    }

    /// The whole record: header and bytes.
    fn record(&self) -> std::ops::Range<u64> {
        self.offset - HEADER as u64..self.offset + u64::from(self.len)
    }
}

/// The pack being appended to.
struct Tail {
    id: u32,
    file: File,
    len: u64,
}

/// Writes each chunk's header (from `headers`) and bytes, in order, at the
/// end of `file` (opened for appending).
fn write_records(mut file: &File, headers: &[u8], chunks: &[(ChunkId, u8, &[u8])]) -> std::io::Result<()> {
    use std::io::{IoSlice, Write};
    for (i, group) in chunks.chunks(512).enumerate() {
        let mut slices = Vec::with_capacity(group.len() * 2);
        for (j, (_, _, bytes)) in group.iter().enumerate() {
            let h = (i * 512 + j) * HEADER;
            slices.push(IoSlice::new(&headers[h..h + HEADER]));
            slices.push(IoSlice::new(bytes));
        }
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match file.write_vectored(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The pack files of a store.
pub(crate) struct Packs {
    dir: PathBuf,
    read_only: bool,
    sync: bool,
    tail: Mutex<Option<Tail>>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
    /// Read-only shared maps of whole packs. Packs only grow and get
    /// holes punched (which read as zeros, and fail the record check), so
    /// a mapped range stays valid; only someone truncating a pack under a
    /// reader could fault it.
    maps: RwLock<HashMap<u32, Arc<Mapping>>>,
}

fn pack_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |cause| StoreError::Pack { path: path.to_path_buf(), op, cause }
}

impl Packs {
    pub(crate) fn new(store_dir: &Path, read_only: bool, sync: bool) -> Self {
        Self {
            dir: store_dir.join("packs"),
            read_only,
            sync,
            tail: Mutex::new(None),
            readers: RwLock::new(HashMap::new()),
            maps: RwLock::new(HashMap::new()),
        }
    }

    fn path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("{id:08}.pack"))
    }

    /// The highest pack id present (0: none).
    fn last_id(&self) -> Result<u32, StoreError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(pack_err(&self.dir, "list")(e)),
        };
        let mut last = 0;
        for e in entries {
            let name = e.map_err(pack_err(&self.dir, "list"))?.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".pack")).and_then(|n| n.parse::<u32>().ok()) {
                last = last.max(id);
            }
        }
        Ok(last)
    }

    /// Opens pack `id` for appending, creating it (and the directory)
    /// durably if needed.
    fn open_tail(&self, id: u32) -> Result<Tail, StoreError> {
        let path = self.path(id);
        std::fs::create_dir_all(&self.dir).map_err(pack_err(&self.dir, "create"))?;
        let existed = path.exists();
        let file = OpenOptions::new().create(true).append(true).read(true).open(&path).map_err(pack_err(&path, "open"))?;
        if !existed {
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(pack_err(&self.dir, "sync"))?;
        }
        let len = file.metadata().map_err(pack_err(&path, "stat"))?.len();
        Ok(Tail { id, file, len })
    }

    /// Appends `chunks` (id, codec, bytes), synced, and returns their
    /// locations in order.
    pub(crate) fn append(&self, chunks: &[(ChunkId, u8, &[u8])]) -> Result<Vec<Location>, StoreError> {
        if self.read_only {
            let e = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "the store is open read-only");
            return Err(pack_err(&self.dir, "append")(e));
        }
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        if tail.as_ref().is_none_or(|t| t.len >= PACK_ROLL) {
            let id = match tail.as_ref() {
                Some(t) => t.id + 1,
                None => self.last_id()?.max(1),
            };
            let t = self.open_tail(id)?;
            *tail = Some(if t.len >= PACK_ROLL { self.open_tail(id + 1)? } else { t });
        }
        let t = tail.as_mut().expect("tail opened above");
        // Headers in one buffer, bytes where they are: one gathered write
        // per 512 records, no copy of the chunks on our side.
        let mut headers = Vec::with_capacity(chunks.len() * HEADER);
        let mut locs = Vec::with_capacity(chunks.len());
        let mut end = t.len;
        for (id, codec, bytes) in chunks {
            let len = u32::try_from(bytes.len()).expect("chunk under 4 GiB");
            headers.extend_from_slice(&id.0);
            headers.push(*codec);
            headers.extend_from_slice(&len.to_le_bytes());
            locs.push(Location { pack: t.id, offset: end + HEADER as u64, len, codec: *codec });
            end += (HEADER + bytes.len()) as u64;
        }
        let path = self.path(t.id);
        let written = write_records(&t.file, &headers, chunks).and_then(|()| if self.sync { t.file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            // The file may hold part of the records (disk full): the
            // length is re-read so the next append goes after them.
            t.len = t.file.metadata().map_or(t.len, |m| m.len());
            return Err(pack_err(&path, "append")(e));
        }
        t.len = end;
        Ok(locs)
    }

    fn reader(&self, id: u32) -> Result<Arc<File>, StoreError> {
        if let Some(f) = self.readers.read().unwrap_or_else(PoisonError::into_inner).get(&id) {
            return Ok(f.clone());
        }
        let path = self.path(id);
        let f = Arc::new(File::open(&path).map_err(pack_err(&path, "open"))?);
        self.readers.write().unwrap_or_else(PoisonError::into_inner).insert(id, f.clone());
        Ok(f)
    }

    /// Calls `f` with the bytes at `loc`, after checking the record names
    /// `id`. A store opened read-only reads through a memory map of the
    /// pack (restore and verify read every chunk: no syscall each); a
    /// writer reads with `pread`.
    ///
    /// # Errors
    /// [`StoreError::ChunkCorrupt`] when the record does not match (hole,
    /// truncation, damage), [`StoreError::Pack`] when the file cannot be
    /// read, or what `f` returns.
    pub(crate) fn with_bytes<R>(
        &self,
        id: &ChunkId,
        loc: &Location,
        f: impl FnOnce(&[u8]) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let record = loc.record();
        let check = |rec: &[u8]| rec[..32] == id.0 && rec[32] == loc.codec && rec[33..37] == loc.len.to_le_bytes();
        if self.read_only {
            let map = self.map(loc.pack, record.end)?;
            let rec = usize::try_from(record.start).ok().zip(usize::try_from(record.end).ok()).and_then(|(a, b)| map.as_slice().get(a..b));
            return match rec {
                Some(rec) if check(rec) => f(&rec[HEADER..]),
                _ => Err(StoreError::ChunkCorrupt(*id)),
            };
        }
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let file = self.reader(loc.pack)?;
        SCRATCH.with(|b| {
            let mut buf = b.borrow_mut();
            buf.clear();
            buf.resize(HEADER + loc.len as usize, 0);
            match file.read_exact_at(&mut buf, record.start) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(StoreError::ChunkCorrupt(*id)),
                Err(e) => return Err(pack_err(&self.path(loc.pack), "read")(e)),
            }
            if !check(&buf) {
                return Err(StoreError::ChunkCorrupt(*id));
            }
            f(&buf[HEADER..])
        })
    }

    /// A map of pack `id` covering at least `end` bytes if the file has
    /// them (a pack grows while a backup appends beside a reader).
    fn map(&self, id: u32, end: u64) -> Result<Arc<Mapping>, StoreError> {
        if let Some(m) = self.maps.read().unwrap_or_else(PoisonError::into_inner).get(&id) {
            if m.len() as u64 >= end {
                return Ok(m.clone());
            }
        }
        let file = self.reader(id)?;
        let path = self.path(id);
        let m = Arc::new(file.try_clone().and_then(Mapping::whole_file_read_only).map_err(pack_err(&path, "map"))?);
        self.maps.write().unwrap_or_else(PoisonError::into_inner).insert(id, m.clone());
        Ok(m)
    }

    /// The pack appends go to (or would, once one is made); packs below
    /// it never change but for holes.
    pub(crate) fn appending(&self) -> Result<u32, StoreError> {
        match self.tail.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            Some(t) => Ok(t.id),
            None => self.last_id(),
        }
    }

    /// Deletes packs no index entry names any more.
    pub(crate) fn remove(&self, ids: &std::collections::HashSet<u32>) -> Result<(), StoreError> {
        for id in ids {
            self.readers.write().unwrap_or_else(PoisonError::into_inner).remove(id);
            self.maps.write().unwrap_or_else(PoisonError::into_inner).remove(id);
            let path = self.path(*id);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(pack_err(&path, "delete")(e)),
            }
        }
        Ok(())
    }

    /// Frees the space of records no index entry names any more.
    pub(crate) fn punch(&self, locs: &[Location]) -> Result<(), StoreError> {
        let mut by_pack: HashMap<u32, Vec<&Location>> = HashMap::new();
        for l in locs {
            by_pack.entry(l.pack).or_default().push(l);
        }
        for (id, locs) in by_pack {
            let path = self.path(id);
            let f = OpenOptions::new().write(true).open(&path).map_err(pack_err(&path, "open"))?;
            // Adjacent records in one range: only whole blocks inside a
            // range are freed, and a record is usually smaller than one.
            let mut ranges: Vec<std::ops::Range<u64>> = locs.iter().map(|l| l.record()).collect();
            ranges.sort_unstable_by_key(|r| r.start);
            let mut merged: Vec<std::ops::Range<u64>> = Vec::with_capacity(ranges.len());
            for r in ranges {
                match merged.last_mut() {
                    Some(m) if m.end >= r.start => m.end = m.end.max(r.end),
                    _ => merged.push(r),
                }
            }
            for r in merged {
                match remus_sys::punch_hole(&f, r.start, r.end - r.start) {
                    Ok(true) => {}
                    // File systems without hole punching keep the bytes:
                    // unreferenced, so only space is lost.
                    Ok(false) => return Ok(()),
                    Err(e) => return Err(pack_err(&path, "free space")(e)),
                }
            }
        }
        Ok(())
    }

    /// Flips one bit of the record's bytes on disk: for tamper tests only.
    pub(crate) fn corrupt(&self, loc: &Location, at: usize) -> Result<(), StoreError> {
        let path = self.path(loc.pack);
        let f = OpenOptions::new().read(true).write(true).open(&path).map_err(pack_err(&path, "open"))?;
        let pos = loc.offset + (at % loc.len.max(1) as usize) as u64;
        let mut b = [0u8];
        f.read_exact_at(&mut b, pos).map_err(pack_err(&path, "read"))?;
        b[0] ^= 1;
        f.write_all_at(&b, pos).map_err(pack_err(&path, "write"))?;
        Ok(())
    }
}
