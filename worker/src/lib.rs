//! xpyd worker: one process that loads the model once and serves a role.
//!
//! - **prefill** (`prefill/`): takes a prompt and a transfer target, prefills in chunks
//!   and streams each layer's KV to the decode worker while the next layer computes;
//!   answers with the first sampled token once the KV is delivered.
//! - **decode** (`decode/`): reserves KV for a request, imports it as the prefill worker
//!   streams it (layer by layer, verified), admits the sequence into the running batch
//!   and streams its tokens; continuous batching across requests.
//! - **combined** (`single` deployments): the decode role that also prefills prompts
//!   itself, one chunk between decode steps.
//!
//! The host (`host.rs`) is what the roles share: the engine (loaded once), the KV
//! receiver, the lease, `/health` and `/metrics`, the gRPC server, stats and the
//! lifecycle. A prefill or decode worker can change role without reloading the model
//! (**role flip**, `POST /role` on its HTTP port): it takes no new work, lets what it
//! runs finish (or sends it elsewhere at `drain_timeout`), gets the engine back from the
//! old role's loop, starts the other role's loop on it and registers its new identity.
//! On SIGTERM it drains (no new work, in-flight work finishes within `drain_timeout`,
//! the rest fails with kind draining and migrates); if its engine thread stops it
//! reports itself failed and exits to be rebuilt.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod decode;
mod flip;
mod host;
pub mod prefill;
mod slots;

pub use flip::FlipReport;
pub use host::run;

use tokio::net::TcpListener;
use xpyd_engine::EngineConfig;
use xpyd_kv_transfer::Backend;
use xpyd_runtime::worker::Membership;

/// The roles a worker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Prefills prompts and streams their KV to decode workers.
    Prefill,
    /// Imports KV and decodes.
    Decode,
    /// Prefills and decodes its own requests (no KV transfer); never flips.
    Combined,
}

impl Role {
    /// The name the cluster uses (`prefill`, `decode`, `combined`).
    pub fn name(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Combined => "combined",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            "combined" => Ok(Role::Combined),
            other => Err(format!(
                "unknown role `{other}` (expected prefill, decode or combined)"
            )),
        }
    }
}

/// What a role decides once the model is loaded (the rest of the engine configuration
/// is the process's and stays across a flip).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSettings {
    /// The role.
    pub role: Role,
    /// Requests admitted at once; for prefill, the queue bound.
    pub max_running: usize,
    /// Tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// Prefix-cache blocks (where prompts are computed; 0 turns it off).
    pub prefix_cache_blocks: usize,
}

impl RoleSettings {
    /// Checks ranges.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        let (field, range) = match self.role {
            Role::Prefill => ("max_queue", 1..=100_000),
            Role::Decode | Role::Combined => ("max_running", 1..=1024),
        };
        if !range.contains(&self.max_running) {
            return Err(format!(
                "{field}: {} is out of range {}..={}",
                self.max_running,
                range.start(),
                range.end()
            ));
        }
        Ok(())
    }
}

/// Worker configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Unique id in the cluster (a flip may give it a new one).
    pub worker_id: String,
    /// The engine, loaded once; its `prefill_chunk` and `prefix_cache_blocks` are
    /// replaced by the serving role's.
    pub engine: EngineConfig,
    /// The role it starts in.
    pub role: RoleSettings,
    /// The role a flip changes to, or why it cannot flip (a combined worker; roles whose
    /// engines differ in what a reload would change).
    pub flip: Result<RoleSettings, String>,
    /// KV backend a decode role offers when the coordinator asks for none.
    pub kv_backend: Backend,
    /// Where to register.
    pub membership: Membership,
    /// Host name other processes reach this worker at.
    pub advertise_host: String,
    /// How long a drain (SIGTERM, or before a flip) waits for in-flight work before
    /// sending the rest to other workers.
    pub drain_timeout: std::time::Duration,
}

impl Config {
    /// Checks ranges.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        flip::check_worker_id(&self.worker_id)?;
        self.role.validate()?;
        if let Ok(other) = &self.flip {
            if other.role == Role::Combined || self.role.role == Role::Combined {
                return Err("flip: a combined worker has no other role".into());
            }
            if other.role == self.role.role {
                return Err(format!(
                    "flip: the other role is {} again",
                    other.role.name()
                ));
            }
            other.validate().map_err(|e| format!("flip: {e}"))?;
        }
        let mut e = self.engine.clone();
        e.prefill_chunk = self.role.prefill_chunk;
        e.prefix_cache_blocks = self.role.prefix_cache_blocks;
        e.validate().map_err(|e| format!("engine: {e}"))
    }

    /// The settings of `role`, if this worker may serve it.
    fn settings(&self, role: Role) -> Result<&RoleSettings, String> {
        if self.role.role == role {
            return Ok(&self.role);
        }
        match &self.flip {
            Ok(s) if s.role == role => Ok(s),
            Ok(_) => Err(format!(
                "a {} worker cannot serve {}",
                self.role.role.name(),
                role.name()
            )),
            Err(why) => Err(why.clone()),
        }
    }
}

/// The listeners a worker serves on.
pub struct Listeners {
    /// gRPC (`xpyd.v1.PrefillWorker` and `xpyd.v1.DecodeWorker` — the one of its role
    /// answers —, health, reflection).
    pub grpc: TcpListener,
    /// HTTP (`/health`, `/metrics`, `/role`).
    pub http: TcpListener,
    /// KV transfer receiver (used while the worker decodes; a combined worker closes it).
    pub kv: TcpListener,
}

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is invalid.
    #[error("config: {0}")]
    Config(String),
    /// The engine failed to load.
    #[error("engine: {0}")]
    Engine(#[from] xpyd_engine::EngineError),
    /// The KV receiver failed to start.
    #[error("kv-transfer: {0}")]
    Transfer(#[from] xpyd_kv_transfer::TransferError),
    /// A listener failed.
    #[error("serve: {0}")]
    Serve(String),
    /// The engine thread stopped (a panic, say): the worker reported itself failed and
    /// stopped so it is rebuilt.
    #[error("the engine thread stopped")]
    EngineStopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(role: Role, max_running: usize) -> RoleSettings {
        RoleSettings {
            role,
            max_running,
            prefill_chunk: 256,
            prefix_cache_blocks: 0,
        }
    }

    fn config(role: RoleSettings, flip: Result<RoleSettings, String>) -> Config {
        Config {
            worker_id: "decode-0".into(),
            engine: EngineConfig::new("model.gguf"),
            role,
            flip,
            kv_backend: Backend::Tcp,
            membership: Membership::default(),
            advertise_host: "127.0.0.1".into(),
            drain_timeout: std::time::Duration::from_secs(1),
        }
    }

    #[test]
    fn a_worker_serves_its_role_and_the_one_it_may_flip_to() {
        let c = config(settings(Role::Decode, 16), Ok(settings(Role::Prefill, 256)));
        c.validate().unwrap();
        assert_eq!(c.settings(Role::Decode).unwrap().max_running, 16);
        assert_eq!(c.settings(Role::Prefill).unwrap().max_running, 256);
        let e = c.settings(Role::Combined).unwrap_err();
        assert!(e.contains("cannot serve combined"), "{e}");
        // The manifest's reason comes back when it forbids flips.
        let c = config(
            settings(Role::Decode, 16),
            Err("differ in `threads`".into()),
        );
        c.validate().unwrap();
        assert!(c.settings(Role::Prefill).unwrap_err().contains("threads"));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (
                config(settings(Role::Decode, 0), Err(String::new())),
                "max_running",
            ),
            (
                config(settings(Role::Prefill, 100_001), Err(String::new())),
                "max_queue",
            ),
            (
                config(settings(Role::Decode, 16), Ok(settings(Role::Decode, 16))),
                "flip: the other role is decode again",
            ),
            (
                config(
                    settings(Role::Combined, 16),
                    Ok(settings(Role::Prefill, 16)),
                ),
                "flip: a combined worker",
            ),
            (
                config(settings(Role::Decode, 16), Ok(settings(Role::Prefill, 0))),
                "flip: max_queue",
            ),
        ];
        for (c, want) in cases {
            let e = c.validate().unwrap_err();
            assert!(e.starts_with(want), "{e}");
        }
        let mut c = config(settings(Role::Decode, 16), Err(String::new()));
        c.worker_id = "a b".into();
        assert!(c.validate().unwrap_err().starts_with("worker_id"));
        c.worker_id = String::new();
        assert!(c.validate().unwrap_err().starts_with("worker_id"));
    }

    #[test]
    fn worker_ids_are_short_and_plain() {
        assert!(flip::check_worker_id("prefill-1").is_ok());
        assert!(flip::check_worker_id("a.b_c-9").is_ok());
        assert!(flip::check_worker_id(&"x".repeat(128)).is_ok());
        for bad in ["", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(flip::check_worker_id(bad).is_err(), "{bad}");
        }
    }
}
