//! The YAML manifest of an xpyd cluster: schema, defaults, loading and validation.
//!
//! Every struct rejects unknown fields, everything that has a sensible default is
//! optional, and [`Manifest::validate`] names the field path and the allowed range or
//! values of the first problem it finds (`roles.decode.replicas: 0 is out of range
//! 1..=64`). See `deploy/examples/*.yaml` for commented manifests.

mod reliability;
mod types;
mod upgrade;
mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_reliability;

pub use reliability::{
    AdvisorSpec, EventsSpec, Probe, ProbeAction, ProbeKind, RebuildScope, UpgradeSpec,
};
pub use types::{
    AuthMode, CoordinatorSpec, EngineKind, KvDtype, KvSpec, PinScope, RateScope, RegistryBackend,
    RegistrySpec, RoleSpec, RolesSpec, RoutingPolicy, RoutingSpec,
};
pub use upgrade::UpgradeChanges;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// Why a manifest could not be used.
#[derive(thiserror::Error, Debug)]
pub enum ManifestError {
    /// The manifest file could not be read.
    #[error("cannot read manifest {}: {source}", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The text is not YAML of the manifest's shape (syntax error, wrong type,
    /// unknown field, unknown enum value). The message carries the serde field path
    /// and line, and the file name when it came from [`Manifest::load`].
    #[error("{0}")]
    Parse(String),
    /// A value has the right type but is not allowed.
    #[error("{field}: {reason}")]
    Invalid {
        /// Dotted path of the offending field, e.g. `roles.decode.replicas`.
        field: String,
        /// What is wrong and what is allowed, e.g. `0 is out of range 1..=64`.
        reason: String,
    },
}

impl ManifestError {
    /// Builds an [`ManifestError::Invalid`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ManifestError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// How the cluster splits the two phases of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Separate prefill and decode workers; KV moves between them (xPyD).
    Disaggregated,
    /// One worker type does both phases (the aggregated baseline).
    Single,
}

impl Mode {
    /// The YAML spelling: `disaggregated` or `single`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Disaggregated => "disaggregated",
            Mode::Single => "single",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a worker process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Computes the prompt's KV cache and ships it to a decode worker.
    Prefill,
    /// Imports KV and generates tokens (continuous batching).
    Decode,
    /// Does both phases in one process (mode `single`).
    Combined,
}

impl Role {
    /// All roles, in start order.
    pub const ALL: [Role; 3] = [Role::Prefill, Role::Decode, Role::Combined];

    /// The YAML key and CLI spelling: `prefill`, `decode` or `combined`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Combined => "combined",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A whole cluster: one service, its model, its roles and the knobs around them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Service name, `[a-z0-9-]{1,63}` starting and ending with a letter or digit
    /// (it becomes process, registry and Kubernetes names). Required.
    pub name: String,
    /// `default` (the fetched SmolLM2-135M-Instruct model) or a path to a `.gguf` file.
    #[serde(default = "default_model")]
    pub model: String,
    /// `disaggregated` or `single`. Required.
    pub mode: Mode,
    /// Listeners, admission and timeouts of the coordinator.
    #[serde(default)]
    pub coordinator: CoordinatorSpec,
    /// Membership store.
    #[serde(default)]
    pub registry: RegistrySpec,
    /// Worker-selection policies.
    #[serde(default)]
    pub routing: RoutingSpec,
    /// KV transfer between prefill and decode workers.
    #[serde(default)]
    pub kv: KvSpec,
    /// Worker roles; which ones are allowed depends on [`Manifest::mode`]. Required.
    pub roles: RolesSpec,
    /// Rolling-upgrade strategy of `xpyd upgrade`.
    #[serde(default)]
    pub upgrade: UpgradeSpec,
    /// Retention of the cluster's events.
    #[serde(default)]
    pub events: EventsSpec,
    /// The ratio advisor.
    #[serde(default)]
    pub advisor: AdvisorSpec,
    /// TLS on the public APIs and the internal plane.
    #[serde(default)]
    pub tls: TlsSpec,
}

/// TLS of a cluster. With `internal: true`, `xpyd up` keeps a private CA for the cluster
/// (in the state directory's `tls/<name>/`, made on first use and kept, so clients given
/// its `ca.pem` once keep trusting the cluster) and issues a certificate per process at
/// every start: workers' gRPC, the coordinator's internal gRPC and KV transfer over tcp
/// then speak TLS, each member trusting only that CA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSpec {
    /// TLS on the public HTTP and gRPC APIs (default false). With `cert` and `key` they
    /// serve those files; without, a certificate the cluster's CA issues (which needs
    /// `internal: true`).
    pub public: bool,
    /// TLS on the internal plane, with the cluster's private CA (default false).
    pub internal: bool,
    /// The public APIs' certificate chain (PEM), relative to the manifest's directory.
    pub cert: Option<String>,
    /// The private key of `cert` (PEM).
    pub key: Option<String>,
    /// Extra host names or addresses the issued certificates carry, besides
    /// `coordinator.host`, `localhost`, `127.0.0.1` and each worker's own host (at most
    /// 16).
    pub hosts: Vec<String>,
}

fn default_model() -> String {
    "default".into()
}

/// Deserializes YAML text into a manifest; an error names the field path (through
/// `serde_path_to_error`) and the line and column of the problem.
fn parse(text: &str) -> Result<Manifest, ManifestError> {
    let mut path = None;
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = Some(e.path().to_string());
            e.into_inner()
        })
    })
    .map_err(|e| {
        let msg = e.without_snippet().to_string();
        // The parser's message carries the position; add it where one does not.
        let at = match e.location() {
            Some(l) if !msg.contains(" line ") => {
                format!(" at line {}, column {}", l.line(), l.column())
            }
            _ => String::new(),
        };
        ManifestError::Parse(match path.filter(|p| p != ".") {
            Some(p) => format!("{p}: {msg}{at}"),
            None => format!("{msg}{at}"),
        })
    })
}

impl Manifest {
    /// Parses YAML text and validates it.
    ///
    /// # Errors
    /// [`ManifestError::Parse`] for malformed YAML, wrong types, unknown fields or
    /// enum values (the message names the field); [`ManifestError::Invalid`] for
    /// values out of range.
    pub fn from_yaml(text: &str) -> Result<Manifest, ManifestError> {
        let manifest = parse(text)?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Reads a manifest file, parses and validates it.
    ///
    /// # Errors
    /// As [`Manifest::from_yaml`], with the file name in the message, plus
    /// [`ManifestError::Io`] when the file cannot be read.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Manifest::from_yaml(&text).map_err(|e| match e {
            ManifestError::Parse(msg) => ManifestError::Parse(format!("{}: {msg}", path.display())),
            ManifestError::Invalid { field, reason } => ManifestError::Invalid {
                field,
                reason: format!("{reason} (in {})", path.display()),
            },
            io @ ManifestError::Io { .. } => io,
        })
    }

    /// Checks every value against its allowed range and the mode/role rules.
    ///
    /// # Errors
    /// [`ManifestError::Invalid`] naming the first offending field.
    pub fn validate(&self) -> Result<(), ManifestError> {
        validate::manifest(self)
    }

    /// Roles to start, in start order, with their specs (and so replica counts):
    /// prefill then decode for mode `disaggregated`, combined for mode `single`.
    /// Roles the mode does not use are left out even if present (validation rejects them).
    pub fn worker_roles(&self) -> Vec<(Role, &RoleSpec)> {
        let wanted: &[Role] = match self.mode {
            Mode::Disaggregated => &[Role::Prefill, Role::Decode],
            Mode::Single => &[Role::Combined],
        };
        wanted
            .iter()
            .filter_map(|&role| self.roles.get(role).map(|spec| (role, spec)))
            .collect()
    }

    /// Total worker processes the manifest asks for.
    #[cfg(test)]
    pub fn total_replicas(&self) -> u32 {
        self.worker_roles().iter().map(|(_, s)| s.replicas).sum()
    }
}
