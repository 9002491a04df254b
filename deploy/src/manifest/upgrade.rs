//! What a rolling upgrade may change: [`Manifest::upgrade_to`] compares a running
//! cluster's manifest with a new one and either lists the roles to roll and the new
//! replica counts, or refuses, naming the first field an upgrade cannot change.
//!
//! Refused: the service's identity (`name`, `mode`), the model (`model`, and per role
//! `engine` and `kv_dtype`, which change the KV fingerprint or format that old and new
//! workers exchange mid-upgrade), and what the coordinator reads once at start
//! (`coordinator.*` except `graceful_shutdown`, `registry`, `routing`, `kv`, `events`).
//! Everything else of a role rolls its workers; `replicas` alone scales; `upgrade` and
//! `coordinator.graceful_shutdown` only change what the supervisor does.

use super::{Manifest, ManifestError, Role};
use serde::Serialize;
use serde_json::Value;

/// What an accepted upgrade does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeChanges {
    /// Roles whose workers are replaced (in start order).
    pub roll: Vec<Role>,
    /// Every role of the new manifest with its replica count.
    pub replicas: Vec<(Role, u32)>,
}

/// The dotted path of the first leaf where `a` and `b` differ, under `prefix`.
fn first_difference(prefix: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                first_difference(&format!("{prefix}.{k}"), va, vb)
            })
        }
        _ if a == b => None,
        _ => Some(prefix.to_string()),
    }
}

fn json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn refuse(field: &str, reason: &str) -> ManifestError {
    ManifestError::invalid(field, format!("{reason}; an upgrade cannot change it"))
}

impl Manifest {
    /// Checks that `new` can replace `self` by a rolling upgrade.
    ///
    /// # Errors
    /// [`ManifestError::Invalid`] naming the first field an upgrade cannot change.
    pub fn upgrade_to(&self, new: &Manifest) -> Result<UpgradeChanges, ManifestError> {
        if self.name != new.name {
            return Err(refuse(
                "name",
                &format!("`{}` is not the running cluster `{}`", new.name, self.name),
            ));
        }
        if self.model != new.model {
            return Err(refuse(
                "model",
                &format!(
                    "changes the model (`{}` → `{}`): old and new workers would exchange KV of different models; start a new cluster for a new model",
                    self.model, new.model
                ),
            ));
        }
        if self.mode != new.mode {
            return Err(refuse(
                "mode",
                &format!("changes the mode ({} → {})", self.mode, new.mode),
            ));
        }
        let mut old_c = json(&self.coordinator);
        let mut new_c = json(&new.coordinator);
        for v in [&mut old_c, &mut new_c] {
            if let Value::Object(o) = v {
                o.remove("graceful_shutdown");
            }
        }
        for (name, a, b) in [
            ("coordinator", old_c, new_c),
            ("registry", json(&self.registry), json(&new.registry)),
            ("routing", json(&self.routing), json(&new.routing)),
            ("kv", json(&self.kv), json(&new.kv)),
            ("events", json(&self.events), json(&new.events)),
            ("advisor", json(&self.advisor), json(&new.advisor)),
        ] {
            if let Some(field) = first_difference(name, &a, &b) {
                return Err(refuse(
                    &field,
                    "is read by the coordinator once at start (restart the cluster to change it)",
                ));
            }
        }
        self.role_changes(new)
    }

    fn role_changes(&self, new: &Manifest) -> Result<UpgradeChanges, ManifestError> {
        let mut roll = Vec::new();
        let mut replicas = Vec::new();
        for (role, spec) in new.worker_roles() {
            replicas.push((role, spec.replicas));
            let Some(old) = self.roles.get(role) else {
                continue;
            };
            if old.engine != spec.engine {
                return Err(refuse(
                    &format!("roles.{role}.engine"),
                    &format!(
                        "changes the model fingerprint ({} → {}): old and new workers could not exchange KV",
                        old.engine.name(),
                        spec.engine.name()
                    ),
                ));
            }
            if old.kv_dtype != spec.kv_dtype {
                return Err(refuse(
                    &format!("roles.{role}.kv_dtype"),
                    "changes the KV format old and new workers exchange",
                ));
            }
            let (mut a, mut b) = (json(old), json(spec));
            for v in [&mut a, &mut b] {
                if let Value::Object(o) = v {
                    o.remove("replicas");
                }
            }
            if a != b {
                roll.push(role);
            }
        }
        Ok(UpgradeChanges { roll, replicas })
    }
}
