//! A map of bounded size that forgets its oldest insertions first: the
//! one shape behind the sender's held-hash set and page shadow and the
//! backup's page cache.
//!
//! Invariants: at most `capacity` entries; when full, an insertion of a
//! new key evicts the key inserted longest ago (replacing the value of a
//! present key does not refresh its age); the bookkeeping of insertion
//! order stays within a constant factor of the entries, whatever the mix
//! of inserts and removals.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// A FIFO-evicting map (see the module documentation).
#[derive(Debug, Clone)]
pub struct BoundedMap<K, V> {
    entries: HashMap<K, (u64, V)>,
    /// Keys in insertion order with the sequence number they were
    /// inserted under; an entry whose number no longer matches is stale.
    order: VecDeque<(u64, K)>,
    next: u64,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V> BoundedMap<K, V> {
    /// An empty map holding at most `capacity` entries.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self { entries: HashMap::new(), order: VecDeque::new(), next: 0, capacity }
    }

    /// The value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(_, v)| v)
    }

    /// The value of `key`, mutably.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key).map(|(_, v)| v)
    }

    /// True when `key` is present.
    pub fn contains_key(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Inserts or replaces; returns true when `key` was not present.
    /// A new key in a full map evicts the oldest.
    pub fn insert(&mut self, key: K, value: V) -> bool {
        if let Some(slot) = self.entries.get_mut(&key) {
            slot.1 = value;
            return false;
        }
        let seq = self.next;
        self.next += 1;
        self.entries.insert(key.clone(), (seq, value));
        self.order.push_back((seq, key));
        while self.entries.len() > self.capacity {
            let Some((seq, old)) = self.order.pop_front() else { break };
            if self.entries.get(&old).is_some_and(|(s, _)| *s == seq) {
                self.entries.remove(&old);
            }
        }
        self.compact();
        true
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let v = self.entries.remove(key).map(|(_, v)| v);
        self.compact();
        v
    }

    /// Keeps only the entries `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.entries.retain(|k, (_, v)| keep(k, v));
        self.compact();
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops stale order entries once they outnumber the live ones.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order.retain(|(seq, k)| entries.get(k).is_some_and(|(s, _)| s == seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_oldest_insertion_goes_first() {
        let mut m = BoundedMap::new(2);
        assert!(m.insert(1, "a"));
        assert!(m.insert(2, "b"));
        assert!(!m.insert(1, "a2"), "a replacement keeps its age");
        assert!(m.insert(3, "c"));
        assert_eq!(m.get(&1), None);
        assert_eq!(m.get(&2), Some(&"b"));
        m.remove(&2);
        assert!(m.insert(1, "again"));
        assert!(m.insert(4, "d"));
        assert_eq!(m.len(), 2);
        assert_eq!(m.get(&3), None, "3 was older than 1's new insertion");
        assert_eq!(m.get(&1), Some(&"again"));
    }

    proptest! {
        /// Against a model: same contents, never over capacity, and the
        /// order bookkeeping stays bounded.
        #[test]
        fn behaves_as_a_fifo_model(ops in proptest::collection::vec((0u8..3, 0u16..40), 0..400), cap in 1usize..16) {
            let mut m = BoundedMap::new(cap);
            let mut model: Vec<(u16, u32)> = Vec::new();
            for (i, (op, k)) in ops.into_iter().enumerate() {
                let v = i as u32;
                match op {
                    0 | 1 => {
                        let new = m.insert(k, v);
                        match model.iter_mut().find(|(mk, _)| *mk == k) {
                            Some(slot) => { prop_assert!(!new); slot.1 = v; }
                            None => {
                                prop_assert!(new);
                                model.push((k, v));
                                if model.len() > cap { model.remove(0); }
                            }
                        }
                    }
                    _ => {
                        let got = m.remove(&k);
                        let want = model.iter().position(|(mk, _)| *mk == k).map(|p| model.remove(p).1);
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert!(m.len() <= cap);
                prop_assert_eq!(m.len(), model.len());
                for (k, v) in &model {
                    prop_assert_eq!(m.get(k), Some(v));
                }
                prop_assert!(m.order.len() <= 2 * m.len() + 65);
            }
        }
    }
}
