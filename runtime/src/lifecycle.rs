//! A worker's lifecycle as the rest of the cluster sees it, in one place: serving,
//! draining (SIGTERM: no new work, in-flight work finishes or is sent elsewhere, the
//! lease is kept so the coordinator does not take the worker for dead), or failed (the
//! engine thread is gone: unhealthy at once, the lease is dropped and the process exits
//! so the supervisor rebuilds it — never a black hole that holds a lease and refuses
//! everything).
//!
//! The gRPC handlers ([`Lifecycle::check`]), `/health`, gRPC health and the load the
//! lease reports (`draining`) all read it.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use xpyd_proto as pb;
use xpyd_proto::worker_error::Kind;

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Taking work.
    Serving,
    /// Shutting down gracefully: no new work; in-flight work finishes or migrates.
    Draining,
    /// Changing role (a flip): no new work until the other role serves; the process,
    /// its model and its listeners stay.
    Flipping,
    /// The engine thread stopped (a panic, say): nothing can be served.
    Failed,
}

impl Phase {
    /// Label for `/health` and logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Flipping => "flipping",
            Phase::Failed => "failed",
        }
    }
}

/// The shared lifecycle of one worker process (cheap to clone).
#[derive(Debug, Clone)]
pub struct Lifecycle {
    phase: Arc<watch::Sender<Phase>>,
    /// Cancelled when the engine thread is gone.
    failed: CancellationToken,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A serving worker.
    pub fn new() -> Self {
        Lifecycle {
            phase: Arc::new(watch::channel(Phase::Serving).0),
            failed: CancellationToken::new(),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Starts draining (no effect once failed).
    pub fn drain(&self) {
        self.phase.send_if_modified(|p| {
            let change = matches!(*p, Phase::Serving | Phase::Flipping);
            if change {
                *p = Phase::Draining;
            }
            change
        });
    }

    /// Starts a role flip: true when the worker was serving (and now takes no new work).
    pub fn begin_flip(&self) -> bool {
        self.phase.send_if_modified(|p| {
            let change = *p == Phase::Serving;
            if change {
                *p = Phase::Flipping;
            }
            change
        })
    }

    /// Ends a role flip: serving again, unless a drain or a failure came meanwhile.
    pub fn end_flip(&self) {
        self.phase.send_if_modified(|p| {
            let change = *p == Phase::Flipping;
            if change {
                *p = Phase::Serving;
            }
            change
        });
    }

    /// Marks the worker failed: its engine is gone.
    pub fn fail(&self) {
        self.phase.send_replace(Phase::Failed);
        self.failed.cancel();
    }

    /// Resolves when the worker has failed.
    pub async fn failed(&self) {
        self.failed.cancelled().await
    }

    /// Changes of phase.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Whether the worker takes new work, given its lease readiness: `Ok` only while
    /// serving with a lease; otherwise a status of kind draining (go elsewhere) or, once
    /// failed, engine.
    ///
    /// # Errors
    /// The status to return to the caller.
    pub fn check(&self, lease_ready: &watch::Receiver<bool>) -> Result<(), Status> {
        match self.phase() {
            Phase::Serving if *lease_ready.borrow() => Ok(()),
            Phase::Serving => Err(pb::WorkerError::status(
                Kind::Draining,
                Code::Unavailable,
                "worker is not ready (starting, or without a registry lease)",
            )),
            Phase::Draining | Phase::Flipping => Err(crate::worker::draining_status()),
            Phase::Failed => Err(pb::WorkerError::status(
                Kind::Engine,
                Code::Unavailable,
                "the worker's engine stopped; it is being rebuilt",
            )),
        }
    }
}

/// Runs `f` (a worker's engine loop) on a thread of its own; if it returns or panics
/// before `expected_end` is cancelled (the worker stops, or its role changes), the worker
/// is marked failed. The thread's result is `f`'s value (the engine, handed to the next
/// role), or `None` after a panic.
///
/// # Errors
/// When the thread cannot be spawned.
pub fn spawn_engine<T: Send + 'static>(
    lifecycle: &Lifecycle,
    expected_end: CancellationToken,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<Option<T>>> {
    let lc = lifecycle.clone();
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            if outcome.is_err() || !expected_end.is_cancelled() {
                tracing::error!(
                    panicked = outcome.is_err(),
                    "the engine thread stopped; the worker reports itself failed"
                );
                lc.fail();
            }
            outcome.ok()
        })
}

/// How a worker ends: drained after a signal, or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A signal came; in-flight work finished or was sent away within the timeout.
    Drained,
    /// The engine thread stopped.
    Failed,
}

/// Serves until `signal` (SIGTERM, Ctrl-C) or an engine failure. On a signal: drain —
/// take no new work, wait up to `timeout` for `inflight()` to reach 0, then `evict()` what
/// is left (its requests fail with kind draining, so the coordinator migrates them) and
/// give it a moment to go.
pub async fn until_stopped(
    lifecycle: &Lifecycle,
    signal: &CancellationToken,
    timeout: Duration,
    inflight: impl Fn() -> usize,
    evict: impl FnOnce(),
) -> Ending {
    tokio::select! {
        _ = signal.cancelled() => {}
        _ = lifecycle.failed() => return Ending::Failed,
    }
    lifecycle.drain();
    tracing::info!(
        inflight = inflight(),
        timeout_s = timeout.as_secs(),
        "draining"
    );
    let left = wait_idle(&inflight, timeout).await;
    if left > 0 {
        tracing::warn!(left, "drain timeout: sending the rest to other workers");
        evict();
        wait_idle(&inflight, Duration::from_secs(2)).await;
    }
    if lifecycle.phase() == Phase::Failed {
        Ending::Failed
    } else {
        Ending::Drained
    }
}

/// Waits until `inflight()` reaches 0 or `timeout` passes; returns what is left.
pub async fn wait_idle(inflight: impl Fn() -> usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let n = inflight();
        if n == 0 || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Test knob: `XPYD_DEBUG_PANIC=decode-0=5` makes that worker's engine thread panic at
/// its 5th step (see [`crate::env::DEBUG_PANIC`]); the step count for `worker_id`.
pub fn debug_panic_after(worker_id: &str) -> Option<u64> {
    let spec = std::env::var(crate::env::DEBUG_PANIC).ok()?;
    spec.split(',').find_map(|item| {
        let (id, n) = item.split_once('=')?;
        (id.trim() == worker_id)
            .then(|| n.trim().parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_gate_new_work() {
        let lc = Lifecycle::new();
        let (tx, rx) = watch::channel(true);
        assert!(lc.check(&rx).is_ok());
        tx.send(false).unwrap();
        let s = lc.check(&rx).unwrap_err();
        assert_eq!(pb::WorkerError::kind_of(&s), Some(Kind::Draining));
        tx.send(true).unwrap();
        lc.drain();
        assert_eq!(lc.phase(), Phase::Draining);
        assert_eq!(
            pb::WorkerError::kind_of(&lc.check(&rx).unwrap_err()),
            Some(Kind::Draining)
        );
        // A flip takes no new work and comes back; a drain during a flip wins.
        let lc2 = Lifecycle::new();
        assert!(lc2.begin_flip());
        assert!(!lc2.begin_flip(), "one flip at a time");
        assert_eq!(
            pb::WorkerError::kind_of(&lc2.check(&rx).unwrap_err()),
            Some(Kind::Draining)
        );
        lc2.end_flip();
        assert!(lc2.check(&rx).is_ok());
        assert!(lc2.begin_flip());
        lc2.drain();
        lc2.end_flip();
        assert_eq!(lc2.phase(), Phase::Draining);
        assert!(!lc2.begin_flip(), "no flip while draining");
        lc.fail();
        lc.drain(); // no way back from failed
        assert_eq!(lc.phase(), Phase::Failed);
        assert_eq!(
            pb::WorkerError::kind_of(&lc.check(&rx).unwrap_err()),
            Some(Kind::Engine)
        );
    }

    #[test]
    fn an_engine_thread_that_panics_fails_the_worker() {
        let lc = Lifecycle::new();
        let stopping = CancellationToken::new();
        let t = spawn_engine(&lc, stopping.clone(), || -> u8 { panic!("test") }).unwrap();
        assert_eq!(t.join().unwrap(), None);
        assert_eq!(lc.phase(), Phase::Failed);
        // Returning while the worker shuts down is the normal end.
        let lc = Lifecycle::new();
        stopping.cancel();
        assert_eq!(
            spawn_engine(&lc, stopping, || 7).unwrap().join().unwrap(),
            Some(7)
        );
        assert_eq!(lc.phase(), Phase::Serving);
    }
}
