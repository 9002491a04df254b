//! The key store in etcd: `<prefix>keys/records` (the records, JSON), `<prefix>keys/hash_key`
//! (the HMAC key, hex) and `<prefix>keys/used` (last uses, JSON). A write reads the
//! documents with their revisions and commits only if neither changed since (a
//! compare-and-swap transaction), trying again otherwise, so concurrent `xpyd keys` runs
//! and coordinators lose no change. The store's API is synchronous: each call runs on a
//! short-lived thread of its own with a single-threaded runtime, so it can be called
//! from the CLI and from the coordinator's blocking threads alike.

use super::{KeyError, Keys, decode_hex, parse_hash_key, parse_records, random_hex};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// How long one call may take (connection included).
const TIMEOUT: Duration = Duration::from_secs(5);
/// Commits a write tries before it gives up on a store others keep changing.
const TRIES: usize = 32;

/// Where the store is.
#[derive(Debug, Clone)]
pub(super) struct Place {
    endpoints: Vec<String>,
    prefix: String,
    roots: Option<xpyd_runtime::tls::Roots>,
}

/// The documents as read, with the revisions a write compares against.
pub(super) struct Loaded {
    pub(super) keys: Keys,
    records_rev: i64,
    hash_rev: i64,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd {} {}", self.endpoints.join(","), self.prefix)
    }
}

impl Place {
    pub(super) fn new(
        endpoints: Vec<String>,
        prefix: &str,
        roots: Option<xpyd_runtime::tls::Roots>,
    ) -> Self {
        Place {
            endpoints,
            prefix: format!("{prefix}keys/"),
            roots,
        }
    }

    fn key(&self, doc: &str) -> String {
        format!("{}{doc}", self.prefix)
    }

    fn err(&self, e: impl std::fmt::Display) -> KeyError {
        KeyError::Io {
            path: PathBuf::from(self.to_string()),
            reason: e.to_string(),
        }
    }

    /// Runs `op` with a client on a thread of its own.
    fn run<T: Send + 'static, F>(
        &self,
        op: impl FnOnce(Client) -> F + Send + 'static,
    ) -> Result<T, KeyError>
    where
        F: Future<Output = Result<T, KeyError>>,
    {
        let me = self.clone();
        let joined = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| me.err(e))?;
            rt.block_on(async {
                let opts = xpyd_runtime::tls::etcd_options(me.roots.as_ref())
                    .with_connect_timeout(TIMEOUT)
                    .with_timeout(TIMEOUT);
                let c = Client::connect(me.endpoints.clone(), Some(opts))
                    .await
                    .map_err(|e| me.err(e))?;
                op(c).await
            })
        })
        .join();
        joined.unwrap_or_else(|_| Err(self.err("the etcd call panicked")))
    }

    /// The records and hash key with their revisions.
    pub(super) fn load(&self) -> Result<Loaded, KeyError> {
        let me = self.clone();
        self.run(move |mut c| async move {
            let (rk, hk) = (me.key("records"), me.key("hash_key"));
            let got = c
                .get(me.prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| me.err(e))?;
            let (mut records, mut hash) = ((None, 0), (None, 0));
            for kv in got.kvs() {
                if kv.key() == rk.as_bytes() {
                    records = (Some(kv.value().to_vec()), kv.mod_revision());
                } else if kv.key() == hk.as_bytes() {
                    hash = (Some(kv.value().to_vec()), kv.mod_revision());
                }
            }
            let at = PathBuf::from(me.to_string());
            let records_parsed = parse_records(records.0.as_deref(), &at)?;
            if hash.0.is_none() && !records_parsed.is_empty() {
                return Err(me.err("hash_key missing, but the store holds keys"));
            }
            Ok(Loaded {
                keys: Keys {
                    hash_key: parse_hash_key(hash.0.as_deref(), &at)?,
                    records: records_parsed,
                },
                records_rev: records.1,
                hash_rev: hash.1,
            })
        })
    }

    /// The records' revision (`None`: none yet, or etcd cannot be reached).
    pub(super) fn stamp(&self) -> Option<u128> {
        let me = self.clone();
        self.run(move |mut c| async move {
            let got = c
                .get(me.key("records"), Some(GetOptions::new().with_keys_only()))
                .await
                .map_err(|e| me.err(e))?;
            Ok(got.kvs().first().map(|kv| kv.mod_revision() as u128))
        })
        .ok()
        .flatten()
    }

    /// Commits `puts` if the documents at `compare` still have those revisions.
    fn commit(
        &self,
        compare: Vec<(String, i64)>,
        puts: Vec<(String, Vec<u8>)>,
    ) -> Result<bool, KeyError> {
        let me = self.clone();
        self.run(move |mut c| async move {
            let when: Vec<Compare> = compare
                .into_iter()
                .map(|(k, rev)| Compare::mod_revision(k, CompareOp::Equal, rev))
                .collect();
            let then: Vec<TxnOp> = puts
                .into_iter()
                .map(|(k, v)| TxnOp::put(k, v, None))
                .collect();
            let r = c
                .txn(Txn::new().when(when).and_then(then))
                .await
                .map_err(|e| me.err(e))?;
            Ok(r.succeeded())
        })
    }

    /// Read-modify-write of the records (making the hash key on first use).
    pub(super) fn update<T>(
        &self,
        f: &mut impl FnMut(&mut Keys) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        for _ in 0..TRIES {
            let mut l = self.load()?;
            let mut puts = Vec::new();
            if l.keys.hash_key.is_empty() {
                let k = random_hex(32)?;
                l.keys.hash_key = decode_hex(&k).expect("hex we made");
                puts.push((self.key("hash_key"), k.into_bytes()));
            }
            let out = f(&mut l.keys)?;
            let json = serde_json::to_vec(&l.keys.records).map_err(|e| self.err(e))?;
            puts.push((self.key("records"), json));
            let compare = vec![
                (self.key("records"), l.records_rev),
                (self.key("hash_key"), l.hash_rev),
            ];
            if self.commit(compare, puts)? {
                return Ok(out);
            }
        }
        Err(self.err(format!(
            "{TRIES} writes in a row met another writer's change"
        )))
    }

    /// The last-uses document.
    pub(super) fn used(&self) -> Result<Option<Vec<u8>>, KeyError> {
        Ok(self.used_rev()?.0)
    }

    fn used_rev(&self) -> Result<(Option<Vec<u8>>, i64), KeyError> {
        let me = self.clone();
        self.run(move |mut c| async move {
            let got = c.get(me.key("used"), None).await.map_err(|e| me.err(e))?;
            Ok(got.kvs().first().map_or((None, 0), |kv| {
                (Some(kv.value().to_vec()), kv.mod_revision())
            }))
        })
    }

    /// Merges last uses in (compare-and-swap, as [`Place::update`]).
    pub(super) fn record_used(
        &self,
        merge: impl Fn(&mut BTreeMap<String, u64>),
    ) -> Result<(), KeyError> {
        for _ in 0..TRIES {
            let (bytes, rev) = self.used_rev()?;
            let mut used: BTreeMap<String, u64> = bytes
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            merge(&mut used);
            let json = serde_json::to_vec(&used).map_err(|e| self.err(e))?;
            if self.commit(
                vec![(self.key("used"), rev)],
                vec![(self.key("used"), json)],
            )? {
                return Ok(());
            }
        }
        Err(self.err(format!(
            "{TRIES} writes in a row met another writer's change"
        )))
    }
}
