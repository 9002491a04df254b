//! Rebuild decisions, pure: which workers a failed worker's rebuild restarts (its role's
//! `rebuild_scope`), and how long a crashed worker waits before its restart (a backoff
//! that doubles from 0.5 s up to 30 s, resets after a minute of running ready, and
//! reports a crash loop from the third failure in a row).

use crate::manifest::{RebuildScope, Role};
use std::time::Duration;

/// First restart delay.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest restart delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Ready this long without failing and the backoff starts over.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Failures in a row from which a worker is in a crash loop.
pub const CRASH_LOOP_AFTER: u32 = 3;

/// A worker slot: role and replica index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    /// Its role.
    pub role: Role,
    /// Its replica index.
    pub index: u32,
}

impl Slot {
    /// The worker id of the slot, `role-index`.
    pub fn id(&self) -> String {
        format!("{}-{}", self.role, self.index)
    }
}

/// The workers among `all` that `scope` restarts when `failed` fails (`failed` included,
/// in the order of `all`).
pub fn scope_members(scope: RebuildScope, failed: Slot, all: &[Slot]) -> Vec<Slot> {
    let mut out: Vec<Slot> = all
        .iter()
        .copied()
        .filter(|s| match scope {
            RebuildScope::Process => *s == failed,
            RebuildScope::UnitReplica => s.index == failed.index,
            RebuildScope::Unit => s.role == failed.role,
            RebuildScope::DeploymentReplica => true,
        })
        .collect();
    if !out.contains(&failed) {
        out.push(failed);
    }
    out
}

/// When a crashed worker restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    /// Wait this long.
    pub delay: Duration,
    /// Failures in a row so far.
    pub failures: u32,
    /// It is in a crash loop.
    pub crash_loop: bool,
}

/// The backoff of one worker slot (kept across its restarts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// Records a failure after the worker was ready for `ready_for` (zero if never) and
    /// returns when to restart it.
    pub fn on_failure(&mut self, ready_for: Duration) -> Restart {
        if ready_for >= STABLE_AFTER {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        let shift = (self.failures - 1).min(16);
        let delay = BACKOFF_BASE.saturating_mul(1 << shift).min(BACKOFF_CAP);
        Restart {
            delay,
            failures: self.failures,
            crash_loop: self.failures >= CRASH_LOOP_AFTER,
        }
    }

    /// Failures in a row so far.
    #[cfg(test)]
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(role: Role, index: u32) -> Slot {
        Slot { role, index }
    }

    #[test]
    fn each_scope_restarts_exactly_its_workers() {
        let p0 = slot(Role::Prefill, 0);
        let p1 = slot(Role::Prefill, 1);
        let d0 = slot(Role::Decode, 0);
        let d1 = slot(Role::Decode, 1);
        let d2 = slot(Role::Decode, 2);
        let all = [p0, p1, d0, d1, d2];
        assert_eq!(scope_members(RebuildScope::Process, d1, &all), [d1]);
        assert_eq!(scope_members(RebuildScope::UnitReplica, d1, &all), [p1, d1]);
        assert_eq!(scope_members(RebuildScope::UnitReplica, d2, &all), [d2]);
        assert_eq!(scope_members(RebuildScope::Unit, d1, &all), [d0, d1, d2]);
        assert_eq!(scope_members(RebuildScope::Unit, p0, &all), [p0, p1]);
        assert_eq!(
            scope_members(RebuildScope::DeploymentReplica, d1, &all),
            all
        );
        // The failed worker is always included, even when `all` no longer lists it.
        assert_eq!(scope_members(RebuildScope::Process, d1, &[p0]), [d1]);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_stable_minute() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..9)
            .map(|_| b.on_failure(Duration::ZERO).delay.as_millis())
            .collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        let r = b.on_failure(Duration::from_secs(10));
        assert_eq!((r.failures, r.crash_loop, r.delay), (10, true, BACKOFF_CAP));
        let r = b.on_failure(STABLE_AFTER);
        assert_eq!(
            (r.failures, r.crash_loop, r.delay),
            (1, false, BACKOFF_BASE)
        );
        for _ in 0..10_000 {
            assert!(b.on_failure(Duration::ZERO).delay <= BACKOFF_CAP);
        }
    }

    #[test]
    fn a_crash_loop_starts_at_the_third_failure_in_a_row() {
        let mut b = Backoff::default();
        let loops: Vec<_> = (0..4)
            .map(|_| b.on_failure(Duration::ZERO).crash_loop)
            .collect();
        assert_eq!(loops, [false, false, true, true]);
        assert_eq!(b.failures(), 4);
    }
}
