//! Prefix cache: full prompt blocks kept after their sequence ends, keyed by the chain hash
//! of the tokens up to and including the block (so a key names a whole prefix, not just
//! one block's tokens). A new prompt reuses the longest run of cached leading blocks and
//! only computes the rest. The cache holds one reference on each block it keeps; the
//! least recently used entries are dropped beyond the capacity or when the pool runs dry,
//! in O(log n) per entry (an index ordered by last use beside the map).
//! Pure bookkeeping: the block contents live in the KV store.

use crate::kv::BlockAllocator;
use std::collections::{BTreeMap, HashMap};

/// Chain hashes of the first `max_blocks` full blocks of `tokens`.
pub fn chain_hashes(tokens: &[u32], block_size: usize, max_blocks: usize) -> Vec<u64> {
    let mut out = Vec::new();
    let mut prev = 0x9E37_79B9_7F4A_7C15u64;
    for block in tokens.chunks_exact(block_size).take(max_blocks) {
        let mut bytes = Vec::with_capacity(8 + 4 * block.len());
        bytes.extend_from_slice(&prev.to_le_bytes());
        for t in block {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        prev = xxhash_rust::xxh3::xxh3_64(&bytes);
        out.push(prev);
    }
    out
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    block: u32,
    /// Key of this entry in `by_use` (0 until first marked used).
    used: u64,
}

/// Cached prefix blocks by chain hash, LRU-bounded.
#[derive(Debug)]
pub struct PrefixCache {
    capacity: usize,
    map: HashMap<u64, Entry>,
    /// Chain hashes by the tick of their last use: the first is the next to evict.
    by_use: BTreeMap<u64, u64>,
    tick: u64,
}

/// Counters of a prefix cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens looked up.
    pub lookup_tokens: u64,
    /// Of those, tokens whose KV came from the cache.
    pub hit_tokens: u64,
    /// Blocks the cache holds now.
    pub cached_blocks: usize,
}

impl PrefixCache {
    /// A cache keeping at most `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        PrefixCache {
            capacity,
            map: HashMap::new(),
            by_use: BTreeMap::new(),
            tick: 0,
        }
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The blocks of the longest cached leading run of `hashes`, marked recently used.
    /// The caller retains them before use.
    pub fn lookup(&mut self, hashes: &[u64]) -> Vec<u32> {
        let n = hashes
            .iter()
            .take_while(|h| self.map.contains_key(h))
            .count();
        self.touch(&hashes[..n]);
        hashes[..n].iter().map(|h| self.map[h].block).collect()
    }

    /// Marks a chain used, its last block oldest: eviction then trims a prefix from its
    /// end, and a cached run always starts at block 0.
    fn touch(&mut self, hashes: &[u64]) {
        for h in hashes.iter().rev() {
            if let Some(e) = self.map.get_mut(h) {
                self.tick += 1;
                self.by_use.remove(&e.used);
                e.used = self.tick;
                self.by_use.insert(self.tick, *h);
            }
        }
    }

    /// Keeps `blocks[i]` under `hashes[i]` (one more holder each) unless that prefix is
    /// cached already, then trims to capacity.
    pub fn insert(&mut self, hashes: &[u64], blocks: &[u32], alloc: &mut BlockAllocator) {
        for (h, b) in hashes.iter().zip(blocks) {
            if !self.map.contains_key(h) {
                alloc.retain(&[*b]);
                self.map.insert(*h, Entry { block: *b, used: 0 });
            }
        }
        self.touch(&hashes[..hashes.len().min(blocks.len())]);
        while self.map.len() > self.capacity {
            if !self.evict_one(alloc) {
                break;
            }
        }
    }

    /// Drops the least recently used entry; false when empty.
    pub fn evict_one(&mut self, alloc: &mut BlockAllocator) -> bool {
        let Some((_, h)) = self.by_use.pop_first() else {
            return false;
        };
        if let Some(e) = self.map.remove(&h) {
            alloc.release(&[e.block]);
        }
        true
    }

    /// Drops entries until `n` blocks are free or the cache is empty; true when they are.
    pub fn make_room(&mut self, n: usize, alloc: &mut BlockAllocator) -> bool {
        while alloc.free_blocks() < n {
            if !self.evict_one(alloc) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_prefix_is_found_and_a_different_one_is_not() {
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[20] = 999; // differs in the second block
        let (ha, hb) = (chain_hashes(&a, 16, 2), chain_hashes(&b, 16, 2));
        assert_eq!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        let mut alloc = BlockAllocator::new(8);
        let blocks = alloc.alloc(2).unwrap();
        let mut c = PrefixCache::new(4);
        c.insert(&ha, &blocks, &mut alloc);
        alloc.release(&blocks); // the sequence ends; the cache still holds them
        assert_eq!(alloc.free_blocks(), 6);
        assert_eq!(c.lookup(&ha), blocks);
        assert_eq!(c.lookup(&hb), blocks[..1]);
        // Same tokens in block 1 after a different block 0: a different key.
        let mut d = a.clone();
        d[0] = 7;
        assert!(c.lookup(&chain_hashes(&d, 16, 2)).is_empty());
    }

    #[test]
    fn capacity_and_pressure_evict_least_recently_used() {
        let mut alloc = BlockAllocator::new(4);
        let mut c = PrefixCache::new(2);
        let toks: Vec<u32> = (0..48).collect();
        let h = chain_hashes(&toks, 16, 3);
        let blocks = alloc.alloc(3).unwrap();
        c.insert(&h, &blocks, &mut alloc);
        assert_eq!(c.len(), 2, "capacity 2");
        assert_eq!(c.lookup(&h), blocks[..2], "the deepest block goes first");
        alloc.release(&blocks);
        assert_eq!(alloc.free_blocks(), 2);
        assert!(c.make_room(4, &mut alloc));
        assert!(c.is_empty());
        assert_eq!(alloc.free_blocks(), 4);
    }

    /// A million cached blocks: eviction goes in least-recently-used order (the deepest
    /// block of each chain first) and takes bounded time per block (printed; the speed
    /// itself is a benchmark figure, not asserted).
    #[test]
    fn a_million_cached_blocks_evict_in_order() {
        const N: usize = 1_000_000;
        let mut alloc = BlockAllocator::new(N);
        let mut c = PrefixCache::new(N);
        // 250,000 chains of 4 blocks, inserted oldest first.
        let t0 = std::time::Instant::now();
        for chain in 0..N / 4 {
            let toks: Vec<u32> = (0..64).map(|i| (chain * 64 + i) as u32).collect();
            let h = chain_hashes(&toks, 16, 4);
            let blocks = alloc.alloc(4).unwrap();
            c.insert(&h, &blocks, &mut alloc);
            alloc.release(&blocks);
        }
        let filled = t0.elapsed();
        assert_eq!((c.len(), alloc.free_blocks()), (N, 0));
        // Chain 0 touched again: it becomes the newest.
        let first: Vec<u32> = (0..64).collect();
        assert_eq!(c.lookup(&chain_hashes(&first, 16, 4)).len(), 4);
        let t1 = std::time::Instant::now();
        assert!(c.make_room(2, &mut alloc));
        // Chain 1 is now the oldest, deepest block first: its first two blocks remain.
        let second: Vec<u32> = (64..128).collect();
        assert_eq!(c.lookup(&chain_hashes(&second, 16, 4)).len(), 2);
        let third: Vec<u32> = (128..192).collect();
        assert_eq!(c.lookup(&chain_hashes(&third, 16, 4)).len(), 4);
        // Everything but the ten blocks touched last goes.
        assert!(c.make_room(N - 10, &mut alloc));
        let evicted = t1.elapsed();
        assert_eq!(c.len(), 10);
        assert_eq!(c.lookup(&chain_hashes(&first, 16, 4)).len(), 4);
        assert_eq!(c.lookup(&chain_hashes(&second, 16, 4)).len(), 2);
        assert!(c.make_room(N, &mut alloc) && c.is_empty());
        eprintln!(
            "prefix cache, {N} blocks: insert {:.0} ns/block, evict {:.0} ns/block",
            filled.as_nanos() as f64 / N as f64,
            evicted.as_nanos() as f64 / (N - 10) as f64
        );
    }
}
