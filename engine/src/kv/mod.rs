//! The paged KV cache: block accounting, storage, and the export/import format.

pub mod blocks;
pub mod cache;
pub mod format;
pub mod prefix;

pub use blocks::{BlockAllocator, blocks_for};
pub use cache::{ATTN_QUERY_BLOCK, AttnQuery, CacheShape, HeapMemory, KvLayout, KvMemory, KvStore};
pub use format::{KvFormatError, KvHeader, LayerChunk};
pub use prefix::{PrefixCache, PrefixStats};
