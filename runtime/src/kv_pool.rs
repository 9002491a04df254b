//! A receiver's KV pools in shared memory: the engine keeps its blocks in a committed
//! /dev/shm segment, and each shm transfer is told where a sequence's rows go
//! ([`Placement`]), so a same-host sender writes them straight into the blocks and the
//! receiver only verifies them where they are.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use xpyd_engine::kv::HeapMemory;
use xpyd_engine::{KvLayout, KvMemory};
use xpyd_kv_transfer::Placement;
use xpyd_kv_transfer::shm::{SHM_DIR, Segment};

/// Engine KV memory backed by a shared-memory segment (unlinked when dropped).
#[derive(Debug)]
pub struct SharedKvMemory(Segment);

impl KvMemory for SharedKvMemory {
    fn bytes(&self) -> &[u8] {
        self.0.bytes()
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.bytes_mut()
    }
}

/// Where a shared pool is, for placements (kept after the memory moves into the engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedPool {
    /// Segment path.
    pub path: String,
    /// Segment size.
    pub len: u64,
}

impl SharedPool {
    /// Where the rows of a sequence with block table `blocks` go.
    pub fn placement(&self, layout: &KvLayout, blocks: Vec<u32>) -> Placement {
        Placement {
            path: self.path.clone(),
            len: self.len,
            block_size: layout.block_size as u32,
            row_bytes: layout.row_bytes as u64,
            pools: layout
                .pools
                .iter()
                .map(|[k, v]| [*k as u64, *v as u64])
                .collect(),
            blocks,
        }
    }
}

/// Makes `bytes` of KV memory in a committed /dev/shm segment; when that is impossible
/// (e.g. a small /dev/shm in a container) it logs why and falls back to the heap, and the
/// second value is `None` (transfers then stage through the receiver's arena).
pub fn kv_memory(bytes: usize) -> (Box<dyn KvMemory>, Option<SharedPool>) {
    static POOLS: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "xpyd-kvpool-{}-{}",
        std::process::id(),
        POOLS.fetch_add(1, Ordering::Relaxed)
    );
    match Segment::create_committed(Path::new(SHM_DIR), &name, bytes as u64) {
        Ok(seg) => {
            let pool = SharedPool {
                path: seg.path().display().to_string(),
                len: seg.len() as u64,
            };
            (Box::new(SharedKvMemory(seg)), Some(pool))
        }
        Err(e) => {
            tracing::warn!(error = %e, bytes, "KV pool stays on the heap: shm transfers will stage through a copy");
            (Box::new(HeapMemory::new(bytes)), None)
        }
    }
}
