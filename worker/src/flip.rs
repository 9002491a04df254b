//! Role flip: a prefill worker becomes a decode worker (or back) without reloading the
//! model. `POST /role {"role": "prefill", "worker_id": "prefill-2"}` on the worker's HTTP
//! port: the worker takes no new work (its lease reports it draining, so the coordinator
//! routes around it), lets what it runs finish — or sends it elsewhere at
//! `drain_timeout`, as a drain does —, gets the engine back from the old role's loop,
//! empties its prefix cache, starts the other role's loop on it and registers its new
//! identity in place of the old one. The answer is a [`FlipReport`] with the time each
//! step took. `GET /role` says what the worker serves now.

use crate::host::{Host, start_part};
use crate::{Role, RoleSettings};
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use xpyd_proto as pb;
use xpyd_runtime::lifecycle::wait_idle;
use xpyd_runtime::metrics as m;
use xpyd_runtime::plane::ClusterKey;

/// What a flip did and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlipReport {
    /// The worker's id before.
    pub from_id: String,
    /// Its id now.
    pub worker_id: String,
    /// The role before.
    pub from: Role,
    /// The role now.
    pub to: Role,
    /// Requests still running at `drain_timeout`, sent elsewhere.
    pub evicted: usize,
    /// Waiting for in-flight work to finish.
    pub drain_ms: f64,
    /// From drained to the new role's loop running on the same engine.
    pub switch_ms: f64,
    /// From the new identity to the registry holding it (0 without a registry).
    pub register_ms: f64,
    /// The whole flip.
    pub total_ms: f64,
}

/// Why a flip was refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlipError {
    /// The request names something this worker cannot do (400).
    #[error("{field}: {message}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Not now: draining, failed, or another flip running (409).
    #[error("{0}")]
    Busy(String),
    /// The engine did not come back from the old role: the worker reports itself
    /// failed and is rebuilt (503).
    #[error("{0}")]
    Failed(String),
}

/// A flip asked of the host.
pub(crate) struct FlipRequest {
    pub(crate) to: Role,
    pub(crate) worker_id: Option<String>,
    pub(crate) reply: oneshot::Sender<Result<FlipReport, FlipError>>,
}

/// Longest worker id.
const MAX_ID: usize = 128;

/// Checks a worker id: 1..=128 of `A-Z a-z 0-9 . _ -`.
///
/// # Errors
/// A message naming the field.
pub(crate) fn check_worker_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID {
        return Err(format!("worker_id: must be 1..={MAX_ID} characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "worker_id: `{c}` is not allowed (letters, digits, `.`, `_`, `-`)"
        ));
    }
    Ok(())
}

/// How long the old role's engine thread may take to end once its service is gone.
const ENGINE_BACK: Duration = Duration::from_secs(30);
/// How long the new identity may take to be registered before the flip reports anyway.
const REGISTER_WAIT: Duration = Duration::from_secs(10);

impl Host {
    /// Changes the role this worker serves to `to` (and its id to `new_id`).
    pub(crate) async fn flip(
        &mut self,
        to: Role,
        new_id: Option<String>,
    ) -> Result<FlipReport, FlipError> {
        let from = self.part.role;
        let from_id = self.info.borrow().worker_id.clone();
        let worker_id = new_id.unwrap_or_else(|| from_id.clone());
        check_worker_id(&worker_id).map_err(|message| FlipError::Invalid {
            field: "worker_id",
            message: message.trim_start_matches("worker_id: ").to_string(),
        })?;
        let settings: RoleSettings = self
            .cfg
            .settings(to)
            .map_err(|message| FlipError::Invalid {
                field: "role",
                message,
            })?
            .clone();
        if to == from && worker_id == from_id {
            return Ok(FlipReport {
                from_id,
                worker_id,
                from,
                to,
                evicted: 0,
                drain_ms: 0.0,
                switch_ms: 0.0,
                register_ms: 0.0,
                total_ms: 0.0,
            });
        }
        let lifecycle = self.shared.lifecycle.clone();
        if !lifecycle.begin_flip() {
            return Err(FlipError::Busy(format!(
                "the worker is {}; it changes role only while serving",
                lifecycle.phase().name()
            )));
        }
        let t0 = Instant::now();
        tracing::info!(from = from.name(), to = to.name(), %from_id, %worker_id, "changing role: draining");
        let timeout = self.cfg.drain_timeout;
        let mut evicted = wait_idle(&*self.part.inflight, timeout).await;
        if evicted > 0 {
            tracing::warn!(
                left = evicted,
                "flip: drain timeout, sending the rest to other workers"
            );
            (self.part.evict)();
            evicted = evicted.max(wait_idle(&*self.part.inflight, Duration::from_secs(2)).await);
        }
        let drained = t0.elapsed();
        let Some(mut engine) = self.retire_part(ENGINE_BACK).await else {
            lifecycle.fail();
            return Err(FlipError::Failed(
                "the engine did not come back from the old role; the worker is rebuilt".into(),
            ));
        };
        if let Err(e) = engine.retune(settings.prefill_chunk, settings.prefix_cache_blocks) {
            lifecycle.fail();
            return Err(FlipError::Failed(format!(
                "the engine could not take the new role's settings: {e}"
            )));
        }
        if to == Role::Decode && self.shared.kv_pool.is_none() {
            self.share_pools(&mut engine);
        }
        {
            let mut s = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
            *s = pb::WorkerStats {
                worker_id: worker_id.clone(),
                role: to.name().into(),
                requests_total: s.requests_total,
                requests_cancelled: s.requests_cancelled,
                ..Default::default()
            };
        }
        self.part = match start_part(engine, &self.shared, &settings) {
            Ok(p) => p,
            Err(e) => {
                lifecycle.fail();
                return Err(FlipError::Failed(format!(
                    "the new role's engine thread did not start: {e}"
                )));
            }
        };
        self.serve_part().await;
        let switched = t0.elapsed();
        // The lease gives up the old identity and registers the new one.
        let mut ready = self.shared.ready.clone();
        ready.borrow_and_update();
        self.info.send_modify(|i| {
            i.worker_id = worker_id.clone();
            i.role = to.name().into();
            i.max_running = settings.max_running as u32;
        });
        // The process's log lines say who it is now.
        xpyd_runtime::logging::set_identity(to.name(), Some(&worker_id));
        lifecycle.end_flip();
        if self.cfg.membership.registry.is_some() {
            let registered = async {
                while ready.changed().await.is_ok() {
                    if *ready.borrow_and_update() {
                        return;
                    }
                }
            };
            if tokio::time::timeout(REGISTER_WAIT, registered)
                .await
                .is_err()
            {
                tracing::warn!(%worker_id, "flip: the new identity is not registered yet");
            }
        }
        let total = t0.elapsed();
        metrics::histogram!(m::WORKER_ROLE_FLIP_SECONDS, "to" => to.name())
            .record(total.as_secs_f64());
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let report = FlipReport {
            from_id,
            worker_id,
            from,
            to,
            evicted,
            drain_ms: ms(drained),
            switch_ms: ms(switched - drained),
            register_ms: ms(total - switched),
            total_ms: ms(total),
        };
        tracing::info!(?report, "role changed");
        Ok(report)
    }
}

impl Host {
    /// Moves the (empty) KV pools of a worker that starts receiving KV into shared
    /// memory, for placed transfers; where that is impossible they stay on the heap and
    /// transfers stage through the receiver's arena.
    fn share_pools(&mut self, engine: &mut xpyd_engine::Engine) {
        let mut pool = None;
        let moved = engine.move_kv_memory(Box::new(|bytes| {
            let (mem, p) = xpyd_runtime::kv_pool::kv_memory(bytes);
            pool = p;
            Ok(mem)
        }));
        match moved {
            Ok(()) => {
                tracing::info!(
                    shared = pool.is_some(),
                    "KV pools moved for the decode role"
                );
                self.shared.kv_pool = pool.map(|p| (p, engine.kv_layout()));
            }
            Err(e) => tracing::warn!(error = %e, "KV pools stay on the heap"),
        }
    }
}

/// The `/role` route's state.
#[derive(Clone)]
struct RoleState {
    flips: mpsc::Sender<FlipRequest>,
    info: watch::Receiver<pb::WorkerInfo>,
    key: Option<ClusterKey>,
}

/// `GET /role` and `POST /role` (which needs the cluster's credential in the
/// `x-xpyd-cluster` header, unless the internal plane is open).
pub(crate) fn router(
    flips: mpsc::Sender<FlipRequest>,
    info: watch::Receiver<pb::WorkerInfo>,
    key: Option<ClusterKey>,
) -> Router {
    Router::new()
        .route("/role", get(current).post(change))
        .with_state(RoleState { flips, info, key })
}

async fn current(State(s): State<RoleState>) -> Json<serde_json::Value> {
    let i = s.info.borrow().clone();
    Json(serde_json::json!({"worker_id": i.worker_id, "role": i.role}))
}

/// A JSON error body naming what was wrong.
fn error(status: StatusCode, kind: &str, field: Option<&str>, message: &str) -> Response {
    let body = serde_json::json!({"error": {"type": kind, "field": field, "message": message}});
    (status, Json(body)).into_response()
}

async fn change(
    State(s): State<RoleState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(k) = &s.key
        && !k.admits(
            headers
                .get(xpyd_runtime::plane::METADATA)
                .and_then(|v| v.to_str().ok()),
        )
    {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            None,
            xpyd_runtime::plane::unauthenticated().message(),
        );
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        role: String,
        #[serde(default)]
        worker_id: Option<String>,
    }
    let b: Body = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                None,
                &format!("body: {e} (expected {{\"role\": \"prefill|decode\", \"worker_id\": …}})"),
            );
        }
    };
    let to: Role = match b.role.parse() {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", Some("role"), &e),
    };
    let (reply, rx) = oneshot::channel();
    let req = FlipRequest {
        to,
        worker_id: b.worker_id,
        reply,
    };
    if s.flips.try_send(req).is_err() {
        return error(
            StatusCode::CONFLICT,
            "busy",
            None,
            "another role change is in progress",
        );
    }
    match rx.await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(e @ FlipError::Invalid { field, .. })) => {
            let msg = e.to_string();
            let msg = msg.strip_prefix(&format!("{field}: ")).unwrap_or(&msg);
            error(StatusCode::BAD_REQUEST, "invalid_request", Some(field), msg)
        }
        Ok(Err(FlipError::Busy(m))) => error(StatusCode::CONFLICT, "busy", None, &m),
        Ok(Err(FlipError::Failed(m))) => error(StatusCode::SERVICE_UNAVAILABLE, "failed", None, &m),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            None,
            "the worker is stopping",
        ),
    }
}
