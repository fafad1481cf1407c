//! [`MemoryDigest`]: a two-level hash tree over a guest's pages.
//!
//! Layout: leaf `i` is the blake3 of page `i`. Pages are grouped by
//! [`GROUP_PAGES`]; a group hash is blake3 over the concatenated leaf hashes
//! of its pages, and the root is blake3 over the concatenated group hashes
//! followed by the page count (little-endian u64). An update touches one
//! leaf and marks its group stale, so keeping the root current costs
//! O(dirty groups × 16 KiB) per epoch instead of hashing all of memory.
//! Restore computes the same root from an image and compares.

use crate::{zero_page_hash, ChunkId, Pfn};

/// Pages per group of the digest tree.
pub const GROUP_PAGES: usize = 512;

/// Incrementally maintained hash of a whole memory image.
#[derive(Clone)]
pub struct MemoryDigest {
    leaves: Vec<ChunkId>,
    groups: Vec<ChunkId>,
    stale: Vec<bool>,
}

impl MemoryDigest {
    /// Digest of an all-zero memory of `page_count` pages.
    #[must_use]
    pub fn zeroed(page_count: u64) -> Self {
        let n = usize::try_from(page_count).expect("page count fits in memory");
        let ngroups = n.div_ceil(GROUP_PAGES);
        Self { leaves: vec![zero_page_hash(); n], groups: vec![ChunkId::default(); ngroups], stale: vec![true; ngroups] }
    }

    /// Number of pages covered.
    #[must_use]
    pub fn page_count(&self) -> u64 {
        self.leaves.len() as u64
    }

    /// Records that page `pfn` now hashes to `hash`.
    ///
    /// # Panics
    /// When `pfn` is outside the memory.
    pub fn set(&mut self, pfn: Pfn, hash: ChunkId) {
        let i = usize::try_from(pfn.0).expect("pfn fits");
        if self.leaves[i] != hash {
            self.leaves[i] = hash;
            self.stale[i / GROUP_PAGES] = true;
        }
    }

    /// Current hash of page `pfn`.
    #[must_use]
    pub fn get(&self, pfn: Pfn) -> ChunkId {
        self.leaves[usize::try_from(pfn.0).expect("pfn fits")]
    }

    /// Root over all pages; recomputes only stale groups.
    pub fn root(&mut self) -> ChunkId {
        // Each level is hashed as one buffer: blake3 then hashes its
        // 1 KiB chunks side by side (SIMD), where 32-byte updates went
        // through them one 64-byte block at a time.
        let mut buf = Vec::with_capacity(GROUP_PAGES.max(self.groups.len()) * 32 + 8);
        for (g, stale) in self.stale.iter_mut().enumerate() {
            if *stale {
                let end = ((g + 1) * GROUP_PAGES).min(self.leaves.len());
                buf.clear();
                buf.extend(self.leaves[g * GROUP_PAGES..end].iter().flat_map(|leaf| leaf.0));
                self.groups[g] = ChunkId(*blake3::hash(&buf).as_bytes());
                *stale = false;
            }
        }
        buf.clear();
        buf.extend(self.groups.iter().flat_map(|group| group.0));
        buf.extend_from_slice(&(self.leaves.len() as u64).to_le_bytes());
        ChunkId(*blake3::hash(&buf).as_bytes())
    }

    /// Root of a full memory image (length a multiple of `PAGE_SIZE`).
    #[must_use]
    pub fn of_image(image: &[u8]) -> ChunkId {
        let pages = image.len() / crate::PAGE_SIZE;
        let mut d = Self::zeroed(pages as u64);
        for (i, page) in image.chunks_exact(crate::PAGE_SIZE).enumerate() {
            d.leaves[i] = crate::content_id(page);
        }
        d.root()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{content_id, PAGE_SIZE};

    /// The layout the module documents, computed here leaf by leaf: roots
    /// stored in histories must not change with how they are computed.
    #[test]
    fn the_root_is_the_documented_two_level_hash() {
        let pages = GROUP_PAGES as u64 * 2 + 3;
        let mut d = MemoryDigest::zeroed(pages);
        for pfn in [1u64, 600, 1026] {
            d.set(Pfn(pfn), content_id(&[pfn as u8; PAGE_SIZE]));
        }
        let mut top = blake3::Hasher::new();
        for g in 0..3u64 {
            let mut group = blake3::Hasher::new();
            for pfn in g * GROUP_PAGES as u64..((g + 1) * GROUP_PAGES as u64).min(pages) {
                group.update(&d.get(Pfn(pfn)).0);
            }
            top.update(group.finalize().as_bytes());
        }
        top.update(&pages.to_le_bytes());
        assert_eq!(d.root().0, *top.finalize().as_bytes());
    }

    #[test]
    fn incremental_root_matches_full_image() {
        let pages = 1500u64;
        let mut image = vec![0u8; pages as usize * PAGE_SIZE];
        let mut d = MemoryDigest::zeroed(pages);
        assert_eq!(d.root(), MemoryDigest::of_image(&image));
        for pfn in [0u64, 7, 511, 512, 1499] {
            let page = &mut image[pfn as usize * PAGE_SIZE..][..PAGE_SIZE];
            page[5] = (pfn % 251) as u8 + 1;
            d.set(Pfn(pfn), content_id(page));
        }
        assert_eq!(d.root(), MemoryDigest::of_image(&image));
        image[3] ^= 1;
        assert_ne!(d.root(), MemoryDigest::of_image(&image));
    }
}
