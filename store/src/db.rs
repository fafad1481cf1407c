//! The RocksDB-backed log.
//!
//! Column families and keys (integers big-endian so keys sort numerically):
//! - `chunks`:  blake3 id [32] → codec u8 | bytes  (codec 0 plain, 1 zstd),
//!   or 2 | location in a local pack file (see `packs`: large commits).
//!   Values arrive compressed, so the family has no block compression and
//!   keeps values in blob files (integrated BlobDB): compaction moves keys,
//!   not page data.
//! - `epochs`:  guest u64 | epoch u64 → manifest (see [`Manifest`]).
//! - `pages`:   guest u64 | pfn u64 | !epoch u64 → page hash [32]. "Page P
//!   at epoch N" is one seek to (P, !N): the first key at or after it
//!   with the same P is the newest version at or before N.
//! - `meta`:    b"head" | guest u64 → epoch u64 | manifest id [32] |
//!   instance u64 | page_count u64;
//!   b"pfns" | guest u64 | epoch u64 → the pages the epoch wrote,
//!   ascending, each a LEB128 varint of its gap from the one before (see
//!   [`encode_pfns`]); their hashes are the page index's entries at that
//!   epoch, read in one batched lookup. About 2 bytes a page where a list
//!   that repeated each hash took 40 (stores written before keep
//!   b"delta" | guest u64 | epoch u64 → (pfn u64 | hash [32])*, still read);
//!   b"s3cur" | guest u64 → last epoch uploaded to the S3 tier;
//!   b"s3chk" | chunk id → id of the pack holding it in S3;
//!   b"bridge" | guest u64 | first u64 → a thinned run (see `retention`).
//!
//! An epoch is committed with one atomic, synced `WriteBatch` holding its
//! new chunks (or, for a large group, their pack locations, the pack
//! synced first), its page-index entries, its manifest and the new head:
//! either all of it is visible after a crash or none of it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use remus_types::{content_id, BoundedMap, ChunkId, EpochId, GuestId, Pfn, PAGE_SIZE};
use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use crate::error::StoreError;
use crate::manifest::{page_delta_hash, Manifest};
use crate::packs::{Location, Packs};

pub(crate) const CF_CHUNKS: &str = "chunks";
pub(crate) const CF_EPOCHS: &str = "epochs";
pub(crate) const CF_PAGES: &str = "pages";
pub(crate) const CF_META: &str = "meta";
/// Which chunks each guest holds: `guest u64 BE | chunk id` → empty. A
/// page may name a stored chunk only when its guest holds it (sent its
/// bytes, or named it, before), so whether a chunk is stored says nothing
/// of other guests' histories.
pub(crate) const CF_HELD: &str = "held";
/// Per guest (key: guest u64 big-endian), the bytes its kept epochs
/// charge to the store ([`Manifest::charge`]), an i64 little-endian kept
/// by merges (added at commit, taken away by thinning, in the same
/// batches), so that no two writers race on it.
pub(crate) const CF_USAGE: &str = "usage";
/// Chunks stored as a delta against another: `delta id` → `base id |
/// depth u8` (the number of deltas to undo to read it: 1 over a whole
/// chunk). GC keeps every base of a live delta, and a commit reads the
/// depth of the base it builds on.
pub(crate) const CF_BASES: &str = "bases";

/// Most deltas undone to read a chunk: a page stored as a delta over a
/// chunk this deep is stored whole instead, so a read costs at most this
/// many extra chunk reads.
pub const MAX_DELTA_DEPTH: u8 = 3;

/// Marks a store whose `usage` column family covers every kept epoch
/// (written when it was created, or counted once from the manifests of a
/// store written before it).
const USAGE_COUNTED: &[u8] = b"usage-counted";

/// The merge of `usage`: the sum of the stored value and the operands.
fn add_usage(_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    let read = |b: &[u8]| b.try_into().map(i64::from_le_bytes).unwrap_or(0);
    let sum = operands.iter().fold(existing.map_or(0, read), |acc, op| acc.wrapping_add(read(op)));
    Some(sum.to_le_bytes().to_vec())
}

/// New chunk bytes from which a commit appends its chunks to a pack file
/// (see [`Store::commit_many`]): a page's worth. Below it (a few bytes of
/// device state, say) they ride in the batch, as a pack append would cost
/// a sync of its own for them.
const BULK_BYTES: usize = 4 << 10;

/// Largest chunk content accepted when reading.
const MAX_CHUNK: usize = 16 << 20;

const CODEC_PLAIN: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const CODEC_PACKED: u8 = 2;
/// `base id [32] | zstd frame of content ^ base` (as the wire carried it).
const CODEC_DELTA: u8 = 3;

/// zstd level of a delta the store makes whole (its chain too deep).
const WHOLE_LEVEL: i32 = 1;

/// Chunk content as it is to be stored.
#[derive(Debug, Clone)]
pub enum StoredChunk {
    /// Bytes as they are.
    Plain(Vec<u8>),
    /// A zstd frame of the content.
    Zstd(Vec<u8>),
    /// A delta: the id of a stored base chunk of the same size and a zstd
    /// frame of the content XOR the base (see [`StoredChunk::delta`]). The
    /// store keeps it as it is unless the base is already
    /// [`MAX_DELTA_DEPTH`] deltas deep, then it stores the content whole.
    Delta(Vec<u8>),
}

impl StoredChunk {
    /// A delta over `base`: `xor_zstd` is a zstd frame of the content XOR
    /// the base's content.
    #[must_use]
    pub fn delta(base: &ChunkId, xor_zstd: &[u8]) -> Self {
        let mut v = Vec::with_capacity(32 + xor_zstd.len());
        v.extend_from_slice(&base.0);
        v.extend_from_slice(xor_zstd);
        Self::Delta(v)
    }

    /// Stored bytes (compressed or not).
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Self::Plain(b) | Self::Zstd(b) | Self::Delta(b) => b.len(),
        }
    }

    /// True for empty content.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn parts(&self) -> (u8, &[u8]) {
        match self {
            Self::Plain(b) => (CODEC_PLAIN, b),
            Self::Zstd(b) => (CODEC_ZSTD, b),
            Self::Delta(b) => (CODEC_DELTA, b),
        }
    }

    fn value(&self) -> Vec<u8> {
        let (codec, b) = self.parts();
        let mut v = Vec::with_capacity(b.len() + 1);
        v.push(codec);
        v.extend_from_slice(b);
        v
    }
}

/// Everything needed to commit one epoch.
#[derive(Debug, Clone, Default)]
pub struct EpochCommit {
    /// Guest.
    pub guest: GuestId,
    /// Epoch; must be the head + 1, or later with `follows` the head.
    pub epoch: EpochId,
    /// The epoch it follows when that is not `epoch − 1`: the primary
    /// merged the epochs between into this one (a backup that fell behind,
    /// catching up). Those epochs are never kept here: the commit records
    /// them as a bridge, as thinning would (see `retention`).
    pub follows: Option<EpochId>,
    /// The primary run that produced it.
    pub instance: u64,
    /// The owner's generation on the witness (0 without one).
    pub generation: u64,
    /// Time of its pause at the primary.
    pub time_unix_ns: u64,
    /// Guest memory size in pages.
    pub page_count: u64,
    /// The primary's memory root at this epoch.
    pub memory_root: ChunkId,
    /// Pause of the guest.
    pub pause_ns: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Page-index entries: each page written in the epoch and its hash.
    pub pages: Vec<(Pfn, ChunkId)>,
    /// Content of chunks that may be new (existing ones are skipped).
    pub chunks: Vec<(ChunkId, StoredChunk)>,
    /// Device state.
    pub device_state: Vec<u8>,
    /// When the backup commits it: 0 (the default) for now by the store's
    /// clock; tests that build a history of their own times give one. The
    /// store makes it later than the parent's either way.
    pub commit_unix_ns: u64,
    /// Its output was released when the primary sealed it
    /// ([`Manifest::released_ahead`]).
    pub released_ahead: bool,
}

/// The committed head of a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Last committed epoch.
    pub epoch: EpochId,
    /// Its manifest id.
    pub manifest: ChunkId,
    /// The primary run that wrote the history.
    pub instance: u64,
    /// Guest memory size in pages.
    pub page_count: u64,
    /// The owner's generation on the witness at the head (0 without one).
    pub generation: u64,
}

/// A guest that failed over here: its old primary is refused from then on,
/// across restarts of the backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// The committed epoch it failed over at.
    pub epoch: EpochId,
    /// When (wall clock, Unix ms).
    pub since_unix_ms: u64,
}

/// What a commit did.
#[derive(Debug, Clone)]
pub struct CommitOutcome {
    /// The new manifest.
    pub manifest: Manifest,
    /// Its id.
    pub id: ChunkId,
    /// Chunks written.
    pub new_chunks: u64,
    /// Chunks that were already stored.
    pub dup_chunks: u64,
}

/// Durability of commits.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Sync the WAL on every commit (default true). Off only for benchmarks
    /// that measure the rest of the pipeline.
    pub sync: bool,
    /// Open for reading only (default false): writes nothing, so it works
    /// on a full disk and beside a running backup's lock-free readers.
    pub read_only: bool,
    /// How many recently committed pages the store keeps decoded in
    /// memory (default 16 Ki, 64 MiB): the bases most deltas of the next
    /// epochs name, and what a live failover image reads back.
    pub recent_pages: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { sync: true, read_only: false, recent_pages: 16 << 10 }
    }
}

impl StoreOptions {
    /// Options for commands that only read (log, verify, restore).
    #[must_use]
    pub fn read_only() -> Self {
        Self { read_only: true, ..Self::default() }
    }
}

/// The content-addressed epoch log.
pub struct Store {
    pub(crate) db: DB,
    path: PathBuf,
    opts: StoreOptions,
    /// GC's coordination with commits (see `gc.rs`).
    pub(crate) gc: crate::gc::GcCoordinator,
    pub(crate) packs: Packs,
    /// Recently committed chunks, decoded and verified, with their delta
    /// depth. Invariant: only chunks the store holds (a commit adds them
    /// after its write; GC's sweep removes what it deletes, with no
    /// commit running), so a delta over one of them has its base stored.
    recent: Mutex<Recent>,
    /// Held by a commit from its first look at what is stored to its
    /// write. Two guests' commits handing in the same new chunk at once
    /// would otherwise both store it, each encoded its own way (whole, or a
    /// delta over its own base), the later write replacing the earlier one
    /// under the same id after an epoch had already taken the earlier one's
    /// delta depth for a delta over it: a chain deeper than
    /// [`MAX_DELTA_DEPTH`], unreadable.
    commit_lock: Mutex<()>,
    /// Whether page lists in the earlier form (`delta`, every hash in it)
    /// may be kept: found at open; new lists are never written so.
    pub(crate) old_page_lists: std::sync::atomic::AtomicBool,
}

/// Content and delta depth of recently committed chunks, by id.
type Recent = BoundedMap<ChunkId, (Arc<Vec<u8>>, u8)>;

pub(crate) fn guest_key(prefix: &[u8], guest: GuestId) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&guest.0.to_be_bytes());
    k
}

pub(crate) fn epoch_key(guest: GuestId, epoch: EpochId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&guest.0.to_be_bytes());
    k[8..].copy_from_slice(&epoch.0.to_be_bytes());
    k
}

pub(crate) fn held_key(guest: GuestId, id: &ChunkId) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&guest.0.to_be_bytes());
    k[8..].copy_from_slice(&id.0);
    k
}

pub(crate) fn page_key(guest: GuestId, pfn: Pfn, epoch: EpochId) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&guest.0.to_be_bytes());
    k[8..16].copy_from_slice(&pfn.0.to_be_bytes());
    k[16..].copy_from_slice(&(!epoch.0).to_be_bytes());
    k
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Each column family's memtable. The index's keys are hashes, so each
/// commit inserts its keys all over the memtable's skiplist, and the walk
/// down it (cache misses) was the backup's largest cost at 64 MiB; a
/// smaller one is shallower, for more frequent flushes (measured in
/// docs/benchmarks.md, "Each side on one core").
const MEMTABLE_BYTES: usize = 8 << 20;

/// The write-ahead log's bound: past it RocksDB flushes the memtables
/// that keep its oldest file alive. The small families (manifests, heads,
/// page lists) fill their memtables slowly, and by RocksDB's own bound
/// (four times every memtable) the log held about 450 MiB, 0.06x the
/// wire over ten minutes (docs/benchmarks.md).
const WAL_BYTES: u64 = 32 << 20;

impl Store {
    /// Opens (creating if needed) the store at `path`.
    ///
    /// # Errors
    /// [`StoreError::Db`] when RocksDB cannot open it (locked by another
    /// process, unreadable, ...).
    pub fn open(path: &Path, opts: StoreOptions) -> Result<Self, StoreError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_max_total_wal_size(WAL_BYTES);
        db_opts.set_compression_type(DBCompressionType::None);
        let plain = || {
            let mut o = Options::default();
            o.set_compression_type(DBCompressionType::None);
            o.set_write_buffer_size(MEMTABLE_BYTES);
            o
        };
        // A bloom filter over each memtable's keys: a commit looks up every
        // chunk it is handed in the chunks and held families, and most new
        // ones are in neither; the filter answers those without a walk down
        // the memtable's skiplist.
        let filtered = || {
            let mut o = plain();
            o.set_memtable_prefix_bloom_ratio(0.1);
            o.set_memtable_whole_key_filtering(true);
            o
        };
        // And in the tables: the same lookups, and the uploader's of each
        // chunk's S3 mark (`meta`) and delta base (`bases`), most of which
        // find nothing (a new chunk, a whole one), answered without a
        // search of every level's index.
        let bloomed = || {
            let mut o = filtered();
            let mut bbo = BlockBasedOptions::default();
            bbo.set_bloom_filter(10.0, false);
            o.set_block_based_table_factory(&bbo);
            o
        };
        let mut chunks = bloomed();
        chunks.set_enable_blob_files(true);
        chunks.set_min_blob_size(256);
        chunks.set_blob_compression_type(DBCompressionType::None);
        chunks.set_enable_blob_gc(true);
        let mut usage = plain();
        usage.set_merge_operator_associative("remus-add-i64", add_usage);
        let mut cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunks),
            ColumnFamilyDescriptor::new(CF_EPOCHS, plain()),
            ColumnFamilyDescriptor::new(CF_PAGES, plain()),
            ColumnFamilyDescriptor::new(CF_META, bloomed()),
            ColumnFamilyDescriptor::new(CF_HELD, bloomed()),
            ColumnFamilyDescriptor::new(CF_USAGE, usage),
            ColumnFamilyDescriptor::new(CF_BASES, bloomed()),
        ];
        if opts.read_only {
            // A store written before a column family existed opens for
            // reading without it (readers do not use `held`).
            let present = DB::list_cf(&db_opts, path).unwrap_or_default();
            cfs.retain(|d| present.iter().any(|p| p == d.name()));
        }
        if opts.read_only {
            // Readers (restore, verify, log) read through mmap: no syscall
            // per chunk. Writers keep plain reads.
            db_opts.set_allow_mmap_reads(true);
        }
        let db = if opts.read_only {
            DB::open_cf_descriptors_read_only(&db_opts, path, cfs, false)?
        } else {
            DB::open_cf_descriptors(&db_opts, path, cfs)?
        };
        let store = Self {
            db,
            path: path.to_path_buf(),
            opts,
            gc: crate::gc::GcCoordinator::default(),
            packs: Packs::new(path, opts.read_only, opts.sync),
            recent: Mutex::new(BoundedMap::new(opts.recent_pages)),
            commit_lock: Mutex::new(()),
            old_page_lists: std::sync::atomic::AtomicBool::new(false),
        };
        let old_lists =
            store.db.prefix_iterator_cf(store.cf(CF_META), b"delta").next().transpose()?.is_some_and(|(k, _)| k.starts_with(b"delta"));
        store.old_page_lists.store(old_lists, std::sync::atomic::Ordering::Relaxed);
        if !opts.read_only {
            store.count_usage()?;
        }
        Ok(store)
    }

    /// Counts each guest's usage from its kept manifests, once, in a
    /// store written before usage was kept (a new store is marked at once).
    fn count_usage(&self) -> Result<(), StoreError> {
        if self.db.get_cf(self.cf(CF_META), USAGE_COUNTED)?.is_some() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for (guest, _) in self.guests()? {
            let used: u64 = self.manifests(guest)?.iter().map(Manifest::charge).sum();
            batch.put_cf(self.cf(CF_USAGE), guest.0.to_be_bytes(), (used as i64).to_le_bytes());
        }
        batch.put_cf(self.cf(CF_META), USAGE_COUNTED, []);
        self.db.write(batch)?;
        Ok(())
    }

    /// The bytes `guest`'s kept epochs charge to the store: the new chunks
    /// each brought in (pages and device state, as stored), its manifest
    /// and its page-index entries ([`Manifest::charge`]). Shared content
    /// is charged to the guest that stored it first; what thinning drops
    /// is no longer charged, though a page version still in use stays
    /// stored (at most the guest's memory size beyond the count).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn usage(&self, guest: GuestId) -> Result<u64, StoreError> {
        let Some(cf) = self.db.cf_handle(CF_USAGE) else { return Ok(0) };
        let v = self.db.get_cf(cf, guest.0.to_be_bytes())?;
        Ok(v.and_then(|v| v.as_slice().try_into().ok()).map_or(0, |b| i64::from_le_bytes(b).max(0) as u64))
    }

    /// Adds `bytes` (negative: takes away) to `guest`'s usage in `batch`.
    pub(crate) fn charge(&self, batch: &mut WriteBatch, guest: GuestId, bytes: i64) {
        batch.merge_cf(self.cf(CF_USAGE), guest.0.to_be_bytes(), bytes.to_le_bytes());
    }

    /// Where the store lives.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    /// The committed head of `guest`, if it has history.
    ///
    /// # Errors
    /// [`StoreError::Db`], or [`StoreError::Corrupt`] for a damaged record.
    pub fn head(&self, guest: GuestId) -> Result<Option<Head>, StoreError> {
        let Some(v) = self.db.get_cf(self.cf(CF_META), guest_key(b"head", guest))? else {
            return Ok(None);
        };
        // 64 bytes; 56 (no generation) before generations were recorded.
        if v.len() != 56 && v.len() != 64 {
            return Err(StoreError::malformed(format!("{guest} head record"), "wrong length"));
        }
        Ok(Some(Head {
            epoch: EpochId(u64_at(&v, 0)),
            manifest: ChunkId(v[8..40].try_into().expect("32 bytes")),
            instance: u64_at(&v, 40),
            page_count: u64_at(&v, 48),
            generation: if v.len() == 64 { u64_at(&v, 56) } else { 0 },
        }))
    }

    /// Puts `head` into `batch` as `guest`'s head record (the layout
    /// [`head`](Self::head) reads).
    pub(crate) fn put_head(&self, batch: &mut WriteBatch, guest: GuestId, head: &Head) {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&head.epoch.0.to_be_bytes());
        v.extend_from_slice(&head.manifest.0);
        v.extend_from_slice(&head.instance.to_be_bytes());
        v.extend_from_slice(&head.page_count.to_be_bytes());
        v.extend_from_slice(&head.generation.to_be_bytes());
        batch.put_cf(self.cf(CF_META), guest_key(b"head", guest), v);
    }

    /// Records durably (a synced write) that `guest` failed over here at
    /// `epoch`; a later fence replaces an earlier one.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn fence(&self, guest: GuestId, fence: Fence) -> Result<(), StoreError> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&fence.epoch.0.to_be_bytes());
        v.extend_from_slice(&fence.since_unix_ms.to_be_bytes());
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.put_cf_opt(self.cf(CF_META), guest_key(b"fenc", guest), v, &wo)?;
        Ok(())
    }

    /// The guest's fence, if it failed over here.
    ///
    /// # Errors
    /// [`StoreError::Db`], or [`StoreError::Corrupt`] for a damaged record.
    pub fn fenced(&self, guest: GuestId) -> Result<Option<Fence>, StoreError> {
        let Some(v) = self.db.get_cf(self.cf(CF_META), guest_key(b"fenc", guest))? else {
            return Ok(None);
        };
        if v.len() != 16 {
            return Err(StoreError::malformed(format!("{guest} fence record"), "wrong length"));
        }
        Ok(Some(Fence { epoch: EpochId(u64_at(&v, 0)), since_unix_ms: u64_at(&v, 8) }))
    }

    /// Every guest with history, with its head.
    ///
    /// # Errors
    /// As [`head`](Self::head).
    pub fn guests(&self) -> Result<Vec<(GuestId, Head)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.prefix_iterator_cf(self.cf(CF_META), b"head") {
            let (k, _) = kv?;
            if !k.starts_with(b"head") || k.len() != 12 {
                break;
            }
            let g = GuestId(u64_at(&k, 4));
            if let Some(h) = self.head(g)? {
                out.push((g, h));
            }
        }
        Ok(out)
    }

    /// True when the chunk is stored.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let cf = self.cf(CF_CHUNKS);
        if !self.db.key_may_exist_cf(cf, id.0) {
            return Ok(false);
        }
        Ok(self.db.get_pinned_cf(cf, id.0)?.is_some())
    }

    /// For each id, whether `guest` holds the chunk: its bytes came from
    /// this guest, or a page of this guest named it before (see
    /// [`CF_HELD`]); what a primary may name by hash alone. One batched
    /// lookup.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn held(&self, guest: GuestId, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        self.present(CF_HELD, &ids.iter().map(|id| held_key(guest, id)).collect::<Vec<_>>())
    }

    /// For each id, whether the chunk is stored: one batched lookup, in
    /// key order (a commit checks thousands at once).
    fn stored(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        self.present(CF_CHUNKS, &ids.iter().map(|id| id.0).collect::<Vec<_>>())
    }

    /// For each key, whether column family `cf` holds it: one batched
    /// lookup, in key order, answers in the order asked.
    fn present<K: AsRef<[u8]> + Ord>(&self, cf: &str, keys: &[K]) -> Result<Vec<bool>, StoreError> {
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_unstable_by(|&a, &b| keys[a].cmp(&keys[b]));
        let found = self.db.batched_multi_get_cf(self.cf(cf), order.iter().map(|&i| keys[i].as_ref()), true);
        let mut out = vec![false; keys.len()];
        for (&i, r) in order.iter().zip(found) {
            out[i] = r?.is_some();
        }
        Ok(out)
    }

    /// The content of a chunk, decompressed and verified against its id.
    ///
    /// # Errors
    /// [`StoreError::ChunkMissing`], [`StoreError::ChunkCorrupt`] when the
    /// bytes are damaged, [`StoreError::Db`].
    pub fn chunk(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(PAGE_SIZE);
        self.chunk_into(id, &mut out)?;
        Ok(out)
    }

    /// Appends the content of a chunk to `out`, verified against its id
    /// (restore decodes pages straight into its write buffer this way).
    ///
    /// # Errors
    /// As [`chunk`](Self::chunk); on error `out` is left as it was.
    pub fn chunk_into(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<(), StoreError> {
        self.chunk_at_depth(id, out, 0)
    }

    /// The content of a chunk, from memory when it was committed lately
    /// (verified then), else as [`chunk`](Self::chunk) reads it: for
    /// following the newest epochs, not for checking what is on disk.
    ///
    /// # Errors
    /// As [`chunk`](Self::chunk).
    pub fn recent_chunk(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>, StoreError> {
        match self.recent(id) {
            Some((content, _)) => Ok(content),
            None => self.chunk(id).map(Arc::new),
        }
    }

    /// A recently committed chunk's content and delta depth.
    fn recent(&self, id: &ChunkId) -> Option<(Arc<Vec<u8>>, u8)> {
        self.recent.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned()
    }

    /// Forgets deleted chunks (GC's sweep, with no commit running).
    pub(crate) fn forget_recent(&self, ids: &[ChunkId]) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            recent.remove(id);
        }
    }

    /// [`chunk_into`](Self::chunk_into), `depth` deltas down a chain (a
    /// chain longer than any the store writes is damage, not a loop). A
    /// base is not checked against its id on the way: the content at the
    /// top of the chain is, and no damage below it passes that check.
    fn chunk_at_depth(&self, id: &ChunkId, out: &mut Vec<u8>, depth: u8) -> Result<(), StoreError> {
        let check = depth == 0;
        // The content is checked against its id, which subsumes RocksDB's
        // block checksum on this path (and costs less than both).
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_verify_checksums(false);
        let v = self.db.get_pinned_cf_opt(self.cf(CF_CHUNKS), id.0, &ro)?.ok_or(StoreError::ChunkMissing(*id))?;
        match v.split_first() {
            Some((&CODEC_PACKED, _)) => {
                let loc = Self::location(&v).ok_or(StoreError::ChunkCorrupt(*id))?;
                if loc.codec == CODEC_DELTA {
                    let delta = self.packs.with_bytes(id, &loc, |b| Ok(b.to_vec()))?;
                    return self.undo_delta(id, &delta, out, depth);
                }
                self.packs.with_bytes(id, &loc, |b| decode_into(id, loc.codec, b, out, check))
            }
            Some((&CODEC_DELTA, b)) => self.undo_delta(id, b, out, depth),
            Some((&codec, b)) => decode_into(id, codec, b, out, check),
            None => Err(StoreError::ChunkCorrupt(*id)),
        }
    }

    /// Appends the content of the delta `id` (`delta`: base id and XOR
    /// frame) to `out`, verified, reading its base first.
    fn undo_delta(&self, id: &ChunkId, delta: &[u8], out: &mut Vec<u8>, depth: u8) -> Result<(), StoreError> {
        let Some((base, xor)) = delta_parts(delta).filter(|_| depth < MAX_DELTA_DEPTH) else {
            return Err(StoreError::ChunkCorrupt(*id));
        };
        let start = out.len();
        self.chunk_at_depth(&base, out, depth + 1)?;
        if apply_xor(&mut out[start..], xor).is_err() || (depth == 0 && content_id(&out[start..]) != *id) {
            out.truncate(start);
            return Err(StoreError::ChunkCorrupt(*id));
        }
        Ok(())
    }

    /// How many deltas deep `id` is stored (0: whole), by the bases table.
    fn delta_depth(&self, id: &ChunkId) -> Result<u8, StoreError> {
        Ok(self.base_record(id)?.map_or(0, |(_, depth)| depth))
    }

    /// The base `id` is stored as a delta over, by the bases table
    /// (`None`: stored whole).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub(crate) fn delta_base(&self, id: &ChunkId) -> Result<Option<ChunkId>, StoreError> {
        Ok(self.base_record(id)?.map(|(base, _)| base))
    }

    /// `id`'s record in the bases table (`base id [32] | depth u8`): its
    /// base and delta depth, `None` when stored whole.
    fn base_record(&self, id: &ChunkId) -> Result<Option<(ChunkId, u8)>, StoreError> {
        let v = self.db.get_cf(self.cf(CF_BASES), id.0)?;
        Ok(v.and_then(|v| Some((ChunkId(v.get(..32)?.try_into().ok()?), *v.get(32)?))))
    }

    /// The pack location of a chunk stored in a pack.
    pub(crate) fn location(v: &[u8]) -> Option<Location> {
        match v.split_first() {
            Some((&CODEC_PACKED, loc)) => Location::decode(loc),
            _ => None,
        }
    }

    /// Commits one epoch atomically and durably.
    ///
    /// # Errors
    /// As [`commit_many`](Self::commit_many).
    pub fn commit(&self, c: EpochCommit) -> Result<CommitOutcome, StoreError> {
        Ok(self.commit_many(vec![c])?.pop().expect("one outcome per commit"))
    }

    /// Commits consecutive epochs with one atomic, synced write: all of
    /// them are visible after a crash, or none.
    ///
    /// # Errors
    /// [`StoreError::OutOfOrder`] unless each epoch follows its guest's
    /// head (or the previous epoch of the group); [`StoreError::Db`] when
    /// the write fails. Either way nothing of the group is visible.
    pub fn commit_many(&self, commits: Vec<EpochCommit>) -> Result<Vec<CommitOutcome>, StoreError> {
        let _one_at_a_time = self.commit_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let gc = self.gc.commit();
        let pages: usize = commits.iter().map(|c| c.pages.len()).sum();
        // Sized up front: growing a large batch copies it over and over.
        let mut batch = WriteBatch::with_capacity_bytes(pages * 120 + 4096);
        let mut fresh = Fresh::default();
        let mut seen = std::collections::HashSet::new();
        // Each guest's head as the group goes: epoch, manifest id, commit time.
        let mut heads: std::collections::HashMap<GuestId, (EpochId, ChunkId, u64)> = std::collections::HashMap::new();
        let mut outcomes = Vec::with_capacity(commits.len());
        for mut c in commits {
            let (head_epoch, parent, parent_commit) = match heads.get(&c.guest) {
                Some(h) => *h,
                None => match self.head(c.guest)? {
                    Some(h) => {
                        // A grafted history has no manifest at its head.
                        let parent_commit = match self.manifest(c.guest, h.epoch) {
                            Ok(m) => m.commit_unix_ns,
                            Err(StoreError::NoEpoch { .. }) => 0,
                            Err(e) => return Err(e),
                        };
                        (h.epoch, h.manifest, parent_commit)
                    }
                    None => (EpochId(0), ChunkId::default(), 0),
                },
            };
            let follows = c.follows.unwrap_or(EpochId(c.epoch.0.saturating_sub(1)));
            if c.epoch <= head_epoch || follows != head_epoch {
                return Err(StoreError::OutOfOrder { guest: c.guest, epoch: c.epoch, head: head_epoch });
            }
            if c.epoch != head_epoch.next() {
                self.bridge_skipped(&mut batch, c.guest, head_epoch, parent, c.epoch)?;
            }
            // The backup's clock, never behind the parent's commit: what a
            // primary claims about time ages nothing.
            let now = if c.commit_unix_ns == 0 { remus_types::now_unix_nanos() } else { c.commit_unix_ns };
            c.commit_unix_ns = now.max(parent_commit.saturating_add(1));
            gc.referenced(c.pages.iter().map(|(_, id)| *id).chain([content_id(&c.device_state)]));
            let out = self.stage(&mut batch, &mut fresh, &mut seen, c, parent)?;
            self.charge(&mut batch, out.manifest.guest, out.manifest.charge() as i64);
            heads.insert(out.manifest.guest, (out.manifest.epoch, out.id, out.manifest.commit_unix_ns));
            outcomes.push(out);
        }
        // The keys named by chunk id go into the batch in ascending order:
        // a memtable takes a run of ascending keys each from where the last
        // went in, where ids in the order they came (random) each search
        // from the top, most of a commit's memtable cost.
        let mut in_order: Vec<usize> = (0..fresh.chunks.len()).collect();
        in_order.sort_unstable_by_key(|&i| fresh.chunks[i].0);
        fresh.held.sort_unstable();
        fresh.bases.sort_unstable_by_key(|(id, _)| *id);
        let held_cf = self.cf(CF_HELD);
        for k in &fresh.held {
            batch.put_cf(held_cf, k, []);
        }
        let bases_cf = self.cf(CF_BASES);
        for (id, v) in &fresh.bases {
            batch.put_cf(bases_cf, id.0, v);
        }
        // New chunks go to a pack file, synced before the index batch that
        // names them (written once, not to the WAL and again to blob files
        // at flush); a few bytes ride in the batch itself.
        let chunks_cf = self.cf(CF_CHUNKS);
        if fresh.chunks.iter().map(|(_, c)| c.len()).sum::<usize>() >= BULK_BYTES {
            let parts: Vec<(ChunkId, u8, &[u8])> = fresh
                .chunks
                .iter()
                .map(|(id, c)| {
                    let (codec, b) = c.parts();
                    (*id, codec, b)
                })
                .collect();
            let locs = self.packs.append(&parts)?;
            let mut v = Vec::with_capacity(1 + Location::LEN);
            for &i in &in_order {
                v.clear();
                v.push(CODEC_PACKED);
                locs[i].encode(&mut v);
                batch.put_cf(chunks_cf, fresh.chunks[i].0 .0, &v);
            }
        } else {
            for &i in &in_order {
                let (id, c) = &fresh.chunks[i];
                batch.put_cf(chunks_cf, id.0, c.value());
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(self.opts.sync);
        self.db.write_opt(batch, &wo)?;
        // Stored now, and GC's sweep waits for `gc` (see `recent`).
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        for ((id, _), content) in fresh.chunks.iter().zip(fresh.content) {
            if let (Some(content), Some(&(_, depth))) = (content, fresh.index.get(id)) {
                recent.insert(*id, (content, depth));
            }
        }
        drop(recent);
        drop(gc);
        Ok(outcomes)
    }

    /// Adds one epoch to `batch`: its index entries, manifest and head;
    /// its new chunks (skipping those stored or already in `seen`, the
    /// chunks each guest of the group handed in so far) go to
    /// `fresh`, for the caller to store.
    fn stage(
        &self,
        batch: &mut WriteBatch,
        fresh: &mut Fresh,
        seen: &mut std::collections::HashSet<(GuestId, ChunkId)>,
        mut c: EpochCommit,
        parent: ChunkId,
    ) -> Result<CommitOutcome, StoreError> {
        // Canonical order: the manifest's page delta is over pfn order,
        // the order the page index yields them back in.
        c.pages.sort_unstable_by_key(|(pfn, _)| *pfn);
        if let Some(w) = c.pages.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(StoreError::malformed(format!("{} epoch {}", c.guest, c.epoch), format!("names page {} twice", w[0].0 .0)));
        }
        let mut new_chunks = 0;
        let mut dup_chunks = 0;
        let mut new_bytes = 0u64;
        let mut firsts = Vec::with_capacity(c.chunks.len());
        for (id, chunk) in std::mem::take(&mut c.chunks) {
            if seen.insert((c.guest, id)) {
                firsts.push((id, chunk));
            } else {
                dup_chunks += 1;
            }
        }
        let ids: Vec<ChunkId> = firsts.iter().map(|(id, _)| *id).collect();
        let stored = self.stored(&ids)?;
        // Held only matters for what is stored already (dedup hits).
        let again: Vec<ChunkId> = ids.iter().zip(&stored).filter(|(_, s)| **s).map(|(id, _)| *id).collect();
        let mut again_held = self.held(c.guest, &again)?.into_iter();
        let held: Vec<bool> = stored.iter().map(|s| *s && again_held.next().unwrap_or(false)).collect();
        // Every chunk handed in is checked against its id before it is
        // stored or counted as this guest's: whatever a caller hands in,
        // nothing is stored under an id its bytes do not have, and whether
        // another guest stored it already changes no answer.
        let mut scratch = Vec::with_capacity(PAGE_SIZE);
        for (((id, chunk), stored), held) in firsts.into_iter().zip(stored).zip(held) {
            if stored && held {
                dup_chunks += 1;
                continue;
            }
            scratch.clear();
            let mismatch = |_: ()| StoreError::Mismatch {
                guest: c.guest,
                epoch: c.epoch,
                id,
                pfn: c.pages.iter().find(|(_, p)| *p == id).map(|(pfn, _)| pfn.0),
            };
            // Kept as a delta: its base and depth.
            let (chunk, over) = match chunk {
                StoredChunk::Delta(d) => {
                    let (base, xor) = delta_parts(&d).ok_or_else(|| mismatch(()))?;
                    // The base from this group or the store; gone (GC) is
                    // named as unstored, so the sender sends it again.
                    let base_depth = match self.group_content(&base, fresh, &mut scratch) {
                        Err(StoreError::ChunkMissing(b)) => {
                            return Err(StoreError::Unstored { guest: c.guest, epoch: c.epoch, ids: vec![b] })
                        }
                        r => r?,
                    };
                    apply_xor(&mut scratch, xor).map_err(mismatch)?;
                    if content_id(&scratch) != id {
                        return Err(mismatch(()));
                    }
                    if base_depth >= MAX_DELTA_DEPTH {
                        (compress_whole(&scratch)?, None)
                    } else {
                        (StoredChunk::Delta(d), Some((base, base_depth + 1)))
                    }
                }
                chunk => {
                    let (codec, bytes) = chunk.parts();
                    decode_chunk_into(&id, codec, bytes, &mut scratch).map_err(|_| mismatch(()))?;
                    (chunk, None)
                }
            };
            fresh.held.push(held_key(c.guest, &id));
            if stored {
                dup_chunks += 1;
                continue;
            }
            if let Some((base, depth)) = over {
                let mut v = [0u8; 33];
                v[..32].copy_from_slice(&base.0);
                v[32] = depth;
                fresh.bases.push((id, v));
            }
            new_bytes += 1 + chunk.len() as u64;
            let content = std::mem::replace(&mut scratch, Vec::with_capacity(PAGE_SIZE));
            fresh.push(id, chunk, over.map_or(0, |(_, depth)| depth), Some(Arc::new(content)));
            new_chunks += 1;
        }
        let ds_id = content_id(&c.device_state);
        if seen.insert((c.guest, ds_id)) && !self.has_chunk(&ds_id)? {
            let ds = StoredChunk::Plain(std::mem::take(&mut c.device_state));
            new_bytes += 1 + ds.len() as u64;
            fresh.push(ds_id, ds, 0, None);
        }
        // A page may name a chunk sent in an earlier epoch: it must still
        // be stored (GC may have removed what no kept epoch referenced),
        // and held by this guest (so naming a hash tells nothing of other
        // guests). Every such chunk is named, so the sender can resend them
        // at once; a chunk stored but not held is named alike.
        let zero = remus_types::zero_page_hash();
        let mut named: Vec<ChunkId> =
            c.pages.iter().map(|(_, id)| *id).filter(|id| *id != zero && !seen.contains(&(c.guest, *id))).collect();
        named.sort_unstable();
        named.dedup();
        // Held implies stored: GC deletes a chunk and every guest's entry
        // for it in one batch, and a commit's chunks are marked against it.
        let held = self.held(c.guest, &named)?;
        let unstored: Vec<ChunkId> = named.into_iter().zip(held).filter(|(_, h)| !h).map(|(id, _)| id).collect();
        if !unstored.is_empty() {
            return Err(StoreError::Unstored { guest: c.guest, epoch: c.epoch, ids: unstored });
        }
        let pages_cf = self.cf(CF_PAGES);
        for (pfn, id) in &c.pages {
            batch.put_cf(pages_cf, page_key(c.guest, *pfn, c.epoch), id.0);
        }
        batch.put_cf(self.cf(CF_META), pfns_key(c.guest, c.epoch), encode_pfns(c.pages.iter().map(|(pfn, _)| *pfn)));
        let manifest = Manifest {
            guest: c.guest,
            epoch: c.epoch,
            parent,
            time_unix_ns: c.time_unix_ns,
            page_count: c.page_count,
            dirty_pages: c.pages.len() as u64,
            memory_root: c.memory_root,
            page_delta: page_delta_hash(&c.pages),
            device_state: ds_id,
            instance: c.instance,
            pause_ns: c.pause_ns,
            wire_bytes: c.wire_bytes,
            new_chunk_bytes: new_bytes,
            generation: c.generation,
            commit_unix_ns: c.commit_unix_ns,
            released_ahead: c.released_ahead,
        };
        let id = manifest.id();
        batch.put_cf(self.cf(CF_EPOCHS), epoch_key(c.guest, c.epoch), manifest.encode());
        let head = Head { epoch: c.epoch, manifest: id, instance: c.instance, page_count: c.page_count, generation: c.generation };
        self.put_head(batch, c.guest, &head);
        Ok(CommitOutcome { manifest, id, new_chunks, dup_chunks })
    }

    /// The manifest of `epoch`.
    ///
    /// # Errors
    /// [`StoreError::NoEpoch`] when it is not committed,
    /// [`StoreError::Corrupt`] when damaged.
    pub fn manifest(&self, guest: GuestId, epoch: EpochId) -> Result<Manifest, StoreError> {
        let v = self.db.get_cf(self.cf(CF_EPOCHS), epoch_key(guest, epoch))?.ok_or(StoreError::NoEpoch { guest, epoch })?;
        let m = Manifest::decode(&v).map_err(|e| e.at(format!("{guest} epoch {epoch}")))?;
        if m.guest != guest || m.epoch != epoch {
            return Err(StoreError::malformed(format!("{guest} epoch {epoch} manifest"), "it names another epoch"));
        }
        Ok(m)
    }

    /// The last `n` kept manifests of `guest`, oldest first: read from the
    /// end, so the cost is that of `n` manifests however long the history.
    ///
    /// # Errors
    /// [`StoreError::Db`], [`StoreError::Corrupt`].
    pub fn last_manifests(&self, guest: GuestId, n: usize) -> Result<Vec<Manifest>, StoreError> {
        let end = epoch_key(guest, EpochId(u64::MAX));
        let mut out = Vec::with_capacity(n.min(1 << 16));
        for kv in self.db.iterator_cf(self.cf(CF_EPOCHS), IteratorMode::From(&end, Direction::Reverse)) {
            if out.len() == n {
                break;
            }
            let (k, v) = kv?;
            if k.len() != 16 || u64_at(&k, 0) != guest.0 {
                break;
            }
            out.push(Manifest::decode(&v).map_err(|e| e.at(format!("{guest} epoch {}", u64_at(&k, 8))))?);
        }
        out.reverse();
        Ok(out)
    }

    /// The committed (kept) epoch of `guest` nearest `epoch`: the first at
    /// or after it when `after`, else the last at or before it; one seek,
    /// however long the history.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn kept_epoch_near(&self, guest: GuestId, epoch: EpochId, after: bool) -> Result<Option<EpochId>, StoreError> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_EPOCHS));
        if after {
            it.seek(epoch_key(guest, epoch));
        } else {
            it.seek_for_prev(epoch_key(guest, epoch));
        }
        it.status()?;
        Ok(it.key().filter(|k| k.len() == 16 && k[..8] == guest.0.to_be_bytes()).map(|k| EpochId(u64_at(k, 8))))
    }

    /// Every manifest of `guest`, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn manifests(&self, guest: GuestId) -> Result<Vec<Manifest>, StoreError> {
        let start = epoch_key(guest, EpochId(0));
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(self.cf(CF_EPOCHS), IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = kv?;
            if k.len() != 16 || u64_at(&k, 0) != guest.0 {
                break;
            }
            out.push(Manifest::decode(&v).map_err(|e| e.at(format!("{guest} epoch {}", u64_at(&k, 8))))?);
        }
        Ok(out)
    }

    /// The newest committed epoch of `guest` whose pause was at or before
    /// `time_unix_ns`.
    ///
    /// # Errors
    /// [`StoreError::NoGuest`] or what reading the manifests returns.
    pub fn epoch_at(&self, guest: GuestId, time_unix_ns: u64) -> Result<Option<EpochId>, StoreError> {
        let all = self.manifests(guest)?;
        if all.is_empty() {
            return Err(StoreError::NoGuest(guest));
        }
        Ok(all.iter().take_while(|m| m.time_unix_ns <= time_unix_ns).last().map(|m| m.epoch))
    }

    /// The hash of page `pfn` of `guest` as of `epoch` (`None`: never
    /// written, so zero).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn page_at(&self, guest: GuestId, pfn: Pfn, epoch: EpochId) -> Result<Option<ChunkId>, StoreError> {
        let key = page_key(guest, pfn, epoch);
        let mut it = self.db.raw_iterator_cf(self.cf(CF_PAGES));
        it.seek(key);
        it.status()?;
        match (it.key(), it.value()) {
            (Some(k), Some(v)) if k.len() == 24 && k[..16] == key[..16] => Ok(Some(hash_value(v)?)),
            _ => Ok(None),
        }
    }

    /// Calls `f(pfn, hash)` for every page of `guest` written at or before
    /// `epoch`, with its newest version at or before `epoch`, ascending pfn.
    ///
    /// # Errors
    /// [`StoreError::Db`], [`StoreError::Corrupt`], or what `f` returns.
    pub fn for_each_page_at(
        &self,
        guest: GuestId,
        epoch: EpochId,
        f: impl FnMut(Pfn, ChunkId) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.for_each_page_in(guest, epoch, 0..u64::MAX, f)
    }

    /// As [`for_each_page_at`](Self::for_each_page_at), for the pages
    /// whose pfn lies in `pfns` (so several threads can share a restore).
    ///
    /// # Errors
    /// As [`for_each_page_at`](Self::for_each_page_at).
    pub fn for_each_page_in(
        &self,
        guest: GuestId,
        epoch: EpochId,
        pfns: std::ops::Range<u64>,
        mut f: impl FnMut(Pfn, ChunkId) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_PAGES));
        it.seek(page_key(guest, Pfn(pfns.start), epoch));
        let mut given = None;
        loop {
            it.status()?;
            let Some(k) = it.key() else { break };
            if k.len() != 24 || u64_at(k, 0) != guest.0 {
                break;
            }
            let pfn = u64_at(k, 8);
            if given == Some(pfn) {
                // An older version of the page just given: on to the next
                // page (most pages have one version, so stepping first and
                // seeking only here saves a seek per page).
                let Some(next) = pfn.checked_add(1) else { break };
                it.seek(page_key(guest, Pfn(next), epoch));
                continue;
            }
            if pfn >= pfns.end {
                break;
            }
            if !u64_at(k, 16) > epoch.0 {
                // The first key of a pfn is its newest version; this one is
                // newer than asked for, so jump to its version at `epoch`.
                it.seek(page_key(guest, Pfn(pfn), epoch));
                continue;
            }
            f(Pfn(pfn), hash_value(it.value().unwrap_or_default())?)?;
            given = Some(pfn);
            it.next();
        }
        Ok(())
    }

    /// Each page whose version at `b` is not its version at `a` (`a < b`),
    /// ascending pfn, with both hashes (`None`: not written by `a`). One
    /// pass over the page index: a page whose newest version at `b` is
    /// from `a` or before costs a step, not a lookup, so the walk costs
    /// about what one page table costs whatever the distance.
    ///
    /// # Errors
    /// [`StoreError::Db`], [`StoreError::Corrupt`], or what `f` returns.
    pub fn for_each_change(
        &self,
        guest: GuestId,
        a: EpochId,
        b: EpochId,
        mut f: impl FnMut(Pfn, Option<ChunkId>, ChunkId) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_PAGES));
        it.seek(page_key(guest, Pfn(0), b));
        let mut given = None;
        loop {
            it.status()?;
            let Some(k) = it.key() else { break };
            if k.len() != 24 || u64_at(k, 0) != guest.0 {
                break;
            }
            let (pfn, version) = (u64_at(k, 8), !u64_at(k, 16));
            if given == Some(pfn) {
                // An older version of the page just looked at.
                let Some(next) = pfn.checked_add(1) else { break };
                it.seek(page_key(guest, Pfn(next), b));
                continue;
            }
            if version > b.0 {
                it.seek(page_key(guest, Pfn(pfn), b));
                continue;
            }
            given = Some(pfn);
            if version <= a.0 {
                it.next();
                continue;
            }
            let after = hash_value(it.value().unwrap_or_default())?;
            // Its version at `a`, if any (the walk goes on from there).
            it.seek(page_key(guest, Pfn(pfn), a));
            it.status()?;
            let before = match it.key() {
                Some(k) if k.len() == 24 && u64_at(k, 0) == guest.0 && u64_at(k, 8) == pfn => {
                    Some(hash_value(it.value().unwrap_or_default())?)
                }
                _ => None,
            };
            if before != Some(after) {
                f(Pfn(pfn), before, after)?;
            }
        }
        Ok(())
    }

    /// The pages written in `epoch` (its page-index entries), ascending pfn.
    ///
    /// # Errors
    /// [`StoreError::Db`], [`StoreError::Corrupt`].
    pub fn epoch_pages(&self, guest: GuestId, epoch: EpochId) -> Result<Vec<(Pfn, ChunkId)>, StoreError> {
        if let Some(list) = self.page_list(guest, epoch)? {
            return Ok(list);
        }
        // Epochs committed before page lists were kept: scan the index.
        let mut out = Vec::new();
        for kv in self.db.prefix_iterator_cf(self.cf(CF_PAGES), guest.0.to_be_bytes()) {
            let (k, v) = kv?;
            if k.len() != 24 || u64_at(&k, 0) != guest.0 {
                break;
            }
            if !u64_at(&k, 16) == epoch.0 {
                out.push((Pfn(u64_at(&k, 8)), hash_value(&v)?));
            }
        }
        Ok(out)
    }

    /// `epoch`'s page list, when it has one (in either form).
    ///
    /// # Errors
    /// [`StoreError::Db`], [`StoreError::Corrupt`].
    pub(crate) fn page_list(&self, guest: GuestId, epoch: EpochId) -> Result<Option<crate::PageList>, StoreError> {
        if let Some(v) = self.db.get_pinned_cf(self.cf(CF_META), pfns_key(guest, epoch))? {
            return self.listed_pages(guest, epoch, &v).map(Some);
        }
        if let Some(v) = self.db.get_pinned_cf(self.cf(CF_META), delta_key(guest, epoch))? {
            return decode_delta_list(guest, epoch, &v).map(Some);
        }
        Ok(None)
    }

    /// The pages written in `epoch`, ascending, without their hashes
    /// (what thinning needs of the epoch that ends a gap).
    ///
    /// # Errors
    /// [`StoreError::Db`], [`StoreError::Corrupt`].
    pub(crate) fn epoch_pfns(&self, guest: GuestId, epoch: EpochId) -> Result<Vec<Pfn>, StoreError> {
        if let Some(v) = self.db.get_pinned_cf(self.cf(CF_META), pfns_key(guest, epoch))? {
            return decode_pfn_list(guest, epoch, &v);
        }
        Ok(self.epoch_pages(guest, epoch)?.into_iter().map(|(pfn, _)| pfn).collect())
    }

    /// The pages of a `pfns` list of `guest`'s `epoch` with their hashes:
    /// the page index's entries at that epoch, in one batched lookup.
    pub(crate) fn listed_pages(&self, guest: GuestId, epoch: EpochId, list: &[u8]) -> Result<crate::PageList, StoreError> {
        let pfns = decode_pfn_list(guest, epoch, list)?;
        let entries: Vec<(Pfn, EpochId)> = pfns.iter().map(|pfn| (*pfn, epoch)).collect();
        Ok(pfns.into_iter().zip(self.index_hashes(guest, &entries)?).collect())
    }

    /// The page index's hash of each (page, epoch) of `guest` that a page
    /// list names, in the order asked: one batched lookup in key order.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming the first entry the index lacks;
    /// [`StoreError::Db`].
    pub(crate) fn index_hashes(&self, guest: GuestId, entries: &[(Pfn, EpochId)]) -> Result<Vec<ChunkId>, StoreError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<[u8; 24]> = entries.iter().map(|(pfn, epoch)| page_key(guest, *pfn, *epoch)).collect();
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_unstable_by(|&a, &b| keys[a].cmp(&keys[b]));
        let found = self.db.batched_multi_get_cf(self.cf(CF_PAGES), order.iter().map(|&i| keys[i].as_slice()), true);
        let mut out = vec![ChunkId::default(); keys.len()];
        for (&i, v) in order.iter().zip(found) {
            let Some(v) = v? else {
                let (pfn, epoch) = entries[i];
                return Err(StoreError::malformed(
                    format!("{guest} epoch {epoch} page list"),
                    format!("names page {} the page index does not hold", pfn.0),
                ));
            };
            out[i] = hash_value(&v)?;
        }
        Ok(out)
    }

    /// A chunk's stored value (codec byte and bytes), unverified: what
    /// the S3 tier packs.
    ///
    /// # Errors
    /// [`StoreError::ChunkMissing`], [`StoreError::Db`].
    pub fn chunk_value(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let v = self.db.get_cf(self.cf(CF_CHUNKS), id.0)?.ok_or(StoreError::ChunkMissing(*id))?;
        match v.split_first() {
            Some((&CODEC_PACKED, _)) => {
                let loc = Self::location(&v).ok_or(StoreError::ChunkCorrupt(*id))?;
                self.packs.with_bytes(id, &loc, |b| {
                    let mut v = Vec::with_capacity(1 + b.len());
                    v.push(loc.codec);
                    v.extend_from_slice(b);
                    Ok(v)
                })
            }
            _ => Ok(v),
        }
    }

    /// A chunk's value for the S3 tier, with the base it stays a delta
    /// over: a delta stays as it is when the tier holds its base, in a pack
    /// (its mark, given with the base) or `pending` in the pack being
    /// filled (given as `None`); otherwise it is made whole (zstd).
    ///
    /// # Errors
    /// As [`chunk`](Self::chunk).
    pub(crate) fn chunk_value_for_s3(
        &self,
        id: &ChunkId,
        pending: impl Fn(&ChunkId) -> bool,
    ) -> Result<(Vec<u8>, Option<S3Base>), StoreError> {
        let v = self.chunk_value(id)?;
        let base = match v.split_first() {
            Some((&CODEC_DELTA, delta)) => delta_parts(delta).ok_or(StoreError::ChunkCorrupt(*id))?.0,
            _ => return Ok((v, None)),
        };
        let held = if pending(&base) { Some(None) } else { self.s3_pack_of(&base)?.map(Some) };
        if let Some(pack) = held {
            return Ok((v, Some((base, pack))));
        }
        let mut content = Vec::with_capacity(PAGE_SIZE);
        self.undo_delta(id, &v[1..], &mut content, 0)?;
        Ok((compress_whole(&content)?.value(), None))
    }

    /// Flushes memtables (for tests that inspect files).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn flush(&self) -> Result<(), StoreError> {
        for cf in [CF_CHUNKS, CF_EPOCHS, CF_PAGES, CF_META] {
            self.db.flush_cf(self.cf(cf))?;
        }
        Ok(())
    }

    /// Flushes and fully compacts every column family, so on-disk size
    /// reflects live data only (for benchmarks and offline tools).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn compact(&self) -> Result<(), StoreError> {
        self.flush()?;
        for cf in [CF_CHUNKS, CF_EPOCHS, CF_PAGES, CF_META] {
            self.db.compact_range_cf(self.cf(cf), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Forgets every guest's usage and that it was counted, as in a store
    /// written before usage was kept: for tests only.
    #[doc(hidden)]
    pub fn forget_usage_for_test(&self) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for (guest, _) in self.guests()? {
            batch.delete_cf(self.cf(CF_USAGE), guest.0.to_be_bytes());
        }
        batch.delete_cf(self.cf(CF_META), USAGE_COUNTED);
        self.db.write(batch)?;
        Ok(())
    }

    /// Rewrites an epoch's page list in the form stores kept before pfns
    /// lists (every hash repeated in it): for tests of such stores only.
    #[doc(hidden)]
    pub fn old_form_page_list_for_test(&self, guest: GuestId, epoch: EpochId) -> Result<(), StoreError> {
        let mut v = Vec::new();
        for (pfn, id) in self.epoch_pages(guest, epoch)? {
            v.extend_from_slice(&pfn.0.to_be_bytes());
            v.extend_from_slice(&id.0);
        }
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_META), pfns_key(guest, epoch));
        batch.put_cf(self.cf(CF_META), delta_key(guest, epoch), v);
        self.db.write(batch)?;
        self.old_page_lists.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Overwrites an epoch's stored pfns list: for tamper tests only.
    #[doc(hidden)]
    pub fn corrupt_page_list_for_test(&self, guest: GuestId, epoch: EpochId, bytes: &[u8]) -> Result<(), StoreError> {
        self.db.put_cf(self.cf(CF_META), pfns_key(guest, epoch), bytes)?;
        Ok(())
    }

    /// Overwrites a stored manifest's raw bytes: for tamper tests only.
    #[doc(hidden)]
    pub fn corrupt_manifest_for_test(&self, guest: GuestId, epoch: EpochId, bytes: &[u8]) -> Result<(), StoreError> {
        self.db.put_cf(self.cf(CF_EPOCHS), epoch_key(guest, epoch), bytes)?;
        Ok(())
    }

    /// Overwrites a stored chunk's raw value: for tamper tests only.
    #[doc(hidden)]
    pub fn corrupt_chunk_for_test(&self, id: &ChunkId, flip_at: usize) -> Result<(), StoreError> {
        let mut v = self.db.get_cf(self.cf(CF_CHUNKS), id.0)?.ok_or(StoreError::ChunkMissing(*id))?;
        if let Some(loc) = Self::location(&v) {
            return self.packs.corrupt(&loc, flip_at);
        }
        let i = flip_at % v.len();
        v[i] ^= 1;
        self.db.put_cf(self.cf(CF_CHUNKS), id.0, v)?;
        Ok(())
    }
}

pub(crate) fn delta_key(guest: GuestId, epoch: EpochId) -> Vec<u8> {
    let mut k = guest_key(b"delta", guest);
    k.extend_from_slice(&epoch.0.to_be_bytes());
    k
}

pub(crate) fn pfns_key(guest: GuestId, epoch: EpochId) -> Vec<u8> {
    let mut k = guest_key(b"pfns", guest);
    k.extend_from_slice(&epoch.0.to_be_bytes());
    k
}

/// An epoch's pages, strictly ascending, as stored under `pfns`: the
/// first pfn, then each one's gap after the one before less one, each a
/// LEB128 varint (most gaps fit one or two bytes).
pub(crate) fn encode_pfns(pfns: impl Iterator<Item = Pfn>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut next = 0u64;
    for pfn in pfns {
        let mut gap = pfn.0 - next;
        while gap >= 0x80 {
            out.push(gap as u8 | 0x80);
            gap >>= 7;
        }
        out.push(gap as u8);
        // Past u64::MAX nothing follows in an ascending list.
        next = pfn.0.wrapping_add(1);
    }
    out
}

/// The pfns [`encode_pfns`] wrote; `None` when `b` is not such a list (a
/// varint cut short or too long, or a pfn past `u64::MAX`).
pub(crate) fn decode_pfns(b: &[u8]) -> Option<Vec<Pfn>> {
    let mut out = Vec::with_capacity(b.len());
    // `None` once u64::MAX is listed: nothing may follow it.
    let (mut next, mut gap, mut shift) = (Some(0u64), 0u64, 0u32);
    for &byte in b {
        let bits = u64::from(byte & 0x7f);
        if shift > 63 || (shift == 63 && bits > 1) {
            return None;
        }
        gap |= bits << shift;
        if byte & 0x80 != 0 {
            shift += 7;
            continue;
        }
        let pfn = next?.checked_add(gap)?;
        out.push(Pfn(pfn));
        next = pfn.checked_add(1);
        (gap, shift) = (0, 0);
    }
    (shift == 0).then_some(out)
}

/// A stored `pfns` list of `guest`'s `epoch`, decoded ([`decode_pfns`]).
///
/// # Errors
/// [`StoreError::Corrupt`] when it is not such a list.
pub(crate) fn decode_pfn_list(guest: GuestId, epoch: EpochId, v: &[u8]) -> Result<Vec<Pfn>, StoreError> {
    decode_pfns(v).ok_or_else(|| StoreError::malformed(format!("{guest} epoch {epoch} page list"), "not a list of ascending page numbers"))
}

/// A page list in the earlier form: (pfn u64 | hash [32])*.
pub(crate) fn decode_delta_list(guest: GuestId, epoch: EpochId, v: &[u8]) -> Result<crate::PageList, StoreError> {
    if v.len() % 40 != 0 {
        return Err(StoreError::malformed(format!("{guest} epoch {epoch} page list"), "length is not a whole number of entries"));
    }
    Ok(v.chunks_exact(40).map(|e| (Pfn(u64_at(e, 0)), ChunkId(e[8..40].try_into().expect("32 bytes")))).collect())
}

/// Decodes a chunk value (codec byte and bytes) and checks it against `id`.
///
/// # Errors
/// [`StoreError::ChunkCorrupt`].
pub fn decode_chunk_value(id: &ChunkId, v: &[u8]) -> Result<Vec<u8>, StoreError> {
    let (&codec, b) = v.split_first().ok_or(StoreError::ChunkCorrupt(*id))?;
    decode_chunk(id, codec, b)
}

/// The base a chunk stays a delta over in the S3 tier, and the pack holding
/// it there (`None`: the pack being filled).
pub(crate) type S3Base = (ChunkId, Option<ChunkId>);

/// A chunk value as the S3 tier may hold it: whole content (checked
/// against its id), or a delta whose base must be read first.
pub(crate) enum HeldValue {
    /// The content, checked.
    Whole(Vec<u8>),
    /// A delta over `base`: `xor` is a zstd frame of the content XOR the
    /// base's content (see [`undo_xor`]).
    Delta { base: ChunkId, xor: Vec<u8> },
}

/// Decodes a chunk value that may be a delta (a delta over itself is
/// refused: it could never be read).
pub(crate) fn decode_held_value(id: &ChunkId, v: &[u8]) -> Result<HeldValue, StoreError> {
    match v.split_first() {
        Some((&CODEC_DELTA, d)) => {
            let (base, xor) = delta_parts(d).filter(|(base, _)| base != id).ok_or(StoreError::ChunkCorrupt(*id))?;
            Ok(HeldValue::Delta { base, xor: xor.to_vec() })
        }
        _ => decode_chunk_value(id, v).map(HeldValue::Whole),
    }
}

/// The content of the delta `id` given its base's content, checked
/// against `id`.
pub(crate) fn undo_xor(id: &ChunkId, base: &[u8], xor: &[u8]) -> Result<Vec<u8>, StoreError> {
    let mut content = base.to_vec();
    if apply_xor(&mut content, xor).is_err() || content_id(&content) != *id {
        return Err(StoreError::ChunkCorrupt(*id));
    }
    Ok(content)
}

/// Decodes chunk bytes stored with `codec` and checks them against `id`.
fn decode_chunk(id: &ChunkId, codec: u8, b: &[u8]) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    decode_chunk_into(id, codec, b, &mut out)?;
    Ok(out)
}

/// The chunks a commit group stores, in order, and where each is with
/// its delta depth (a later delta of the group may build on one).
#[derive(Default)]
pub(crate) struct Fresh {
    chunks: Vec<(ChunkId, StoredChunk)>,
    index: HashMap<ChunkId, (usize, u8)>,
    /// Each page's content, as verified (a device state: `None`).
    content: Vec<Option<Arc<Vec<u8>>>>,
    /// Keys of the held entries to write.
    held: Vec<[u8; 40]>,
    /// Base and depth of the new chunks kept as deltas.
    bases: Vec<(ChunkId, [u8; 33])>,
}

impl Fresh {
    fn push(&mut self, id: ChunkId, chunk: StoredChunk, depth: u8, content: Option<Arc<Vec<u8>>>) {
        self.index.insert(id, (self.chunks.len(), depth));
        self.chunks.push((id, chunk));
        self.content.push(content);
    }
}

impl Store {
    /// Appends the content of `id` to `out`, from the group's new chunks,
    /// the recent ones or the store, and returns its delta depth.
    fn group_content(&self, id: &ChunkId, fresh: &Fresh, out: &mut Vec<u8>) -> Result<u8, StoreError> {
        let Some(&(i, depth)) = fresh.index.get(id) else {
            if let Some((content, depth)) = self.recent(id) {
                out.extend_from_slice(&content);
                return Ok(depth);
            }
            self.chunk_into(id, out)?;
            return self.delta_depth(id);
        };
        match &fresh.content[i] {
            Some(content) => out.extend_from_slice(content),
            // A device state: whole, kept as it came.
            None => {
                let (codec, bytes) = fresh.chunks[i].1.parts();
                decode_chunk_into(id, codec, bytes, out)?;
            }
        }
        Ok(depth)
    }
}

/// A delta's base id and XOR frame (`None`: too short to be a delta).
fn delta_parts(delta: &[u8]) -> Option<(ChunkId, &[u8])> {
    let base = delta.get(..32)?.try_into().ok()?;
    Some((ChunkId(base), &delta[32..]))
}

/// `content` stored whole (zstd): a delta whose chain is too deep, or one
/// leaving the store for the S3 tier.
fn compress_whole(content: &[u8]) -> Result<StoredChunk, StoreError> {
    remus_types::zstd_compress(content, WHOLE_LEVEL)
        .map(StoredChunk::Zstd)
        .map_err(|cause| StoreError::Io { what: "compressing a delta made whole", cause })
}

/// XORs `content` (a base's content, in place) with the zstd frame
/// `xor_zstd`, which must hold exactly as many bytes.
fn apply_xor(content: &mut [u8], xor_zstd: &[u8]) -> Result<(), ()> {
    let mut x = vec![0u8; content.len()];
    match remus_types::zstd_decompress_into(xor_zstd, &mut x) {
        Ok(n) if n == content.len() => {
            content.iter_mut().zip(&x).for_each(|(c, x)| *c ^= x);
            Ok(())
        }
        _ => Err(()),
    }
}

/// Appends the content of chunk bytes stored with `codec` to `out`, after
/// checking it against `id` (on error `out` is left as it was).
fn decode_chunk_into(id: &ChunkId, codec: u8, b: &[u8], out: &mut Vec<u8>) -> Result<(), StoreError> {
    decode_into(id, codec, b, out, true)
}

/// Appends the content of a whole chunk to `out`; `check`: against its id.
fn decode_into(id: &ChunkId, codec: u8, b: &[u8], out: &mut Vec<u8>, check: bool) -> Result<(), StoreError> {
    let start = out.len();
    let decoded = match codec {
        CODEC_PLAIN => {
            out.extend_from_slice(b);
            Ok(())
        }
        CODEC_ZSTD => match zstd::zstd_safe::get_frame_content_size(b) {
            // Sized from the frame header (remus writes it); a 16 MiB
            // guess per call would dominate restore time.
            Ok(Some(n)) if n <= MAX_CHUNK as u64 => {
                out.resize(start + n as usize, 0);
                let got = remus_types::zstd_decompress_into(b, &mut out[start..]);
                if got.is_ok_and(|got| got == n as usize) {
                    Ok(())
                } else {
                    Err(())
                }
            }
            _ => Err(()),
        },
        _ => Err(()),
    };
    if decoded.is_err() || (check && content_id(&out[start..]) != *id) {
        out.truncate(start);
        return Err(StoreError::ChunkCorrupt(*id));
    }
    Ok(())
}

pub(crate) fn hash_value(v: &[u8]) -> Result<ChunkId, StoreError> {
    v.try_into().map(ChunkId).map_err(|_| StoreError::malformed("page index entry", "not a 32-byte hash"))
}
