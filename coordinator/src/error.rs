//! Client-facing errors: one type that renders as an OpenAI-style error body with the
//! right HTTP status (and Retry-After when it is worth retrying), or as a gRPC status.

use crate::cluster::Overload;
use serde_json::json;
use tonic::Code;

/// An error a client sees.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// OpenAI `type`.
    pub kind: &'static str,
    /// OpenAI `code`.
    pub code: Option<&'static str>,
    /// The request field at fault.
    pub param: Option<String>,
    /// What went wrong.
    pub message: String,
    /// Seconds after which a retry may succeed.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A refusal before the request is looked at: 401, 403, 413 or 429 (this one with
    /// `Retry-After: retry_after` seconds), with its OpenAI `type` and `code`.
    pub fn refusal(
        status: u16,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code: Some(code),
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 naming the field (in `param` and at the start of the message).
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            code: None,
            param: Some(param.into()),
            message: format!("{param}: {}", message.into()),
            retry_after: None,
        }
    }

    /// A query parameter's count in `1..=max`, or 400 naming `param`.
    ///
    /// # Errors
    /// 400 when `v` is not such a count.
    pub fn count(param: &str, v: &str, max: usize) -> Result<usize, ApiError> {
        v.parse()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| ApiError::invalid(param, format!("`{v}` is not in 1..={max}")))
    }

    /// 400 for a body that is not valid JSON or not the expected shape.
    pub fn bad_body(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            code: None,
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 404 for a model this cluster does not serve.
    pub fn unknown_model(given: &str, served: &str) -> Self {
        ApiError {
            status: 404,
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model".into()),
            message: format!("The model `{given}` does not exist; this cluster serves `{served}`"),
            retry_after: None,
        }
    }

    /// 400 for a prompt that does not fit the context.
    pub fn context(tokens: usize, max: usize) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            param: Some("messages".into()),
            message: format!(
                "This model's maximum context length is {max} tokens; the prompt has {tokens} tokens"
            ),
            retry_after: None,
        }
    }

    /// 5xx / 4xx from a failed leg.
    pub fn upstream(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind: if status >= 500 {
                "server_error"
            } else {
                "invalid_request_error"
            },
            code: None,
            param: None,
            message: message.into(),
            retry_after: (status == 503 || status == 429).then_some(1),
        }
    }

    /// 504 when a deadline passed.
    pub fn timeout(what: &str) -> Self {
        ApiError {
            status: 504,
            kind: "timeout",
            code: Some("timeout"),
            param: None,
            message: format!("{what} timed out"),
            retry_after: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }

    /// The equivalent gRPC status.
    pub fn grpc(&self) -> tonic::Status {
        let code = match self.status {
            400 | 413 | 422 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            429 => Code::ResourceExhausted,
            503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Internal,
        };
        let mut status = tonic::Status::new(code, self.message.clone());
        if let Some(secs) = self.retry_after {
            status
                .metadata_mut()
                .insert("retry-after", secs.to_string().parse().expect("digits"));
        }
        status
    }
}

impl From<Overload> for ApiError {
    fn from(o: Overload) -> Self {
        let (status, code) = match o {
            Overload::NoWorkers(_) => (503, "no_workers"),
            Overload::Timeout(_) | Overload::QueueFull => (429, "overloaded"),
        };
        ApiError {
            status,
            kind: if status == 429 {
                "rate_limit_exceeded"
            } else {
                "server_error"
            },
            code: Some(code),
            param: None,
            message: o.to_string(),
            retry_after: Some(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_maps_to_429_or_503_with_retry_after() {
        let e: ApiError = Overload::QueueFull.into();
        assert_eq!((e.status, e.retry_after), (429, Some(1)));
        let e: ApiError = Overload::NoWorkers("decode").into();
        assert_eq!(e.status, 503);
        assert_eq!(e.grpc().code(), Code::Unavailable);
        let b = ApiError::invalid("temperature", "3 is outside 0..=2").body();
        assert_eq!(b["error"]["param"], "temperature");
    }
}
