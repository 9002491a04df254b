//! Block accounting for the paged KV cache: a pure, synchronous allocator of fixed-size blocks.

use crate::error::{EngineError, Result};

/// Hands out block ids from a fixed pool. Allocation is all-or-nothing: a request that
/// cannot be met changes nothing and returns [`EngineError::OutOfBlocks`].
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    /// Free ids, popped from the end (lowest ids are handed out first).
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    /// A pool of `total` blocks, all free.
    pub fn new(total: usize) -> Self {
        BlockAllocator {
            free: (0..total as u32).rev().collect(),
            total,
        }
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
        Ok(taken)
    }

    /// Returns blocks to the pool.
    pub fn release(&mut self, blocks: &[u32]) {
        debug_assert!(blocks.iter().all(|b| (*b as usize) < self.total));
        self.free.extend(blocks.iter().rev().copied());
        debug_assert!(self.free.len() <= self.total, "double free of KV blocks");
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
}
