//! Receive buffers recycled across chunks, so steady-state receiving allocates nothing
//! and touches no fresh pages.

use std::sync::{Arc, Mutex};

/// A pool of byte buffers.
#[derive(Debug, Default)]
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// Buffers kept for reuse; more are freed.
const KEEP: usize = 16;

/// Bytes kept for reuse at most (a buffer that would go beyond is freed): what a pool
/// holds between transfers stays bounded whatever sizes its transfers had.
pub const KEEP_BYTES: usize = 256 << 20;

impl BufPool {
    /// An empty pool.
    pub fn new() -> Arc<Self> {
        Arc::new(BufPool::default())
    }

    /// A buffer of exactly `len` bytes (contents unspecified), reused when possible.
    pub fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut buf = {
            let mut free = self.free.lock().expect("pool lock");
            match free.iter().position(|b| b.capacity() >= len) {
                Some(i) => free.swap_remove(i),
                None => free.pop().unwrap_or_default(),
            }
        };
        buf.resize(len, 0);
        PooledBuf {
            buf,
            pool: Some(self.clone()),
        }
    }

    /// Bytes the pool keeps for reuse now (at most [`KEEP_BYTES`]).
    pub fn held_bytes(&self) -> usize {
        let free = self.free.lock().expect("pool lock");
        free.iter().map(Vec::capacity).sum()
    }
}

/// A buffer that returns to its pool when dropped.
pub struct PooledBuf {
    buf: Vec<u8>,
    pool: Option<Arc<BufPool>>,
}

impl PooledBuf {
    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl From<Vec<u8>> for PooledBuf {
    fn from(buf: Vec<u8>) -> Self {
        PooledBuf { buf, pool: None }
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PooledBuf({} bytes)", self.buf.len())
    }
}

impl PartialEq for PooledBuf {
    fn eq(&self, other: &Self) -> bool {
        self.buf == other.buf
    }
}

impl Eq for PooledBuf {}

impl Clone for PooledBuf {
    fn clone(&self) -> Self {
        PooledBuf {
            buf: self.buf.clone(),
            pool: None,
        }
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let mut free = pool.free.lock().expect("pool lock");
            let held: usize = free.iter().map(Vec::capacity).sum();
            if free.len() < KEEP && held + self.buf.capacity() <= KEEP_BYTES {
                free.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused() {
        let pool = BufPool::new();
        let a = pool.get(1000);
        let ptr = a.as_ptr();
        drop(a);
        let b = pool.get(500);
        assert_eq!(b.as_ptr(), ptr, "the freed buffer is handed out again");
        assert_eq!(b.len(), 500);
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_bytes() {
        let pool = BufPool::new();
        let big: Vec<PooledBuf> = (0..3).map(|_| pool.get(KEEP_BYTES / 2)).collect();
        drop(big);
        assert!(pool.held_bytes() <= KEEP_BYTES, "{}", pool.held_bytes());
        assert!(
            pool.held_bytes() >= KEEP_BYTES / 2,
            "a buffer is still kept"
        );
    }
}
