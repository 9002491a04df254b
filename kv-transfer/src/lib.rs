//! Moving a request's KV cache between processes.
//!
//! A [`Receiver`] (decode side) reserves room for a transfer and hands out a serializable
//! [`TransferTarget`]; a [`Sender`] (prefill side) opens the target, writes layer chunks
//! as they are computed and commits; the receiver's [`Incoming`] yields each verified
//! chunk as it lands, then `Complete` — or a typed failure within the deadline.
//! Backends: TCP (checksummed frames, pooled connections) and same-host shared memory
//! (the sender writes straight into the receiver's segment; only small notices cross the
//! socket; with a [`Placement`] it writes straight into the receiver's KV blocks), and
//! NCCL behind the `nccl` feature. Reservations are epoch-fenced: a released and reused reservation refuses
//! senders holding the old epoch.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod buffers;
pub mod error;
pub mod frame;
pub mod metrics;
#[cfg(feature = "nccl")]
pub mod nccl;
#[cfg(not(feature = "nccl"))]
#[path = "nccl_absent.rs"]
pub mod nccl;
pub mod oob;
pub mod receiver;
pub mod sender;
pub mod shm;
pub mod stream;
pub mod target;
#[cfg(feature = "ucx")]
pub mod ucx;

pub use error::{Result, TransferError};
pub use receiver::{Event, Incoming, Receiver, ReceiverConfig, ReserveSpec, Stats, TransferFence};
pub use sender::{Sender, Transfer};
pub use shm::{Payload, PayloadReader};
pub use target::{Backend, Placement, ShmDesc, TransferTarget};
