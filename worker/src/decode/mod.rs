//! The decode role: admission against the KV budget (promises per request), the KV
//! reservation and its import (layer by layer, verified) on the engine thread, which
//! runs one batched decode step per iteration (continuous batching); in combined mode it
//! also prefills prompts itself, one chunk between decode steps. A drain lets in-flight
//! streams finish; the rest fail with kind draining and migrate.

pub mod budget;
pub mod engine_loop;
pub mod service;

use crate::host::{Part, Shared};
use crate::slots::Active;
use crate::{Role, RoleSettings};
use budget::Budget;
use engine_loop::{Cmd, EngineLoop};
use service::DecodeService;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use xpyd_engine::Engine;

/// Starts the decode (or combined) role on `engine`.
///
/// # Errors
/// When the engine thread cannot be spawned.
pub(crate) fn start(
    engine: Engine,
    shared: &Shared,
    settings: &RoleSettings,
) -> std::io::Result<Part> {
    let kv = engine.kv_usage();
    let budget = Arc::new(Mutex::new(Budget::new(
        kv.used_blocks + kv.free_blocks,
        settings.max_running,
    )));
    shared
        .stats
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .kv_blocks_free = kv.free_blocks as u32;
    let (cmd_tx, cmd_rx) = mpsc::channel(4096);
    let lp = EngineLoop::new(
        engine,
        budget.clone(),
        shared.stats.clone(),
        settings.role.name(),
        shared.delay,
        cmd_tx.downgrade(),
    )
    .panic_after(shared.panic_after);
    let retiring = CancellationToken::new();
    let thread =
        xpyd_runtime::lifecycle::spawn_engine(&shared.lifecycle, retiring.clone(), move || {
            lp.run(cmd_rx)
        })?;
    let inflight = {
        let budget = budget.clone();
        move || budget.lock().unwrap_or_else(|e| e.into_inner()).running()
    };
    // Weak: only the service keeps the engine's command channel open, so the loop ends
    // (and gives the engine back) once the service and its calls are gone.
    let evict = {
        let cmds = cmd_tx.downgrade();
        move || {
            if let Some(cmds) = cmds.upgrade() {
                let _ = cmds.try_send(Cmd::Evict);
            }
        }
    };
    let combined = settings.role == Role::Combined;
    let service = DecodeService {
        cmds: cmd_tx,
        budget,
        receiver: if combined {
            None
        } else {
            shared.receiver.clone()
        },
        stats: shared.stats.clone(),
        ready: shared.ready.clone(),
        lifecycle: shared.lifecycle.clone(),
        geometry: shared.geometry,
        default_backend: shared.kv_backend,
        combined,
        kv_pool: shared.kv_pool.clone(),
        key: shared.key.clone(),
    };
    Ok(Part {
        role: settings.role,
        service: Active::Decode(Arc::new(service)),
        inflight: Box::new(inflight),
        evict: Box::new(evict),
        thread: Some(thread),
        retiring,
    })
}
