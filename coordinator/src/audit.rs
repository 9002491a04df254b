//! The audit log: one JSON line per admin operation — who (the API key's name, the
//! cluster token, or anyone when the service takes no keys), from where, what (method,
//! path, the request's body), when, and the outcome (status and the answer or the
//! error) — appended to a file (mode 0600) that survives a coordinator restart, and
//! served newest last by `GET /v1/audit?since=&limit=`. The supervisor reports the
//! changes made on its own control endpoint (`xpyd scale/upgrade/down`) with
//! `POST /v1/audit`.
//!
//! The store is synchronous ([`Audit::append`] writes one line); the HTTP side calls it
//! on a blocking thread. The file is only ever appended to; a line torn by a crash is
//! skipped (with a warning) when the file is read back.

use crate::App;
use crate::error::ApiError;
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Header the coordinator sets on a control call it makes to the supervisor on an
/// operator's behalf and audits itself: the supervisor does not report that call again.
pub const AUDITED: &str = "x-xpyd-audited";

/// Entries kept in memory (and served); the file keeps every one.
pub const KEPT: usize = 10_000;
/// Most entries one query returns.
pub const MAX_LIMIT: usize = 1_000;
/// Longest request or answer text an entry keeps (longer ones are cut, marked `…`).
pub const MAX_TEXT: usize = 2_048;

/// One admin operation, as the log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// 1, 2, … in the order written, across restarts.
    pub seq: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The rest, as recorded.
    #[serde(flatten)]
    pub record: Record,
}

/// What [`Audit::append`] is given: who did what, and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `key:<name>`, `cluster token`, `anyone (no API keys)`, or `advisor (auto)`.
    pub who: String,
    /// The caller's address (empty for the coordinator's own actions).
    pub peer: String,
    /// `POST /v1/advisor/apply`, …
    pub action: String,
    /// The request's body (JSON when it parses, else text).
    pub request: Value,
    /// HTTP status of the answer.
    pub status: u16,
    /// The answer's body (JSON when it parses), or its error.
    pub outcome: Value,
}

/// Why the log could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {reason}")]
pub struct AuditError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    pub reason: String,
}

#[derive(Debug)]
struct Inner {
    tail: VecDeque<Entry>,
    next: u64,
}

/// The audit log (cheap to clone: a shared handle).
#[derive(Debug, Clone)]
pub struct Audit {
    path: Option<PathBuf>,
    inner: Arc<Mutex<Inner>>,
}

impl Audit {
    /// A log kept only in memory (tests, or a coordinator without a state directory).
    pub fn in_memory() -> Self {
        Audit {
            path: None,
            inner: Arc::new(Mutex::new(Inner {
                tail: VecDeque::new(),
                next: 1,
            })),
        }
    }

    /// Opens (or creates, mode 0600) the log at `path` and reads back its last
    /// [`KEPT`] entries.
    ///
    /// # Errors
    /// The file cannot be created or read.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, AuditError> {
        let path = path.into();
        let err = |e: &dyn std::fmt::Display| AuditError {
            path: path.clone(),
            reason: e.to_string(),
        };
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|e| err(&e))?;
        }
        let file = open_append(&path).map_err(|e| err(&e))?;
        drop(file);
        let reader = std::io::BufReader::new(std::fs::File::open(&path).map_err(|e| err(&e))?);
        let mut tail = VecDeque::new();
        let mut next = 1;
        for (n, line) in reader.lines().enumerate() {
            let line = line.map_err(|e| err(&e))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Entry>(&line) {
                Ok(e) => {
                    next = next.max(e.seq + 1);
                    if tail.len() == KEPT {
                        tail.pop_front();
                    }
                    tail.push_back(e);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), line = n + 1, error = %e, "audit log line skipped")
                }
            }
        }
        Ok(Audit {
            path: Some(path),
            inner: Arc::new(Mutex::new(Inner { tail, next })),
        })
    }

    /// The file, if the log has one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Writes `r` as the next entry (file I/O: call it off the async threads).
    ///
    /// # Errors
    /// The line could not be written; the entry is still kept in memory.
    pub fn append(&self, r: Record) -> Result<Entry, AuditError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let e = Entry {
            seq: g.next,
            at_ms: xpyd_runtime::events::now_ms(),
            record: r,
        };
        g.next += 1;
        if g.tail.len() == KEPT {
            g.tail.pop_front();
        }
        g.tail.push_back(e.clone());
        // Under the lock: lines reach the file in `seq` order.
        if let Some(p) = &self.path {
            let mut line = serde_json::to_vec(&e).unwrap_or_default();
            line.push(b'\n');
            open_append(p)
                .and_then(|mut f| f.write_all(&line))
                .map_err(|err| AuditError {
                    path: p.clone(),
                    reason: err.to_string(),
                })?;
        }
        Ok(e)
    }

    /// Entries after `since` (a `seq`), oldest first, at most `limit` (the newest ones).
    pub fn query(&self, since: u64, limit: usize) -> Vec<Entry> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let after: Vec<&Entry> = g.tail.iter().filter(|e| e.seq > since).collect();
        let skip = after.len().saturating_sub(limit);
        after.into_iter().skip(skip).cloned().collect()
    }
}

fn open_append(p: &Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(p)
}

/// `text` as JSON when it parses, else as a string; cut at [`MAX_TEXT`] bytes.
pub fn body_value(text: &[u8]) -> Value {
    if text.is_empty() {
        return Value::Null;
    }
    if text.len() <= MAX_TEXT
        && let Ok(v) = serde_json::from_slice::<Value>(text)
    {
        return v;
    }
    let s = String::from_utf8_lossy(text);
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let cut = if end < s.len() { "…" } else { "" };
    Value::String(format!("{}{cut}", &s[..end]))
}

/// Records `r` on a blocking thread; a write that fails is logged (the operation
/// itself has already happened).
pub fn record(audit: &Audit, r: Record) {
    let audit = audit.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = audit.append(r) {
            tracing::error!(error = %e, "audit entry not written");
        }
    });
}

/// The routes, merged into the coordinator's HTTP router (an admin route).
pub(crate) fn routes() -> Router<Arc<App>> {
    Router::new().route("/v1/audit", get(list).post(report))
}

/// What the supervisor reports of a change made on its control endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reported {
    who: String,
    peer: String,
    action: String,
    request: Value,
    status: u16,
    outcome: Value,
}

/// Longest `who`, `peer` or `action` a report may carry.
const MAX_LABEL: usize = 256;

/// `POST /v1/audit`: an operation made elsewhere (the supervisor's control endpoint),
/// appended as reported. The reported `who` stands alone only when the call carries the
/// cluster's credential (`x-xpyd-cluster`: the supervisor's); otherwise the caller's
/// own identity is kept beside it.
async fn report(
    State(app): State<Arc<App>>,
    caller: Option<axum::Extension<crate::keys::Caller>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let r: Reported = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return ApiError::bad_body(format!("invalid audit record: {e}")).into_response(),
    };
    for (field, v) in [("who", &r.who), ("peer", &r.peer), ("action", &r.action)] {
        if v.is_empty() || v.len() > MAX_LABEL {
            return ApiError::invalid(field, format!("must be 1..={MAX_LABEL} bytes"))
                .into_response();
        }
    }
    let member = app.cluster_key.as_ref().is_some_and(|k| {
        k.admits(
            headers
                .get(xpyd_runtime::plane::METADATA)
                .and_then(|v| v.to_str().ok()),
        )
    });
    let who = match caller.map(|c| c.0) {
        _ if member => r.who,
        Some(c) => format!("{} (reported by {c})", r.who),
        None => format!("{} (reported)", r.who),
    };
    let record = Record {
        who,
        peer: r.peer,
        action: r.action,
        request: body_value(r.request.to_string().as_bytes()),
        status: r.status,
        outcome: body_value(r.outcome.to_string().as_bytes()),
    };
    let audit = app.audit.clone();
    match tokio::task::spawn_blocking(move || audit.append(record)).await {
        Ok(Ok(e)) => axum::Json(json!({"seq": e.seq})).into_response(),
        Ok(Err(e)) => ApiError::upstream(500, e.to_string()).into_response(),
        Err(e) => ApiError::upstream(500, format!("audit task: {e}")).into_response(),
    }
}

async fn list(State(app): State<Arc<App>>, RawQuery(q): RawQuery) -> Response {
    match parse_query(q.as_deref()) {
        Ok((since, limit)) => {
            axum::Json(json!({"entries": app.audit.query(since, limit)})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `since=<seq>&limit=<n>` (defaults 0 and 100).
fn parse_query(raw: Option<&str>) -> Result<(u64, usize), ApiError> {
    let (mut since, mut limit) = (0u64, 100usize);
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "since" => {
                since = v.parse().map_err(|_| {
                    ApiError::invalid("since", format!("`{v}` is not a sequence number"))
                })?;
            }
            "limit" => limit = ApiError::count("limit", v, MAX_LIMIT)?,
            other => {
                return Err(ApiError::invalid(other, "unknown parameter (since, limit)"));
            }
        }
    }
    Ok((since, limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(action: &str, status: u16) -> Record {
        Record {
            who: "key:ops".into(),
            peer: "127.0.0.1:5000".into(),
            action: action.into(),
            request: json!({"prefill": 1, "decode": 3}),
            status,
            outcome: json!({"generation": 1}),
        }
    }

    #[test]
    fn entries_survive_a_reopen_and_keep_counting() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/audit.jsonl");
        let a = Audit::open(&p).unwrap();
        a.append(rec("POST /v1/advisor/apply", 200)).unwrap();
        a.append(rec("PUT /v1/advisor/config", 400)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // A crash tore the last line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"seq\": 3, \"at")
            .unwrap();
        let b = Audit::open(&p).unwrap();
        let got = b.query(0, 10);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].record.action, "POST /v1/advisor/apply");
        assert_eq!((got[1].seq, got[1].record.status), (2, 400));
        let e = b.append(rec("POST /v1/scale", 200)).unwrap();
        assert_eq!(e.seq, 3);
        assert_eq!(b.query(1, 10).len(), 2);
        assert_eq!(b.query(0, 1)[0].seq, 3, "a limit keeps the newest");
    }

    #[test]
    fn long_or_binary_bodies_are_cut_not_dropped() {
        assert_eq!(body_value(b"{\"a\":1}"), json!({"a": 1}));
        assert_eq!(body_value(b""), Value::Null);
        let long = "é".repeat(MAX_TEXT);
        let v = body_value(long.as_bytes());
        let s = v.as_str().unwrap();
        assert!(s.ends_with('…') && s.len() <= MAX_TEXT + '…'.len_utf8());
        assert_eq!(body_value(&[0xff, b'x']), json!("\u{fffd}x"));
    }

    #[test]
    fn queries_name_the_bad_parameter() {
        assert_eq!(parse_query(Some("since=4&limit=7")).unwrap(), (4, 7));
        assert_eq!(parse_query(None).unwrap(), (0, 100));
        for (q, field) in [
            ("limit=0", "limit"),
            ("since=x", "since"),
            ("who=me", "who"),
        ] {
            let e = parse_query(Some(q)).unwrap_err();
            assert_eq!(
                (e.status, e.body()["error"]["param"].as_str()),
                (400, Some(field))
            );
        }
    }
}
