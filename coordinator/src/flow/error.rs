//! Why a request's flow stopped short of its finish. Decided by kind — from the typed
//! [`WorkerError`] a worker puts in its status, or from the transport's own failure —
//! never from message text; turned into an HTTP or gRPC error only at the edge
//! ([`FlowError::api`]).

use crate::cluster::{Leg, Overload, Slot};
use crate::error::ApiError;
use tonic::Status;
use xpyd_proto::WorkerError;
use xpyd_proto::worker_error::Kind;

/// How a worker leg failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection failed (refused, reset, keepalive unanswered): the worker is
    /// unreachable, so it is also marked down.
    Transport,
    /// The worker is draining or leaving and sent the request away.
    Draining,
    /// No room on that worker now (KV budget, queue).
    Overloaded,
    /// The KV transfer between the legs failed.
    Transfer,
    /// The worker's engine failed, or the worker answered with an unexpected error.
    Engine,
    /// The stream ended without a finishing token.
    Ended,
    /// The worker left the cluster (its lease lapsed) while serving the request.
    Left,
}

impl Failure {
    /// Label for metrics (`reason`).
    pub fn reason(self) -> &'static str {
        match self {
            Failure::Transport => "transport",
            Failure::Draining => "draining",
            Failure::Overloaded => "overloaded",
            Failure::Transfer => "transfer",
            Failure::Engine => "engine",
            Failure::Ended => "stream_ended",
            Failure::Left => "worker_left",
        }
    }
}

/// Why a request ended without its finish.
#[derive(Debug, Clone, PartialEq)]
pub enum FlowError {
    /// The client went away (disconnected, or stopped reading past its stall timeout):
    /// nothing is sent; every leg is dropped.
    ClientGone,
    /// No worker could take it in time.
    Overload(Overload),
    /// A deadline passed: `first token`, `next token` or `request`.
    Timeout(&'static str),
    /// The request itself is bad (a worker refused it as such): no worker would take it.
    Invalid(String),
    /// A leg failed on a worker: the request may go to another pair.
    Worker {
        /// Which leg.
        leg: Leg,
        /// The worker's id.
        worker: String,
        /// Its gRPC URL (excluded from the request's next attempts).
        url: String,
        /// How.
        failure: Failure,
        /// What it said (for the log and, if it is the last failure, the client).
        message: String,
    },
    /// Sent to `attempts` worker pairs, the limit; the last failure is kept.
    Exhausted {
        /// Pairs tried.
        attempts: u32,
        /// The last failure.
        last: Box<FlowError>,
    },
}

fn leg_name(leg: Leg) -> &'static str {
    match leg {
        Leg::Prefill => "prefill",
        Leg::Decode => "decode",
    }
}

impl FlowError {
    /// The error a worker's gRPC status means. A status tonic made from a local failure
    /// (connection refused or reset, keepalive unanswered, a broken stream) carries that
    /// failure as its source; one a worker sent does not.
    pub fn from_status(leg: Leg, worker: &Slot, s: &Status) -> FlowError {
        let failure = match WorkerError::kind_of(s) {
            Some(Kind::Invalid) => {
                return FlowError::Invalid(format!("{} worker: {}", leg_name(leg), s.message()));
            }
            Some(Kind::Overloaded) => Failure::Overloaded,
            Some(Kind::Draining) => Failure::Draining,
            Some(Kind::Transfer) => Failure::Transfer,
            Some(_) => Failure::Engine,
            None if std::error::Error::source(s).is_some() => Failure::Transport,
            None if s.code() == tonic::Code::InvalidArgument => {
                return FlowError::Invalid(format!("{} worker: {}", leg_name(leg), s.message()));
            }
            None => Failure::Engine,
        };
        Self::worker(leg, worker, failure, s.message())
    }

    /// A failure of `failure` kind on the worker of `slot`.
    pub fn worker(leg: Leg, slot: &Slot, failure: Failure, message: &str) -> FlowError {
        FlowError::Worker {
            leg,
            worker: slot.worker_id.clone(),
            url: slot.url.clone(),
            failure,
            message: message.to_string(),
        }
    }

    /// True when another worker pair may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, FlowError::Worker { .. })
    }

    /// What the client is told; `None` when nobody is listening.
    pub fn api(&self) -> Option<ApiError> {
        Some(match self {
            FlowError::ClientGone => return None,
            FlowError::Overload(o) => o.clone().into(),
            FlowError::Timeout(what) => ApiError::timeout(what),
            FlowError::Invalid(m) => ApiError::upstream(400, m.clone()),
            FlowError::Worker {
                leg,
                failure,
                message,
                ..
            } => {
                let status = if *failure == Failure::Overloaded {
                    429
                } else {
                    503
                };
                ApiError::upstream(status, format!("{} worker: {message}", leg_name(*leg)))
            }
            FlowError::Exhausted { attempts, last } => {
                let inner = last.api()?;
                ApiError::upstream(
                    inner.status,
                    format!(
                        "gave up after {attempts} worker pairs (the migration limit); last: {}",
                        inner.message
                    ),
                )
            }
        })
    }

    /// The HTTP status for metrics (`code` label): 499 for a client that left.
    pub fn code(&self) -> u16 {
        self.api().map_or(499, |e| e.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Cluster, RouteFacts};
    use crate::router::{PolicyKind, Router, RouterConfig};

    /// A slot on a registered decode worker (and the runtime its channel lives on).
    fn slot() -> (tokio::runtime::Runtime, Slot) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _in = rt.enter();
        let router = || Router::new(PolicyKind::RoundRobin, RouterConfig::default());
        let c = Cluster::new(router(), router(), 8);
        let info = xpyd_proto::WorkerInfo {
            worker_id: "decode-0".into(),
            role: "decode".into(),
            grpc_url: "http://127.0.0.1:1".into(),
            max_running: 4,
            ..Default::default()
        };
        c.upsert(info, Default::default(), None);
        let facts = RouteFacts {
            source_ip: None,
            tokens: vec![1u32].into(),
            class: 0,
            exclude: Vec::new(),
        };
        let slot = rt
            .block_on(c.acquire_decode(facts, std::time::Duration::from_secs(1)))
            .unwrap();
        drop(_in);
        (rt, slot)
    }

    #[test]
    fn kinds_decide_not_text() {
        let (_rt, d) = slot();
        let s = WorkerError::status(
            Kind::Draining,
            tonic::Code::Unavailable,
            "invalid argument!",
        );
        let e = FlowError::from_status(Leg::Decode, &d, &s);
        assert!(
            matches!(&e, FlowError::Worker { failure: Failure::Draining, url, .. } if url == "http://127.0.0.1:1")
        );
        assert!(e.retryable());
        let s = WorkerError::status(Kind::Invalid, tonic::Code::InvalidArgument, "transport");
        let e = FlowError::from_status(Leg::Prefill, &d, &s);
        assert!(matches!(e, FlowError::Invalid(_)) && !e.retryable());
        assert_eq!(e.api().unwrap().status, 400);
        // A status the peer sent without a kind is an engine failure, whatever it says.
        let e = FlowError::from_status(Leg::Decode, &d, &Status::unavailable("transport error"));
        assert!(matches!(
            &e,
            FlowError::Worker {
                failure: Failure::Engine,
                ..
            }
        ));
        // One tonic made from a local failure carries it as its source.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let e = FlowError::from_status(Leg::Decode, &d, &Status::from_error(Box::new(io)));
        assert!(matches!(
            &e,
            FlowError::Worker {
                failure: Failure::Transport,
                ..
            }
        ));
    }

    #[test]
    fn edges_map_to_client_errors() {
        let (_rt, d) = slot();
        assert_eq!(FlowError::ClientGone.api(), None);
        assert_eq!(FlowError::ClientGone.code(), 499);
        assert_eq!(FlowError::Timeout("first token").code(), 504);
        let w = FlowError::worker(Leg::Decode, &d, Failure::Overloaded, "full");
        assert_eq!(w.code(), 429);
        let x = FlowError::Exhausted {
            attempts: 4,
            last: Box::new(FlowError::worker(
                Leg::Decode,
                &d,
                Failure::Transport,
                "gone",
            )),
        };
        let api = x.api().unwrap();
        assert_eq!(api.status, 503);
        assert!(api.message.contains("4 worker pairs"), "{}", api.message);
    }
}
