//! The `xpyd.v1.DecodeWorker` gRPC service: admission against the KV budget, the KV
//! reservation and its import task, and the token stream whose end cancels the request.

use super::engine_loop::{Cmd, EventTx, ReserveFn};
use crate::decode::budget::{Budget, Refusal};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use xpyd_engine::{KvHeader, KvLayout};
use xpyd_kv_transfer::{Backend, Event, Incoming, Receiver, ReserveSpec};
use xpyd_proto as pb;
use xpyd_proto::worker_error::Kind;
use xpyd_runtime::kv_pool::SharedPool;
use xpyd_runtime::worker::{
    DropGuard, GuardedStream, SharedStats, sampling_from_pb, transfer_status,
};

/// A KV transfer that went wrong on this side (bad header or state, no outcome).
fn transfer_failed(msg: String) -> Status {
    pb::WorkerError::status(Kind::Transfer, Code::DataLoss, msg)
}

/// What the service needs to know about the engine it fronts.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Tokens per KV block.
    pub block_size: usize,
    /// The model's context length.
    pub context_length: usize,
    /// Bytes of K plus V for one token over all layers.
    pub kv_bytes_per_token: u64,
}

/// The service state.
pub struct DecodeService {
    pub(crate) cmds: mpsc::Sender<Cmd>,
    pub(crate) budget: Arc<Mutex<Budget>>,
    pub(crate) receiver: Option<std::sync::Arc<Receiver>>,
    pub(crate) stats: SharedStats,
    pub(crate) ready: watch::Receiver<bool>,
    pub(crate) lifecycle: xpyd_runtime::lifecycle::Lifecycle,
    pub(crate) geometry: Geometry,
    pub(crate) default_backend: Backend,
    pub(crate) combined: bool,
    /// The engine's KV pools in shared memory (for placed transfers), when they are.
    pub(crate) kv_pool: Option<(SharedPool, KvLayout)>,
    /// The cluster's key: the targets handed out are signed with it.
    pub(crate) key: Option<xpyd_runtime::plane::ClusterKey>,
}

/// Tells the engine thread to drop request `id`, without waiting.
fn cancel_soon(cmds: &mpsc::Sender<Cmd>, id: u64, client_gone: bool) {
    let cmd = Cmd::Cancel { id, client_gone };
    if let Err(mpsc::error::TrySendError::Full(cmd)) = cmds.try_send(cmd) {
        let cmds = cmds.clone();
        tokio::spawn(async move {
            let _ = cmds.send(cmd).await;
        });
    }
}

/// Undoes an admitted `Decode` (its budget promise and any reserved blocks, through the
/// engine thread) when dropped armed.
struct Undo {
    cmds: mpsc::Sender<Cmd>,
    id: u64,
    armed: bool,
}

impl Undo {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if self.armed {
            cancel_soon(&self.cmds, self.id, false);
        }
    }
}

fn blocks_for(tokens: usize, block: usize) -> usize {
    tokens.div_ceil(block)
}

impl DecodeService {
    fn admit(&self, id: u64, prompt: usize, max_tokens: usize) -> Result<(), Status> {
        if prompt == 0 {
            return Err(invalid("prompt_tokens must be at least 1"));
        }
        if max_tokens == 0 {
            return Err(invalid("max_tokens must be at least 1"));
        }
        let ctx = self.geometry.context_length;
        if prompt >= ctx {
            return Err(invalid(format!(
                "prompt of {prompt} tokens exceeds the context length of {ctx} tokens"
            )));
        }
        // Generation stops at the context length, so that bounds what must be promised.
        let need = blocks_for((prompt + max_tokens).min(ctx), self.geometry.block_size);
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        b.promise(id, need).map_err(|r| match r {
            Refusal::TooLarge { .. } => invalid(r.to_string()),
            Refusal::Full { .. } => {
                pb::WorkerError::status(Kind::Overloaded, Code::ResourceExhausted, r.to_string())
            }
            Refusal::Duplicate(_) => {
                pb::WorkerError::status(Kind::Engine, Code::AlreadyExists, r.to_string())
            }
        })
    }

    /// The stream handed to tonic: ends the request when dropped.
    fn stream(
        &self,
        id: u64,
        rx: mpsc::Receiver<Result<pb::DecodeEvent, Status>>,
        import: CancellationToken,
    ) -> GuardedStream<Result<pb::DecodeEvent, Status>> {
        let cmds = self.cmds.clone();
        GuardedStream::new(
            rx,
            DropGuard::new(move || {
                import.cancel();
                cancel_soon(&cmds, id, true);
            }),
        )
    }
}

/// Forwards one transfer's events to the engine thread until it completes, fails, or the
/// request is cancelled.
async fn import(
    id: u64,
    mut incoming: Incoming,
    cmds: mpsc::Sender<Cmd>,
    out: EventTx,
    cancel: CancellationToken,
) {
    let mut metas = 0;
    loop {
        let ev = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            ev = incoming.next() => ev,
        };
        let cmd = match ev {
            None => Cmd::Fail {
                id,
                status: transfer_failed("transfer ended without an outcome".into()),
            },
            Some(Err(e)) => Cmd::Fail {
                id,
                status: transfer_status(&e),
            },
            Some(Ok(Event::Meta(m))) => {
                let parsed = m
                    .verified()
                    .map_err(|e| transfer_status(&e))
                    .and_then(|bytes| {
                        if metas == 0 {
                            KvHeader::decode(bytes)
                                .map(|(h, _)| Cmd::Begin {
                                    id,
                                    header: Box::new(h),
                                    out: out.clone(),
                                })
                                .map_err(|e| transfer_failed(format!("KV header: {e}")))
                        } else {
                            serde_json::from_slice(bytes)
                                .map(|s| Cmd::Resume {
                                    id,
                                    state: Box::new(s),
                                })
                                .map_err(|e| transfer_failed(format!("resume state: {e}")))
                        }
                    });
                metas += 1;
                match parsed {
                    Ok(c) => c,
                    Err(status) => Cmd::Fail { id, status },
                }
            }
            Some(Ok(Event::Chunk { layer, tag, data })) => Cmd::Rows {
                id,
                layer,
                tag,
                data,
            },
            Some(Ok(Event::Complete(_))) => Cmd::Finish { id },
        };
        let last = matches!(cmd, Cmd::Finish { .. } | Cmd::Fail { .. });
        if let Cmd::Fail { status, .. } = &cmd {
            // Reach the client even if the engine never saw this request.
            let _ = out.try_send(Err(status.clone()));
        }
        if cmds.send(cmd).await.is_err() || last {
            return;
        }
    }
}

type EventStream = GuardedStream<Result<pb::DecodeEvent, Status>>;

/// A request no worker would take.
fn invalid(msg: impl Into<String>) -> Status {
    pb::WorkerError::status(Kind::Invalid, Code::InvalidArgument, msg)
}

/// The engine thread is gone: the worker cannot serve (it is being rebuilt).
fn engine_stopped() -> Status {
    pb::WorkerError::status(Kind::Engine, Code::Unavailable, "the engine stopped")
}

#[tonic::async_trait]
impl pb::decode_worker_server::DecodeWorker for DecodeService {
    type DecodeStream = EventStream;
    type GenerateStream = EventStream;

    async fn decode(
        &self,
        req: Request<pb::DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        self.lifecycle.check(&self.ready)?;
        let r = req.into_inner();
        let Some(receiver) = &self.receiver else {
            return Err(pb::WorkerError::status(
                Kind::Engine,
                Code::FailedPrecondition,
                "this worker does not receive KV",
            ));
        };
        let backend = if r.backend.is_empty() {
            self.default_backend
        } else {
            r.backend
                .parse::<Backend>()
                .map_err(|e| invalid(format!("backend: {e}")))?
        };
        self.admit(
            r.request_id,
            r.prompt_tokens as usize,
            r.max_tokens as usize,
        )?;
        // The handler can be dropped at any await below (the caller went away): until the
        // response stream exists, that undoes the admission and any reserved blocks.
        let undo = Undo {
            cmds: self.cmds.clone(),
            id: r.request_id,
            armed: true,
        };
        let deadline = Duration::from_millis(r.transfer_deadline_ms.max(1) as u64);
        let spec = ReserveSpec {
            transfer_id: r.request_id,
            backend,
            bytes: self.geometry.kv_bytes_per_token * r.prompt_tokens as u64,
            deadline,
            placement: None,
        };
        let (target, incoming) = match (&self.kv_pool, backend) {
            // Shared-memory transfers write straight into blocks reserved now: the engine
            // thread reserves them and the transfer, and keeps its fence, in one turn.
            (Some((pool, layout)), Backend::Shm | Backend::Auto) => {
                let (pool, layout, receiver) = (pool.clone(), layout.clone(), receiver.clone());
                let reserve: ReserveFn = Box::new(move |blocks| {
                    let placement = Some(pool.placement(&layout, blocks));
                    receiver
                        .reserve(ReserveSpec { placement, ..spec })
                        .map_err(|e| transfer_status(&e))
                });
                let (reply, made) = oneshot::channel();
                let cmd = Cmd::Reserve {
                    id: r.request_id,
                    tokens: r.prompt_tokens as usize,
                    reserve,
                    reply,
                };
                self.cmds.send(cmd).await.map_err(|_| engine_stopped())?;
                made.await.map_err(|_| engine_stopped())??
            }
            _ => receiver.reserve(spec).map_err(|e| transfer_status(&e))?,
        };
        let target_json = serde_json::to_vec(&target).map_err(|e| {
            pb::WorkerError::status(
                Kind::Engine,
                Code::Internal,
                format!("target encoding: {e}"),
            )
        })?;
        // Room for every token plus the reservation and an error: sends never block.
        let (tx, rx) = mpsc::channel(r.max_tokens as usize + 4);
        let _ = tx.try_send(Ok(pb::DecodeEvent {
            event: Some(pb::decode_event::Event::Reserved(pb::Reserved {
                target_mac: self.key.as_ref().map_or_else(Vec::new, |k| {
                    k.sign(xpyd_runtime::plane::TARGET, &target_json)
                }),
                target_json,
                epoch: target.epoch,
            })),
        }));
        let cancel = CancellationToken::new();
        tokio::spawn(import(
            r.request_id,
            incoming,
            self.cmds.clone(),
            tx,
            cancel.clone(),
        ));
        let stream = self.stream(r.request_id, rx, cancel);
        undo.disarm();
        Ok(Response::new(stream))
    }

    async fn generate(
        &self,
        req: Request<pb::LocalGenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.lifecycle.check(&self.ready)?;
        if !self.combined {
            return Err(pb::WorkerError::status(
                Kind::Engine,
                Code::FailedPrecondition,
                "this decode worker does not prefill (run it in combined mode)",
            ));
        }
        let r = req.into_inner();
        let params = sampling_from_pb(&r.sampling.unwrap_or_default());
        let prompt_len = match r.prompt_len as usize {
            0 => r.tokens.len(),
            n if n <= r.tokens.len() => n,
            n => return Err(invalid(format!("prompt_len: {n} is beyond the tokens"))),
        };
        // Tokens generated elsewhere (a migrated request) are part of what is promised.
        let generated = r.tokens.len() - prompt_len;
        self.admit(
            r.request_id,
            r.tokens.len(),
            params.max_tokens.saturating_sub(generated).max(1),
        )?;
        let (tx, rx) = mpsc::channel(params.max_tokens + 4);
        let cmd = Cmd::Local {
            id: r.request_id,
            tokens: r.tokens,
            prompt_len,
            params,
            out: tx,
        };
        if self.cmds.send(cmd).await.is_err() {
            return Err(engine_stopped());
        }
        Ok(Response::new(self.stream(
            r.request_id,
            rx,
            CancellationToken::new(),
        )))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let id = req.into_inner().request_id;
        let found = self
            .budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .holds(id);
        let _ = self
            .cmds
            .send(Cmd::Cancel {
                id,
                client_gone: true,
            })
            .await;
        Ok(Response::new(pb::CancelResponse { found }))
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
