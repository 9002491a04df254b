//! Per-worker, LRU-bounded sets of prompt block chain hashes for `prefix_aware` routing.
//!
//! This is the router's *belief* about each worker's prefix cache, built only from what it
//! routed there; it is not synchronised with the worker's real KV cache.

use std::collections::{BTreeMap, HashMap};

/// One worker's remembered block hashes with least-recently-used eviction.
#[derive(Debug, Default, Clone)]
struct LruBlocks {
    /// hash → last-use stamp.
    stamp: HashMap<u64, u64>,
    /// last-use stamp → hash; the first entry is the eviction victim.
    order: BTreeMap<u64, u64>,
    clock: u64,
}

impl LruBlocks {
    fn touch(&mut self, hash: u64, capacity: usize) {
        self.clock += 1;
        if let Some(old) = self.stamp.insert(hash, self.clock) {
            self.order.remove(&old);
        }
        self.order.insert(self.clock, hash);
        while self.stamp.len() > capacity {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            self.stamp.remove(&victim);
        }
    }

    fn contains(&self, hash: u64) -> bool {
        self.stamp.contains_key(&hash)
    }
}

/// Remembered prompt blocks of every worker, keyed by worker id.
#[derive(Debug, Clone)]
pub struct PrefixIndex {
    capacity: usize,
    workers: HashMap<String, LruBlocks>,
}

impl PrefixIndex {
    /// Empty index remembering at most `capacity` blocks per worker (0 remembers nothing).
    pub fn new(capacity: usize) -> Self {
        PrefixIndex {
            capacity,
            workers: HashMap::new(),
        }
    }

    /// Records that `worker` now holds the blocks with chain hashes `hashes` (in prompt
    /// order). They are touched last-to-first so that, like a paged KV cache, a prompt's
    /// tail is evicted before its head and the leading run survives longest.
    pub fn record(&mut self, worker: &str, hashes: &[u64]) {
        if self.capacity == 0 || hashes.is_empty() {
            return;
        }
        let capacity = self.capacity;
        let lru = match self.workers.get_mut(worker) {
            Some(lru) => lru,
            None => self.workers.entry(worker.to_owned()).or_default(),
        };
        for &h in hashes.iter().rev() {
            lru.touch(h, capacity);
        }
    }

    /// How many leading entries of `hashes` `worker` is believed to hold.
    pub fn matched(&self, worker: &str, hashes: &[u64]) -> usize {
        self.workers.get(worker).map_or(0, |lru| {
            hashes.iter().take_while(|&&h| lru.contains(h)).count()
        })
    }

    /// Forgets everything about `worker`.
    pub fn forget(&mut self, worker: &str) {
        self.workers.remove(worker);
    }

    /// Number of blocks remembered for `worker`.
    pub fn len(&self, worker: &str) -> usize {
        self.workers.get(worker).map_or(0, |lru| lru.stamp.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_leading_run_only() {
        let mut idx = PrefixIndex::new(100);
        idx.record("w", &[1, 2, 3]);
        assert_eq!(idx.matched("w", &[1, 2, 3, 4]), 3);
        assert_eq!(idx.matched("w", &[1, 9, 3]), 1);
        assert_eq!(idx.matched("w", &[9, 1, 2]), 0);
        assert_eq!(idx.matched("other", &[1, 2]), 0);
    }

    #[test]
    fn lru_bound_holds_and_evicts_least_recent() {
        let mut idx = PrefixIndex::new(4);
        idx.record("w", &[1, 2]);
        idx.record("w", &[3, 4]);
        idx.record("w", &[1]); // refresh 1
        // Touch order so far: 2, 1, 4, 3, 1 (records go last-to-first), so inserting 6 and
        // 5 evicts the two least recent: 2, then 4.
        idx.record("w", &[5, 6]);
        assert_eq!(idx.len("w"), 4);
        assert_eq!(idx.matched("w", &[1]), 1);
        assert_eq!(idx.matched("w", &[2]), 0);
        assert_eq!(idx.matched("w", &[3]), 1);
        assert_eq!(idx.matched("w", &[4]), 0);
        assert_eq!(idx.matched("w", &[5, 6]), 2);
        for i in 10..1000 {
            idx.record("w", &[i, i + 5000]);
            assert!(idx.len("w") <= 4);
        }
    }

    #[test]
    fn tail_is_evicted_before_head() {
        let mut idx = PrefixIndex::new(3);
        idx.record("w", &[10, 11, 12]);
        idx.record("w", &[20]); // one eviction: the prompt's tail block 12
        assert_eq!(idx.matched("w", &[10, 11, 12]), 2);
    }

    #[test]
    fn zero_capacity_and_forget() {
        let mut idx = PrefixIndex::new(0);
        idx.record("w", &[1]);
        assert_eq!(idx.matched("w", &[1]), 0);
        let mut idx = PrefixIndex::new(8);
        idx.record("w", &[1]);
        idx.forget("w");
        assert_eq!(idx.matched("w", &[1]), 0);
        assert_eq!(idx.len("w"), 0);
    }
}
