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
    /// Device and inode of the mapped file: a path reused by a new segment is a new file.
    id: (u64, u64),
    /// The creator's shared lock on the file while it lives: how [`remove_orphans`] tells
    /// a live segment from one whose process died (across PID namespaces too).
    _alive: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// A name for a new segment: `xpyd-<kind>-<pid>-<nonce>`, unique per process and run (a
/// restarted worker with the same pid does not reuse a name a sender may have mapped).
pub fn segment_name(kind: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    format!("xpyd-{kind}-{}-{:016x}", std::process::id(), h.finish())
}

/// Removes segments under `dir` left by processes that are gone (killed before they
/// could unlink them: /dev/shm is memory). A live segment's creator holds a shared lock
/// on it; a segment nobody locks, older than a minute, is an orphan. Only this user's
/// segments can be opened (they are created 0600).
pub fn remove_orphans(dir: &Path) {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_str().is_some_and(|n| n.starts_with("xpyd-")) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(60));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(e.path());
        if let (true, Ok(f)) = (old, file)
            && Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok()
        {
            tracing::info!(segment = ?name, "removing a shared-memory segment no process holds");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn file_id(f: &std::fs::File) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

impl Segment {
    /// Creates and maps a new segment of `len` bytes (receiver side). Its pages are
    /// committed on first touch, so a full /dev/shm surfaces later as a fault: use
    /// [`Segment::create_committed`] for memory that must be there (KV pools).
    pub fn create(dir: &Path, name: &str, len: u64) -> Result<Self> {
        Self::create_with(dir, name, len, false)
    }

    /// Like [`Segment::create`], with every page allocated up front: a /dev/shm too small
    /// is an error now rather than a bus error on some later write.
    pub fn create_committed(dir: &Path, name: &str, len: u64) -> Result<Self> {
        Self::create_with(dir, name, len, true)
    }

    fn create_with(dir: &Path, name: &str, len: u64, commit: bool) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        // Only this user's processes may read or write the KV.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| TransferError::Io(format!("create {}: {e}", path.display())))?;
        f.set_len(len.max(1))
            .map_err(|e| TransferError::Io(format!("size {}: {e}", path.display())))?;
        if commit {
            let n = i64::try_from(len.max(1)).map_err(|_| TransferError::Io("segment size".into()));
            if let Err(e) = n.and_then(|n| {
                nix::fcntl::posix_fallocate(&f, 0, n)
                    .map_err(|e| TransferError::Io(format!("allocate {len} bytes: {e}")))
            }) {
                let _ = std::fs::remove_file(&path);
                return Err(TransferError::Unavailable(format!(
                    "{}: {e}",
                    path.display()
                )));
            }
        }
        // SAFETY: we just created the file; only its owner (this receiver) sizes or removes it.
        let map = unsafe { MmapMut::map_mut(&f) }
            .map_err(|e| TransferError::Io(format!("mmap {}: {e}", path.display())))?;
        let id = file_id(&f)?;
        Ok(Segment {
            map,
            path,
            owner: true,
            id,
            _alive: nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).ok(),
        })
    }

    /// Maps an existing segment (sender side); its size must be `len`. Symbolic links
    /// are not followed.
    pub fn open(path: &Path, len: u64) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
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
            id: file_id(&f)?,
            _alive: None,
        })
    }

    /// True when `path` still names the file this segment maps.
    pub fn is_current(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
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

/// The checksum a chunk must match, checked by whoever reads it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// Layer index.
    pub layer: u32,
    /// The sender's tag.
    pub tag: u64,
    /// Expected checksum.
    pub checksum: u64,
}

/// Bytes of a received chunk: owned (tcp, verified on receipt) or a range of the
/// receiver's shared region (shm, zero-copy: the sender wrote them there directly). A
/// shared range is verified as it is read: through [`Payload::reader`], which checks the
/// checksum while copying into the destination (one pass), or [`Payload::verified`].
#[derive(Debug, Clone)]
pub enum Payload {
    /// Received into a (pooled) buffer; already verified.
    Owned(Arc<PooledBuf>),
    /// A range of a shared region (relative to the region), with its checksum.
    Mapped(Arc<Region>, std::ops::Range<usize>, Expect),
    /// `len` bytes the sender wrote straight into the receiver's KV blocks (a placed
    /// transfer): nothing to copy, only to verify where they are, through
    /// [`PayloadReader::check_in_place`].
    Placed(usize, Expect),
}

impl Payload {
    /// The bytes to copy out (none for a placed payload).
    fn raw(&self) -> &[u8] {
        match self {
            Payload::Owned(v) => v,
            Payload::Mapped(s, r, _) => &s.bytes()[r.clone()],
            Payload::Placed(..) => &[],
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Placed(n, _) => *n,
            _ => self.raw().len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True for rows already in the receiver's KV blocks.
    pub fn is_placed(&self) -> bool {
        matches!(self, Payload::Placed(..))
    }

    fn not_placed(&self) -> Result<()> {
        if self.is_placed() {
            return Err(TransferError::Protocol(
                "placed rows are in the KV blocks already: check them in place".into(),
            ));
        }
        Ok(())
    }

    /// The bytes, after verifying them (a read pass for shared ranges).
    pub fn verified(&self) -> Result<&[u8]> {
        self.not_placed()?;
        let mut r = self.reader();
        r.check(self.raw())?;
        Ok(self.raw())
    }

    /// A verified copy.
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        self.not_placed()?;
        let mut out = vec![0u8; self.len()];
        let mut r = self.reader();
        r.copy_to(0, &mut out)?;
        r.finish()?;
        Ok(out)
    }

    /// Copies the bytes out in order, verifying as it goes, or (placed) verifies them
    /// where they are; see [`PayloadReader`].
    pub fn reader(&self) -> PayloadReader<'_> {
        let expect = match self {
            Payload::Owned(_) => None,
            Payload::Mapped(_, _, e) | Payload::Placed(_, e) => {
                Some((crate::frame::checksum_start(e.layer, e.tag), *e))
            }
        };
        PayloadReader {
            src: self.raw(),
            len: self.len(),
            placed: self.is_placed(),
            next: 0,
            expect,
        }
    }
}

/// Copies a payload into destinations in order, continuing its checksum over each piece
/// while the piece is in cache, or (placed payloads) continues the checksum over the
/// bytes where the sender put them. Data is only accepted once
/// [`PayloadReader::finish`] returns `Ok`: a destination filled from a corrupt payload
/// must be discarded.
pub struct PayloadReader<'a> {
    src: &'a [u8],
    len: usize,
    placed: bool,
    next: usize,
    expect: Option<(u32, Expect)>,
}

impl PayloadReader<'_> {
    fn at(&self, offset: usize, n: usize) -> Result<usize> {
        offset
            .checked_add(n)
            .filter(|e| *e <= self.len && offset == self.next)
            .ok_or_else(|| {
                TransferError::Protocol(format!(
                    "payload read at {offset}+{n} (next {}, length {})",
                    self.next, self.len
                ))
            })
    }

    /// Continues the checksum over payload bytes `offset..offset + bytes.len()` of a
    /// placed payload, read where the sender wrote them (the receiver's KV blocks).
    /// Offsets must follow each other without gaps.
    pub fn check_in_place(&mut self, offset: usize, bytes: &[u8]) -> Result<()> {
        if !self.placed {
            return Err(TransferError::Protocol(
                "only placed payloads are checked in place".into(),
            ));
        }
        self.next = self.at(offset, bytes.len())?;
        if let Some((crc, _)) = self.expect.as_mut() {
            *crc = crate::frame::checksum_update(*crc, bytes);
        }
        Ok(())
    }

    /// Copies payload bytes `offset..offset + dst.len()` into `dst`. Offsets must follow
    /// each other without gaps.
    pub fn copy_to(&mut self, offset: usize, dst: &mut [u8]) -> Result<()> {
        const PIECE: usize = 64 * 1024;
        if self.placed {
            return Err(TransferError::Protocol(
                "placed rows are in the KV blocks already: check them in place".into(),
            ));
        }
        let end = self.at(offset, dst.len())?;
        for (s, d) in self.src[offset..end]
            .chunks(PIECE)
            .zip(dst.chunks_mut(PIECE))
        {
            d.copy_from_slice(s);
            if let Some((crc, _)) = self.expect.as_mut() {
                *crc = crate::frame::checksum_update(*crc, s);
            }
        }
        self.next = end;
        Ok(())
    }

    fn check(&mut self, all: &[u8]) -> Result<()> {
        if let Some((crc, _)) = self.expect.as_mut() {
            *crc = crate::frame::checksum_update(*crc, all);
        }
        self.next = all.len();
        self.finish_ref()
    }

    fn finish_ref(&self) -> Result<()> {
        if self.next != self.len {
            return Err(TransferError::Protocol(format!(
                "payload read {} of {} bytes",
                self.next, self.len
            )));
        }
        match self.expect {
            Some((crc, e)) if crc as u64 != e.checksum => Err(TransferError::Checksum(format!(
                "layer {} chunk {:#x} in shared memory{}",
                e.layer,
                e.tag,
                if self.placed { " (placed)" } else { "" }
            ))),
            _ => Ok(()),
        }
    }

    /// Succeeds when every byte was copied and the checksum matched.
    pub fn finish(self) -> Result<()> {
        self.finish_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_segments_nobody_holds_are_removed_as_orphans() {
        let dir = tempfile_dir();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
        let live = Segment::create(&dir, "xpyd-live", 4096).unwrap();
        let orphan = dir.join("xpyd-orphan");
        std::fs::write(&orphan, b"left by a killed process").unwrap();
        let young = dir.join("xpyd-young");
        std::fs::write(&young, b"just created").unwrap();
        let other = dir.join("not-ours");
        std::fs::write(&other, b"x").unwrap();
        for p in [live.path(), orphan.as_path(), other.as_path()] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        remove_orphans(&dir);
        assert!(live.path().exists(), "its creator holds it");
        assert!(!orphan.exists(), "nobody holds it");
        assert!(young.exists(), "too young to judge");
        assert!(other.exists(), "not a segment");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("xpyd-shm-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

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
