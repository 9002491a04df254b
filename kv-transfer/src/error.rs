//! Typed transfer errors, with the retryable-vs-fatal split the coordinator acts on.

/// Why a transfer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// The transfer did not complete before its deadline.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The other side closed the connection or died before the transfer completed.
    #[error("peer gone: {0}")]
    PeerGone(String),
    /// No reservation with this id, or it was released and reused (older epoch).
    #[error("stale or unknown reservation {transfer_id} epoch {epoch}")]
    StaleEpoch {
        /// The transfer.
        transfer_id: u64,
        /// The epoch the sender presented.
        epoch: u64,
    },
    /// The sender's model is not the receiver's.
    #[error("model fingerprint mismatch: receiver expects {expected}, sender has {found}")]
    FingerprintMismatch {
        /// The receiver's fingerprint.
        expected: String,
        /// The sender's fingerprint.
        found: String,
    },
    /// A checksum did not match: the data was corrupted on the way.
    #[error("checksum mismatch in {0}")]
    Checksum(String),
    /// The peer sent something that is not this protocol, or out of bounds.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The requested backend is not built or cannot run on this machine.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The peer reported a failure.
    #[error("rejected by peer: {0}")]
    Rejected(String),
    /// Local I/O failure (bind, mmap, …).
    #[error("i/o: {0}")]
    Io(String),
}

impl TransferError {
    /// True when retrying the transfer (e.g. on another pair of workers) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            TransferError::DeadlineExceeded(_)
                | TransferError::PeerGone(_)
                | TransferError::Checksum(_)
                | TransferError::Io(_)
        )
    }

    /// Short label for the failure-reason metric.
    pub fn reason(&self) -> &'static str {
        match self {
            TransferError::DeadlineExceeded(_) => "deadline",
            TransferError::PeerGone(_) => "peer_gone",
            TransferError::StaleEpoch { .. } => "stale_epoch",
            TransferError::FingerprintMismatch { .. } => "fingerprint",
            TransferError::Checksum(_) => "checksum",
            TransferError::Protocol(_) => "protocol",
            TransferError::Unavailable(_) => "unavailable",
            TransferError::Rejected(_) => "rejected",
            TransferError::Io(_) => "io",
        }
    }
}

impl From<std::io::Error> for TransferError {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted
            | ConnectionRefused => TransferError::PeerGone(e.to_string()),
            _ => TransferError::Io(e.to_string()),
        }
    }
}

/// Result alias.
pub type Result<T, E = TransferError> = std::result::Result<T, E>;
