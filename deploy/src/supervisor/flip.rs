//! Role flips in the actor: changing the split within the same number of processes
//! turns ready workers of one role into the other (`POST /role` on each worker's HTTP
//! port) instead of starting new processes and draining old ones — no model reload, no
//! capacity dip beyond the flipped worker's own drain. The flipped worker takes the
//! lowest free index of its new role (`decode-2` becomes, say, `prefill-1`), and the
//! supervisor re-keys its record when the worker confirms; the replica counts change at
//! once and count a flipping worker in its new role, so `reconcile` starts and stops
//! nothing meanwhile. A flip that fails (refused, timed out, the process died) leaves
//! the counts as asked: `reconcile` then gets there the usual way.

use super::actor::{Msg, Supervisor};
use super::control::{CtlError, Reply};
use super::rebuild::Slot;
use super::states::WorkerState;
use crate::manifest::Role;
use serde_json::{Value, json};
use std::time::Duration;
use xpyd_runtime::events::Severity;

/// A flip command in progress: its reply once every flip has ended.
pub struct PendingFlip {
    /// The answer to the caller.
    pub reply: Option<Reply>,
    /// Flips not ended yet.
    pub left: usize,
    /// What each ended flip reported (`{"id", "ok", …}`).
    pub results: Vec<Value>,
}

/// How long a worker may take to flip beyond its drain.
const FLIP_MARGIN: Duration = Duration::from_secs(60);

/// Asks the worker at `http` to serve `role` as `id`.
async fn post_flip(
    http: String,
    role: &'static str,
    id: String,
    credential: String,
    wait: Duration,
) -> Result<Value, String> {
    tokio::task::spawn_blocking(move || {
        let body = json!({"role": role, "worker_id": id}).to_string();
        // The process's agent: over TLS it trusts the cluster's CA.
        let resp = xpyd_bench::http::agent()
            .post(&format!("{http}/role"))
            .config()
            .http_status_as_error(false)
            .timeout_global(Some(wait))
            .build()
            .header("content-type", "application/json")
            .header(xpyd_runtime::plane::METADATA, &credential)
            .send(body)
            .map_err(|e| format!("POST {http}/role: {e}"))?;
        let code = resp.status().as_u16();
        let text = resp.into_body().read_to_string().unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if code == 200 {
            Ok(v)
        } else {
            Err(format!(
                "HTTP {code}: {}",
                v["error"]["message"].as_str().unwrap_or(&v.to_string())
            ))
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

impl Supervisor {
    /// The role a worker counts in: its new one while it flips.
    pub(super) fn counted_role(w: &super::actor::Worker) -> Role {
        w.flipping.map_or(w.slot.role, |s| s.role)
    }

    /// True when `slot` is taken by a worker or reserved by a flip.
    pub(super) fn slot_taken(&self, slot: Slot) -> bool {
        self.workers.contains_key(&slot.id())
            || self.workers.values().any(|w| w.flipping == Some(slot))
    }

    /// Flips `n` ready workers of `from` to `to`; the reply comes when all have ended.
    pub(super) fn flip(&mut self, from: &str, to: &str, n: u32, reply: Reply) {
        match self.start_flips(from, to, n) {
            Ok(0) => {
                let _ = reply.send(Ok(json!({"flipped": []})));
            }
            Ok(left) => {
                self.pending_flip = Some(PendingFlip {
                    reply: Some(reply),
                    left,
                    results: vec![],
                });
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn start_flips(&mut self, from: &str, to: &str, n: u32) -> Result<usize, CtlError> {
        self.check_idle("flip roles")?;
        let role = |name: &str, field: &str| {
            [Role::Prefill, Role::Decode]
                .into_iter()
                .find(|r| r.name() == name && self.desired.contains_key(r))
                .ok_or_else(|| {
                    CtlError::invalid(
                        field,
                        format!("`{name}` is not a prefill or decode role of this cluster"),
                    )
                })
        };
        let (from, to) = (role(from, "from")?, role(to, "to")?);
        if from == to {
            return Err(CtlError::invalid("to", "must differ from `from`"));
        }
        let have = self.desired.get(&from).copied().unwrap_or(0);
        if n >= have {
            return Err(CtlError::invalid(
                "count",
                format!("{n} of {have} {from} workers would leave none"),
            ));
        }
        // Ready workers that have printed their URL, highest index first (as a scale-down
        // picks them).
        let mut ready: Vec<(u32, String, String)> = self
            .workers
            .values()
            .filter(|w| w.slot.role == from && w.flipping.is_none())
            .filter(|w| w.state == WorkerState::Ready && w.version == self.current)
            .filter_map(|w| Some((w.slot.index, w.id.clone(), w.http.clone()?)))
            .collect();
        ready.sort_by_key(|(i, _, _)| std::cmp::Reverse(*i));
        if (ready.len() as u32) < n {
            return Err(CtlError::busy(format!(
                "only {} of {} {from} workers are ready to flip",
                ready.len(),
                n
            )));
        }
        let wait = self
            .spec(self.current, from)
            .map_or(Duration::from_secs(30), |s| s.graceful_shutdown.timeout())
            + FLIP_MARGIN;
        *self.desired.entry(from).or_default() -= n;
        *self.desired.entry(to).or_default() += n;
        let msg = format!("flipping {n} {from} worker(s) to {to}");
        self.event(Severity::Normal, &self.s.name.clone(), "Flipping", msg);
        for (_, id, http) in ready.into_iter().take(n as usize) {
            let index = (0..)
                .find(|i| {
                    !self.slot_taken(Slot {
                        role: to,
                        index: *i,
                    })
                })
                .unwrap_or(0);
            let slot = Slot { role: to, index };
            let Some(w) = self.workers.get_mut(&id) else {
                continue;
            };
            w.flipping = Some(slot);
            let generation = w.generation;
            let msgs = self.msgs.clone();
            let new_id = slot.id();
            let credential = self.s.key.bearer().to_string();
            tokio::spawn(async move {
                let result = post_flip(http, to.name(), new_id, credential, wait).await;
                let _ = msgs.send(Msg::Flipped { generation, result }).await;
            });
        }
        Ok(n as usize)
    }

    /// A worker answered its flip (or did not).
    pub(super) fn flipped(&mut self, generation: u64, result: Result<Value, String>) {
        let id = self
            .workers
            .values()
            .find(|w| w.generation == generation)
            .map(|w| w.id.clone());
        let entry = match (id, result) {
            (Some(id), Ok(report)) => self.rekey(&id, &report),
            (id, Err(e)) => {
                let id = id.unwrap_or_else(|| format!("generation {generation}"));
                if let Some(w) = self.workers.get_mut(&id) {
                    w.flipping = None;
                }
                let msg =
                    format!("role flip failed: {e}; the split is reached by restarts instead");
                self.event(Severity::Warning, &id, "FlipFailed", msg);
                json!({"id": id, "ok": false, "error": e})
            }
            (None, Ok(_)) => json!({"id": format!("generation {generation}"), "ok": false,
                "error": "the process is gone"}),
        };
        if let Some(p) = self.pending_flip.as_mut() {
            p.results.push(entry);
            p.left = p.left.saturating_sub(1);
            if p.left == 0
                && let Some(p) = self.pending_flip.take()
                && let Some(reply) = p.reply
            {
                let _ = reply.send(Ok(json!({"flipped": p.results})));
            }
        }
        // Any flip that failed leaves counts a restart has to meet.
        self.reconcile();
    }

    /// Moves worker `id`'s record to its new slot once the worker serves it.
    fn rekey(&mut self, id: &str, report: &Value) -> Value {
        let Some(mut w) = self.workers.remove(id) else {
            return json!({"id": id, "ok": false, "error": "the worker is gone"});
        };
        let Some(slot) = w.flipping.take() else {
            self.workers.insert(id.to_string(), w);
            return json!({"id": id, "ok": false, "error": "no flip was pending"});
        };
        w.slot = slot;
        w.id = slot.id();
        w.last_flip = Some(report.clone());
        let new_id = w.id.clone();
        let routable = w.state.routable();
        self.workers.insert(new_id.clone(), w);
        self.reporter.routing(&new_id, routable);
        let ms = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
        let msg = format!(
            "{id} now serves {} as {new_id}, same process, no reload: {:.0} ms (drain {:.0}, switch {:.0}, register {:.0})",
            slot.role,
            ms("total_ms"),
            ms("drain_ms"),
            ms("switch_ms"),
            ms("register_ms")
        );
        self.event(Severity::Normal, &new_id, "Flipped", msg);
        json!({"id": id, "ok": true, "worker_id": new_id, "report": report})
    }
}
