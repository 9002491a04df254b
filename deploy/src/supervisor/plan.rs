//! The rolling-upgrade planner, pure: given how many old and new workers of a role are
//! alive and ready, how many new ones to start and old ones to stop now, without more
//! than `replicas + surge` workers alive and without fewer than `replicas - unavailable`
//! ready (unless there already were fewer). Surge is `max_surge_percent` of the replicas
//! rounded up, unavailable `max_unavailable_percent` rounded down; when both come out
//! 0, unavailable is 1 so the upgrade can move (as Kubernetes does).

/// Budget of one role's rolling replacement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rolling {
    /// Workers of the new version wanted.
    pub replicas: u32,
    /// Extra workers allowed during the upgrade.
    pub surge: u32,
    /// Workers that may be unready during the upgrade.
    pub unavailable: u32,
}

impl Rolling {
    /// The budget for `replicas` workers with these percentages (each `0..=100`).
    pub fn new(replicas: u32, surge_percent: u32, unavailable_percent: u32) -> Self {
        let surge = (replicas * surge_percent).div_ceil(100);
        let mut unavailable = replicas * unavailable_percent / 100;
        if surge == 0 && unavailable == 0 {
            unavailable = 1;
        }
        Rolling {
            replicas,
            surge,
            unavailable,
        }
    }

    /// What to do now.
    pub fn step(&self, s: &RoleCounts) -> Step {
        if s.new_failed {
            return Step::Abort;
        }
        if s.old_alive == 0 && s.new_ready >= self.replicas {
            return Step::Done;
        }
        let alive = s.old_alive + s.new_alive;
        let max_alive = self.replicas + self.surge;
        let start = self
            .replicas
            .saturating_sub(s.new_alive)
            .min(max_alive.saturating_sub(alive));
        let ready = s.old_ready + s.new_ready;
        let min_ready = self.replicas.saturating_sub(self.unavailable);
        // Unready old workers serve nothing: they go first and always may. Ready ones go
        // while enough others stay ready.
        let stop_unready = s.old_alive - s.old_ready.min(s.old_alive);
        let stop_ready = s.old_ready.min(ready.saturating_sub(min_ready));
        Step::Act {
            start,
            stop_unready,
            stop_ready,
        }
    }
}

/// One role's workers during an upgrade (draining workers are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoleCounts {
    /// Old-version workers alive.
    pub old_alive: u32,
    /// Of those, ready.
    pub old_ready: u32,
    /// New-version workers alive.
    pub new_alive: u32,
    /// Of those, ready.
    pub new_ready: u32,
    /// A new worker failed (its startup probe, or it exited): the upgrade stops.
    pub new_failed: bool,
}

/// What the planner says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Step {
    /// Start and stop this many now (any may be 0: wait).
    Act {
        /// New workers to start.
        start: u32,
        /// Old unready workers to stop.
        stop_unready: u32,
        /// Old ready workers to stop.
        stop_ready: u32,
    },
    /// The role is replaced.
    Done,
    /// A new worker failed: stop and roll back.
    Abort,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn budgets_round_surge_up_and_unavailable_down() {
        assert_eq!(
            Rolling::new(2, 1, 1),
            Rolling {
                replicas: 2,
                surge: 1,
                unavailable: 0
            }
        );
        assert_eq!(
            Rolling::new(4, 25, 25),
            Rolling {
                replicas: 4,
                surge: 1,
                unavailable: 1
            }
        );
        assert_eq!(
            Rolling::new(10, 10, 10),
            Rolling {
                replicas: 10,
                surge: 1,
                unavailable: 1
            }
        );
        assert_eq!(
            Rolling::new(3, 100, 100),
            Rolling {
                replicas: 3,
                surge: 3,
                unavailable: 3
            }
        );
        assert_eq!(
            Rolling::new(3, 0, 10),
            Rolling {
                replicas: 3,
                surge: 0,
                unavailable: 1
            }
        );
    }

    #[test]
    fn zero_disruption_on_two_workers_goes_one_by_one() {
        let r = Rolling::new(2, 1, 1);
        let counts = |old_alive, old_ready, new_alive, new_ready| RoleCounts {
            old_alive,
            old_ready,
            new_alive,
            new_ready,
            new_failed: false,
        };
        let act = |start, stop_ready| Step::Act {
            start,
            stop_unready: 0,
            stop_ready,
        };
        assert_eq!(r.step(&counts(2, 2, 0, 0)), act(1, 0));
        assert_eq!(
            r.step(&counts(2, 2, 1, 0)),
            act(0, 0),
            "wait for the new one"
        );
        assert_eq!(r.step(&counts(2, 2, 1, 1)), act(0, 1));
        assert_eq!(r.step(&counts(1, 1, 1, 1)), act(1, 0));
        assert_eq!(r.step(&counts(1, 1, 2, 2)), act(0, 1));
        assert_eq!(r.step(&counts(0, 0, 2, 2)), Step::Done);
        let failed = RoleCounts {
            new_failed: true,
            ..counts(2, 2, 1, 0)
        };
        assert_eq!(r.step(&failed), Step::Abort);
    }

    /// Simulates an upgrade: every started worker becomes ready by the next step (or a
    /// step later), stopped workers go at once.
    fn simulate(r: Rolling, old: u32, lag: bool) -> (u32, u32, u32) {
        let (mut old_alive, mut new_ready, mut new_pending, mut pending2) = (old, 0u32, 0u32, 0u32);
        let (mut max_alive, mut min_ready) = (old, old);
        for steps in 0..1000 {
            let c = RoleCounts {
                old_alive,
                old_ready: old_alive,
                new_alive: new_ready + new_pending + pending2,
                new_ready,
                new_failed: false,
            };
            match r.step(&c) {
                Step::Done => return (steps, max_alive, min_ready),
                Step::Abort => unreachable!(),
                Step::Act {
                    start,
                    stop_unready,
                    stop_ready,
                } => {
                    assert_eq!(stop_unready, 0);
                    old_alive -= stop_ready;
                    min_ready = min_ready.min(old_alive + new_ready);
                    new_ready += new_pending;
                    new_pending = pending2;
                    pending2 = 0;
                    if lag {
                        pending2 += start;
                    } else {
                        new_pending += start;
                    }
                    max_alive = max_alive.max(old_alive + new_ready + new_pending + pending2);
                }
            }
        }
        panic!("no progress: {r:?} from {old}");
    }

    proptest! {
        /// Whatever the budget and the old count, the upgrade finishes, never has more
        /// than replicas + surge alive (or the old count), and never fewer ready than
        /// replicas - unavailable (or the old count).
        #[test]
        fn upgrades_finish_within_their_budget(
            replicas in 1u32..40,
            old in 1u32..40,
            surge in 0u32..=100,
            unavailable in 0u32..=100,
            lag: bool,
        ) {
            let r = Rolling::new(replicas, surge, unavailable);
            let (steps, max_alive, min_ready) = simulate(r, old, lag);
            prop_assert!(steps <= 4 * (replicas + old) + 4);
            prop_assert!(max_alive <= (replicas + r.surge).max(old), "{max_alive} {r:?}");
            prop_assert!(min_ready >= replicas.saturating_sub(r.unavailable).min(old), "{min_ready} {r:?}");
        }
    }
}
