//! Block accounting for the paged KV cache: a pure, synchronous allocator of fixed-size blocks.

use crate::error::{EngineError, Result};

/// Hands out block ids from a fixed pool. Allocation is all-or-nothing: a request that
/// cannot be met changes nothing and returns [`EngineError::OutOfBlocks`]. Blocks are
/// reference counted so full prompt blocks can be shared (prefix cache and the sequences
/// reusing them); a block returns to the pool when its last holder releases it.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    /// Free ids, popped from the end (lowest ids are handed out first).
    free: Vec<u32>,
    /// Holders per block (0 = free).
    refs: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    /// A pool of `total` blocks, all free.
    pub fn new(total: usize) -> Self {
        BlockAllocator {
            free: (0..total as u32).rev().collect(),
            refs: vec![0; total],
            total,
        }
    }

    /// Adds a holder to blocks already allocated.
    pub fn retain(&mut self, blocks: &[u32]) {
        for b in blocks {
            debug_assert!(self.refs[*b as usize] > 0, "retain of a free block");
            self.refs[*b as usize] += 1;
        }
    }

    /// Holders of a block.
    pub fn holders(&self, block: u32) -> u32 {
        self.refs[block as usize]
    }

    /// Takes `n` blocks, or none at all when fewer than `n` are free.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u32>> {
        if n > self.free.len() {
            return Err(EngineError::OutOfBlocks {
                needed: n,
                free: self.free.len(),
                total: self.total,
            });
        }
        let at = self.free.len() - n;
        let mut taken = self.free.split_off(at);
        taken.reverse();
        for b in &taken {
            self.refs[*b as usize] = 1;
        }
        Ok(taken)
    }

    /// Drops one holder of each block; blocks without holders return to the pool.
    pub fn release(&mut self, blocks: &[u32]) {
        for b in blocks.iter().rev() {
            let r = &mut self.refs[*b as usize];
            debug_assert!(*r > 0, "double free of KV block {b}");
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.free.push(*b);
            }
        }
    }

    /// Blocks free now.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Size of the pool.
    pub fn total_blocks(&self) -> usize {
        self.total
    }

    /// Blocks in use now.
    pub fn used_blocks(&self) -> usize {
        self.total - self.free.len()
    }
}

/// Blocks needed to hold `tokens` tokens.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn all_or_nothing() {
        let mut a = BlockAllocator::new(4);
        let x = a.alloc(3).unwrap();
        assert_eq!(x, vec![0, 1, 2]);
        let err = a.alloc(2).unwrap_err();
        assert!(matches!(
            err,
            EngineError::OutOfBlocks {
                needed: 2,
                free: 1,
                total: 4
            }
        ));
        assert_eq!(a.free_blocks(), 1, "a failed alloc must not take blocks");
        a.release(&x);
        assert_eq!(a.free_blocks(), 4);
    }

    proptest! {
        #[test]
        fn never_hands_out_a_block_twice(ops in proptest::collection::vec((0usize..6, any::<bool>()), 1..60)) {
            let mut a = BlockAllocator::new(16);
            let mut held: Vec<Vec<u32>> = Vec::new();
            for (n, free) in ops {
                if free && !held.is_empty() {
                    let b = held.remove(0);
                    a.release(&b);
                } else if let Ok(b) = a.alloc(n) {
                    held.push(b);
                }
                let mut all: Vec<u32> = held.iter().flatten().copied().collect();
                let count = all.len();
                all.sort();
                all.dedup();
                prop_assert_eq!(all.len(), count);
                prop_assert_eq!(a.used_blocks(), count);
            }
        }
    }

    #[test]
    fn shared_blocks_free_with_their_last_holder() {
        let mut a = BlockAllocator::new(4);
        let x = a.alloc(2).unwrap();
        a.retain(&x[..1]);
        a.release(&x);
        assert_eq!((a.free_blocks(), a.holders(x[0])), (3, 1));
        a.release(&x[..1]);
        assert_eq!(a.free_blocks(), 4);
    }
}
