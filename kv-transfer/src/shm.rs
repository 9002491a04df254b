//! Shared-memory segments: a file under /dev/shm mapped by both processes. The only
//! `unsafe` in the crate is here: mapping a file, which is sound while no other process
//! truncates it (segments are created, sized and unlinked only by their receiver).
#![allow(unsafe_code)]

use crate::buffers::PooledBuf;
use crate::error::{Result, TransferError};
use memmap2::MmapMut;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where segments are created.
pub const SHM_DIR: &str = "/dev/shm";

/// A mapped segment. The receiver's copy unlinks the file when dropped.
#[derive(Debug)]
pub struct Segment {
    map: MmapMut,
    path: PathBuf,
    owner: bool,
}

impl Segment {
    /// Creates and maps a new segment of `len` bytes (receiver side).
    pub fn create(dir: &Path, name: &str, len: u64) -> Result<Self> {
        let path = dir.join(name);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| TransferError::Io(format!("create {}: {e}", path.display())))?;
        f.set_len(len.max(1))
            .map_err(|e| TransferError::Io(format!("size {}: {e}", path.display())))?;
        // SAFETY: we just created the file; only its owner (this receiver) sizes or removes it.
        let map = unsafe { MmapMut::map_mut(&f) }
            .map_err(|e| TransferError::Io(format!("mmap {}: {e}", path.display())))?;
        Ok(Segment {
            map,
            path,
            owner: true,
        })
    }

    /// Maps an existing segment (sender side); its size must be `len`.
    pub fn open(path: &Path, len: u64) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| TransferError::Unavailable(format!("open {}: {e}", path.display())))?;
        let actual = f.metadata()?.len();
        if actual != len.max(1) {
            return Err(TransferError::Protocol(format!(
                "segment {} has {actual} bytes, target says {len}",
                path.display()
            )));
        }
        // SAFETY: the receiver never truncates a segment while a reservation is live; a
        // sender that outlives the reservation writes into an unlinked, still-mapped file.
        let map = unsafe { MmapMut::map_mut(&f) }
            .map_err(|e| TransferError::Io(format!("mmap {}: {e}", path.display())))?;
        Ok(Segment {
            map,
            path: path.to_path_buf(),
            owner: false,
        })
    }

    /// The mapping.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The mapping, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// The file backing the segment.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A receiver's long-lived segment, carved into regions per reservation. Senders map it
/// once and keep the mapping, so steady-state transfers touch no fresh pages.
#[derive(Debug)]
pub struct Arena {
    seg: Segment,
    /// Free ranges: offset → length, coalesced.
    free: Mutex<BTreeMap<usize, usize>>,
}

/// Regions are aligned to pages.
const ALIGN: usize = 4096;

impl Arena {
    /// Creates the segment backing the arena.
    pub fn create(dir: &Path, name: &str, len: u64) -> Result<Arc<Self>> {
        let seg = Segment::create(dir, name, len)?;
        let mut free = BTreeMap::new();
        free.insert(0, seg.len());
        Ok(Arc::new(Arena {
            seg,
            free: Mutex::new(free),
        }))
    }

    /// The segment.
    pub fn segment(&self) -> &Segment {
        &self.seg
    }

    /// Takes a region of `len` bytes (first fit), or `None` when the arena is too full.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Option<Region> {
        let want = len.max(1).next_multiple_of(ALIGN);
        let mut free = self.free.lock().expect("arena lock");
        let (&off, &have) = free.iter().find(|(_, l)| **l >= want)?;
        free.remove(&off);
        if have > want {
            free.insert(off + want, have - want);
        }
        Some(Region {
            arena: self.clone(),
            off,
            len: want,
        })
    }

    fn release(&self, off: usize, len: usize) {
        let mut free = self.free.lock().expect("arena lock");
        let (mut off, mut len) = (off, len);
        if let Some((&p, &pl)) = free.range(..off).next_back()
            && p + pl == off
        {
            free.remove(&p);
            off = p;
            len += pl;
        }
        if let Some(nl) = free.remove(&(off + len)) {
            len += nl;
        }
        free.insert(off, len);
    }

    /// Bytes free now.
    pub fn free_bytes(&self) -> usize {
        self.free.lock().expect("arena lock").values().sum()
    }
}

/// A region of an arena, returned to it when the last holder drops it.
#[derive(Debug)]
pub struct Region {
    arena: Arc<Arena>,
    off: usize,
    len: usize,
}

impl Region {
    /// Offset in the segment.
    pub fn offset(&self) -> usize {
        self.off
    }

    /// Length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.arena.seg.bytes()[self.off..self.off + self.len]
    }

    /// The arena.
    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.arena.release(self.off, self.len);
    }
}

/// Bytes of a received chunk: owned (tcp) or a range of the receiver's shared region
/// (shm, zero-copy: the sender wrote them there directly).
#[derive(Debug, Clone)]
pub enum Payload {
    /// Received into a (pooled) buffer.
    Owned(Arc<PooledBuf>),
    /// A range of a shared region (relative to the region).
    Mapped(Arc<Region>, std::ops::Range<usize>),
}

impl Payload {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Owned(v) => v,
            Payload::Mapped(s, r) => &s.bytes()[r.clone()],
        }
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_regions_are_disjoint_and_coalesce() {
        let dir = std::env::temp_dir();
        let name = format!("xpyd-arena-test-{}", std::process::id());
        let a = Arena::create(&dir, &name, 64 * 1024).unwrap();
        let r1 = a.alloc(5000).unwrap();
        let r2 = a.alloc(4096).unwrap();
        assert_eq!((r1.offset(), r1.len()), (0, 8192));
        assert_eq!(r2.offset(), 8192);
        assert!(a.alloc(60 * 1024).is_none(), "too large for what is left");
        drop(r1);
        drop(r2);
        assert_eq!(a.free_bytes(), 64 * 1024);
        assert!(a.alloc(64 * 1024).is_some(), "freed ranges coalesce");
    }
}
