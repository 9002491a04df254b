//! The `xpyd.v1.PrefillWorker` gRPC service: opens the KV transfer to the target, queues
//! the prefill on the engine thread, streams the KV as it is computed, and answers with
//! the first token once the receiver has committed everything. A caller that goes away
//! cancels the prefill (checked between chunks) and aborts the transfer.

use super::engine_loop::{Job, Outgoing};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use xpyd_kv_transfer::{Sender, Stats, Transfer, TransferTarget};
use xpyd_proto as pb;
use xpyd_runtime::worker::{
    DropGuard, SharedStats, sampling_from_pb, token_to_pb, transfer_status,
};

/// The service state.
pub struct PrefillService {
    pub(crate) jobs: mpsc::Sender<Job>,
    pub(crate) sender: Sender,
    pub(crate) stats: SharedStats,
    pub(crate) ready: watch::Receiver<bool>,
    pub(crate) lifecycle: xpyd_runtime::lifecycle::Lifecycle,
    /// Prefills in progress, by request id, for `Cancel` and the drain.
    pub(crate) running: Running,
    /// The cluster's key: targets must carry its signature.
    pub(crate) key: Option<xpyd_runtime::plane::ClusterKey>,
}

/// Prefill calls in progress (queued or running, until their KV committed), by request id.
pub type Running = Arc<Mutex<HashMap<u64, CancellationToken>>>;

/// Tag of an engine chunk: first position and token count.
fn tag(start: u32, count: u32) -> u64 {
    ((start as u64) << 32) | count as u64
}

/// Streams everything the engine hands out, then commits.
async fn stream_kv(
    mut t: Transfer,
    mut rx: mpsc::Receiver<Outgoing>,
) -> Result<Stats, xpyd_kv_transfer::TransferError> {
    let mut resumed = false;
    while let Some(msg) = rx.recv().await {
        let r = match msg {
            Outgoing::Header(h) => t.send_meta(&h).await,
            Outgoing::Chunk(c) => match t.send(c.layer, tag(c.start, c.count), &c.payload).await {
                Ok(()) => t.flush().await,
                Err(e) => Err(e),
            },
            Outgoing::Resume(r) => {
                resumed = true;
                t.send_meta(&r).await
            }
        };
        if let Err(e) = r {
            t.abort().await;
            return Err(e);
        }
    }
    if resumed {
        t.commit().await
    } else {
        // The prefill stopped early (cancelled or failed): tell the receiver.
        t.abort().await;
        Err(xpyd_kv_transfer::TransferError::Rejected(
            "prefill ended before the KV was complete".into(),
        ))
    }
}

/// A request no worker would take.
fn invalid(msg: impl Into<String>) -> Status {
    pb::WorkerError::status(pb::worker_error::Kind::Invalid, Code::InvalidArgument, msg)
}

/// The engine thread is gone: the worker cannot serve (it is being rebuilt).
fn engine_stopped() -> Status {
    pb::WorkerError::status(
        pb::worker_error::Kind::Engine,
        Code::Unavailable,
        "the engine stopped",
    )
}

#[tonic::async_trait]
impl pb::prefill_worker_server::PrefillWorker for PrefillService {
    async fn prefill(
        &self,
        req: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        self.lifecycle.check(&self.ready)?;
        let r = req.into_inner();
        if r.tokens.is_empty() {
            return Err(invalid("tokens: the prompt is empty"));
        }
        let prompt_len = match r.prompt_len as usize {
            0 => r.tokens.len(),
            n if n <= r.tokens.len() => n,
            n => {
                return Err(invalid(format!(
                    "prompt_len: {n} is beyond the {} tokens",
                    r.tokens.len()
                )));
            }
        };
        // Only a target a decode worker of this cluster issued: a forged one could send
        // the KV anywhere, or write it over another request's blocks.
        if let Some(k) = &self.key
            && !k.verify(xpyd_runtime::plane::TARGET, &r.target_json, &r.target_mac)
        {
            return Err(pb::WorkerError::status(
                pb::worker_error::Kind::Invalid,
                Code::PermissionDenied,
                "target_json: not signed by a decode worker of this cluster (target_mac)",
            ));
        }
        let target: TransferTarget = serde_json::from_slice(&r.target_json)
            .map_err(|e| invalid(format!("target_json: {e}")))?;
        let params = sampling_from_pb(&r.sampling.unwrap_or_default());
        params
            .validate()
            .map_err(|e| xpyd_runtime::worker::engine_status(&e))?;
        let transfer = self
            .sender
            .open(&target)
            .await
            .map_err(|e| transfer_status(&e))?;
        let backend = transfer.backend();
        let (out, rx) = mpsc::channel(256);
        let streamer = tokio::spawn(stream_kv(transfer, rx));
        let cancel = CancellationToken::new();
        // Dropping this future (the caller left) cancels the prefill.
        let _cancel_on_drop = cancel.clone().drop_guard();
        let id = r.request_id;
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, cancel.clone());
        let running = self.running.clone();
        let _forget = DropGuard::new(move || {
            running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
        let (reply, answer) = oneshot::channel();
        let job = Job {
            id: r.request_id,
            tokens: r.tokens,
            prompt_len,
            params,
            out,
            cancel,
            reply,
        };
        self.jobs.send(job).await.map_err(|_| engine_stopped())?;
        let first = answer.await.map_err(|_| engine_stopped())?;
        let committed = streamer.await.map_err(|e| {
            pb::WorkerError::status(
                pb::worker_error::Kind::Transfer,
                Code::Internal,
                e.to_string(),
            )
        })?;
        let (first, reused) = first?;
        let stats = committed.map_err(|e| transfer_status(&e))?;
        Ok(Response::new(pb::PrefillResponse {
            first: Some(token_to_pb(&first)),
            cached_tokens: reused as u32,
            kv_bytes: stats.bytes,
            backend: backend.name().into(),
            kv_seconds: stats.seconds,
        }))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let id = req.into_inner().request_id;
        let token = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned();
        // The engine thread sees it before its next chunk; the call then fails CANCELLED.
        if let Some(t) = &token {
            t.cancel();
        }
        Ok(Response::new(pb::CancelResponse {
            found: token.is_some(),
        }))
    }

    async fn stats(
        &self,
        _req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::WorkerStats>, Status> {
        Ok(Response::new(
            self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        ))
    }
}
