//! One request on the engine thread, with one explicit stage. Transitions:
//!
//! ```text
//! Reserved ──Begin──► Importing ──Finish──► Decoding ──finish/cancel──► (gone)
//!    │                   │   (placed import failed, a sender attached)
//!    │                   └──────────────► Held ──timeout──► (gone)
//!    └──Cancel (no stream yet)──► (gone, or Held as above)
//! Local ──► Prefilling ──first token──► Decoding
//! ```
//!
//! Only requests with a stream (`out`) send tokens or errors; a reservation without one
//! (placed imports reserve blocks before the header arrives) is freed silently.

use super::EventTx;
use std::time::Instant;
use xpyd_kv_transfer::TransferFence;

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Blocks reserved for a placed import; no header yet.
    Reserved,
    /// KV arriving from a prefill worker.
    Importing,
    /// Combined mode: prompt being prefilled here, chunk by chunk.
    Prefilling,
    /// In the running batch.
    Decoding,
    /// A failed placed import whose blocks (and budget promise) stay out of use until
    /// then: its sender may still write into them.
    Held {
        /// When the blocks are freed.
        until: Instant,
    },
}

/// A request the engine thread holds.
#[derive(Debug)]
pub struct Request {
    /// Where it is.
    pub stage: Stage,
    /// Its response stream; `None` before the import's header arrived.
    pub out: Option<EventTx>,
    /// When its import or local prefill began (for TTFT, and the prefill order).
    pub started: Instant,
    /// The fence of its placed transfer, until the import completes.
    pub fence: Option<TransferFence>,
    /// When its last token went out.
    pub last_token: Option<Instant>,
    /// Sum of the gaps between its tokens (seconds).
    pub gaps: f64,
    /// Tokens sent.
    pub tokens: usize,
}

impl Request {
    /// A request at `stage`, streaming to `out` when it has a stream.
    pub fn new(stage: Stage, out: Option<EventTx>) -> Self {
        Request {
            stage,
            out,
            started: Instant::now(),
            fence: None,
            last_token: None,
            gaps: 0.0,
            tokens: 0,
        }
    }

    /// True while its blocks are held after a failed placed import.
    pub fn held(&self) -> bool {
        matches!(self.stage, Stage::Held { .. })
    }
}
