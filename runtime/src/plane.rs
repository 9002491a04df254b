//! The internal plane's credential: every call between the cluster's own processes —
//! workers registering with the coordinator, the coordinator calling workers, the
//! supervisor flipping a worker's role — carries proof that its caller holds the
//! cluster's secret, and what one member hands another through a third (a decode
//! worker's transfer target, given to a prefill worker by the coordinator; a worker's
//! record in etcd) is signed with it.
//!
//! The secret is the cluster token `xpyd up` writes (a file of mode 0600, passed to the
//! children by path). Nothing on the wire is the token itself: calls present
//! `HMAC-SHA256(token, "xpyd/internal-plane/v1")` in the `x-xpyd-cluster` metadata (or
//! HTTP header), and signatures are `HMAC-SHA256(token, purpose ‖ 0 ‖ data)`. Both are
//! checked in constant time. A process started without a token runs an open internal
//! plane (every caller admitted) and says so at start.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;
use std::sync::Arc;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

type HmacSha256 = Hmac<Sha256>;

/// The gRPC metadata key (and HTTP header) of the internal credential.
pub const METADATA: &str = "x-xpyd-cluster";

/// What a call presents.
const CALLS: &str = "xpyd/internal-plane/v1";
/// What a decode worker signs: a transfer target it issued.
pub const TARGET: &str = "xpyd/kv-target/v1";
/// What a worker signs: its record in etcd.
pub const RECORD: &str = "xpyd/etcd-record/v1";

/// Why a credential file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    /// Unreadable.
    #[error("cluster token {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// Other users may read it, so it proves nothing.
    #[error(
        "cluster token {path}: mode {mode:o} lets other users read it; it must be 0600 (chmod 600 {path})"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Shorter than 16 characters.
    #[error("cluster token {path}: shorter than 16 characters")]
    Short {
        /// The file.
        path: String,
    },
}

/// The cluster's secret, and what is derived from it. Its `Debug` shows nothing.
#[derive(Clone)]
pub struct ClusterKey {
    secret: Arc<[u8]>,
    /// Hex of the call credential.
    bearer: Arc<str>,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(…)")
    }
}

/// Reads a cluster token file, which must be readable by its owner only.
///
/// # Errors
/// Unreadable, readable by others, or shorter than 16 characters.
pub fn read_token(path: &Path) -> Result<String, PlaneError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display().to_string();
    let io = |e: std::io::Error| PlaneError::Io {
        path: shown.clone(),
        reason: e.to_string(),
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PlaneError::Exposed { path: shown, mode });
    }
    let token = std::fs::read_to_string(path)
        .map_err(io)?
        .trim()
        .to_string();
    if token.len() < 16 {
        return Err(PlaneError::Short { path: shown });
    }
    Ok(token)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex to bytes, `None` when it is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

impl ClusterKey {
    /// The key of a token (as `xpyd up` writes it).
    pub fn from_token(token: &str) -> Self {
        let secret: Arc<[u8]> = Arc::from(token.trim().as_bytes());
        let mut k = ClusterKey {
            secret,
            bearer: Arc::from(""),
        };
        k.bearer = Arc::from(hex(&k.mac(CALLS, b"").finalize().into_bytes()));
        k
    }

    /// Reads a token file (see [`read_token`]).
    ///
    /// # Errors
    /// Unreadable, readable by others, or too short.
    pub fn load(path: &Path) -> Result<Self, PlaneError> {
        Ok(Self::from_token(&read_token(path)?))
    }

    fn mac(&self, purpose: &str, data: &[u8]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        m.update(purpose.as_bytes());
        m.update(&[0]);
        m.update(data);
        m
    }

    /// The credential a call presents (hex).
    pub fn bearer(&self) -> &str {
        &self.bearer
    }

    /// Whether `presented` (a call's `x-xpyd-cluster` value) is this cluster's
    /// credential.
    pub fn admits(&self, presented: Option<&str>) -> bool {
        presented
            .and_then(|p| unhex(p.trim()))
            .is_some_and(|b| self.mac(CALLS, b"").verify_slice(&b).is_ok())
    }

    /// Signs `data` for `purpose` ([`TARGET`], [`RECORD`]).
    pub fn sign(&self, purpose: &str, data: &[u8]) -> Vec<u8> {
        self.mac(purpose, data).finalize().into_bytes().to_vec()
    }

    /// Whether `sig` is this cluster's signature of `data` for `purpose`.
    pub fn verify(&self, purpose: &str, data: &[u8], sig: &[u8]) -> bool {
        self.mac(purpose, data).verify_slice(sig).is_ok()
    }

    /// Hex of [`ClusterKey::sign`].
    pub fn sign_hex(&self, purpose: &str, data: &[u8]) -> String {
        hex(&self.sign(purpose, data))
    }
}

/// The refusal of a call without the credential.
pub fn unauthenticated() -> Status {
    Status::unauthenticated(
        "this is the cluster's internal plane: the call carries no valid cluster credential (x-xpyd-cluster)",
    )
}

/// Server side: admits a call only with the cluster's credential (every call when the
/// plane is open).
#[derive(Clone, Debug)]
pub struct Gate(pub Option<ClusterKey>);

impl Interceptor for Gate {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match &self.0 {
            None => Ok(req),
            Some(k) if k.admits(req.metadata().get(METADATA).and_then(|v| v.to_str().ok())) => {
                Ok(req)
            }
            Some(_) => Err(unauthenticated()),
        }
    }
}

/// Client side: puts the cluster's credential on every call.
#[derive(Clone, Debug)]
pub struct Badge(Option<AsciiMetadataValue>);

impl Badge {
    /// The badge of `key` (none on an open plane).
    pub fn new(key: Option<&ClusterKey>) -> Self {
        Badge(key.and_then(|k| MetadataValue::try_from(k.bearer()).ok()))
    }

    /// The credential it carries (for an HTTP call's [`METADATA`] header).
    pub fn bearer(&self) -> Option<&str> {
        self.0.as_ref().and_then(|v| v.to_str().ok())
    }
}

impl Interceptor for Badge {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(METADATA, v.clone());
        }
        Ok(req)
    }
}

/// A channel whose calls carry the cluster's credential.
pub type Channel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Badge>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_admitted_only_with_the_clusters_own_credential() {
        let k = ClusterKey::from_token("0123456789abcdef0123");
        let other = ClusterKey::from_token("0123456789abcdef0124");
        assert!(k.admits(Some(k.bearer())));
        assert!(!k.admits(Some(other.bearer())));
        assert!(!k.admits(None));
        assert!(!k.admits(Some("")));
        assert!(!k.admits(Some("zz")));
        // The token itself is not the credential.
        assert!(!k.admits(Some("0123456789abcdef0123")));
        assert!(!k.bearer().contains("0123456789abcdef0123"));
        let mut gate = Gate(Some(k.clone()));
        let mut badge = Badge::new(Some(&k));
        let r = badge.call(Request::new(())).unwrap();
        assert!(gate.call(r).is_ok());
        let e = gate.call(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let r = Badge::new(Some(&other)).call(Request::new(())).unwrap();
        assert!(gate.call(r).is_err());
        // An open plane admits everyone and badges nothing.
        assert!(Gate(None).call(Request::new(())).is_ok());
        let r = Badge::new(None).call(Request::new(())).unwrap();
        assert!(r.metadata().get(METADATA).is_none());
        assert_eq!(format!("{k:?}"), "ClusterKey(…)");
    }

    #[test]
    fn signatures_bind_purpose_data_and_key() {
        let k = ClusterKey::from_token("0123456789abcdef0123");
        let s = k.sign(TARGET, b"{\"addr\":\"a\"}");
        assert!(k.verify(TARGET, b"{\"addr\":\"a\"}", &s));
        assert!(!k.verify(TARGET, b"{\"addr\":\"b\"}", &s));
        assert!(!k.verify(RECORD, b"{\"addr\":\"a\"}", &s));
        assert!(!ClusterKey::from_token("another-token-000").verify(
            TARGET,
            b"{\"addr\":\"a\"}",
            &s
        ));
        assert!(!k.verify(TARGET, b"{\"addr\":\"a\"}", &s[..16]));
        assert_eq!(unhex(&k.sign_hex(TARGET, b"x")), Some(k.sign(TARGET, b"x")));
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.token");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ClusterKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = ClusterKey::load(&p).unwrap();
        assert_eq!(
            k.bearer(),
            ClusterKey::from_token("0123456789abcdef0123").bearer()
        );
        std::fs::write(&p, "short").unwrap();
        assert!(matches!(
            ClusterKey::load(&p),
            Err(PlaneError::Short { .. })
        ));
        assert!(ClusterKey::load(&dir.path().join("none")).is_err());
    }
}
