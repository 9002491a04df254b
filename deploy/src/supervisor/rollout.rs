//! Replica counts and rolling upgrades in the actor: `reconcile` keeps each role at its
//! wanted count (scale up with fresh indexes; scale down by draining the least useful
//! workers first — restarting, starting, not ready, then the highest index); `scale` and
//! `upgrade` are the control calls; a [`Rollout`] replaces one role after another with
//! the planner's steps (`plan.rs`), and when a new worker fails it stops and rolls back
//! the roles it touched, so the old version keeps serving.

use super::actor::{AfterExit, Supervisor, Version};
use super::control::CtlError;
use super::plan::{RoleCounts, Rolling, Step};
use super::states::WorkerState;
use crate::manifest::{Manifest, ManifestError, Role, UpgradeChanges};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use xpyd_runtime::events::Severity;

/// An upgrade (or its rollback) in progress.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Version being replaced.
    pub from: u32,
    /// Version being rolled out.
    pub to: u32,
    /// Roles to replace, in order.
    pub roles: Vec<Role>,
    /// The role being replaced (index into `roles`).
    pub pos: usize,
    /// Replicas of every role once done.
    pub targets: BTreeMap<Role, u32>,
    /// Replicas before the upgrade (a rollback's targets).
    pub before: BTreeMap<Role, u32>,
    /// (max surge %, max unavailable %).
    pub percents: (u32, u32),
    /// How long a role may go without progress before the rollout fails.
    pub deadline: Duration,
    /// Progress so far: (roles done, new workers ready in the current role) …
    pub progress: (usize, u32),
    /// … and when it last grew.
    pub progress_at: Instant,
    /// A new worker failed: why.
    pub failure: Option<String>,
    /// This is a rollback, because of this failure.
    pub rollback: Option<String>,
}

impl Rollout {
    /// For `GET /v1/supervisor`.
    pub fn view(&self) -> Value {
        json!({
            "from": self.from, "to": self.to,
            "roles": self.roles.iter().map(|r| r.name()).collect::<Vec<_>>(),
            "role": self.roles.get(self.pos).map(|r| r.name()),
            "rollback": self.rollback.is_some(), "reason": self.rollback,
        })
    }
}

/// A manifest error as a control error naming the field.
fn manifest_error(e: ManifestError) -> CtlError {
    match e {
        ManifestError::Invalid { field, reason } => CtlError::invalid(&field, reason),
        other => CtlError::invalid("manifest", other),
    }
}

impl Supervisor {
    /// Workers of `role` that count towards its replicas: not leaving (a worker draining
    /// for a rebuild comes back).
    fn staying(&self, role: Role) -> Vec<&super::actor::Worker> {
        self.workers
            .values()
            .filter(|w| Self::counted_role(w) == role)
            .filter(|w| match w.state {
                WorkerState::Stopped => false,
                WorkerState::Draining => matches!(w.after_exit, AfterExit::Restart(_)),
                _ => true,
            })
            .collect()
    }

    /// Keeps every role at its wanted replica count.
    pub(super) fn reconcile(&mut self) {
        let wanted: Vec<(Role, u32)> = self.desired.iter().map(|(r, n)| (*r, *n)).collect();
        for (role, n) in wanted {
            let have = self.staying(role).len() as u32;
            for _ in have..n {
                self.spawn_worker(role, self.current);
            }
            if have > n {
                let victims = self.victims(role, None, (have - n) as usize);
                for id in victims {
                    self.drain(&id, AfterExit::Remove, "scale-down");
                }
            }
        }
    }

    /// Up to `n` workers of `role` (of versions other than `keep`) to stop, least
    /// useful first.
    fn victims(&self, role: Role, keep: Option<u32>, n: usize) -> Vec<String> {
        let rank = |s: WorkerState| match s {
            WorkerState::Restarting | WorkerState::Failed | WorkerState::Draining => 0,
            WorkerState::Starting => 1,
            WorkerState::NotReady => 2,
            _ => 3,
        };
        let mut ws: Vec<_> = self
            .staying(role)
            .into_iter()
            .filter(|w| Some(w.version) != keep)
            .collect();
        ws.sort_by_key(|w| (rank(w.state), std::cmp::Reverse(w.slot.index)));
        ws.into_iter().take(n).map(|w| w.id.clone()).collect()
    }

    /// `POST /v1/scale`.
    pub(super) fn scale(&mut self, role: &str, replicas: u32) -> Result<Value, CtlError> {
        self.check_idle("scale")?;
        let roles: Vec<Role> = self.desired.keys().copied().collect();
        let Some(r) = roles.iter().copied().find(|r| r.name() == role) else {
            let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
            return Err(CtlError::invalid(
                "role",
                format!(
                    "`{role}` is not a role of this cluster ({})",
                    names.join(", ")
                ),
            ));
        };
        let from = self.desired.insert(r, replicas).unwrap_or(0);
        let msg = format!("{r}: {from} → {replicas} replicas");
        self.event(Severity::Normal, &self.s.name.clone(), "Scaled", msg);
        // Start (or drain) the workers now, not at the next tick: in between the service
        // would count the new workers as missing and raise a false Alarm.
        self.reconcile();
        Ok(json!({"role": r.name(), "from": from, "to": replicas}))
    }

    /// The new manifest (relative `mock_profile` paths made absolute against `dir`) and
    /// what it changes, or the refusal naming the field.
    fn check_upgrade(
        &self,
        text: &str,
        dir: Option<PathBuf>,
    ) -> Result<(Manifest, UpgradeChanges), CtlError> {
        let mut new = Manifest::from_yaml(text).map_err(manifest_error)?;
        if let Some(dir) = dir {
            for spec in [
                &mut new.roles.prefill,
                &mut new.roles.decode,
                &mut new.roles.combined,
            ]
            .into_iter()
            .flatten()
            {
                if let Some(p) = &mut spec.mock_profile
                    && p.is_relative()
                {
                    *p = dir.join(&*p);
                }
            }
        }
        let changes = self
            .manifest(self.current)
            .upgrade_to(&new)
            .map_err(manifest_error)?;
        if self.model_stamp.is_some() && super::actor::stamp(&self.s.model) != self.model_stamp {
            return Err(CtlError::invalid(
                "model",
                format!(
                    "the model file {} changed on disk since the cluster started (a new fingerprint); an upgrade cannot change the model",
                    self.s.model.display()
                ),
            ));
        }
        Ok((new, changes))
    }

    /// `POST /v1/upgrade`: checks the new manifest and starts rolling it out.
    pub(super) fn upgrade(&mut self, text: &str, dir: Option<PathBuf>) -> Result<Value, CtlError> {
        self.check_idle("upgrade")?;
        if !self.service.has_run() {
            return Err(CtlError::busy(
                "cannot upgrade: the cluster is still deploying",
            ));
        }
        let (new, changes) = self.check_upgrade(text, dir)?;
        let to = self.versions.keys().max().copied().unwrap_or(1) + 1;
        let file = self.s.run_dir.join(format!("{}-v{to}.yaml", self.s.name));
        let yaml = serde_saphyr::to_string(&new).map_err(|e| CtlError::invalid("manifest", e))?;
        std::fs::create_dir_all(&self.s.run_dir)
            .and_then(|()| std::fs::write(&file, yaml))
            .map_err(|e| CtlError {
                status: 500,
                field: None,
                message: format!("writing {}: {e}", file.display()),
            })?;
        let percents = new.upgrade.percents();
        let deadline = new.upgrade.progress_deadline();
        self.versions.insert(
            to,
            Version {
                manifest: new,
                file,
            },
        );
        let from = self.current;
        let targets: BTreeMap<Role, u32> = changes.replicas.iter().copied().collect();
        let roll: Vec<&str> = changes.roll.iter().map(|r| r.name()).collect();
        let msg = format!(
            "upgrade v{from} → v{to}: rolling [{}] (max surge {}%, max unavailable {}%)",
            roll.join(", "),
            percents.0,
            percents.1
        );
        self.event(Severity::Normal, &self.s.name.clone(), "UpgradeStep", msg);
        let reply = json!({"accepted": true, "from": from, "to": to, "roll": roll});
        self.rollout = Some(Rollout {
            from,
            to,
            roles: changes.roll,
            pos: 0,
            targets,
            before: self.desired.clone(),
            percents,
            deadline,
            progress: (0, 0),
            progress_at: Instant::now(),
            failure: None,
            rollback: None,
        });
        Ok(reply)
    }

    /// Counts of `role` for the planner: `to` is the new version. The new workers count
    /// as ready only once the coordinator routes to them.
    fn counts(&self, role: Role, to: u32, failed: bool) -> RoleCounts {
        let routed = self.routed.borrow();
        let mut c = RoleCounts {
            new_failed: failed,
            ..RoleCounts::default()
        };
        for w in self.staying(role) {
            let ready = w.state == WorkerState::Ready;
            if w.version == to {
                c.new_alive += 1;
                c.new_ready += u32::from(ready && routed.contains(&w.id));
            } else {
                c.old_alive += 1;
                c.old_ready += u32::from(ready);
            }
        }
        c
    }

    /// One step of the rollout in progress.
    pub(super) fn rollout_step(&mut self) {
        let Some(r) = self.rollout.clone() else {
            return;
        };
        let Some(&role) = r.roles.get(r.pos) else {
            self.finish_rollout();
            return;
        };
        let target = r.targets.get(&role).copied().unwrap_or(1);
        let plan = Rolling::new(target, r.percents.0, r.percents.1);
        let name = self.s.name.clone();
        let counts = self.counts(role, r.to, r.failure.is_some());
        let progress = (r.pos, counts.new_ready);
        let now = Instant::now();
        if progress > r.progress {
            if let Some(x) = self.rollout.as_mut() {
                (x.progress, x.progress_at) = (progress, now);
            }
        } else if r.failure.is_none() && now.duration_since(r.progress_at) > r.deadline {
            let why = format!(
                "{role}: no progress within the deadline of {}s ({} of {target} new workers ready)",
                r.deadline.as_secs(),
                counts.new_ready
            );
            if let Some(x) = self.rollout.as_mut() {
                x.failure = Some(why);
            }
            self.abort_rollout();
            return;
        }
        match plan.step(&counts) {
            Step::Done => {
                let msg = format!("{role}: all {target} workers at v{}", r.to);
                self.event(Severity::Normal, &name, "UpgradeStep", msg);
                if let Some(x) = self.rollout.as_mut() {
                    x.pos += 1;
                }
            }
            Step::Abort => self.abort_rollout(),
            Step::Act {
                start,
                stop_unready,
                stop_ready,
            } => {
                for _ in 0..start {
                    let id = self.spawn_worker(role, r.to);
                    let msg = format!("started {id} (v{})", r.to);
                    self.event(Severity::Normal, &name, "UpgradeStep", msg);
                }
                let unready = self.victims(role, Some(r.to), stop_unready as usize);
                let mut ready: Vec<String> = self
                    .staying(role)
                    .into_iter()
                    .filter(|w| w.version != r.to && w.state == WorkerState::Ready)
                    .map(|w| w.id.clone())
                    .collect();
                ready.sort_by_key(|id| {
                    std::cmp::Reverse(self.workers.get(id).map(|w| w.slot.index))
                });
                ready.truncate(stop_ready as usize);
                for id in unready.into_iter().chain(ready) {
                    let msg = format!("stopping {id} (replaced by v{})", r.to);
                    self.event(Severity::Normal, &name, "UpgradeStep", msg);
                    self.drain(&id, AfterExit::Remove, &format!("upgrade to v{}", r.to));
                }
            }
        }
    }

    /// A new worker failed: roll back the roles touched so far, or give up a rollback.
    fn abort_rollout(&mut self) {
        let Some(r) = self.rollout.take() else {
            return;
        };
        let reason = r.failure.clone().unwrap_or_default();
        let name = self.s.name.clone();
        if r.rollback.is_some() {
            let msg = format!(
                "the rollback to v{} failed too ({reason}); workers are left as they are",
                r.to
            );
            self.event(Severity::Error, &name, "Rollback", msg);
            self.current = r.to;
            self.desired = r.targets.clone();
            // A rollback runs from the new version back to the old: the upgrade it ends
            // went the other way (what `xpyd upgrade` waits on).
            self.last_upgrade =
                json!({"from": r.to, "to": r.from, "outcome": "rollback_failed", "reason": reason});
            return;
        }
        let msg = format!(
            "upgrade v{} → v{} failed ({reason}); rolling back to v{}, the old workers keep serving",
            r.from, r.to, r.from
        );
        self.event(Severity::Error, &name, "Rollback", msg);
        self.rollout = Some(Rollout {
            from: r.to,
            to: r.from,
            roles: r.roles[..=r.pos.min(r.roles.len().saturating_sub(1))].to_vec(),
            pos: 0,
            targets: r.before.clone(),
            before: r.before,
            percents: r.percents,
            deadline: r.deadline,
            progress: (0, 0),
            progress_at: Instant::now(),
            failure: None,
            rollback: Some(reason),
        });
    }

    /// Every role is replaced: the rollout's version becomes the cluster's.
    fn finish_rollout(&mut self) {
        let Some(r) = self.rollout.take() else {
            return;
        };
        self.current = r.to;
        self.desired = r.targets.clone();
        let name = self.s.name.clone();
        if let Some(reason) = r.rollback {
            let msg = format!(
                "rolled back to v{} after the upgrade to v{} failed: {reason}",
                r.to, r.from
            );
            self.event(Severity::Error, &name, "Rollback", msg);
            self.last_upgrade =
                json!({"from": r.to, "to": r.from, "outcome": "rolled_back", "reason": reason});
        } else {
            let msg = format!("upgrade v{} → v{} complete", r.from, r.to);
            self.event(Severity::Normal, &name, "UpgradeStep", msg);
            self.last_upgrade = json!({"from": r.from, "to": r.to, "outcome": "succeeded"});
        }
    }
}
