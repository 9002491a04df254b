//! The two state machines of the supervisor, pure and synchronous: one per worker
//! ([`WorkerState`]) and one for the service ([`ServiceState`]), with the managed
//! product's transitions. The actor feeds them facts and turns every change into an
//! event (severity from [`WorkerState::severity`] / [`ServiceState::severity`]).
//!
//! Worker:
//! ```text
//!  spawn ─► Starting ──readiness passes──► Ready ◄──readiness passes── NotReady
//!              │  └──readiness fails × threshold──► NotReady ◄──fails × threshold──┘│
//!              │                                                                     │
//!   startup fails × threshold, liveness fails × threshold, unexpected exit          │
//!              ▼                                                                     ▼
//!            Failed ──► Restarting (backoff) ──respawn──► Starting
//!   any live state ──stop (scale-down, upgrade, down, a peer's rebuild)──► Draining
//!   Draining ──exit──► Restarting (rebuild) | Stopped (removed)
//! ```
//! Service:
//! ```text
//!  Deploying ──all workers ready──► Running ◄──healthy again── Alarm
//!      │ a worker fails or is not ready          Running ──a worker not ready, or more
//!      ▼                                                   unavailable than allowed──► Alarm
//!  Abnormal ──all workers ready──► Running       Running/Alarm ──upgrade──► Upgrading ──► Running/Alarm
//!  Deploying/Abnormal ──gave up──► Failed        any ──stop──► Stopping ──all exited──► Stopped
//! ```

use serde::Serialize;
use std::fmt;
use xpyd_runtime::events::Severity;

/// One worker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum WorkerState {
    /// Spawned; its startup probe has not passed or its readiness not yet once.
    Starting,
    /// Passing readiness: in routing.
    Ready,
    /// Started, but its readiness probe fails: out of routing until it passes.
    NotReady,
    /// Being stopped: out of routing, SIGTERM sent or about to be, finishing its work.
    Draining,
    /// Its startup or liveness probe failed, or it exited unexpectedly.
    Failed,
    /// Waiting for its restart (backoff) after a failure or a drain for a rebuild.
    Restarting,
    /// Stopped for good (scale-down, upgrade, down): no longer part of the cluster.
    Stopped,
}

/// What happened to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerInput {
    /// Its readiness probe passed.
    ReadinessPassed,
    /// Its readiness probe failed `failure_threshold` times in a row.
    ReadinessFailed,
    /// Its startup or liveness probe failed `failure_threshold` times in a row, or it
    /// exited while it was meant to run.
    Failed,
    /// The supervisor stops it.
    Drain,
    /// It will be started again.
    Restart,
    /// Its new process was spawned.
    Respawned,
    /// It is gone for good.
    Remove,
}

impl WorkerState {
    /// The state after `input`, or `None` when `input` does not apply in this state
    /// (a late probe result, a second stop): the caller changes nothing.
    #[must_use]
    pub fn on(self, input: WorkerInput) -> Option<WorkerState> {
        use WorkerInput as I;
        use WorkerState as S;
        let live = matches!(self, S::Starting | S::Ready | S::NotReady);
        let next = match (self, input) {
            (S::Starting | S::NotReady, I::ReadinessPassed) => S::Ready,
            (S::Starting | S::Ready, I::ReadinessFailed) => S::NotReady,
            (_, I::Failed) if live => S::Failed,
            (_, I::Drain) if live || self == S::Failed => S::Draining,
            (S::Failed | S::Draining, I::Restart) => S::Restarting,
            (S::Restarting, I::Respawned) => S::Starting,
            (S::Failed | S::Draining | S::Restarting, I::Remove) => S::Stopped,
            _ => return None,
        };
        (next != self).then_some(next)
    }

    /// Whether the coordinator may route to it.
    pub fn routable(self) -> bool {
        self == WorkerState::Ready
    }

    /// Whether its process is meant to be running (probed, restarted when it exits).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            WorkerState::Starting | WorkerState::Ready | WorkerState::NotReady
        )
    }

    /// Severity of an event announcing a change into this state.
    pub fn severity(self) -> Severity {
        match self {
            WorkerState::Failed => Severity::Error,
            WorkerState::NotReady | WorkerState::Restarting => Severity::Warning,
            _ => Severity::Normal,
        }
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The service's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ServiceState {
    /// Starting for the first time; not every worker ready yet.
    Deploying,
    /// Serving: every worker ready, or the unready ones are (re)starting within the
    /// upgrade strategy's max unavailable.
    Running,
    /// Serving, degraded: a worker fails its readiness, or more workers are unavailable
    /// than max unavailable allows.
    Alarm,
    /// Deploying with failures: a worker failed a probe or exited before the service
    /// ever ran.
    Abnormal,
    /// A rolling upgrade (or its rollback) is in progress.
    Upgrading,
    /// Stopping every process.
    Stopping,
    /// Every process has exited.
    Stopped,
    /// Deployment gave up (not ready in time, or a worker kept exiting at start).
    Failed,
}

/// What the service state is computed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceFacts {
    /// A stop was requested.
    pub stopping: bool,
    /// Every process has exited (only meaningful while stopping).
    pub all_stopped: bool,
    /// Deployment gave up.
    pub gave_up: bool,
    /// A rolling upgrade or rollback is running.
    pub upgrading: bool,
    /// Workers the service should have.
    pub desired: u32,
    /// Workers in state Ready.
    pub ready: u32,
    /// Workers in state NotReady.
    pub not_ready: u32,
    /// Workers in state Failed.
    pub failed: u32,
    /// Workers in state Restarting after a failure (not a planned rebuild).
    pub crashed: u32,
    /// New workers (scale-up) starting for the first time: not yet expected to serve.
    pub fresh: u32,
    /// Workers that may be unavailable while the service still counts as Running.
    pub max_unavailable: u32,
}

impl ServiceState {
    /// The state after looking at `f`.
    #[must_use]
    pub fn next(self, f: &ServiceFacts) -> ServiceState {
        use ServiceState as S;
        if self == S::Stopped {
            return S::Stopped;
        }
        if f.stopping {
            return if f.all_stopped {
                S::Stopped
            } else {
                S::Stopping
            };
        }
        if f.gave_up || self == S::Failed {
            return S::Failed;
        }
        if f.upgrading {
            return S::Upgrading;
        }
        let all_ready = f.ready >= f.desired && f.not_ready == 0 && f.failed == 0;
        // Planned restarts within max-unavailable still count as Running; a crash does not.
        let healthy = f.not_ready == 0
            && f.failed == 0
            && f.crashed == 0
            && f.ready + f.fresh + f.max_unavailable >= f.desired;
        match self {
            S::Deploying if all_ready => S::Running,
            S::Deploying if f.failed + f.crashed + f.not_ready > 0 => S::Abnormal,
            S::Deploying => S::Deploying,
            S::Abnormal if all_ready => S::Running,
            S::Abnormal => S::Abnormal,
            _ if healthy => S::Running,
            _ => S::Alarm,
        }
    }

    /// Severity of an event announcing a change into this state.
    pub fn severity(self) -> Severity {
        match self {
            ServiceState::Failed => Severity::Error,
            ServiceState::Alarm | ServiceState::Abnormal => Severity::Warning,
            _ => Severity::Normal,
        }
    }

    /// Whether the service ever ran (no longer deploying).
    pub fn has_run(self) -> bool {
        !matches!(
            self,
            ServiceState::Deploying | ServiceState::Abnormal | ServiceState::Failed
        )
    }
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use WorkerInput as I;
    use WorkerState as S;

    const ALL: [WorkerState; 7] = [
        S::Starting,
        S::Ready,
        S::NotReady,
        S::Draining,
        S::Failed,
        S::Restarting,
        S::Stopped,
    ];
    const INPUTS: [WorkerInput; 7] = [
        I::ReadinessPassed,
        I::ReadinessFailed,
        I::Failed,
        I::Drain,
        I::Restart,
        I::Respawned,
        I::Remove,
    ];

    #[test]
    fn worker_transitions_are_the_documented_ones() {
        let mut allowed = Vec::new();
        for s in ALL {
            for i in INPUTS {
                if let Some(n) = s.on(i) {
                    allowed.push((s, i, n));
                }
            }
        }
        let want = [
            (S::Starting, I::ReadinessPassed, S::Ready),
            (S::Starting, I::ReadinessFailed, S::NotReady),
            (S::Starting, I::Failed, S::Failed),
            (S::Starting, I::Drain, S::Draining),
            (S::Ready, I::ReadinessFailed, S::NotReady),
            (S::Ready, I::Failed, S::Failed),
            (S::Ready, I::Drain, S::Draining),
            (S::NotReady, I::ReadinessPassed, S::Ready),
            (S::NotReady, I::Failed, S::Failed),
            (S::NotReady, I::Drain, S::Draining),
            (S::Draining, I::Restart, S::Restarting),
            (S::Draining, I::Remove, S::Stopped),
            (S::Failed, I::Drain, S::Draining),
            (S::Failed, I::Restart, S::Restarting),
            (S::Failed, I::Remove, S::Stopped),
            (S::Restarting, I::Respawned, S::Starting),
            (S::Restarting, I::Remove, S::Stopped),
        ];
        assert_eq!(allowed, want);
    }

    #[test]
    fn stopped_is_terminal_and_only_ready_is_routable() {
        for i in INPUTS {
            assert_eq!(S::Stopped.on(i), None);
        }
        let routable: Vec<_> = ALL.into_iter().filter(|s| s.routable()).collect();
        assert_eq!(routable, [S::Ready]);
        assert_eq!(S::Failed.severity(), Severity::Error);
        assert_eq!(S::NotReady.severity(), Severity::Warning);
        assert_eq!(S::Ready.severity(), Severity::Normal);
    }

    fn facts(desired: u32, ready: u32) -> ServiceFacts {
        ServiceFacts {
            desired,
            ready,
            ..Default::default()
        }
    }

    #[test]
    fn deploying_becomes_running_or_abnormal() {
        use ServiceState as V;
        assert_eq!(V::Deploying.next(&facts(3, 2)), V::Deploying);
        assert_eq!(V::Deploying.next(&facts(3, 3)), V::Running);
        let failing = ServiceFacts {
            failed: 1,
            ..facts(3, 2)
        };
        assert_eq!(V::Deploying.next(&failing), V::Abnormal);
        let crashed = ServiceFacts {
            crashed: 1,
            ..facts(3, 2)
        };
        assert_eq!(V::Deploying.next(&crashed), V::Abnormal);
        // Abnormal sticks until everything is ready, even when the failure moved on.
        assert_eq!(V::Abnormal.next(&facts(3, 2)), V::Abnormal);
        assert_eq!(V::Abnormal.next(&facts(3, 3)), V::Running);
        let gave_up = ServiceFacts {
            gave_up: true,
            ..facts(3, 2)
        };
        assert_eq!(V::Abnormal.next(&gave_up), V::Failed);
        assert_eq!(V::Failed.next(&facts(3, 3)), V::Failed);
    }

    #[test]
    fn running_alarms_on_probe_failures_and_tolerates_starts_within_max_unavailable() {
        use ServiceState as V;
        let within = ServiceFacts {
            max_unavailable: 1,
            ..facts(4, 3)
        };
        assert_eq!(
            V::Running.next(&within),
            V::Running,
            "a start within max unavailable"
        );
        let beyond = ServiceFacts {
            max_unavailable: 1,
            ..facts(4, 2)
        };
        assert_eq!(V::Running.next(&beyond), V::Alarm);
        let scaling_up = ServiceFacts {
            fresh: 2,
            ..facts(6, 4)
        };
        assert_eq!(
            V::Running.next(&scaling_up),
            V::Running,
            "new workers still starting"
        );
        let not_ready = ServiceFacts {
            not_ready: 1,
            max_unavailable: 2,
            ..facts(4, 3)
        };
        assert_eq!(
            V::Running.next(&not_ready),
            V::Alarm,
            "a probe failure while running"
        );
        let failed = ServiceFacts {
            failed: 1,
            max_unavailable: 2,
            ..facts(4, 3)
        };
        assert_eq!(V::Running.next(&failed), V::Alarm);
        let crashed = ServiceFacts {
            crashed: 1,
            max_unavailable: 4,
            ..facts(4, 3)
        };
        assert_eq!(
            V::Running.next(&crashed),
            V::Alarm,
            "a crash is no planned start, whatever max unavailable allows"
        );
        assert_eq!(V::Alarm.next(&facts(4, 4)), V::Running);
        let up = ServiceFacts {
            upgrading: true,
            ..facts(4, 4)
        };
        assert_eq!(V::Running.next(&up), V::Upgrading);
        assert_eq!(V::Upgrading.next(&facts(4, 4)), V::Running);
        assert_eq!(V::Upgrading.next(&facts(4, 3)), V::Alarm);
    }

    #[test]
    fn stopping_ends_in_stopped_from_anywhere() {
        use ServiceState as V;
        let stop = ServiceFacts {
            stopping: true,
            ..facts(2, 2)
        };
        let done = ServiceFacts {
            all_stopped: true,
            ..stop
        };
        for s in [
            V::Deploying,
            V::Running,
            V::Alarm,
            V::Abnormal,
            V::Upgrading,
            V::Failed,
        ] {
            assert_eq!(s.next(&stop), V::Stopping);
            assert_eq!(s.next(&done), V::Stopped);
        }
        assert_eq!(V::Stopped.next(&facts(2, 2)), V::Stopped);
        assert_eq!(V::Failed.severity(), Severity::Error);
        assert_eq!(V::Alarm.severity(), Severity::Warning);
        assert!(!V::Abnormal.has_run() && V::Alarm.has_run());
    }
}
