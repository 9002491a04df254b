//! The probe scheduler of one worker process, pure and synchronous: which of its three
//! probes are due at an instant, and what a result means. Startup runs first (from
//! `delay` after the process started, every `interval`) and gates the others; once it
//! passes, readiness and liveness run (each from its own `delay` after the start, or at
//! once if that has passed). A probe "trips" when it has failed `failure_threshold`
//! times in a row; a success resets the count. At most one run per probe is in flight.
//! The actor runs the probes ([`super::probe_exec`]) and maps outcomes to worker inputs.

use crate::manifest::{Probe, ProbeKind};
use std::time::Instant;

#[derive(Debug, Clone)]
struct Tracker {
    probe: Probe,
    next_due: Instant,
    failures: u32,
    in_flight: bool,
}

/// What one probe result means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a tripped probe changes the worker's state"]
pub struct Outcome {
    /// Which probe.
    pub kind: ProbeKind,
    /// It passed.
    pub passed: bool,
    /// Failures in a row, this one included (0 when it passed).
    pub failures: u32,
    /// Its threshold.
    pub threshold: u32,
    /// This failure reached the threshold (reported once per run of failures).
    pub tripped: bool,
}

/// The probes of one process (a restarted worker gets a new set).
#[derive(Debug, Clone)]
pub struct ProbeSet {
    started_at: Instant,
    startup_passed: bool,
    trackers: [Tracker; 3],
}

fn index(kind: ProbeKind) -> usize {
    match kind {
        ProbeKind::Startup => 0,
        ProbeKind::Readiness => 1,
        ProbeKind::Liveness => 2,
    }
}

impl ProbeSet {
    /// Probes of a process started at `started_at`: `[startup, readiness, liveness]`.
    pub fn new(probes: [Probe; 3], started_at: Instant) -> Self {
        let trackers = probes.map(|probe| Tracker {
            next_due: started_at + probe.delay,
            probe,
            failures: 0,
            in_flight: false,
        });
        ProbeSet {
            started_at,
            startup_passed: false,
            trackers,
        }
    }

    /// The probe of `kind`.
    pub fn probe(&self, kind: ProbeKind) -> &Probe {
        &self.trackers[index(kind)].probe
    }

    /// Whether the startup probe has passed.
    #[cfg(test)]
    pub fn started(&self) -> bool {
        self.startup_passed
    }

    /// The probes to run now; each is marked in flight until [`ProbeSet::on_result`].
    pub fn due(&mut self, now: Instant) -> Vec<ProbeKind> {
        let kinds: &[ProbeKind] = if self.startup_passed {
            &[ProbeKind::Readiness, ProbeKind::Liveness]
        } else {
            &[ProbeKind::Startup]
        };
        let mut out = Vec::new();
        for &kind in kinds {
            let t = &mut self.trackers[index(kind)];
            if !t.in_flight && t.next_due <= now {
                t.in_flight = true;
                t.next_due = now + t.probe.interval;
                out.push(kind);
            }
        }
        out
    }

    /// Records a result of `kind` that arrived at `now`.
    pub fn on_result(&mut self, kind: ProbeKind, passed: bool, now: Instant) -> Outcome {
        let started_at = self.started_at;
        let t = &mut self.trackers[index(kind)];
        t.in_flight = false;
        let threshold = t.probe.failure_threshold;
        if passed {
            t.failures = 0;
        } else {
            t.failures = t.failures.saturating_add(1);
        }
        let failures = t.failures;
        if passed && kind == ProbeKind::Startup && !self.startup_passed {
            self.startup_passed = true;
            // The others start now, or at their own delay after the process started.
            for k in [ProbeKind::Readiness, ProbeKind::Liveness] {
                let o = &mut self.trackers[index(k)];
                o.next_due = now.max(started_at + o.probe.delay);
            }
        }
        Outcome {
            kind,
            passed,
            failures,
            threshold,
            tripped: !passed && failures == threshold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ProbeAction;
    use std::time::Duration;

    fn probe(delay: u64, interval: u64, threshold: u32) -> Probe {
        Probe {
            action: ProbeAction::HttpGet("/health".into()),
            delay: Duration::from_secs(delay),
            interval: Duration::from_secs(interval),
            timeout: Duration::from_secs(1),
            failure_threshold: threshold,
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn startup_gates_the_others_and_runs_on_its_schedule() {
        let t0 = Instant::now();
        let mut p = ProbeSet::new([probe(2, 1, 3), probe(5, 2, 3), probe(1, 4, 3)], t0);
        assert!(p.due(t0).is_empty());
        assert!(p.due(t0 + s(1)).is_empty(), "startup waits its delay");
        assert_eq!(p.due(t0 + s(2)), [ProbeKind::Startup]);
        assert!(p.due(t0 + s(4)).is_empty(), "one run in flight at a time");
        let o = p.on_result(ProbeKind::Startup, false, t0 + s(2));
        assert_eq!((o.failures, o.tripped), (1, false));
        assert!(p.due(t0 + s(2)).is_empty(), "next run one interval later");
        assert_eq!(p.due(t0 + s(3)), [ProbeKind::Startup]);
        let o = p.on_result(ProbeKind::Startup, true, t0 + s(3));
        assert!(o.passed && !o.tripped && p.started());
        // Liveness's delay (1 s) has passed: at once; readiness waits for its 5 s.
        assert_eq!(p.due(t0 + s(3)), [ProbeKind::Liveness]);
        assert!(p.due(t0 + s(4)).is_empty());
        assert_eq!(p.due(t0 + s(5)), [ProbeKind::Readiness]);
    }

    #[test]
    fn a_probe_trips_once_at_its_threshold_and_success_resets_it() {
        let t0 = Instant::now();
        let mut p = ProbeSet::new([probe(1, 1, 1), probe(1, 1, 3), probe(1, 1, 2)], t0);
        assert_eq!(p.due(t0 + s(1)), [ProbeKind::Startup]);
        let _ = p.on_result(ProbeKind::Startup, true, t0 + s(1));
        let mut trips = Vec::new();
        let mut now = t0 + s(1);
        for ok in [false, false, true, false, false, false, false] {
            assert_eq!(p.due(now), [ProbeKind::Readiness, ProbeKind::Liveness]);
            let o = p.on_result(ProbeKind::Readiness, ok, now);
            trips.push((o.failures, o.tripped));
            let _ = p.on_result(ProbeKind::Liveness, true, now);
            now += s(1);
        }
        assert_eq!(
            trips,
            [
                (1, false),
                (2, false),
                (0, false),
                (1, false),
                (2, false),
                (3, true),
                (4, false)
            ]
        );
    }

    #[test]
    fn a_startup_probe_that_never_passes_trips_after_threshold_runs() {
        let t0 = Instant::now();
        let mut p = ProbeSet::new([probe(1, 1, 4), probe(1, 1, 3), probe(1, 1, 3)], t0);
        let mut now = t0;
        let mut runs = 0;
        loop {
            now += Duration::from_millis(250);
            for k in p.due(now) {
                assert_eq!(
                    k,
                    ProbeKind::Startup,
                    "nothing else runs before startup passes"
                );
                runs += 1;
                if p.on_result(k, false, now).tripped {
                    assert_eq!(runs, 4);
                    assert!(now - t0 >= s(4) && now - t0 < s(5), "{:?}", now - t0);
                    return;
                }
            }
            assert!(runs < 10);
        }
    }
}
