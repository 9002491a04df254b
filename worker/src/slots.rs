//! The gRPC services of a worker that can change role: both `PrefillWorker` and
//! `DecodeWorker` stay registered on the one server for the process's life, and each
//! call goes to the service of the role served now. A call for the other role fails
//! with kind draining (the coordinator sends it elsewhere); so does one during a flip,
//! when no role serves.

use crate::decode::service::DecodeService;
use crate::prefill::service::PrefillService;
use std::sync::{Arc, RwLock};
use tonic::{Code, Request, Response, Status};
use xpyd_proto as pb;
use xpyd_proto::worker_error::Kind;
use xpyd_runtime::worker::SharedStats;

/// The service of the role served now.
#[derive(Clone)]
pub(crate) enum Active {
    /// Between roles.
    None,
    /// Prefill.
    Prefill(Arc<PrefillService>),
    /// Decode or combined.
    Decode(Arc<DecodeService>),
}

/// The switch both gRPC services read.
#[derive(Clone)]
pub(crate) struct Slots {
    active: Arc<RwLock<Active>>,
    stats: SharedStats,
}

impl Slots {
    pub(crate) fn new(stats: SharedStats) -> Self {
        Slots {
            active: Arc::new(RwLock::new(Active::None)),
            stats,
        }
    }

    /// Routes calls to `a` from now on (the old service goes once its calls end).
    pub(crate) fn set(&self, a: Active) {
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = a;
    }

    fn get(&self) -> Active {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn stats(&self) -> pb::WorkerStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A call this worker's current role does not serve.
fn other_role(wanted: &str, serving: &str) -> Status {
    pb::WorkerError::status(
        Kind::Draining,
        Code::Unavailable,
        format!("this worker serves {serving} now, not {wanted}: send the request elsewhere"),
    )
}

fn serving(a: &Active, stats: &SharedStats) -> String {
    match a {
        Active::None => "no role (it is changing role)".into(),
        _ => stats.lock().unwrap_or_else(|e| e.into_inner()).role.clone(),
    }
}

/// `xpyd.v1.PrefillWorker` of the switch.
pub(crate) struct PrefillSlot(pub(crate) Slots);

impl PrefillSlot {
    fn service(&self) -> Result<Arc<PrefillService>, Status> {
        match self.0.get() {
            Active::Prefill(s) => Ok(s),
            a => Err(other_role("prefill", &serving(&a, &self.0.stats))),
        }
    }
}

#[tonic::async_trait]
impl pb::prefill_worker_server::PrefillWorker for PrefillSlot {
    async fn prefill(
        &self,
        req: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let s = self.service()?;
        pb::prefill_worker_server::PrefillWorker::prefill(&*s, req).await
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        match self.service() {
            Ok(s) => pb::prefill_worker_server::PrefillWorker::cancel(&*s, req).await,
            Err(_) => Ok(Response::new(pb::CancelResponse { found: false })),
        }
    }

    async fn stats(
        &self,
        _req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::WorkerStats>, Status> {
        Ok(Response::new(self.0.stats()))
    }
}

/// `xpyd.v1.DecodeWorker` of the switch.
pub(crate) struct DecodeSlot(pub(crate) Slots);

impl DecodeSlot {
    fn service(&self) -> Result<Arc<DecodeService>, Status> {
        match self.0.get() {
            Active::Decode(s) => Ok(s),
            a => Err(other_role("decode", &serving(&a, &self.0.stats))),
        }
    }
}

#[tonic::async_trait]
impl pb::decode_worker_server::DecodeWorker for DecodeSlot {
    type DecodeStream = <DecodeService as pb::decode_worker_server::DecodeWorker>::DecodeStream;
    type GenerateStream = <DecodeService as pb::decode_worker_server::DecodeWorker>::GenerateStream;

    async fn decode(
        &self,
        req: Request<pb::DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        let s = self.service()?;
        pb::decode_worker_server::DecodeWorker::decode(&*s, req).await
    }

    async fn generate(
        &self,
        req: Request<pb::LocalGenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let s = self.service()?;
        pb::decode_worker_server::DecodeWorker::generate(&*s, req).await
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        match self.service() {
            Ok(s) => pb::decode_worker_server::DecodeWorker::cancel(&*s, req).await,
            Err(_) => Ok(Response::new(pb::CancelResponse { found: false })),
        }
    }

    async fn stats(
        &self,
        _req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::WorkerStats>, Status> {
        Ok(Response::new(self.0.stats()))
    }
}
