//! A receiver's KV pools in shared memory: the engine keeps its blocks in a committed
//! /dev/shm segment, and each shm transfer is told where a sequence's rows go
//! ([`Placement`]), so a same-host sender writes them straight into the blocks and the
//! receiver only verifies them where they are.

use std::path::Path;
use xpyd_engine::kv::HeapMemory;
use xpyd_engine::{KvLayout, KvMemory};
use xpyd_kv_transfer::Placement;
use xpyd_kv_transfer::shm::{SHM_DIR, Segment, remove_orphans, segment_name};

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
    remove_orphans(Path::new(SHM_DIR));
    let name = segment_name("kvpool");
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

/// Why a received chunk was not taken in.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The engine refused it (geometry, order, state).
    #[error(transparent)]
    Engine(#[from] xpyd_engine::EngineError),
    /// Its bytes failed verification.
    #[error(transparent)]
    Transfer(#[from] xpyd_kv_transfer::TransferError),
}

/// Takes one received layer chunk (tag `start << 32 | count`) into sequence `id`: rows a
/// same-host sender placed in the blocks are verified where they are, others are copied
/// in while verified. Nothing is accepted unless the checksum matches; on any failure
/// the sequence is removed (a placed import's blocks are then held, see
/// [`Engine::remove`](xpyd_engine::Engine::remove)).
pub fn import_chunk(
    engine: &mut xpyd_engine::Engine,
    id: u64,
    layer: u32,
    tag: u64,
    data: &xpyd_kv_transfer::Payload,
) -> Result<(), ChunkError> {
    let (start, count) = ((tag >> 32) as u32, tag as u32);
    let mut reader = data.reader();
    if data.is_placed() {
        engine.import_rows_in_place(id, layer, start, count, data.len(), &mut |off, b| {
            reader.check_in_place(off, b).map_err(|e| e.to_string())
        })?;
    } else {
        engine.import_rows_with(id, layer, start, count, data.len(), &mut |off, dst| {
            reader.copy_to(off, dst).map_err(|e| e.to_string())
        })?;
    }
    if let Err(e) = reader.finish() {
        engine.remove(id);
        return Err(e.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use xpyd_engine::testing::TinyModel;
    use xpyd_engine::{Engine, EngineConfig, SamplingParams};
    use xpyd_kv_transfer::Payload;
    use xpyd_kv_transfer::frame::checksum;
    use xpyd_kv_transfer::shm::Expect;

    /// The sender's formula (`Placement::runs`) and the engine's own layout agree: rows
    /// written where the placement says are what the engine verifies in place, through
    /// the same `import_chunk` the decode worker uses, and decode continues exactly.
    #[test]
    fn rows_written_through_a_placement_are_the_engines_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        TinyModel {
            seed: 3,
            ..Default::default()
        }
        .write(&path)
        .unwrap();
        let mut cfg = EngineConfig::new(&path);
        cfg.num_blocks = Some(64);
        cfg.prefill_chunk = 16;
        let mut a = Engine::load(cfg.clone()).unwrap();
        let mut shared = None;
        let make: Box<xpyd_engine::KvMemoryFactory<'_>> = Box::new(|bytes| {
            let (mem, pool) = kv_memory(bytes);
            shared = pool;
            Ok(mem)
        });
        let mut b = Engine::load_with_kv_memory(cfg, Some(make)).unwrap();
        let pool = shared.expect("a shared pool under /dev/shm");
        // Fragment the allocator so the table is not one run.
        b.reserve_import(1, 40).unwrap();
        b.reserve_import(2, 20).unwrap();
        b.remove(1);
        b.release_held(1);
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(6)
        };
        let prompt: Vec<u32> = (0..60).map(|i| 3 + (i * 11) % 200).collect();
        let reference = a
            .generate(9, prompt.clone(), params.clone(), &mut |_| {})
            .unwrap()
            .tokens;
        let table = b.reserve_import(3, prompt.len()).unwrap();
        assert!(table.windows(2).any(|w| w[1] != w[0] + 1), "{table:?}");
        let placement = pool.placement(&b.kv_layout(), table);
        let mut peer = Segment::open(Path::new(&placement.path), placement.len).unwrap();
        a.add_sequence(1, prompt, params).unwrap();
        b.begin_import(3, &a.export_header(1).unwrap()).unwrap();
        let mut chunks = Vec::new();
        let first = a.prefill(1, &mut |c| chunks.push(c)).unwrap();
        for c in &chunks {
            let tag = u64::from(c.start) << 32 | u64::from(c.count);
            let mut at = 0;
            for r in placement.runs(c.layer, tag, c.payload.len()).unwrap() {
                let n = r.len();
                peer.bytes_mut()[r].copy_from_slice(&c.payload[at..at + n]);
                at += n;
            }
            let expect = Expect {
                layer: c.layer,
                tag,
                checksum: checksum(c.layer, tag, &c.payload),
            };
            import_chunk(
                &mut b,
                3,
                c.layer,
                tag,
                &Payload::Placed(c.payload.len(), expect),
            )
            .unwrap();
        }
        b.import_resume(3, a.resume_state(1).unwrap()).unwrap();
        b.finish_import(3).unwrap();
        let mut out = vec![first.token];
        b.run_to_end(3, &mut |ev| out.push(ev.token)).unwrap();
        assert_eq!(out, reference);

        // A row changed after the sender's checksum fails the import; the blocks are held.
        let table = b.reserve_import(4, 20).unwrap();
        let placement = pool.placement(&b.kv_layout(), table.clone());
        b.begin_import(4, &{
            a.add_sequence(5, (0..20).collect(), SamplingParams::greedy(2))
                .unwrap();
            a.export_header(5).unwrap()
        })
        .unwrap();
        let mut chunks = Vec::new();
        a.prefill(5, &mut |c| chunks.push(c)).unwrap();
        let c = &chunks[0];
        let tag = u64::from(c.start) << 32 | u64::from(c.count);
        let runs = placement.runs(c.layer, tag, c.payload.len()).unwrap();
        let mut at = 0;
        for r in runs.clone() {
            let n = r.len();
            peer.bytes_mut()[r].copy_from_slice(&c.payload[at..at + n]);
            at += n;
        }
        peer.bytes_mut()[runs[0].start + 3] ^= 1;
        let expect = Expect {
            layer: c.layer,
            tag,
            checksum: checksum(c.layer, tag, &c.payload),
        };
        let err = import_chunk(
            &mut b,
            4,
            c.layer,
            tag,
            &Payload::Placed(c.payload.len(), expect),
        )
        .unwrap_err();
        assert!(matches!(err, ChunkError::Transfer(_)), "{err}");
        assert!(b.holds(4));
        assert_eq!(b.release_held(4), table.len());
    }
}
