//! Page encodings: how one dirty page crosses the wire.
//!
//! Record layout (little-endian):
//! ```text
//! pfn: u64 | kind: u8 | body
//!   kind 0 Zero      body: -                      (the all-zero page)
//!   kind 1 Ref       body: hash[32]               (a page the backup holds)
//!   kind 2 Xor       body: hash[32] base[32] len:u32 zstd(page ^ base)[len]
//!   kind 3 RawZstd   body: hash[32] len:u32 zstd(page)[len]
//!   kind 4 RawPlain  body: hash[32] page[4096]    (incompressible)
//! ```
//! `hash` is the blake3 of the page; the receiver re-derives it from the
//! decoded bytes and refuses a mismatch. Decoding is bounded: a
//! decompressed page must be exactly 4096 bytes.

use std::sync::Arc;

use parking_lot::Mutex;
use remus_types::{content_id, page_id, zero_page_hash, BoundedMap, ChunkId, EpochId, Pfn, PAGE_SIZE};

use crate::codec::{Reader, Writer};
use crate::error::DecodeError;

/// How one page is carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageEncoding {
    /// The all-zero page.
    Zero,
    /// A page whose content the backup already holds, named by its hash.
    Ref,
    /// XOR against a page the backup holds, zstd-compressed.
    Xor {
        /// Hash of the base page.
        base: ChunkId,
        /// zstd frame of `page ^ base`.
        delta: Vec<u8>,
    },
    /// The page, zstd-compressed.
    RawZstd(Vec<u8>),
    /// The page as is (it did not compress).
    RawPlain(Vec<u8>),
}

/// One dirty page on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRecord {
    /// Guest page number.
    pub pfn: Pfn,
    /// blake3 of the page content (zero hash for `Zero`).
    pub hash: ChunkId,
    /// Its encoding.
    pub encoding: PageEncoding,
}

impl PageRecord {
    /// Appends the record to `w`.
    pub fn encode(&self, w: &mut Writer) {
        w.u64(self.pfn.0);
        match &self.encoding {
            PageEncoding::Zero => w.u8(0),
            PageEncoding::Ref => {
                w.u8(1);
                w.bytes(&self.hash.0);
            }
            PageEncoding::Xor { base, delta } => {
                w.u8(2);
                w.bytes(&self.hash.0);
                w.bytes(&base.0);
                w.blob(delta);
            }
            PageEncoding::RawZstd(z) => {
                w.u8(3);
                w.bytes(&self.hash.0);
                w.blob(z);
            }
            PageEncoding::RawPlain(p) => {
                w.u8(4);
                w.bytes(&self.hash.0);
                w.bytes(p);
            }
        }
    }

    /// Bytes this record takes on the wire.
    #[must_use]
    pub fn wire_len(&self) -> usize {
        9 + match &self.encoding {
            PageEncoding::Zero => 0,
            PageEncoding::Ref => 32,
            PageEncoding::Xor { delta, .. } => 68 + delta.len(),
            PageEncoding::RawZstd(z) => 36 + z.len(),
            PageEncoding::RawPlain(p) => 32 + p.len(),
        }
    }

    /// Reads one record.
    ///
    /// # Errors
    /// [`DecodeError`] on truncation, an unknown kind or an oversized blob.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let pfn = Pfn(r.u64()?);
        let kind = r.u8()?;
        let (hash, encoding) = match kind {
            0 => (zero_page_hash(), PageEncoding::Zero),
            1 => (r.hash()?, PageEncoding::Ref),
            2 => {
                let hash = r.hash()?;
                let base = r.hash()?;
                (hash, PageEncoding::Xor { base, delta: r.blob(PAGE_SIZE * 2)?.to_vec() })
            }
            3 => {
                let hash = r.hash()?;
                (hash, PageEncoding::RawZstd(r.blob(PAGE_SIZE * 2)?.to_vec()))
            }
            4 => {
                let hash = r.hash()?;
                (hash, PageEncoding::RawPlain(r.take(PAGE_SIZE)?.to_vec()))
            }
            k => return Err(DecodeError::UnknownKind { what: "page encoding", kind: k }),
        };
        Ok(Self { pfn, hash, encoding })
    }

    /// Rebuilds the page content. `base` looks up a page the receiver
    /// holds by hash (needed for `Ref` and `Xor`).
    ///
    /// # Errors
    /// [`DecodeError::MissingBase`] when `base` does not know a referenced
    /// page, [`DecodeError::Corrupt`] when decompression fails or yields the
    /// wrong size, [`DecodeError::HashMismatch`] when the result does not
    /// hash to `hash`.
    pub fn decode_page(&self, base: impl FnOnce(&ChunkId) -> Option<Vec<u8>>) -> Result<Vec<u8>, DecodeError> {
        let page = match &self.encoding {
            PageEncoding::Zero => return Ok(vec![0u8; PAGE_SIZE]),
            PageEncoding::Ref => return base(&self.hash).ok_or(DecodeError::MissingBase(self.hash)),
            PageEncoding::Xor { base: b, delta } => {
                let mut page = base(b).ok_or(DecodeError::MissingBase(*b))?;
                let d = decompress_page(delta)?;
                if page.len() != PAGE_SIZE {
                    return Err(DecodeError::Corrupt("base page has the wrong size"));
                }
                xor_into(&mut page, &d);
                page
            }
            PageEncoding::RawZstd(z) => decompress_page(z)?,
            PageEncoding::RawPlain(p) => p.clone(),
        };
        if content_id(&page) != self.hash {
            return Err(DecodeError::HashMismatch { pfn: self.pfn.0 });
        }
        Ok(page)
    }
}

/// Decompresses a zstd frame that must hold exactly one page.
///
/// # Errors
/// [`DecodeError::Corrupt`] when it is not a valid frame of 4096 bytes.
pub fn decompress_page(z: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = vec![0u8; PAGE_SIZE];
    let n = remus_types::zstd_decompress_into(z, &mut out).map_err(|_| DecodeError::Corrupt("bad zstd frame"))?;
    if n != PAGE_SIZE {
        return Err(DecodeError::Corrupt("decompressed page is not 4096 bytes"));
    }
    Ok(out)
}

/// A page sent whole: zstd when that saves more than a record's
/// overhead, else plain (at once when its bytes look uniformly random).
fn compress_page(z: &mut zstd::bulk::Compressor<'_>, page: &[u8]) -> PageEncoding {
    if looks_random(page) {
        return PageEncoding::RawPlain(page.to_vec());
    }
    match z.compress(page) {
        Ok(c) if c.len() + 64 < PAGE_SIZE => PageEncoding::RawZstd(c),
        _ => PageEncoding::RawPlain(page.to_vec()),
    }
}

/// Every 17th byte of `page` (241 samples; 17 is prime to every power
/// of two, so no word or struct layout aliases the samples) spread over
/// the 256 byte values as evenly as random bytes spread: their collision
/// count (the sum of squared counts) is about n + n²/256 ≈ 468 for random
/// bytes and at least twice that for anything an entropy coder shrinks
/// (base64 text: ~1140; English-like text: thousands). Costs about a
/// twentieth of trying zstd on the page. A page of random bytes repeated
/// within itself passes for random and goes plain: the price of not
/// trying.
fn looks_random(page: &[u8]) -> bool {
    const LIMIT: u32 = 960;
    let mut counts = [0u8; 256];
    for b in page.iter().step_by(17) {
        let c = &mut counts[usize::from(*b)];
        *c = c.saturating_add(1);
    }
    let mut collisions = 0u32;
    for c in counts {
        collisions += u32::from(c) * u32::from(c);
        if collisions >= LIMIT {
            return false;
        }
    }
    true
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Tally of encodings chosen, for the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodingMix {
    /// Zero pages.
    pub zero: u64,
    /// Pages sent as references.
    pub reference: u64,
    /// Pages sent as XOR deltas.
    pub xor: u64,
    /// Pages sent zstd-compressed.
    pub raw_zstd: u64,
    /// Pages sent plain.
    pub raw_plain: u64,
}

impl EncodingMix {
    /// Counts one record.
    pub fn add(&mut self, e: &PageEncoding) {
        match e {
            PageEncoding::Zero => self.zero += 1,
            PageEncoding::Ref => self.reference += 1,
            PageEncoding::Xor { .. } => self.xor += 1,
            PageEncoding::RawZstd(_) => self.raw_zstd += 1,
            PageEncoding::RawPlain(_) => self.raw_plain += 1,
        }
    }

    /// Adds another tally.
    pub fn merge(&mut self, o: &Self) {
        self.zero += o.zero;
        self.reference += o.reference;
        self.xor += o.xor;
        self.raw_zstd += o.raw_zstd;
        self.raw_plain += o.raw_plain;
    }

    /// Total pages counted.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.zero + self.reference + self.xor + self.raw_zstd + self.raw_plain
    }
}

/// Tuning of the sender's encoder.
#[derive(Debug, Clone, Copy)]
pub struct EncoderConfig {
    /// zstd level for page content (default 1).
    pub zstd_level: i32,
    /// Hashes remembered as held by the backup (default 1 Mi).
    pub held_capacity: usize,
    /// Previous page contents kept for XOR deltas (default 16 Ki pages).
    pub shadow_capacity: usize,
    /// Threads that compress a large epoch's pages side by side (default:
    /// the machine's cores, at most 4; 1 for none).
    pub threads: usize,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self { zstd_level: 1, held_capacity: 1 << 20, shadow_capacity: 16 << 10, threads: cores.min(4) }
    }
}

/// Pages a call must leave to be compressed before they are spread over
/// threads (a first copy or a burst, a slice of it at a time; see
/// `SenderConfig::slice_pages`): far below it, starting threads costs
/// more than it saves; at it, compressing takes tens of milliseconds.
const PARALLEL_PAGES: usize = 1024;

/// Whole-page zstd frames shared by the encoders of one primary's links:
/// a near and a far backup are sent the same epochs and mostly need the
/// same new pages sent whole. Links encode an epoch at the same moment
/// (each on a core), so one goes through its pages first to last and the
/// other last to first, each leaving its frames and taking the other's:
/// they meet in the middle, having compressed each page about once.
/// Bounded: the [`FRAMES`](Self::FRAMES) most recent frames.
#[derive(Clone)]
pub struct SharedFrames(Arc<Mutex<BoundedMap<ChunkId, Arc<[u8]>>>>);

impl SharedFrames {
    /// Frames kept (about 1.3 KiB each for text-like pages: 10 MiB; at 40
    /// Hz and 400 pages sent whole an epoch, half a second of epochs).
    pub const FRAMES: usize = 8 << 10;
}

impl Default for SharedFrames {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(BoundedMap::new(Self::FRAMES))))
    }
}

impl std::fmt::Debug for SharedFrames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedFrames").field("frames", &self.0.lock().len()).finish()
    }
}

/// Sender-side encoder: remembers which hashes the backup holds (bounded)
/// and the last content of recently written pages (bounded), and picks the
/// cheapest encoding for each page.
///
/// Invariant: a hash is in `held` only if a page with that content was
/// sent in an epoch recorded next to it and the backup has not said it
/// deleted it since, so after a reconnect
/// [`forget_after`](Self::forget_after) the committed epoch removes every
/// reference the backup might not hold; [`forget`](Self::forget) removes
/// what the backup's GC deleted.
pub struct PageEncoder {
    held: BoundedMap<ChunkId, EpochId>,
    shadow: BoundedMap<Pfn, (ChunkId, Box<[u8]>)>,
    zstd: zstd::bulk::Compressor<'static>,
    level: i32,
    threads: usize,
    /// Frames shared with other links, and whether this one goes through
    /// an epoch's pages last to first.
    shared: Option<(SharedFrames, bool)>,
}

impl PageEncoder {
    /// A fresh encoder (the backup is assumed to hold nothing).
    ///
    /// # Panics
    /// If zstd cannot create a compression context (out of memory).
    #[must_use]
    pub fn new(cfg: EncoderConfig) -> Self {
        Self {
            held: BoundedMap::new(cfg.held_capacity),
            shadow: BoundedMap::new(cfg.shadow_capacity),
            zstd: zstd::bulk::Compressor::new(cfg.zstd_level).expect("zstd context"),
            level: cfg.zstd_level,
            threads: cfg.threads.max(1),
            shared: None,
        }
    }

    /// Takes pages sent whole from `frames` from now on when another link
    /// compressed them already, and leaves its own there; `backwards`:
    /// goes through an epoch's pages last to first (see [`SharedFrames`]).
    pub fn share_frames(&mut self, frames: SharedFrames, backwards: bool) {
        self.shared = Some((frames, backwards));
    }

    /// Encodes an epoch's pages (`page(i)` written at `pfns[i]`, with
    /// blake3 `hashes[i]`), in order: the records [`encode_hashed`]
    /// (Self::encode_hashed) gives one by one, with the pages that go
    /// whole compressed on several threads when there are many.
    ///
    /// # Panics
    /// If zstd cannot create a compression context (out of memory).
    pub fn encode_pages<'a>(
        &mut self,
        epoch: EpochId,
        pfns: &[Pfn],
        page: impl Fn(usize) -> &'a [u8] + Sync,
        hashes: &[ChunkId],
    ) -> Vec<PageRecord> {
        let mut records = Vec::with_capacity(pfns.len());
        // Every decision in order, as one by one; the pages to compress
        // whole are left for later (their content is the epoch's, not the
        // shadow's, so nothing decided after them changes them).
        let mut whole = Vec::new();
        for (i, (pfn, hash)) in pfns.iter().zip(hashes).enumerate() {
            let encoding = self.decide(epoch, *pfn, page(i), *hash).unwrap_or_else(|| {
                whole.push(i);
                // Filled in below.
                PageEncoding::Zero
            });
            records.push(PageRecord { pfn: *pfn, hash: *hash, encoding });
        }
        if whole.len() < PARALLEL_PAGES || self.threads == 1 {
            let (zstd, shared) = (&mut self.zstd, &self.shared);
            let mut one = |i: usize| {
                let Some((frames, _)) = shared else { return compress_page(zstd, page(i)) };
                if let Some(z) = frames.0.lock().get(&hashes[i]).cloned() {
                    return PageEncoding::RawZstd(z.to_vec());
                }
                let e = compress_page(zstd, page(i));
                if let PageEncoding::RawZstd(z) = &e {
                    frames.0.lock().insert(hashes[i], z.as_slice().into());
                }
                e
            };
            if matches!(shared, Some((_, true))) {
                whole.reverse();
            }
            for i in whole {
                records[i].encoding = one(i);
            }
            return records;
        }
        let per = whole.len().div_ceil(self.threads);
        let level = self.level;
        let done: Vec<Vec<(usize, PageEncoding)>> = std::thread::scope(|s| {
            let workers: Vec<_> = whole
                .chunks(per)
                .map(|jobs| {
                    let page = &page;
                    s.spawn(move || {
                        let mut z = zstd::bulk::Compressor::new(level).expect("zstd context");
                        jobs.iter().map(|&i| (i, compress_page(&mut z, page(i)))).collect()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("a compression thread panicked")).collect()
        });
        for (i, e) in done.into_iter().flatten() {
            records[i].encoding = e;
        }
        records
    }

    /// Encodes `page` (written at `pfn` in `epoch`).
    pub fn encode(&mut self, epoch: EpochId, pfn: Pfn, page: &[u8]) -> PageRecord {
        self.encode_hashed(epoch, pfn, page, page_id(page))
    }

    /// Encodes `page` whose blake3 the caller already computed.
    pub fn encode_hashed(&mut self, epoch: EpochId, pfn: Pfn, page: &[u8], hash: ChunkId) -> PageRecord {
        let encoding = self.decide(epoch, pfn, page, hash).unwrap_or_else(|| compress_page(&mut self.zstd, page));
        PageRecord { pfn, hash, encoding }
    }

    /// The encoding of `page`, or `None` when it goes whole (the caller
    /// compresses it); what is held and the shadow move as for the record.
    fn decide(&mut self, epoch: EpochId, pfn: Pfn, page: &[u8], hash: ChunkId) -> Option<PageEncoding> {
        debug_assert_eq!(page.len(), PAGE_SIZE);
        if hash == zero_page_hash() {
            self.shadow.remove(&pfn);
            return Some(PageEncoding::Zero);
        }
        let encoding = if self.held.contains_key(&hash) {
            Some(PageEncoding::Ref)
        } else {
            let xor = self.xor_delta(pfn, page);
            self.mark_held(hash, epoch);
            xor
        };
        self.remember(pfn, hash, page);
        encoding
    }

    /// After a reconnect: the backup committed everything up to
    /// `committed` and nothing after, so forget hashes first sent later.
    pub fn forget_after(&mut self, committed: EpochId) {
        self.held.retain(|_, e| *e <= committed);
        let held = &self.held;
        self.shadow.retain(|_, (h, _)| held.contains_key(h));
    }

    /// The backup says the guest may name `chunks` there (its Holds, before
    /// the Welcome): count them as held, as sent before anything this run
    /// sent (so no [`forget_after`](Self::forget_after) drops them).
    /// Returns how many were not counted already.
    pub fn assume_held(&mut self, chunks: &[ChunkId]) -> usize {
        let before = self.held.len();
        for c in chunks {
            if !self.held.contains_key(c) {
                self.held.insert(*c, EpochId(0));
            }
        }
        self.held.len() - before
    }

    /// The backup no longer holds `chunks` (its GC deleted them, or it
    /// refused an epoch naming them): never reference them again, nor use
    /// them as XOR bases, until their content is sent anew. Returns how
    /// many of them were counted as held.
    pub fn forget(&mut self, chunks: &[ChunkId]) -> usize {
        let before = self.held.len();
        for c in chunks {
            self.held.remove(c);
        }
        let forgotten = before - self.held.len();
        if forgotten > 0 {
            let held = &self.held;
            self.shadow.retain(|_, (h, _)| held.contains_key(h));
        }
        forgotten
    }

    /// Number of hashes believed held by the backup.
    #[must_use]
    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    fn xor_delta(&mut self, pfn: Pfn, page: &[u8]) -> Option<PageEncoding> {
        let (base, old) = self.shadow.get(&pfn)?;
        if !self.held.contains_key(base) {
            return None;
        }
        // Only worth it for a small change: at most a quarter of the
        // 8-byte words differ (counted as words, and no further than the
        // first one past the quarter).
        let word = |w: &[u8]| u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        let quarter = PAGE_SIZE / 8 / 4;
        if old.chunks_exact(8).zip(page.chunks_exact(8)).filter(|(a, b)| word(a) != word(b)).nth(quarter).is_some() {
            return None;
        }
        let mut delta = old.to_vec();
        xor_into(&mut delta, page);
        let z = self.zstd.compress(&delta).ok()?;
        Some(PageEncoding::Xor { base: *base, delta: z })
    }

    /// Called only for a hash not held yet, so `epoch` is the one that
    /// first sends it (see `forget_after`).
    fn mark_held(&mut self, hash: ChunkId, epoch: EpochId) {
        self.held.insert(hash, epoch);
    }

    fn remember(&mut self, pfn: Pfn, hash: ChunkId, page: &[u8]) {
        match self.shadow.get_mut(&pfn) {
            Some(slot) => {
                slot.0 = hash;
                slot.1.copy_from_slice(page);
            }
            None => {
                self.shadow.insert(pfn, (hash, page.into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, RngCore, SeedableRng};
    use std::collections::HashMap;

    fn round_trip(rec: &PageRecord) -> PageRecord {
        let mut w = Writer::default();
        rec.encode(&mut w);
        let buf = w.into_inner();
        let mut r = Reader::new(&buf);
        let back = PageRecord::decode(&mut r).unwrap();
        assert!(r.is_empty());
        back
    }

    fn page_from(seed: &[u8], fill: u8) -> Vec<u8> {
        let mut p = vec![fill; PAGE_SIZE];
        for (i, b) in seed.iter().enumerate() {
            p[(i * 97) % PAGE_SIZE] = *b;
        }
        p
    }

    proptest! {
        #[test]
        fn every_encoding_round_trips(seed in proptest::collection::vec(any::<u8>(), 0..64), fill in any::<u8>(), edits in proptest::collection::vec((0usize..PAGE_SIZE, any::<u8>()), 1..8)) {
            let mut enc = PageEncoder::new(EncoderConfig::default());
            let mut store: HashMap<ChunkId, Vec<u8>> = HashMap::new();
            let first = page_from(&seed, fill);
            let mut second = first.clone();
            for (at, v) in edits { second[at] ^= v | 1; }
            let pages = [first.clone(), second, first, vec![0; PAGE_SIZE], (0..PAGE_SIZE).map(|i| (i * 7919 % 251) as u8).collect()];
            for (i, page) in pages.iter().enumerate() {
                let rec = enc.encode(EpochId(1), Pfn(3), page);
                let back = round_trip(&rec);
                prop_assert_eq!(&back, &rec);
                let out = back.decode_page(|h| store.get(h).cloned()).unwrap();
                prop_assert_eq!(&out, page, "page {}", i);
                store.insert(rec.hash, out);
            }
        }

        #[test]
        fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..6000)) {
            let mut r = Reader::new(&buf);
            if let Ok(rec) = PageRecord::decode(&mut r) {
                let _ = rec.decode_page(|_| None);
            }
        }
    }

    #[test]
    fn encoder_picks_the_cheap_encodings() {
        let mut enc = PageEncoder::new(EncoderConfig::default());
        let text: Vec<u8> = b"the epoch of a guest ".iter().copied().cycle().take(PAGE_SIZE).collect();
        assert!(matches!(enc.encode(EpochId(1), Pfn(1), &[0; PAGE_SIZE]).encoding, PageEncoding::Zero));
        assert!(matches!(enc.encode(EpochId(1), Pfn(1), &text).encoding, PageEncoding::RawZstd(_)));
        assert!(matches!(enc.encode(EpochId(1), Pfn(2), &text).encoding, PageEncoding::Ref));
        let mut edited = text.clone();
        edited[100] = b'X';
        let rec = enc.encode(EpochId(2), Pfn(1), &edited);
        match &rec.encoding {
            PageEncoding::Xor { delta, .. } => assert!(delta.len() < 64, "delta {} bytes", delta.len()),
            e => panic!("expected xor, got {e:?}"),
        }
        let random: Vec<u8> = (0..PAGE_SIZE as u64).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect();
        let _ = enc.encode(EpochId(2), Pfn(9), &random);
        // After a reconnect at epoch 1, epoch 2's pages are no longer held.
        enc.forget_after(EpochId(1));
        assert!(matches!(enc.encode(EpochId(3), Pfn(5), &edited).encoding, PageEncoding::RawZstd(_) | PageEncoding::Xor { .. }));
        assert!(matches!(enc.encode(EpochId(3), Pfn(6), &text).encoding, PageEncoding::Ref));
    }

    #[test]
    fn random_bytes_go_plain_untried_and_anything_an_entropy_coder_shrinks_is_tried() {
        let mut random = vec![0u8; PAGE_SIZE];
        StdRng::seed_from_u64(1).fill_bytes(&mut random);
        assert!(looks_random(&random));
        let mut enc = PageEncoder::new(EncoderConfig::default());
        assert!(matches!(enc.encode(EpochId(1), Pfn(1), &random).encoding, PageEncoding::RawPlain(_)));
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let base64: Vec<u8> = random.iter().map(|b| alphabet[usize::from(b & 63)]).collect();
        // Random 16- and 32-bit values: every other (fourth) byte zero,
        // which a stride of a power of two would never sample.
        let halves: Vec<u8> = random.iter().enumerate().map(|(i, b)| if i % 2 == 1 { 0 } else { *b }).collect();
        let quarters: Vec<u8> = random.iter().enumerate().map(|(i, b)| if i % 4 == 3 { 0 } else { *b }).collect();
        let text: Vec<u8> = b"the epoch of a guest ".iter().copied().cycle().take(PAGE_SIZE).collect();
        for (name, page) in [("base64", &base64), ("16-bit", &halves), ("32-bit", &quarters), ("text", &text)] {
            assert!(!looks_random(page), "{name} taken for random");
            assert!(matches!(enc.encode(EpochId(1), Pfn(2), page).encoding, PageEncoding::RawZstd(_)), "{name} not compressed");
        }
    }

    #[test]
    fn links_sharing_frames_compress_a_page_once_and_send_the_same_frame() {
        let frames = SharedFrames::default();
        // Different levels make different frames of the same page, so the
        // second encoder's frame shows whose compression it sent.
        let mut near = PageEncoder::new(EncoderConfig { zstd_level: 19, threads: 1, ..EncoderConfig::default() });
        near.share_frames(frames.clone(), false);
        let mut far = PageEncoder::new(EncoderConfig { zstd_level: 1, threads: 1, ..EncoderConfig::default() });
        far.share_frames(frames, true);
        let mut alone = PageEncoder::new(EncoderConfig { zstd_level: 1, threads: 1, ..EncoderConfig::default() });
        // Text of words picked at random: what a level changes the frame of.
        let words = ["the ", "epoch ", "of ", "a ", "guest ", "backup ", "page ", "memory ", "commit "];
        let mut rng = StdRng::seed_from_u64(2);
        let mut text = || -> Vec<u8> {
            let mut p = Vec::new();
            while p.len() < PAGE_SIZE {
                p.extend_from_slice(words[rng.gen_range(0..words.len())].as_bytes());
            }
            p.truncate(PAGE_SIZE);
            p
        };
        let pages: Vec<Vec<u8>> = (0..4).map(|_| text()).collect();
        let pfns: Vec<Pfn> = (0..4).map(Pfn).collect();
        let hashes: Vec<ChunkId> = pages.iter().map(|p| content_id(p)).collect();
        // The near link compressed the first two when the far one (going
        // backwards) starts: the far link compresses the last two itself.
        let by_near = near.encode_pages(EpochId(1), &pfns[..2], |i| &pages[i], &hashes[..2]);
        let by_far = far.encode_pages(EpochId(1), &pfns, |i| &pages[i], &hashes);
        let by_alone = alone.encode_pages(EpochId(1), &pfns, |i| &pages[i], &hashes);
        for i in 0..4 {
            assert!(matches!(by_far[i].encoding, PageEncoding::RawZstd(_)));
            if i < 2 {
                assert_eq!(by_far[i], by_near[i], "page {i}: the far link sends the near link's frame");
                assert_ne!(by_alone[i], by_near[i], "page {i}: a link of its own compresses at its own level");
            } else {
                assert_eq!(by_far[i], by_alone[i], "page {i}: compressed by the far link at its level");
            }
            assert_eq!(by_far[i].decode_page(|_| None).unwrap(), pages[i]);
        }
        // And the near link, on to the rest of the epoch, takes the far
        // link's frames.
        let rest = near.encode_pages(EpochId(1), &pfns[2..], |i| &pages[2 + i], &hashes[2..]);
        assert_eq!(rest[..], by_far[2..]);
    }

    #[test]
    fn forgotten_hashes_are_neither_referenced_nor_xor_bases() {
        let mut enc = PageEncoder::new(EncoderConfig::default());
        let text: Vec<u8> = b"a page the backup will delete ".iter().copied().cycle().take(PAGE_SIZE).collect();
        let other: Vec<u8> = b"another page ".iter().copied().cycle().take(PAGE_SIZE).collect();
        let first = enc.encode(EpochId(1), Pfn(1), &text);
        enc.encode(EpochId(1), Pfn(2), &other);
        assert_eq!(enc.held_len(), 2);
        assert_eq!(enc.forget(&[first.hash, ChunkId([9; 32])]), 1, "only held hashes count");
        assert_eq!(enc.held_len(), 1);
        // Same content again: its bytes go, not a reference.
        assert!(matches!(enc.encode(EpochId(2), Pfn(3), &text).encoding, PageEncoding::RawZstd(_)));
        assert!(matches!(enc.encode(EpochId(2), Pfn(4), &other).encoding, PageEncoding::Ref));
        // A small edit of a page whose last content was forgotten is not
        // sent as XOR against it.
        enc.forget(&[content_id(&other)]);
        let mut edited = other.clone();
        edited[10] = b'X';
        assert!(matches!(enc.encode(EpochId(3), Pfn(2), &edited).encoding, PageEncoding::RawZstd(_)));
    }

    /// An epoch of many pages (text, random, repeated, zero, edited) as
    /// one by one and as `encode_pages` with threads: the same records,
    /// epoch after epoch (what is held and the shadow move alike).
    #[test]
    fn a_large_epoch_compressed_on_threads_encodes_as_one_by_one() {
        let n = PARALLEL_PAGES * 2;
        let mut rng = 7u64;
        let mut next = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            rng >> 33
        };
        let mut pages: Vec<Vec<u8>> = (0..n)
            .map(|i| match i % 5 {
                0 => vec![0u8; PAGE_SIZE],
                1 => (0..PAGE_SIZE).map(|_| next() as u8).collect(),
                2 => vec![7u8; PAGE_SIZE],
                _ => {
                    let mut p: Vec<u8> = (0..PAGE_SIZE).map(|j| b"remus page "[j % 11]).collect();
                    p[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    p
                }
            })
            .collect();
        let mut one = PageEncoder::new(EncoderConfig { threads: 1, ..EncoderConfig::default() });
        let mut many = PageEncoder::new(EncoderConfig { threads: 3, ..EncoderConfig::default() });
        for e in 1..=2u64 {
            if e == 2 {
                // Edits: most pages go as XOR deltas over the first epoch's.
                for (i, p) in pages.iter_mut().enumerate() {
                    p[i % PAGE_SIZE] ^= 0x5a;
                }
            }
            let pfns: Vec<Pfn> = (0..n as u64).map(Pfn).collect();
            let hashes: Vec<ChunkId> = pages.iter().map(|p| page_id(p)).collect();
            let want: Vec<PageRecord> =
                pfns.iter().zip(&pages).zip(&hashes).map(|((pfn, p), h)| one.encode_hashed(EpochId(e), *pfn, p, *h)).collect();
            let got = many.encode_pages(EpochId(e), &pfns, |i| &pages[i], &hashes);
            assert!(got == want, "epoch {e}: the records differ");
            let mut mix = EncodingMix::default();
            got.iter().for_each(|r| mix.add(&r.encoding));
            // The first epoch's whole pages took the threads; the
            // second's are deltas over it.
            let whole = mix.raw_zstd + mix.raw_plain;
            assert!(if e == 1 { whole >= PARALLEL_PAGES as u64 && mix.raw_plain > 0 } else { mix.xor > whole }, "epoch {e}: {mix:?}");
        }
    }

    #[test]
    fn tampered_page_is_refused() {
        let mut enc = PageEncoder::new(EncoderConfig::default());
        let text: Vec<u8> = b"abc ".iter().copied().cycle().take(PAGE_SIZE).collect();
        let mut rec = enc.encode(EpochId(1), Pfn(1), &text);
        rec.hash.0[0] ^= 1;
        assert_eq!(rec.decode_page(|_| None), Err(DecodeError::HashMismatch { pfn: 1 }));
        let rec = PageRecord { pfn: Pfn(2), hash: rec.hash, encoding: PageEncoding::Ref };
        assert_eq!(rec.decode_page(|_| None), Err(DecodeError::MissingBase(rec.hash)));
    }
}
