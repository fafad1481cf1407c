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
        for (g, stale) in self.stale.iter_mut().enumerate() {
            if *stale {
                let end = ((g + 1) * GROUP_PAGES).min(self.leaves.len());
                let mut h = blake3::Hasher::new();
                for leaf in &self.leaves[g * GROUP_PAGES..end] {
                    h.update(&leaf.0);
                }
                self.groups[g] = ChunkId(*h.finalize().as_bytes());
                *stale = false;
            }
        }
        let mut h = blake3::Hasher::new();
        for group in &self.groups {
            h.update(&group.0);
        }
        h.update(&(self.leaves.len() as u64).to_le_bytes());
        ChunkId(*h.finalize().as_bytes())
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
