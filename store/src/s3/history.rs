//! Reading the S3 tier back: segments, checkpoints, bridges, pack
//! indexes and chunks, checked as they arrive, for restore after site
//! loss.
//!
//! A read is planned from the keys alone (one listing per kind): for a
//! target epoch it takes the newest kept checkpoint at or before it and
//! the segments from there on, so what it reads is bounded by the epochs
//! it needs, not by the length of the history.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use remus_types::{ChunkId, EpochId, GuestId, Pfn};

use super::format::{self, BridgeObject, CheckpointObject, PackBuilder, PackEntry, SegmentObject};
use super::seal::{is_sealed, Keyring};
use super::{S3Client, S3Config, S3Error};
use crate::chain::{Bridge, ChainWalk};
use crate::db::{decode_held_value, undo_xor, HeldValue, MAX_DELTA_DEPTH};
use crate::error::StoreError;
use crate::manifest::Manifest;

/// A bucket and prefix holding remus history.
#[derive(Debug)]
pub struct S3Tier {
    pub(crate) client: S3Client,
    pub(crate) cfg: S3Config,
    /// The keys objects are sealed with (`s3.encryption-keys`).
    keys: Option<Keyring>,
}

/// One epoch as S3 holds it.
#[derive(Debug, Clone)]
pub struct S3Epoch {
    /// Its manifest.
    pub manifest: Manifest,
    /// Pages written in it, ascending pfn.
    pub pages: Vec<(Pfn, ChunkId)>,
}

/// A guest's history in S3, or the part of it a read needed (manifests
/// and page lists, no chunks).
#[derive(Debug, Clone, Default)]
pub struct S3History {
    /// The page table the read started from (`None`: the first epoch).
    pub base: Option<CheckpointObject>,
    /// Kept epochs read, oldest first (from the base's epoch on).
    pub epochs: Vec<S3Epoch>,
    /// Thinned runs, oldest first.
    pub bridges: Vec<BridgeObject>,
    /// Packs the objects read name as holding their chunks.
    pub packs: BTreeSet<ChunkId>,
    /// Objects read (segments, checkpoint and bridges).
    pub objects_read: u64,
}

/// Which part of a guest's history a read needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// Page tables will be wanted at this epoch and later only, so the
    /// read may start from a checkpoint at or before it (`None`: read
    /// from the first epoch).
    pub from: Option<EpochId>,
    /// Nothing after this epoch is read (`None`: up to the newest).
    pub upto: Option<EpochId>,
}

impl Reach {
    /// Everything, from the first epoch.
    pub const ALL: Self = Self { from: None, upto: None };
    /// The newest epoch (from the newest checkpoint on).
    pub const LATEST: Self = Self { from: Some(EpochId(u64::MAX)), upto: None };

    /// One epoch: from the checkpoint before it, up to it.
    #[must_use]
    pub fn epoch(e: EpochId) -> Self {
        Self { from: Some(e), upto: Some(e) }
    }

    fn upto(&self) -> EpochId {
        self.upto.unwrap_or(EpochId(u64::MAX))
    }
}

/// A guest's bridge keys and the runs of dropped epochs they name, from
/// one listing.
struct BridgeKeys(Vec<(String, Option<(EpochId, EpochId)>)>);

impl BridgeKeys {
    /// Whether a bridge spans `epoch` (it was thinned).
    fn spans(&self, epoch: EpochId) -> bool {
        self.0.iter().any(|(_, span)| span.is_some_and(|(f, l)| f <= epoch && epoch <= l))
    }
}

/// A listed segment: its key and span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentKey {
    /// Its key.
    pub key: String,
    /// First epoch of its span.
    pub first: EpochId,
    /// Last epoch of its span (the epoch before the next segment's first;
    /// the largest epoch for the newest).
    pub last: EpochId,
}

impl S3Tier {
    /// A tier for `cfg`; makes no request, so it works while S3 is away.
    ///
    /// # Errors
    /// [`S3Error::Config`], also for a key file that cannot be read.
    pub fn new(cfg: &S3Config) -> Result<Self, S3Error> {
        let keys = cfg.encryption_keys.as_deref().map(Keyring::load).transpose().map_err(|e| S3Error::Config(e.to_string()))?;
        Ok(Self { client: S3Client::new(cfg)?, cfg: cfg.clone(), keys })
    }

    /// A tier for `cfg` whose bucket answers with these credentials.
    ///
    /// # Errors
    /// [`S3Error::Config`], [`S3Error::Unreachable`], [`S3Error::Denied`],
    /// [`S3Error::NoSuchBucket`].
    pub fn connect(cfg: &S3Config) -> Result<Self, S3Error> {
        let t = Self::new(cfg)?;
        t.client.check()?;
        Ok(t)
    }

    /// The client (bucket and prefix bound).
    #[must_use]
    pub fn client(&self) -> &S3Client {
        &self.client
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &S3Config {
        &self.cfg
    }

    /// Puts a new object at `rel` (`If-None-Match: *`), sealed when the
    /// tier has keys.
    pub(crate) fn put_object(&self, rel: &str, plain: Vec<u8>) -> Result<(), S3Error> {
        let body = match &self.keys {
            Some(k) => k.seal_object(rel, &plain),
            None => plain,
        };
        self.client.put_new(rel, body)
    }

    /// The plain bytes of an object read at `rel`: opened when sealed;
    /// refused when sealed and the tier has no keys ([`StoreError::Keys`]),
    /// or not sealed and it has (unless `s3.accept-plaintext`; as damage).
    pub(crate) fn open(&self, rel: &str, body: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        match (&self.keys, is_sealed(&body)) {
            (Some(k), true) => k.open_object(rel, body),
            (None, true) => Err(needs_keys(&format!("s3 {rel}"))),
            (Some(_), false) if !self.cfg.accept_plaintext => Err(StoreError::malformed(
                format!("s3 {rel}"),
                "not encrypted, but s3.encryption-keys is set: refused, as anyone who can write the bucket could have put it there (a \
                 tier written before encryption was turned on needs s3.accept-plaintext = true)",
            )),
            _ => Ok(body),
        }
    }

    /// Reads and opens the object at `rel`.
    pub(crate) fn get_object(&self, rel: &str) -> Result<Vec<u8>, StoreError> {
        self.open(rel, self.client.get(rel)?)
    }

    /// Reads and opens the objects at `rels`, in order.
    pub(crate) fn get_objects(&self, rels: &[String]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.client.get_many(rels)?.into_iter().zip(rels).map(|(body, rel)| self.open(rel, body)).collect()
    }

    /// An empty pack, sealing its values when the tier has keys.
    pub(crate) fn new_pack(&self) -> PackBuilder {
        PackBuilder::new(self.keys.as_ref().map(Keyring::pack_sealer))
    }

    /// Chunk `e` from the bytes `stored` at its place in `pack`: opened
    /// when sealed, then decoded; whole content is checked against its id,
    /// a delta is checked once its base is read ([`fetch_located`](Self::fetch_located)).
    pub(crate) fn held_value(&self, pack: &ChunkId, e: &PackEntry, stored: &[u8]) -> Result<HeldValue, StoreError> {
        let opened;
        let value = match (&e.seal, &self.keys) {
            (None, _) => stored,
            (Some(seal), Some(k)) => {
                opened = k.open_value(&pack.to_hex(), seal, e.offset, stored)?;
                &opened
            }
            (Some(_), None) => return Err(needs_keys(&format!("s3 pack {pack}"))),
        };
        decode_held_value(&e.id, value).map_err(|_| mismatch(pack, &e.id))
    }

    /// Guests with epochs in S3.
    ///
    /// # Errors
    /// As S3 answers.
    pub fn guests(&self) -> Result<Vec<GuestId>, StoreError> {
        // One entry per guest, not per segment.
        // And epoch objects, written before segments.
        let mut g: Vec<GuestId> = [self.client.list_folders("segments/")?, self.client.list_folders("epochs/")?]
            .iter()
            .flatten()
            .filter_map(|p| p.split('/').nth(1).and_then(|h| u64::from_str_radix(h, 16).ok()))
            .map(GuestId)
            .collect();
        g.sort_unstable();
        g.dedup();
        Ok(g)
    }

    /// `guest`'s segments, by first epoch.
    ///
    /// # Errors
    /// As S3 answers.
    pub fn segment_keys(&self, guest: GuestId) -> Result<Vec<SegmentKey>, StoreError> {
        // Epoch objects from before segments read as one-epoch segments.
        let mut listed = self.client.list(&format::segments_prefix(guest))?;
        listed.extend(self.client.list(&format::legacy_epochs_prefix(guest))?);
        let mut v: Vec<SegmentKey> = listed
            .into_iter()
            .filter_map(|l| format::segment_first(&l.key).map(|first| SegmentKey { key: l.key, first, last: EpochId(u64::MAX) }))
            .collect();
        v.sort_by(|a, b| (a.first, &a.key).cmp(&(b.first, &b.key)));
        // Each span ends where the next distinct one starts (a segment
        // being rewritten by thinning shares its first epoch).
        let mut next = EpochId(u64::MAX);
        for i in (0..v.len()).rev() {
            if i + 1 < v.len() && v[i + 1].first != v[i].first {
                next = EpochId(v[i + 1].first.0 - 1);
            }
            v[i].last = next;
        }
        Ok(v)
    }

    /// Epochs of `guest` with a checkpoint, ascending.
    ///
    /// # Errors
    /// As S3 answers.
    pub fn checkpoint_epochs(&self, guest: GuestId) -> Result<Vec<EpochId>, StoreError> {
        let mut v: Vec<EpochId> =
            self.client.list(&format::checkpoints_prefix(guest))?.iter().filter_map(|l| format::checkpoint_epoch(&l.key)).collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Reads one segment, checking it against its key and each page list
    /// against its manifest.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming the object; S3 errors.
    pub fn segment(&self, guest: GuestId, key: &str) -> Result<SegmentObject, StoreError> {
        check_segment(key, guest, &self.get_object(key)?)
    }

    /// The newest epoch of `guest` paused at or before `time_unix_ns`
    /// (times taken as rising with epochs, as the local lookup does),
    /// found by bisecting the segments: about log2(segments) + 1 read.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming a damaged segment; S3 errors.
    pub fn epoch_at(&self, guest: GuestId, time_unix_ns: u64) -> Result<Option<EpochId>, StoreError> {
        let segments = self.segment_keys(guest)?;
        let dropped = self.bridge_keys(guest)?;
        // The last segment whose first epoch is at or before the time
        // (kept as read, so it is not read again below).
        let (mut lo, mut hi) = (0, segments.len());
        let mut last_at = None;
        while lo < hi {
            let mid = (lo + hi) / 2;
            let seg = self.segment(guest, &segments[mid].key)?;
            if seg.epochs.first().is_some_and(|(m, _)| m.time_unix_ns <= time_unix_ns) {
                lo = mid + 1;
                last_at = Some(seg);
            } else {
                hi = mid;
            }
        }
        // In it, the newest kept epoch at or before the time; before it,
        // when thinning left none there.
        for i in (0..lo).rev() {
            let seg = match last_at.take() {
                Some(seg) if i + 1 == lo => seg,
                _ => self.segment(guest, &segments[i].key)?,
            };
            let at = seg.epochs.iter().take_while(|(m, _)| m.time_unix_ns <= time_unix_ns).filter(|(m, _)| !dropped.spans(m.epoch)).last();
            if let Some((m, _)) = at {
                return Ok(Some(m.epoch));
            }
        }
        Ok(None)
    }

    /// The newest `n` kept manifests of `guest`, oldest first, read from
    /// the newest segments back (about n / epochs-per-segment + 1 read),
    /// with the chain walked between them.
    ///
    /// # Errors
    /// [`StoreError::NoGuest`] when S3 holds nothing of it;
    /// [`StoreError::Corrupt`] naming a damaged segment or broken link.
    pub fn last_manifests(&self, guest: GuestId, n: usize) -> Result<Vec<Manifest>, StoreError> {
        let segments = self.segment_keys(guest)?;
        if segments.is_empty() {
            return Err(StoreError::NoGuest(guest));
        }
        let dropped = self.bridge_keys(guest)?;
        let mut found: BTreeMap<EpochId, Manifest> = BTreeMap::new();
        for s in segments.iter().rev() {
            // Spans are disjoint: an older segment holds only older epochs.
            if found.len() >= n {
                break;
            }
            for (m, _) in self.segment(guest, &s.key)?.epochs {
                if !dropped.spans(m.epoch) {
                    found.insert(m.epoch, m);
                }
            }
        }
        let mut out: Vec<Manifest> = found.into_values().collect();
        out.drain(..out.len().saturating_sub(n));
        if let Some(first) = out.first() {
            let bridges: Vec<Bridge> = self.read_bridges(&dropped, first.epoch)?.iter().map(|b| b.bridge).collect();
            let mut walk = ChainWalk::after(&bridges, first);
            for m in &out[1..] {
                walk.step(m)
                    .map_err(|why| StoreError::malformed(format!("s3 {guest} epoch {} manifest chain", m.epoch), why.to_string()))?;
            }
        }
        Ok(out)
    }

    /// Every thinning bridge of `guest` ending at or after `from`, oldest
    /// first.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming the object; S3 errors.
    pub fn bridges(&self, guest: GuestId, from: EpochId) -> Result<Vec<BridgeObject>, StoreError> {
        self.read_bridges(&self.bridge_keys(guest)?, from)
    }

    /// Lists `guest`'s bridges (keys and spans, no bodies).
    fn bridge_keys(&self, guest: GuestId) -> Result<BridgeKeys, StoreError> {
        let listed = self.client.list(&format::bridges_prefix(guest))?;
        Ok(BridgeKeys(
            listed
                .into_iter()
                .map(|l| {
                    let span = format::bridge_span(&l.key);
                    (l.key, span)
                })
                .collect(),
        ))
    }

    /// Reads the bridges of `keys` ending at or after `from` (and any whose
    /// key names no span, so that its damage is reported), oldest first.
    fn read_bridges(&self, keys: &BridgeKeys, from: EpochId) -> Result<Vec<BridgeObject>, StoreError> {
        let keys: Vec<String> =
            keys.0.iter().filter(|(_, span)| span.is_none_or(|(_, last)| last >= from)).map(|(key, _)| key.clone()).collect();
        let mut out = Vec::with_capacity(keys.len());
        for (key, body) in keys.iter().zip(self.get_objects(&keys)?) {
            out.push(BridgeObject::decode(&body).map_err(|e| e.at(format!("s3 {key}")))?);
        }
        out.sort_by_key(|b| b.bridge.first);
        Ok(out)
    }

    /// The newest checkpoint of `guest` at or before `at` whose epoch is
    /// kept; a damaged one is passed over (it only saves reading), with a
    /// warning.
    fn base(&self, guest: GuestId, at: EpochId, dropped: &BridgeKeys) -> Result<Option<CheckpointObject>, StoreError> {
        for e in self.checkpoint_epochs(guest)?.into_iter().rev().filter(|e| *e <= at && !dropped.spans(*e)) {
            let key = format::checkpoint_key(guest, e);
            match self.get_object(&key).and_then(|b| CheckpointObject::decode(&b)) {
                Ok(c) if c.manifest.guest == guest && c.manifest.epoch == e => return Ok(Some(c)),
                Ok(_) => tracing::warn!(key, "passing over a checkpoint that names another epoch"),
                Err(StoreError::S3(S3Error::NotFound(_))) => {}
                Err(err) => {
                    if !matches!(err, StoreError::Corrupt { .. }) {
                        return Err(err);
                    }
                    tracing::warn!(key, error = %err, "passing over a damaged checkpoint");
                }
            }
        }
        Ok(None)
    }

    /// The part of a guest's history that `reach` needs, with every
    /// object checked and the manifest chain walked across bridges (from
    /// the checkpoint it starts at, whose table hashes to its manifest's
    /// memory root); `progress(done, total)` counts segments.
    ///
    /// # Errors
    /// [`StoreError::NoGuest`] when S3 holds nothing of it,
    /// [`StoreError::Corrupt`] naming the damaged object or broken link,
    /// or two segments that disagree about an epoch.
    pub fn history(&self, guest: GuestId, reach: Reach, progress: &mut dyn FnMut(u64, u64)) -> Result<S3History, StoreError> {
        let segments = self.segment_keys(guest)?;
        if segments.is_empty() {
            return Err(StoreError::NoGuest(guest));
        }
        let dropped = self.bridge_keys(guest)?;
        let base = match reach.from {
            Some(from) => self.base(guest, from.min(reach.upto()), &dropped)?,
            None => None,
        };
        let lo = base.as_ref().map_or(EpochId(0), |c| c.manifest.epoch);
        let bridges = self.read_bridges(&dropped, lo)?;
        let wanted: Vec<&SegmentKey> = segments.iter().filter(|s| s.last >= lo && s.first <= reach.upto()).collect();
        let mut by_epoch: BTreeMap<EpochId, (S3Epoch, usize)> = BTreeMap::new();
        let mut packs: BTreeSet<ChunkId> = base.iter().flat_map(|c| c.packs.iter().copied()).collect();
        let mut read = 0;
        for batch in wanted.chunks(64) {
            let keys: Vec<String> = batch.iter().map(|s| s.key.clone()).collect();
            for (i, body) in self.get_objects(&keys)?.into_iter().enumerate() {
                let at = read + i;
                let seg = check_segment(&wanted[at].key, guest, &body)?;
                packs.extend(seg.packs);
                for (manifest, pages) in seg.epochs {
                    let e = manifest.epoch;
                    if e < lo || e > reach.upto() || bridges.iter().any(|b| b.bridge.spans(e)) {
                        continue;
                    }
                    match by_epoch.get(&e) {
                        Some((have, _)) if have.manifest == manifest && have.pages == pages => {}
                        Some((_, other)) => {
                            return Err(StoreError::malformed(
                                format!("s3 {} and {}", wanted[*other].key, wanted[at].key),
                                format!("they disagree about epoch {e} (two writers?)"),
                            ))
                        }
                        None => {
                            by_epoch.insert(e, (S3Epoch { manifest, pages }, at));
                        }
                    }
                }
            }
            read += batch.len();
            progress(read as u64, wanted.len() as u64);
        }
        let epochs: Vec<S3Epoch> = by_epoch.into_values().map(|(e, _)| e).collect();
        if epochs.is_empty() {
            return Err(StoreError::NoGuest(guest));
        }
        let links: Vec<Bridge> = bridges.iter().map(|b| b.bridge).collect();
        let mut walk = ChainWalk::new(&links);
        let mut rest = &epochs[..];
        if let Some(c) = &base {
            if epochs[0].manifest != c.manifest {
                return Err(StoreError::malformed(
                    format!("s3 {}", c.key()),
                    "its manifest is not the one the segments hold for its epoch",
                ));
            }
            walk = ChainWalk::after(&links, &c.manifest);
            rest = &epochs[1..];
        }
        for e in rest {
            walk.step(&e.manifest)
                .map_err(|why| StoreError::malformed(format!("s3 {guest} epoch {} manifest chain", e.manifest.epoch), why.to_string()))?;
        }
        let objects_read = read as u64 + u64::from(base.is_some()) + bridges.len() as u64;
        Ok(S3History { base, epochs, bridges, packs, objects_read })
    }

    /// Every pack index: chunk id → (pack, entry).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming a damaged index; S3 errors.
    pub fn chunk_locations(&self) -> Result<ChunkLocations, StoreError> {
        let keys: Vec<String> = self.client.list("index/")?.into_iter().map(|l| l.key).collect();
        let mut out = HashMap::new();
        for batch in keys.chunks(256) {
            for (key, body) in batch.iter().zip(self.get_objects(batch)?) {
                let ix = format::decode_index(&body).map_err(|e| e.at(format!("s3 {key}")))?;
                for e in ix.entries {
                    out.insert(e.id, (ix.pack, e));
                }
            }
        }
        Ok(out)
    }

    /// Every pack index, for a chunk that is not where the history says
    /// (repacked since).
    ///
    /// # Errors
    /// As [`chunk_locations`](Self::chunk_locations).
    pub fn relocate(&self) -> Result<ChunkLocations, StoreError> {
        tracing::info!("a chunk is not where the history says (repacked since): reading every pack index");
        self.chunk_locations()
    }

    /// Every chunk in the indexes of `packs`; `None` when one of them is
    /// gone (repacked since).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming a damaged index; S3 errors.
    pub fn pack_locations(&self, packs: &BTreeSet<ChunkId>) -> Result<Option<ChunkLocations>, StoreError> {
        let keys: Vec<String> = packs.iter().map(format::index_key).collect();
        let mut out = HashMap::new();
        for batch in keys.chunks(4 * remus_s3::PARALLEL) {
            let bodies = match self.get_objects(batch) {
                Ok(b) => b,
                Err(StoreError::S3(S3Error::NotFound(_))) => return Ok(None),
                Err(e) => return Err(e),
            };
            for (key, body) in batch.iter().zip(bodies) {
                let ix = format::decode_index(&body).map_err(|e| e.at(format!("s3 {key}")))?;
                out.extend(ix.entries.into_iter().map(|e| (e.id, (ix.pack, e))));
            }
        }
        Ok(Some(out))
    }

    /// Fetches the chunks in `wanted` by ranged reads of the packs that
    /// hold them (memory: at most 64 MiB of ranges, or one range),
    /// verifying each against its id, and hands each to `f`; locations
    /// from every pack index.
    ///
    /// # Errors
    /// [`StoreError::ChunkMissing`] when no pack holds one,
    /// [`StoreError::Corrupt`] naming pack and chunk when one is damaged,
    /// S3 errors, or what `f` returns.
    pub fn fetch_chunks(
        &self,
        wanted: impl IntoIterator<Item = ChunkId>,
        f: impl FnMut(ChunkId, Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.fetch_located(&self.chunk_locations()?, wanted, f)
    }

    /// As [`fetch_chunks`](Self::fetch_chunks), with the chunk locations
    /// already read.
    ///
    /// # Errors
    /// As [`fetch_chunks`](Self::fetch_chunks).
    pub fn fetch_located(
        &self,
        locs: &ChunkLocations,
        wanted: impl IntoIterator<Item = ChunkId>,
        mut f: impl FnMut(ChunkId, Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.fetch_at_depth(locs, wanted.into_iter().collect(), 0, &mut Passing::default(), &mut f)
    }

    /// Fetches `wanted`, `depth` deltas down a chain: the whole ones go to
    /// `f` as they arrive; the deltas (their XOR frames kept, a few
    /// hundred bytes each) once their bases are fetched the same way, one
    /// level down, each base's content streamed past the deltas over it
    /// (from the ranges read `passing` when they hold it).
    fn fetch_at_depth(
        &self,
        locs: &ChunkLocations,
        wanted: Vec<ChunkId>,
        depth: u8,
        passing: &mut Passing,
        f: &mut dyn FnMut(ChunkId, Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut over: HashMap<ChunkId, Vec<(ChunkId, ChunkId, Vec<u8>)>> = HashMap::new();
        self.fetch_values(locs, wanted, passing, &mut |pack, id, value| match value {
            HeldValue::Whole(content) => f(id, content),
            HeldValue::Delta { base, xor } => {
                over.entry(base).or_default().push((pack, id, xor));
                Ok(())
            }
        })?;
        if over.is_empty() {
            return Ok(());
        }
        if depth >= MAX_DELTA_DEPTH {
            let (pack, id, _) = &over.values().next().expect("not empty")[0];
            return Err(StoreError::malformed(
                format!("s3 pack {pack}"),
                format!("chunk {id} is a delta more than {MAX_DELTA_DEPTH} deep"),
            ));
        }
        let bases: Vec<ChunkId> = over.keys().copied().collect();
        self.fetch_at_depth(locs, bases, depth + 1, passing, &mut |base, content| {
            for (pack, id, xor) in over.remove(&base).unwrap_or_default() {
                f(id, undo_xor(&id, &content, &xor).map_err(|_| mismatch(&pack, &id))?)?;
            }
            Ok(())
        })
    }

    /// The values of `wanted`, each handed to `f` with its pack as
    /// [`held_value`](Self::held_value) decodes it: from a range `passing`
    /// kept, else by ranged reads (memory: at most 64 MiB of ranges, or
    /// one range, in flight), whose bodies `passing` then keeps.
    fn fetch_values(
        &self,
        locs: &ChunkLocations,
        wanted: Vec<ChunkId>,
        passing: &mut Passing,
        f: &mut dyn FnMut(ChunkId, ChunkId, HeldValue) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut by_pack: BTreeMap<ChunkId, Vec<PackEntry>> = BTreeMap::new();
        for id in wanted {
            let (pack, e) = locs.get(&id).ok_or(StoreError::ChunkMissing(id))?;
            match passing.find(pack, e) {
                Some(value) => f(*pack, id, self.held_value(pack, e, value)?)?,
                None => by_pack.entry(*pack).or_default().push(*e),
            }
        }
        // Ranged reads of the parts of each pack that hold wanted chunks,
        // ranges closer than RANGE_GAP read as one: a chunk or two from a
        // pack costs their bytes, not the pack's.
        let mut reads: Vec<(ChunkId, u64, u64, Vec<PackEntry>)> = Vec::new();
        for (pack, mut entries) in by_pack {
            entries.sort_by_key(|e| e.offset);
            for e in entries {
                let end = e.offset + u64::from(e.len);
                match reads.last_mut() {
                    Some((p, _, read_end, es)) if *p == pack && e.offset <= read_end.saturating_add(RANGE_GAP) => {
                        *read_end = (*read_end).max(end);
                        es.push(e);
                    }
                    _ => reads.push((pack, e.offset, end, vec![e])),
                }
            }
        }
        let mut next = 0;
        while next < reads.len() {
            // A batch: up to 2 × PARALLEL reads and FETCH_BYTES in memory (at least one read).
            let mut upto = next + 1;
            let mut bytes = reads[next].2 - reads[next].1;
            while upto < reads.len() && upto - next < 2 * remus_s3::PARALLEL && bytes + (reads[upto].2 - reads[upto].1) <= FETCH_BYTES {
                bytes += reads[upto].2 - reads[upto].1;
                upto += 1;
            }
            let batch = &reads[next..upto];
            let ranges: Vec<(String, u64, u64)> =
                batch.iter().map(|(p, start, end, _)| (format::pack_key(p), *start, end - start)).collect();
            for ((pack, start, _, entries), body) in batch.iter().zip(self.client.get_ranges(&ranges)?) {
                for e in entries {
                    let at = (e.offset - start) as usize;
                    let value = body
                        .get(at..at + e.len as usize)
                        .ok_or_else(|| StoreError::malformed(format!("s3 pack {pack}"), format!("truncated at chunk {}", e.id)))?;
                    f(*pack, e.id, self.held_value(pack, e, value)?)?;
                }
                passing.keep(*pack, *start, body);
            }
            next = upto;
        }
        Ok(())
    }
}

/// The ranges a fetch has read, kept (the newest, up to [`PASSING_BYTES`])
/// so that the bases of its deltas, read a level down, come from them
/// when they lie there: a range merged across gaps holds many chunks
/// besides those it was read for, and an older version of a page is often
/// among them.
#[derive(Default)]
struct Passing {
    ranges: VecDeque<(ChunkId, u64, Vec<u8>)>,
    bytes: usize,
}

impl Passing {
    /// The bytes of entry `e` of `pack`, if a kept range holds them.
    fn find(&self, pack: &ChunkId, e: &PackEntry) -> Option<&[u8]> {
        self.ranges.iter().find_map(|(p, start, body)| {
            let at = usize::try_from(e.offset.checked_sub(*start)?).ok()?;
            (p == pack).then(|| body.get(at..at + e.len as usize)).flatten()
        })
    }

    fn keep(&mut self, pack: ChunkId, start: u64, body: Vec<u8>) {
        self.bytes += body.len();
        self.ranges.push_back((pack, start, body));
        while self.bytes > PASSING_BYTES {
            let Some((_, _, old)) = self.ranges.pop_front() else { break };
            self.bytes -= old.len();
        }
    }
}

/// Bytes of ranges a fetch keeps for the bases of its deltas, at most.
const PASSING_BYTES: usize = 256 << 20;

/// The error for chunk `id` of `pack` whose bytes do not give its content.
fn mismatch(pack: &ChunkId, id: &ChunkId) -> StoreError {
    StoreError::malformed(format!("s3 pack {pack}"), format!("chunk {id} does not match its hash"))
}

/// The error for a sealed `object` read by a tier without keys.
fn needs_keys(object: &str) -> StoreError {
    StoreError::Keys(format!("{object} is encrypted: set s3.encryption-keys to the key file that encrypted it"))
}

/// Where S3 holds chunks: chunk id → (pack, its entry in the pack's index).
pub type ChunkLocations = HashMap<ChunkId, (ChunkId, PackEntry)>;

/// Parts of a pack closer than this are read as one range.
const RANGE_GAP: u64 = 1 << 20;

/// Bytes of pack ranges a fetch holds at once at most (beyond one range).
const FETCH_BYTES: u64 = 64 << 20;

impl S3History {
    /// The kept epochs' manifests, oldest first.
    pub fn manifests(&self) -> impl Iterator<Item = &Manifest> {
        self.epochs.iter().map(|e| &e.manifest)
    }

    /// The newest kept epoch.
    #[must_use]
    pub fn latest(&self) -> Option<&S3Epoch> {
        self.epochs.last()
    }

    /// The kept epoch `epoch`.
    #[must_use]
    pub fn get(&self, epoch: EpochId) -> Option<&S3Epoch> {
        self.epochs.binary_search_by_key(&epoch, |e| e.manifest.epoch).ok().map(|i| &self.epochs[i])
    }

    /// The kept epoch nearest `epoch`: the first at or after it when
    /// `after`, else the last at or before it.
    #[must_use]
    pub fn kept_near(&self, epoch: EpochId, after: bool) -> Option<EpochId> {
        let i = self.epochs.partition_point(|e| e.manifest.epoch < epoch);
        if after {
            self.epochs.get(i).map(|e| e.manifest.epoch)
        } else {
            match self.epochs.get(i) {
                Some(e) if e.manifest.epoch == epoch => Some(epoch),
                _ => i.checked_sub(1).map(|j| self.epochs[j].manifest.epoch),
            }
        }
    }

    /// The newest kept epoch paused at or before `time_unix_ns`.
    #[must_use]
    pub fn at(&self, time_unix_ns: u64) -> Option<&S3Epoch> {
        self.epochs.iter().take_while(|e| e.manifest.time_unix_ns <= time_unix_ns).last()
    }

    /// Every page written at or before `epoch`, with its newest version
    /// at or before it (pages never written are zero).
    /// `epoch` must be one this history read (at or after its base).
    #[must_use]
    pub fn page_table(&self, epoch: EpochId) -> BTreeMap<Pfn, ChunkId> {
        let mut versions: BTreeMap<Pfn, (EpochId, ChunkId)> = BTreeMap::new();
        if let Some(c) = &self.base {
            debug_assert!(epoch >= c.manifest.epoch, "a page table before the history's base");
            versions.extend(c.pages.iter().map(|(pfn, id)| (*pfn, (c.manifest.epoch, *id))));
        }
        let lo = self.base.as_ref().map_or(EpochId(0), |c| c.manifest.epoch);
        let mut put = |pfn: Pfn, e: EpochId, id: ChunkId| {
            if e <= epoch && versions.get(&pfn).is_none_or(|(have, _)| *have < e) {
                versions.insert(pfn, (e, id));
            }
        };
        for ep in &self.epochs {
            for (pfn, id) in &ep.pages {
                put(*pfn, ep.manifest.epoch, *id);
            }
        }
        for b in &self.bridges {
            for (pfn, e, id) in b.pages.iter().filter(|(_, e, _)| *e > lo) {
                put(*pfn, *e, *id);
            }
        }
        versions.into_iter().map(|(p, (_, id))| (p, id)).collect()
    }
}

/// Decodes a segment and checks it against its key, its guest, and each
/// epoch's page list against its manifest.
pub(crate) fn check_segment(key: &str, guest: GuestId, body: &[u8]) -> Result<SegmentObject, StoreError> {
    let seg = format::decode_listed(key, body).map_err(|e| e.at(format!("s3 {key}")))?;
    if seg.guest != guest || !seg.is_at(key) {
        return Err(StoreError::malformed(format!("s3 {key}"), "the segment names another guest or span"));
    }
    for (m, pages) in &seg.epochs {
        if !m.names_pages(pages) {
            return Err(StoreError::malformed(
                format!("s3 {key}"),
                format!("the page list of epoch {} does not match its manifest", m.epoch),
            ));
        }
    }
    Ok(seg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_range_gives_exactly_the_entries_wholly_inside_it_of_its_own_pack() {
        let (a, b) = (ChunkId([1; 32]), ChunkId([2; 32]));
        let mut passing = Passing::default();
        passing.keep(a, 100, (0..50).collect());
        let at = |offset: u64, len: u32| PackEntry { id: ChunkId([9; 32]), offset, len, seal: None };
        assert_eq!(passing.find(&a, &at(120, 10)), Some(&(20..30).collect::<Vec<u8>>()[..]));
        assert_eq!(passing.find(&a, &at(100, 50)).map(<[u8]>::len), Some(50));
        assert_eq!(passing.find(&a, &at(140, 20)), None, "runs past the range");
        assert_eq!(passing.find(&a, &at(90, 20)), None, "starts before it");
        assert_eq!(passing.find(&b, &at(120, 10)), None, "another pack");
        passing.keep(b, 0, vec![7; 8]);
        assert_eq!(passing.find(&b, &at(4, 4)), Some(&[7u8; 4][..]));
        assert_eq!(passing.bytes, 58);
    }
}
