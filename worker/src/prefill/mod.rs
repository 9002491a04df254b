//! The prefill role: a FIFO of prompts on the engine thread, prefilled chunk by chunk,
//! each layer's KV handed to the request's transfer task as it is computed; the answer
//! is the first sampled token once the receiver has committed the KV. A drain lets
//! queued and running prefills finish and their transfers commit; the rest are cancelled
//! and go elsewhere.

pub mod engine_loop;
pub mod service;

use crate::RoleSettings;
use crate::host::{Part, Shared};
use crate::slots::Active;
use engine_loop::EngineLoop;
use service::{PrefillService, Running};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use xpyd_engine::Engine;

/// Starts the prefill role on `engine`.
///
/// # Errors
/// When the engine thread cannot be spawned.
pub(crate) fn start(
    engine: Engine,
    shared: &Shared,
    settings: &RoleSettings,
) -> std::io::Result<Part> {
    let (job_tx, job_rx) = mpsc::channel(settings.max_running);
    let lp =
        EngineLoop::new(engine, shared.stats.clone(), shared.delay).panic_after(shared.panic_after);
    let retiring = CancellationToken::new();
    let thread =
        xpyd_runtime::lifecycle::spawn_engine(&shared.lifecycle, retiring.clone(), move || {
            lp.run(job_rx)
        })?;
    let running: Running = Default::default();
    let inflight = {
        let running = running.clone();
        move || running.lock().unwrap_or_else(|e| e.into_inner()).len()
    };
    let evict = {
        let running = running.clone();
        move || {
            for token in running.lock().unwrap_or_else(|e| e.into_inner()).values() {
                token.cancel();
            }
        }
    };
    let service = PrefillService {
        jobs: job_tx,
        sender: shared.sender.clone(),
        stats: shared.stats.clone(),
        ready: shared.ready.clone(),
        lifecycle: shared.lifecycle.clone(),
        running,
        key: shared.key.clone(),
    };
    Ok(Part {
        role: settings.role,
        service: Active::Prefill(Arc::new(service)),
        inflight: Box::new(inflight),
        evict: Box::new(evict),
        thread: Some(thread),
        retiring,
    })
}
