//! API keys: the store `xpyd keys` edits and the coordinator checks callers against.
//!
//! A key reads `xpyd-<id>-<secret>`: `id` (8 hex digits) finds its record, the secret
//! (32 random bytes, hex) is never stored — only an HMAC-SHA256 of the whole key under
//! the store's own random hash key, compared in constant time. The store is a directory
//! (mode 0700) of files written atomically with mode 0600: `keys.json` (the records),
//! `hash.key` (the HMAC key) and `used.json` (when each key was last used, written by
//! the coordinator) — or, for a cluster whose membership is in etcd, the same three
//! documents as etcd keys under `<registry.prefix>keys/`. A key is scoped to every service or bound to named ones, and may be
//! an admin key (the operations endpoints); a bound key cannot be deleted.

mod etcd;

use crate::error::ApiError;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type HmacSha256 = Hmac<Sha256>;

/// Longest key or service name.
pub const MAX_NAME: usize = 64;
/// Keys a store holds at most.
pub const MAX_KEYS: usize = 10_000;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A name, service or argument is not acceptable; the message names it.
    #[error("{0}")]
    Invalid(String),
    /// No key of that name.
    #[error("no key named `{0}`")]
    NotFound(String),
    /// A key of that name exists already.
    #[error("a key named `{0}` exists already")]
    Exists(String),
    /// The key is bound to services and cannot be deleted.
    #[error("key `{name}` is bound to {services:?}; unbind it first")]
    Bound {
        /// The key.
        name: String,
        /// Its services.
        services: Vec<String>,
    },
    /// Reading or writing the store failed.
    #[error("key store {path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// One key as stored: no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Its id (the key's second part).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// HMAC-SHA256 of the whole key, hex.
    pub hash: String,
    /// Services it is bound to; empty: every service.
    pub services: Vec<String>,
    /// Whether it opens the operations endpoints.
    pub admin: bool,
    /// Creation time (Unix seconds).
    pub created_unix: u64,
}

impl KeyRecord {
    /// Whether it may call `service`.
    pub fn scopes(&self, service: &str) -> bool {
        self.services.is_empty() || self.services.iter().any(|s| s == service)
    }
}

/// What `xpyd keys list` shows of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// Name.
    pub name: String,
    /// Bound services (empty: all).
    pub services: Vec<String>,
    /// Admin key.
    pub admin: bool,
    /// Creation time (Unix seconds).
    pub created_unix: u64,
    /// Last use seen by a coordinator (Unix seconds).
    pub last_used_unix: Option<u64>,
}

/// The coordinator's state directory: `$XPYD_STATE_DIR`, else the user data
/// directory's `xpyd`.
pub fn state_dir() -> PathBuf {
    std::env::var_os(xpyd_runtime::env::STATE_DIR)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            dirs::data_dir()
                .unwrap_or_else(std::env::temp_dir)
                .join("xpyd")
        })
}

/// The store's directory: `keys` in the [`state_dir`].
pub fn default_dir() -> PathBuf {
    state_dir().join("keys")
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn io(path: &Path, e: impl std::fmt::Display) -> KeyError {
    KeyError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Checks a key or service name: 1..=64 of `A-Z a-z 0-9 _ . -`.
///
/// # Errors
/// [`KeyError::Invalid`] naming `what`.
pub fn check_name(what: &str, name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::Invalid(format!(
            "{what}: `{name}` must be 1..={MAX_NAME} letters, digits, `_`, `.` or `-`"
        )))
    }
}

/// Writes `bytes` to `path` atomically (a temporary file in the same directory, mode
/// 0600, synced, then renamed over it).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("keys"),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// `bytes` random bytes from the OS, hex.
///
/// # Errors
/// The OS has no randomness to give.
pub fn random_hex(bytes: usize) -> Result<String, KeyError> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(|e| KeyError::Io {
        path: PathBuf::from("getrandom"),
        reason: e.to_string(),
    })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A key store: a directory, or keys in etcd when the cluster keeps its membership
/// there.
#[derive(Debug, Clone)]
pub struct Store {
    at: Backing,
}

#[derive(Debug, Clone)]
enum Backing {
    /// `keys.json`, `hash.key` and `used.json` in a directory (mode 0700), each written
    /// atomically with mode 0600; writers take turns through an `flock`.
    Dir(PathBuf),
    /// The same three documents as etcd keys under a prefix; writers commit with a
    /// compare-and-swap on the documents' revisions and retry on a conflict.
    Etcd(etcd::Place),
}

/// The records and the hash key, as loaded.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    hash_key: Vec<u8>,
    records: Vec<KeyRecord>,
}

fn parse_records(bytes: Option<&[u8]>, at: &Path) -> Result<Vec<KeyRecord>, KeyError> {
    match bytes {
        Some(b) => serde_json::from_slice(b).map_err(|e| io(at, e)),
        None => Ok(Vec::new()),
    }
}

fn parse_hash_key(bytes: Option<&[u8]>, at: &Path) -> Result<Vec<u8>, KeyError> {
    match bytes {
        Some(b) => {
            decode_hex(String::from_utf8_lossy(b).trim()).ok_or_else(|| io(at, "not a hex key"))
        }
        None => Ok(Vec::new()),
    }
}

impl Store {
    /// The store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store {
            at: Backing::Dir(dir.into()),
        }
    }

    /// The store in etcd at `endpoints`, under `<prefix>keys/` (`https://` endpoints
    /// checked against `roots`).
    pub fn etcd(
        endpoints: Vec<String>,
        prefix: &str,
        roots: Option<xpyd_runtime::tls::Roots>,
    ) -> Self {
        Store {
            at: Backing::Etcd(etcd::Place::new(endpoints, prefix, roots)),
        }
    }

    /// Its directory, when it is one.
    pub fn dir(&self) -> Option<&Path> {
        match &self.at {
            Backing::Dir(d) => Some(d),
            Backing::Etcd(_) => None,
        }
    }

    fn records_path(dir: &Path) -> PathBuf {
        dir.join("keys.json")
    }

    fn hash_key_path(dir: &Path) -> PathBuf {
        dir.join("hash.key")
    }

    fn used_path(dir: &Path) -> PathBuf {
        dir.join("used.json")
    }

    fn ensure_dir(dir: &Path) -> Result<(), KeyError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io(dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io(dir, e))
    }

    /// Loads records and hash key; an absent store has no keys.
    ///
    /// # Errors
    /// [`KeyError::Io`] for an unreadable or malformed store.
    pub fn load(&self) -> Result<Keys, KeyError> {
        match &self.at {
            Backing::Dir(dir) => {
                let rp = Self::records_path(dir);
                let read = |p: &Path| match std::fs::read(p) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io(p, e)),
                };
                let records = parse_records(read(&rp)?.as_deref(), &rp)?;
                let hp = Self::hash_key_path(dir);
                let hash = read(&hp)?;
                if hash.is_none() && !records.is_empty() {
                    return Err(io(&hp, "missing, but the store holds keys"));
                }
                Ok(Keys {
                    hash_key: parse_hash_key(hash.as_deref(), &hp)?,
                    records,
                })
            }
            Backing::Etcd(p) => Ok(p.load()?.keys),
        }
    }

    /// A stamp that changes whenever the records do (a file's modification time, an
    /// etcd revision); `None` when there are none or it cannot be read.
    fn stamp(&self) -> Option<u128> {
        match &self.at {
            Backing::Dir(dir) => std::fs::metadata(Self::records_path(dir))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_nanos()),
            Backing::Etcd(p) => p.stamp(),
        }
    }

    /// Holds the directory's write lock (an exclusive `flock` on `.lock` in it) until the
    /// returned file is dropped: concurrent `xpyd keys` runs and coordinators recording
    /// last uses take turns at read-modify-write, so none loses another's change.
    fn exclusive(dir: &Path) -> Result<std::fs::File, KeyError> {
        use std::os::unix::fs::OpenOptionsExt;
        Self::ensure_dir(dir)?;
        let p = dir.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| io(&p, e))?;
        f.lock().map_err(|e| io(&p, e))?;
        Ok(f)
    }

    /// Read-modify-write of the records: `f` sees the store as it is (with a hash key,
    /// made on first use) and its changes land whole or not at all, never over another
    /// writer's.
    fn update<T>(
        &self,
        mut f: impl FnMut(&mut Keys) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        match &self.at {
            Backing::Dir(dir) => {
                let _lock = Self::exclusive(dir)?;
                let mut keys = self.load()?;
                if keys.hash_key.is_empty() {
                    let k = random_hex(32)?;
                    write_private(&Self::hash_key_path(dir), k.as_bytes())?;
                    keys.hash_key = decode_hex(&k).expect("hex we wrote");
                }
                let out = f(&mut keys)?;
                let json = serde_json::to_vec_pretty(&keys.records).map_err(|e| io(dir, e))?;
                write_private(&Self::records_path(dir), &json)?;
                Ok(out)
            }
            Backing::Etcd(p) => p.update(&mut f),
        }
    }

    /// Creates a key and returns its secret — the only time it is shown.
    ///
    /// # Errors
    /// A bad or taken name, a bad service name, a full store, or I/O.
    pub fn create(&self, name: &str, services: &[String], admin: bool) -> Result<String, KeyError> {
        check_name("name", name)?;
        for s in services {
            check_name("services", s)?;
        }
        let mut services: Vec<String> = services.to_vec();
        services.sort();
        services.dedup();
        self.update(|keys| {
            if keys.records.iter().any(|r| r.name == name) {
                return Err(KeyError::Exists(name.into()));
            }
            if keys.records.len() >= MAX_KEYS {
                return Err(KeyError::Invalid(format!(
                    "the store holds {MAX_KEYS} keys already"
                )));
            }
            let id = loop {
                let id = random_hex(4)?;
                if !keys.records.iter().any(|r| r.id == id) {
                    break id;
                }
            };
            let secret = format!("xpyd-{id}-{}", random_hex(32)?);
            keys.records.push(KeyRecord {
                hash: keys.hash_of(&secret),
                id,
                name: name.into(),
                services: services.clone(),
                admin,
                created_unix: now_unix(),
            });
            Ok(secret)
        })
    }

    /// Binds each named key to each service (in one write).
    ///
    /// # Errors
    /// An unknown key, a bad service name, or I/O; nothing is written then.
    pub fn bind(&self, names: &[String], services: &[String]) -> Result<(), KeyError> {
        self.edit(names, services, |r, s| {
            if !r.services.contains(s) {
                r.services.push(s.clone());
                r.services.sort();
            }
        })
    }

    /// Unbinds each named key from each service (in one write); a key bound to nothing
    /// is scoped to every service again.
    ///
    /// # Errors
    /// An unknown key, a bad service name, or I/O; nothing is written then.
    pub fn unbind(&self, names: &[String], services: &[String]) -> Result<(), KeyError> {
        self.edit(names, services, |r, s| r.services.retain(|x| x != s))
    }

    fn edit(
        &self,
        names: &[String],
        services: &[String],
        f: impl Fn(&mut KeyRecord, &String),
    ) -> Result<(), KeyError> {
        if names.is_empty() || services.is_empty() {
            return Err(KeyError::Invalid(
                "give at least one key name and one service".into(),
            ));
        }
        for s in services {
            check_name("services", s)?;
        }
        self.update(|keys| {
            for n in names {
                let r = keys
                    .records
                    .iter_mut()
                    .find(|r| &r.name == n)
                    .ok_or_else(|| KeyError::NotFound(n.clone()))?;
                for s in services {
                    f(r, s);
                }
            }
            Ok(())
        })
    }

    /// Deletes a key that is bound to no service.
    ///
    /// # Errors
    /// An unknown or bound key, or I/O.
    pub fn delete(&self, name: &str) -> Result<(), KeyError> {
        self.update(|keys| {
            let i = keys
                .records
                .iter()
                .position(|r| r.name == name)
                .ok_or_else(|| KeyError::NotFound(name.into()))?;
            if !keys.records[i].services.is_empty() {
                return Err(KeyError::Bound {
                    name: name.into(),
                    services: keys.records[i].services.clone(),
                });
            }
            keys.records.remove(i);
            Ok(())
        })
    }

    /// Every key without its secret, with its last use.
    ///
    /// # Errors
    /// I/O.
    pub fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        let keys = self.load()?;
        let used = self.used();
        Ok(keys
            .records
            .iter()
            .map(|r| KeyInfo {
                name: r.name.clone(),
                services: r.services.clone(),
                admin: r.admin,
                created_unix: r.created_unix,
                last_used_unix: used.get(&r.id).copied(),
            })
            .collect())
    }

    /// Last use per key id (what coordinators recorded).
    pub fn used(&self) -> BTreeMap<String, u64> {
        let bytes = match &self.at {
            Backing::Dir(dir) => std::fs::read(Self::used_path(dir)).ok(),
            Backing::Etcd(p) => p.used().ok().flatten(),
        };
        bytes
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Merges last uses into the store (newest wins).
    ///
    /// # Errors
    /// I/O.
    pub fn record_used(&self, seen: &BTreeMap<String, u64>) -> Result<(), KeyError> {
        let merge = |used: &mut BTreeMap<String, u64>| {
            for (id, t) in seen {
                let e = used.entry(id.clone()).or_default();
                *e = (*e).max(*t);
            }
        };
        match &self.at {
            Backing::Dir(dir) => {
                let _lock = Self::exclusive(dir)?;
                let mut used = self.used();
                merge(&mut used);
                let json = serde_json::to_vec(&used).map_err(|e| io(dir, e))?;
                write_private(&Self::used_path(dir), &json)
            }
            Backing::Etcd(p) => p.record_used(merge),
        }
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Keys {
    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.hash_key).expect("HMAC takes any key length")
    }

    fn hash_of(&self, key: &str) -> String {
        let mut m = self.mac();
        m.update(key.as_bytes());
        m.finalize()
            .into_bytes()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    }

    /// The record of a presented key, if it is one of ours (the hash compared in
    /// constant time).
    pub fn find(&self, presented: &str) -> Option<&KeyRecord> {
        let mut parts = presented.splitn(3, '-');
        let (Some("xpyd"), Some(id), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        let r = self.records.iter().find(|r| r.id == id)?;
        let want = decode_hex(&r.hash)?;
        let mut m = self.mac();
        m.update(presented.as_bytes());
        m.verify_slice(&want).ok().map(|()| r)
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Who made a call, as the audit log names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The service requires no key.
    Anyone,
    /// The cluster's own credential (`xpyd up`, the supervisor, the dashboard it opens).
    Cluster,
    /// The API key of this name.
    Key(String),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Anyone => f.write_str("anyone (no API keys)"),
            Caller::Cluster => f.write_str("cluster token"),
            Caller::Key(n) => write!(f, "key:{n}"),
        }
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// An inference call: any key scoped to the service.
    Service,
    /// An operations call: an admin key scoped to the service, or the cluster token.
    Admin,
}

/// The coordinator's view of the store: reloaded when `keys.json` changes ([`Live::refresh`],
/// which the coordinator calls every [`RECHECK`] on a blocking thread, so a call's check
/// never touches the disk), with last uses gathered for `used.json`.
#[derive(Debug)]
pub struct Live {
    store: Store,
    service: String,
    cluster_token: Option<String>,
    state: Mutex<LiveState>,
}

#[derive(Debug)]
struct LiveState {
    keys: Keys,
    stamp: Option<u128>,
    used: BTreeMap<String, u64>,
}

/// How often the coordinator looks for a changed store.
pub const RECHECK: Duration = Duration::from_secs(1);

impl Live {
    /// Loads the store for `service`; `cluster_token` (from `xpyd up`) opens every call.
    ///
    /// # Errors
    /// A malformed store.
    pub fn new(
        store: Store,
        service: &str,
        cluster_token: Option<String>,
    ) -> Result<Self, KeyError> {
        let keys = store.load()?;
        let stamp = store.stamp();
        Ok(Live {
            store,
            service: service.into(),
            cluster_token,
            state: Mutex::new(LiveState {
                keys,
                stamp,
                used: BTreeMap::new(),
            }),
        })
    }

    /// Checks a call's `Authorization` value (`Bearer <key>`).
    ///
    /// # Errors
    /// 401 without a key or with one the store does not hold, 403 for a key not scoped
    /// to this service or not an admin key where one is needed.
    pub fn check(&self, authorization: Option<&str>, need: Need) -> Result<Caller, ApiError> {
        let presented = authorization
            .map(str::trim)
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty());
        let Some(key) = presented else {
            return Err(unauthorized(
                "an API key is required: send `Authorization: Bearer <key>`",
            ));
        };
        // The cluster's own credential opens everything (`xpyd up --ask` uses it too).
        if self
            .cluster_token
            .as_deref()
            .is_some_and(|t| constant_time_eq(t.as_bytes(), key.as_bytes()))
        {
            return Ok(Caller::Cluster);
        }
        let mut st = self.state.lock().expect("keys lock");
        let Some(r) = st.keys.find(key) else {
            return Err(unauthorized("the API key is not valid"));
        };
        if !r.scopes(&self.service) {
            return Err(forbidden(format!(
                "the API key `{}` is not bound to service `{}`",
                r.name, self.service
            )));
        }
        if need == Need::Admin && !r.admin {
            return Err(forbidden(format!(
                "the API key `{}` is not an admin key",
                r.name
            )));
        }
        let (id, name) = (r.id.clone(), r.name.clone());
        st.used.insert(id, now_unix());
        Ok(Caller::Key(name))
    }

    /// Reloads the store when `keys.json` changed since it was loaded (file I/O: call it
    /// off the async threads). A store that cannot be read keeps the keys loaded before.
    pub fn refresh(&self) {
        let now = self.store.stamp();
        if now == self.state.lock().expect("keys lock").stamp {
            return;
        }
        match self.store.load() {
            Ok(k) => {
                let mut st = self.state.lock().expect("keys lock");
                st.keys = k;
                st.stamp = now;
            }
            Err(e) => {
                tracing::warn!(error = %e, "key store not reloaded; the keys loaded before stay")
            }
        }
    }

    /// Writes the last uses gathered since the previous call into the store.
    pub fn flush_used(&self) {
        let seen = std::mem::take(&mut self.state.lock().expect("keys lock").used);
        if !seen.is_empty()
            && let Err(e) = self.store.record_used(&seen)
        {
            tracing::warn!(error = %e, "recording when keys were last used");
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::refusal(401, "invalid_request_error", "invalid_api_key", message)
}

fn forbidden(message: String) -> ApiError {
    ApiError::refusal(
        403,
        "permission_denied",
        "insufficient_permissions",
        message,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Writers at once (several `xpyd keys` runs, coordinators recording last uses) take
    /// turns: every key created is kept, every bind lands.
    #[test]
    fn concurrent_writers_lose_no_change() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path().join("keys"));
        store.create("base", &[], false).unwrap();
        std::thread::scope(|s| {
            for i in 0..8 {
                let store = &store;
                s.spawn(move || {
                    store.create(&format!("k{i}"), &[], false).unwrap();
                    store
                        .bind(&names(&["base"]), &names(&[&format!("svc{i}")]))
                        .unwrap();
                    let seen = BTreeMap::from([(format!("id{i}"), 100 + i as u64)]);
                    store.record_used(&seen).unwrap();
                });
            }
        });
        let list = store.list().unwrap();
        assert_eq!(list.len(), 9, "{list:?}");
        let base = list.iter().find(|k| k.name == "base").unwrap();
        assert_eq!(base.services.len(), 8, "{:?}", base.services);
        assert_eq!(store.used().len(), 8);
    }

    #[test]
    fn a_created_key_is_shown_once_and_stored_only_as_a_hash() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path().join("keys"));
        let secret = store.create("ci", &[], false).unwrap();
        assert!(secret.starts_with("xpyd-") && secret.len() > 70, "{secret}");
        for entry in std::fs::read_dir(store.dir().unwrap()).unwrap() {
            let p = entry.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap();
            let tail = secret.rsplit('-').next().unwrap();
            assert!(!text.contains(tail), "{} holds the secret", p.display());
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        let mode = std::fs::metadata(store.dir().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        let keys = store.load().unwrap();
        assert_eq!(keys.find(&secret).unwrap().name, "ci");
        // One changed character anywhere, or another key's id, is no key.
        let mut wrong = secret.clone().into_bytes();
        let last = wrong.len() - 1;
        wrong[last] = if wrong[last] == b'0' { b'1' } else { b'0' };
        assert!(keys.find(std::str::from_utf8(&wrong).unwrap()).is_none());
        assert!(keys.find("xpyd-00000000-00").is_none());
        assert!(keys.find("sk-anything").is_none());
        assert!(matches!(
            store.create("ci", &[], false),
            Err(KeyError::Exists(_))
        ));
    }

    #[test]
    fn scopes_bind_in_batch_and_a_bound_key_cannot_be_deleted() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        store.create("a", &[], false).unwrap();
        store.create("b", &names(&["svc1"]), false).unwrap();
        store
            .bind(&names(&["a", "b"]), &names(&["svc2", "svc3"]))
            .unwrap();
        let list = store.list().unwrap();
        assert_eq!(list[0].services, ["svc2", "svc3"]);
        assert_eq!(list[1].services, ["svc1", "svc2", "svc3"]);
        let err = store.delete("a").unwrap_err();
        assert!(matches!(err, KeyError::Bound { .. }), "{err}");
        store
            .unbind(&names(&["a"]), &names(&["svc2", "svc3"]))
            .unwrap();
        store.delete("a").unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(matches!(
            store.bind(&names(&["nobody"]), &names(&["svc"])),
            Err(KeyError::NotFound(_))
        ));
        assert!(matches!(
            store.create("bad name", &[], false),
            Err(KeyError::Invalid(m)) if m.starts_with("name:")
        ));
        assert!(matches!(
            store.bind(&names(&["b"]), &names(&["a/b"])),
            Err(KeyError::Invalid(m)) if m.starts_with("services:")
        ));
    }

    proptest::proptest! {
        /// Fuzz target over key files and presented keys: a store with any bytes in its
        /// files loads or fails typed, and any presented string is a key or none —
        /// never a panic.
        #[test]
        fn any_store_bytes_or_presented_key_fail_typed(
            records in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            hash_key in "\\PC{0,80}",
            presented in "(xpyd-)?\\PC{0,20}(-\\PC{0,70})?",
        ) {
            let d = tempfile::tempdir().unwrap();
            let store = Store::new(d.path());
            std::fs::write(d.path().join("keys.json"), &records).unwrap();
            std::fs::write(d.path().join("hash.key"), &hash_key).unwrap();
            if let Ok(keys) = store.load() {
                let _ = keys.find(&presented);
            }
            let good = Store::new(d.path().join("good"));
            good.create("k", &[], false).unwrap();
            let keys = good.load().unwrap();
            proptest::prop_assert!(keys.find(&presented).is_none());
        }
    }

    #[test]
    fn the_coordinator_answers_401_and_403_and_sees_new_keys() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        let any = store.create("any", &[], false).unwrap();
        let other = store
            .create("other", &names(&["elsewhere"]), false)
            .unwrap();
        let admin = store.create("admin", &names(&["svc"]), true).unwrap();
        let live = Live::new(store.clone(), "svc", Some("tok".into())).unwrap();
        let bearer = |k: &str| format!("Bearer {k}");
        assert!(live.check(Some(&bearer(&any)), Need::Service).is_ok());
        assert_eq!(live.check(None, Need::Service).unwrap_err().status, 401);
        assert_eq!(
            live.check(Some("Bearer xpyd-1-2"), Need::Service)
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            live.check(Some(&bearer(&other)), Need::Service)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            live.check(Some(&bearer(&any)), Need::Admin)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            live.check(Some(&bearer(&admin)), Need::Admin),
            Ok(Caller::Key("admin".into())),
            "the audit log names the key"
        );
        assert_eq!(
            live.check(Some("Bearer tok"), Need::Admin),
            Ok(Caller::Cluster)
        );
        assert!(live.check(Some("Bearer tok"), Need::Service).is_ok());
        assert_eq!(
            live.check(Some("Bearer tok2"), Need::Admin)
                .unwrap_err()
                .status,
            401,
            "only the token itself"
        );
        // A key made after the coordinator started works within the recheck period.
        let late = store.create("late", &[], false).unwrap();
        assert_eq!(
            live.check(Some(&bearer(&late)), Need::Service)
                .unwrap_err()
                .status,
            401,
            "a check reads no file"
        );
        live.refresh();
        assert!(live.check(Some(&bearer(&late)), Need::Service).is_ok());
        live.flush_used();
        let list = store.list().unwrap();
        let used = |n: &str| list.iter().find(|k| k.name == n).unwrap().last_used_unix;
        assert!(used("any").is_some() && used("late").is_some());
        assert!(used("other").is_none(), "a refused key was not used");
    }
}
