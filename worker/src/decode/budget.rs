//! KV admission: a decode worker promises each admitted request the blocks for its whole
//! prompt plus `max_tokens` up front, so a running batch never runs out of KV mid-decode.
//! Pure bookkeeping; the engine thread releases a promise when it frees the sequence.

use std::collections::HashMap;

/// Promised blocks per request against a fixed pool and a cap on concurrent requests.
#[derive(Debug)]
pub struct Budget {
    total_blocks: usize,
    max_running: usize,
    promised: HashMap<u64, usize>,
    promised_blocks: usize,
}

/// Why a promise was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request can never fit this worker.
    #[error("request needs {needed} KV blocks but the worker has {total}")]
    TooLarge {
        /// Blocks needed.
        needed: usize,
        /// Pool size.
        total: usize,
    },
    /// Not now: the pool or the running cap is full.
    #[error(
        "worker full: {running} of {max_running} requests, {free} of {total} KV blocks free, {needed} needed"
    )]
    Full {
        /// Requests holding promises.
        running: usize,
        /// The cap.
        max_running: usize,
        /// Unpromised blocks.
        free: usize,
        /// Pool size.
        total: usize,
        /// Blocks needed.
        needed: usize,
    },
    /// The id holds a promise already.
    #[error("request {0} is already admitted")]
    Duplicate(u64),
}

impl Budget {
    /// A budget over `total_blocks` and at most `max_running` requests.
    pub fn new(total_blocks: usize, max_running: usize) -> Self {
        Budget {
            total_blocks,
            max_running,
            promised: HashMap::new(),
            promised_blocks: 0,
        }
    }

    /// Promises `blocks` to request `id`, or says why not.
    pub fn promise(&mut self, id: u64, blocks: usize) -> Result<(), Refusal> {
        if self.promised.contains_key(&id) {
            return Err(Refusal::Duplicate(id));
        }
        if blocks > self.total_blocks {
            return Err(Refusal::TooLarge {
                needed: blocks,
                total: self.total_blocks,
            });
        }
        let free = self.total_blocks - self.promised_blocks;
        if self.promised.len() >= self.max_running || blocks > free {
            return Err(Refusal::Full {
                running: self.promised.len(),
                max_running: self.max_running,
                free,
                total: self.total_blocks,
                needed: blocks,
            });
        }
        self.promised.insert(id, blocks);
        self.promised_blocks += blocks;
        Ok(())
    }

    /// Releases the promise of `id` (no-op when it holds none).
    pub fn release(&mut self, id: u64) {
        if let Some(b) = self.promised.remove(&id) {
            self.promised_blocks -= b;
        }
    }

    /// True when `id` holds a promise.
    pub fn holds(&self, id: u64) -> bool {
        self.promised.contains_key(&id)
    }

    /// Requests holding promises.
    pub fn running(&self) -> usize {
        self.promised.len()
    }

    /// Blocks promised.
    pub fn promised_blocks(&self) -> usize {
        self.promised_blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promises_are_bounded_by_blocks_and_running_cap() {
        let mut b = Budget::new(10, 2);
        assert_eq!(
            b.promise(1, 11),
            Err(Refusal::TooLarge {
                needed: 11,
                total: 10
            })
        );
        b.promise(1, 6).unwrap();
        assert!(matches!(
            b.promise(2, 5),
            Err(Refusal::Full { free: 4, .. })
        ));
        assert_eq!(b.promise(1, 1), Err(Refusal::Duplicate(1)));
        b.promise(2, 4).unwrap();
        assert!(matches!(
            b.promise(3, 0),
            Err(Refusal::Full { running: 2, .. })
        ));
        b.release(1);
        b.release(1);
        assert_eq!((b.running(), b.promised_blocks()), (1, 4));
        b.promise(3, 6).unwrap();
        assert_eq!(b.promised_blocks(), 10);
    }
}
