//! The gRPC contract of xpyd (`xpyd.v1`), generated once here with tonic-prost-build;
//! no other crate compiles `.proto` files.

/// Everything in package `xpyd.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("xpyd.v1");
}

/// Encoded `FileDescriptorSet` of `xpyd.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("xpyd_descriptor");

pub use v1::*;

impl WorkerError {
    /// A status whose details carry a [`WorkerError`] of `kind`.
    pub fn status(
        kind: worker_error::Kind,
        code: tonic::Code,
        message: impl Into<String>,
    ) -> tonic::Status {
        let details = prost::Message::encode_to_vec(&WorkerError { kind: kind as i32 });
        tonic::Status::with_details(code, message, details.into())
    }

    /// The kind a status's details carry, if it came from a worker that said.
    pub fn kind_of(status: &tonic::Status) -> Option<worker_error::Kind> {
        let e: WorkerError = prost::Message::decode(status.details()).ok()?;
        match worker_error::Kind::try_from(e.kind).ok()? {
            worker_error::Kind::Unspecified => None,
            k => Some(k),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_error_survives_the_status() {
        let s = WorkerError::status(
            worker_error::Kind::Draining,
            tonic::Code::Unavailable,
            "draining",
        );
        assert_eq!(WorkerError::kind_of(&s), Some(worker_error::Kind::Draining));
        assert_eq!(WorkerError::kind_of(&tonic::Status::unavailable("x")), None);
    }
}
