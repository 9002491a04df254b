//! The commands the service and the transfer tasks send the engine thread.

use tokio::sync::mpsc;
use tonic::Status;
use xpyd_engine::{KvHeader, ResumeState, SamplingParams};
use xpyd_kv_transfer::{Incoming, Payload, TransferTarget};
use xpyd_proto as pb;

/// What a request's response stream carries.
pub type EventTx = mpsc::Sender<Result<pb::DecodeEvent, Status>>;

/// Makes a placed transfer's reservation from the block table its blocks got.
pub type ReserveFn = Box<dyn FnOnce(Vec<u32>) -> Result<(TransferTarget, Incoming), Status> + Send>;

/// Work for the engine thread.
pub enum Cmd {
    /// A hold may have ended.
    Wake,
    /// Reserve blocks for a placed import of `tokens` tokens (before its header arrives)
    /// and, in the same turn of the loop, the transfer that writes into them: `reserve`
    /// makes it from the block table, and the loop keeps its fence (see
    /// [`HOLD_AFTER_FAILED_IMPORT`]) before the reply hands the target out. One round
    /// trip: a second one would wait out a whole decode step under load.
    Reserve {
        /// Request id (= sequence id).
        id: u64,
        /// Prompt tokens whose KV will arrive.
        tokens: usize,
        /// Makes the transfer's reservation from the block table.
        reserve: ReserveFn,
        /// The target to hand to the sender and what arrives, or why not.
        reply: tokio::sync::oneshot::Sender<Result<(TransferTarget, Incoming), Status>>,
    },
    /// The KV header arrived: reserve blocks for the import.
    Begin {
        /// Request id (= sequence id).
        id: u64,
        /// The exporter's header.
        header: Box<KvHeader>,
        /// Where this request's tokens and errors go.
        out: EventTx,
    },
    /// One layer chunk: rows `start..start+count` of `layer`.
    Rows {
        /// Request id.
        id: u64,
        /// Layer.
        layer: u32,
        /// Chunk tag (`start << 32 | count`).
        tag: u64,
        /// The bytes, verified while copied into the KV blocks (or, placed, where the
        /// sender wrote them).
        data: Payload,
    },
    /// The resume state (first token, sampler position) arrived.
    Resume {
        /// Request id.
        id: u64,
        /// The state.
        state: Box<ResumeState>,
    },
    /// The transfer completed: start decoding.
    Finish {
        /// Request id.
        id: u64,
    },
    /// Combined mode: prefill `tokens` here, then decode.
    Local {
        /// Request id.
        id: u64,
        /// Prompt tokens, then any tokens generated elsewhere (a migrated request).
        tokens: Vec<u32>,
        /// How many of `tokens` are the prompt.
        prompt_len: usize,
        /// Sampling.
        params: SamplingParams,
        /// Where tokens go.
        out: EventTx,
    },
    /// Drop the request and free everything it holds (idempotent).
    Cancel {
        /// Request id.
        id: u64,
        /// Counted as cancelled (the client left) rather than finished.
        client_gone: bool,
    },
    /// Fail the request with this status and free it.
    Fail {
        /// Request id.
        id: u64,
        /// What went wrong.
        status: Status,
    },
    /// The drain timed out: send every request away (they fail with kind draining, and
    /// the coordinator migrates them).
    Evict,
}
