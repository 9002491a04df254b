//! The versioned, self-describing byte format of exported KV.
//!
//! ```text
//! header : "XPYDKV01" | version u16 | len u32 | JSON(KvHeader) | xxh3-64 of JSON
//! chunk* : "LAYR" | layer u32 | start u32 | count u32 | len u64 | payload | xxh3-64
//! end    : "END!" | chunks u32
//! ```
//! All integers little endian. A chunk's payload is the K rows then the V rows of
//! positions `start..start+count` of one layer, in the header's dtype. The checksum of a
//! chunk covers its fields and payload, so a flipped bit anywhere is caught.

use crate::config::KvDtype;
use crate::sequence::ResumeState;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// Format version written by this build.
pub const VERSION: u16 = 1;
const MAGIC: &[u8; 8] = b"XPYDKV01";
const CHUNK_TAG: &[u8; 4] = b"LAYR";
const END_TAG: &[u8; 4] = b"END!";
/// Largest header accepted (JSON bytes).
const MAX_HEADER: usize = 16 << 20;

/// Why exported KV was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KvFormatError {
    /// The data ended before `what` was complete.
    #[error("truncated data: {what}")]
    Truncated {
        /// The part that was cut.
        what: &'static str,
    },
    /// Not KV data of this project.
    #[error("bad magic: not xpyd KV data")]
    BadMagic,
    /// Written by an incompatible version.
    #[error("unsupported format version {0} (this build reads {VERSION})")]
    UnsupportedVersion(u16),
    /// The header JSON is malformed.
    #[error("malformed header: {0}")]
    Header(String),
    /// A checksum did not match.
    #[error("checksum mismatch in {what}")]
    Checksum {
        /// Which part.
        what: String,
    },
    /// The KV was computed by another model.
    #[error("model fingerprint mismatch: this engine runs {expected}, the KV is from {found}")]
    ModelMismatch {
        /// This engine's fingerprint.
        expected: String,
        /// The data's fingerprint.
        found: String,
    },
    /// Different element type.
    #[error("KV dtype mismatch: engine uses {expected:?}, data is {found:?}")]
    DtypeMismatch {
        /// This engine's dtype.
        expected: KvDtype,
        /// The data's dtype.
        found: KvDtype,
    },
    /// Layer count, row width or sizes disagree.
    #[error("geometry mismatch: {0}")]
    Geometry(String),
    /// A chunk that does not continue its layer where the previous one ended.
    #[error("layer {layer}: chunk starts at {start}, expected {expected}")]
    OutOfOrder {
        /// The layer.
        layer: u32,
        /// Where the chunk starts.
        start: u32,
        /// Where it should have started.
        expected: u32,
    },
    /// Finished with layers missing rows.
    #[error("incomplete KV: layer {layer} has {have} of {need} tokens")]
    Incomplete {
        /// The first incomplete layer.
        layer: u32,
        /// Rows received.
        have: u32,
        /// Rows expected.
        need: u32,
    },
}

type R<T> = Result<T, KvFormatError>;

/// What travels before the layers: identity, geometry and the state decode resumes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvHeader {
    /// Format version.
    pub version: u16,
    /// Fingerprint of the model that computed the KV.
    pub fingerprint: String,
    /// Element type of the rows.
    pub dtype: KvDtype,
    /// Layers that follow.
    pub n_layer: u32,
    /// Width of one K or V row.
    pub kv_dim: u32,
    /// Tokens per block on the exporter.
    pub block_size: u32,
    /// Tokens whose KV the data carries.
    pub token_count: u32,
    /// The exporter's block ids (informational: the importer allocates its own).
    pub source_blocks: Vec<u32>,
    /// Sampling, stop and token state for decode to resume from.
    pub resume: ResumeState,
}

impl KvHeader {
    /// Bytes of one layer's full payload (K and V of every token).
    pub fn layer_bytes(&self) -> usize {
        2 * self.token_count as usize * self.kv_dim as usize * self.dtype.size()
    }

    /// Serialises the header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let json = serde_json::to_vec(self).expect("header serialises");
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&xxh3_64(&json).to_le_bytes());
    }

    /// Parses a header, returning it and the bytes consumed.
    pub fn decode(buf: &[u8]) -> R<(KvHeader, usize)> {
        let mut r = Reader { buf, at: 0 };
        if r.take(8, "magic")? != MAGIC {
            return Err(KvFormatError::BadMagic);
        }
        let version = r.u16("version")?;
        if version != VERSION {
            return Err(KvFormatError::UnsupportedVersion(version));
        }
        let len = r.u32("header length")? as usize;
        if len > MAX_HEADER {
            return Err(KvFormatError::Header(format!("{len} bytes is too large")));
        }
        let json = r.take(len, "header")?;
        let sum = r.u64("header checksum")?;
        if xxh3_64(json) != sum {
            return Err(KvFormatError::Checksum {
                what: "header".into(),
            });
        }
        let h: KvHeader =
            serde_json::from_slice(json).map_err(|e| KvFormatError::Header(e.to_string()))?;
        if h.version != version {
            return Err(KvFormatError::UnsupportedVersion(h.version));
        }
        Ok((h, r.at))
    }
}

/// One layer's KV for a run of positions: the unit the prefill hook hands out and a
/// transport moves.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerChunk {
    /// Layer index.
    pub layer: u32,
    /// First position.
    pub start: u32,
    /// Positions carried.
    pub count: u32,
    /// K rows then V rows, little endian, in the header's dtype.
    pub payload: Vec<u8>,
}

impl LayerChunk {
    fn checksum(&self) -> u64 {
        let mut h = Xxh3::new();
        h.update(&self.layer.to_le_bytes());
        h.update(&self.start.to_le_bytes());
        h.update(&self.count.to_le_bytes());
        h.update(&self.payload);
        h.digest()
    }

    /// Serialises the chunk with its checksum.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(CHUNK_TAG);
        out.extend_from_slice(&self.layer.to_le_bytes());
        out.extend_from_slice(&self.start.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.payload);
        out.extend_from_slice(&self.checksum().to_le_bytes());
    }

    /// Parses and verifies one chunk, returning it and the bytes consumed.
    pub fn decode(buf: &[u8]) -> R<(LayerChunk, usize)> {
        let mut r = Reader { buf, at: 0 };
        if r.take(4, "chunk tag")? != CHUNK_TAG {
            return Err(KvFormatError::BadMagic);
        }
        let layer = r.u32("chunk layer")?;
        let start = r.u32("chunk start")?;
        let count = r.u32("chunk count")?;
        let len = r.u64("chunk length")?;
        let len = usize::try_from(len).map_err(|_| KvFormatError::Truncated { what: "chunk" })?;
        let payload = r.take(len, "chunk payload")?.to_vec();
        let sum = r.u64("chunk checksum")?;
        let chunk = LayerChunk {
            layer,
            start,
            count,
            payload,
        };
        if chunk.checksum() != sum {
            return Err(KvFormatError::Checksum {
                what: format!("layer {layer} chunk at {start}"),
            });
        }
        Ok((chunk, r.at))
    }
}

/// A whole export: header, then every chunk, then the end marker.
pub fn encode_all(header: &KvHeader, chunks: &[LayerChunk]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.layer_bytes() * header.n_layer as usize + 4096);
    header.encode(&mut out);
    for c in chunks {
        c.encode(&mut out);
    }
    out.extend_from_slice(END_TAG);
    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    out
}

/// Parses a whole export (header, chunks, end marker), verifying every checksum.
pub fn decode_all(buf: &[u8]) -> R<(KvHeader, Vec<LayerChunk>)> {
    let (header, mut at) = KvHeader::decode(buf)?;
    let mut chunks = Vec::new();
    loop {
        let rest = &buf[at..];
        if rest.len() >= 4 && &rest[..4] == END_TAG {
            let mut r = Reader { buf: rest, at: 4 };
            let n = r.u32("end marker")? as usize;
            if n != chunks.len() {
                return Err(KvFormatError::Geometry(format!(
                    "end marker counts {n} chunks, found {}",
                    chunks.len()
                )));
            }
            if r.at != rest.len() {
                return Err(KvFormatError::Geometry("trailing bytes after end".into()));
            }
            return Ok((header, chunks));
        }
        let (c, used) = LayerChunk::decode(rest)?;
        chunks.push(c);
        at += used;
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> R<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(KvFormatError::Truncated { what })?;
        let s = self
            .buf
            .get(self.at..end)
            .ok_or(KvFormatError::Truncated { what })?;
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self, what: &'static str) -> R<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &'static str) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &'static str) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
}
