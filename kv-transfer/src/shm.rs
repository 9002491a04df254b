//! Shared-memory segments: a file under /dev/shm mapped by both processes. The only
//! `unsafe` in the crate is here: mapping a file, which is sound while no other process
//! truncates it (segments are created, sized and unlinked only by their receiver).
#![allow(unsafe_code)]

use crate::error::{Result, TransferError};
use memmap2::MmapMut;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Bytes of a received chunk: owned (tcp) or a range of the receiver's segment (shm,
/// zero-copy: the sender wrote them there directly).
#[derive(Debug, Clone)]
pub enum Payload {
    /// Received into a buffer.
    Owned(Arc<Vec<u8>>),
    /// A range of a shared segment.
    Mapped(Arc<Segment>, std::ops::Range<usize>),
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
