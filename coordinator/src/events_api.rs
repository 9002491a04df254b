//! The cluster's event log as the coordinator holds it: [`EventStore`] (an
//! [`EventLog`] behind a mutex; every operation is short and synchronous) and its HTTP
//! side, `GET /v1/events?since=&severity=&subject=&limit=` (`{"events": [...]}`, oldest
//! first) and `POST /v1/events` (one event or a JSON array of them; the supervisor
//! reports its events here). Code in the coordinator records its own with
//! [`EventStore::record`].

use crate::App;
use crate::error::ApiError;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use xpyd_runtime::events::{self, Event, EventLog, Query, Retention, Severity};

/// Most events one query returns.
pub const MAX_LIMIT: usize = 10_000;
/// Most events one `POST /v1/events` may carry.
pub const MAX_BATCH: usize = 1_000;

/// How long requests re-sent off one worker are gathered into one event.
pub const RESEND_WINDOW: Duration = Duration::from_secs(2);

/// The coordinator's copy of the cluster's events (cheap to clone: a shared handle).
#[derive(Debug, Clone)]
pub struct EventStore {
    log: Arc<Mutex<EventLog>>,
    /// Requests re-sent off each worker in its current window (one entry per worker
    /// that failed requests in the last [`RESEND_WINDOW`]).
    bursts: Arc<Mutex<HashMap<String, Burst>>>,
}

/// Requests re-sent off one worker within a window.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Burst {
    /// Re-sent before any token reached the client (a retry).
    pub retried: u32,
    /// Re-sent after tokens were sent (a migration: the stream went on elsewhere).
    pub migrated: u32,
    /// How many for each failure reason.
    pub reasons: BTreeMap<&'static str, u32>,
}

impl Burst {
    /// Counts one request re-sent for `reason`.
    pub fn add(&mut self, reason: &'static str, migrated: bool) {
        if migrated {
            self.migrated += 1;
        } else {
            self.retried += 1;
        }
        *self.reasons.entry(reason).or_default() += 1;
    }

    /// The event's message.
    pub fn message(&self, worker: &str) -> String {
        let n = self.retried + self.migrated;
        let reasons: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, k)| format!("{r} ×{k}"))
            .collect();
        format!(
            "{n} request{} moved off {worker} to other workers ({} migrated mid-stream, {} retried before their first token; {})",
            if n == 1 { "" } else { "s" },
            self.migrated,
            self.retried,
            reasons.join(", ")
        )
    }
}

impl Default for EventStore {
    fn default() -> Self {
        EventStore::new(Retention::default())
    }
}

impl EventStore {
    /// An empty store keeping events as `retention` says.
    pub fn new(retention: Retention) -> Self {
        EventStore {
            log: Arc::new(Mutex::new(EventLog::new(retention))),
            bursts: Arc::default(),
        }
    }

    /// Notes a request re-sent off `worker` for `reason` (`migrated`: after tokens were
    /// sent). The first one of a window schedules one Warning event, `RequestsMoved`, for
    /// everything re-sent off that worker within [`RESEND_WINDOW`]: a dead worker with
    /// many streams makes one event, not one per stream. Needs a tokio runtime.
    pub fn resent(&self, worker: &str, reason: &'static str, migrated: bool) {
        let first = {
            let mut b = self.bursts.lock().unwrap_or_else(|e| e.into_inner());
            let burst = b.entry(worker.to_string()).or_default();
            burst.add(reason, migrated);
            burst.retried + burst.migrated == 1
        };
        if first {
            let (store, worker) = (self.clone(), worker.to_string());
            tokio::spawn(async move {
                tokio::time::sleep(RESEND_WINDOW).await;
                store.flush_burst(&worker);
            });
        }
    }

    /// Records the event of `worker`'s window and starts a new one.
    fn flush_burst(&self, worker: &str) {
        let burst = self
            .bursts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(worker);
        if let Some(b) = burst {
            let msg = b.message(worker);
            self.record(Event::new(Severity::Warning, worker, "RequestsMoved", msg));
        }
    }

    fn lock(&self) -> MutexGuard<'_, EventLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `e` (time 0 = now) and logs it at info level; returns its sequence number, or `None`
    /// when it was already older than the retention.
    pub fn record(&self, e: Event) -> Option<u64> {
        // The supervisor prints its own Warning/Error events; here they are info.
        tracing::info!(subject = %e.subject, reason = %e.reason, severity = %e.severity, "{}", e.message);
        self.lock().push(e, events::now_ms())
    }

    /// The events `q` selects, oldest first.
    pub fn query(&self, q: &Query) -> Vec<Event> {
        self.lock().query(q, events::now_ms())
    }
}

/// The routes, merged into the coordinator's HTTP router.
pub(crate) fn routes() -> Router<Arc<App>> {
    Router::new().route("/v1/events", get(list).post(report))
}

/// Parses `since`, `severity`, `subject` and `limit`; anything else is refused by name.
pub fn parse_query(raw: Option<&str>, now_ms: u64) -> Result<Query, ApiError> {
    let mut q = Query::default();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        let bad = |e: events::EventError| ApiError::invalid(k, strip_field(&e.to_string()));
        match k {
            "since" => q.since_ms = Some(events::parse_since(&v, now_ms).map_err(bad)?),
            "severity" => q.severity_at_least = Some(v.parse().map_err(bad)?),
            "subject" if !v.is_empty() => q.subject = Some(v),
            "subject" => {}
            "limit" => q.limit = ApiError::count("limit", &v, MAX_LIMIT)?,
            other => {
                return Err(ApiError::invalid(
                    other,
                    "unknown parameter (since, severity, subject, limit)",
                ));
            }
        }
    }
    Ok(q)
}

/// `since: reason` → `reason` (the parameter name is put back by `ApiError::invalid`).
fn strip_field(msg: &str) -> String {
    msg.split_once(": ")
        .map(|(_, r)| r.to_string())
        .unwrap_or_else(|| msg.to_string())
}

/// `%XX` and `+` decoding of a query value (invalid escapes are kept as they are).
fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%' && i + 2 < b.len())
            .then(|| Some(hex(b[i + 1])? * 16 + hex(b[i + 2])?))
            .flatten();
        match (b[i], escaped) {
            (_, Some(v)) => {
                out.push(v);
                i += 2;
            }
            (b'+', None) => out.push(b' '),
            (c, None) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn list(State(app): State<Arc<App>>, RawQuery(raw): RawQuery) -> Response {
    match parse_query(raw.as_deref(), events::now_ms()) {
        Ok(q) => axum::Json(json!({"events": app.events.query(&q)})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// One event or an array of them.
fn parse_events(body: &[u8]) -> Result<Vec<Event>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_body(format!("invalid JSON body: {e}")))?;
    let items = match v {
        Value::Array(a) => a,
        one => vec![one],
    };
    if items.len() > MAX_BATCH {
        return Err(ApiError::bad_body(format!(
            "at most {MAX_BATCH} events per request"
        )));
    }
    items
        .into_iter()
        .map(|item| {
            let e: Event = serde_json::from_value(item)
                .map_err(|e| ApiError::bad_body(format!("not an event: {e}")))?;
            e.validate().map_err(|err| match err {
                events::EventError::Invalid { field, reason } => ApiError::invalid(field, reason),
            })?;
            Ok(e)
        })
        .collect()
}

async fn report(State(app): State<Arc<App>>, body: Bytes) -> Response {
    match parse_events(&body) {
        Ok(list) => {
            let n = list.len();
            for e in list {
                app.events.record(e);
            }
            axum::Json(json!({"accepted": n})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xpyd_runtime::events::Severity;

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn queries_parse_and_bad_parameters_are_named() {
        let q = parse_query(
            Some("since=10m&severity=Warning&subject=decode-0&limit=5"),
            NOW,
        )
        .unwrap();
        assert_eq!(q.since_ms, Some(NOW - 600_000));
        assert_eq!(q.severity_at_least, Some(Severity::Warning));
        assert_eq!(q.subject.as_deref(), Some("decode-0"));
        assert_eq!(q.limit, 5);
        let q = parse_query(Some("since=2023-11-14T22%3A13%3A20Z"), 0).unwrap();
        assert_eq!(q.since_ms, Some(NOW));
        assert_eq!(parse_query(None, NOW).unwrap(), Query::default());
        for (raw, param) in [
            ("severity=fatal", "severity"),
            ("since=yesterday", "since"),
            ("limit=0", "limit"),
            ("limit=x", "limit"),
            ("colour=red", "colour"),
        ] {
            let e = parse_query(Some(raw), NOW).unwrap_err();
            assert_eq!(
                (e.status, e.param.as_deref()),
                (400, Some(param)),
                "{raw}: {e:?}"
            );
            assert!(
                e.message.starts_with(&format!("{param}: ")),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn posted_events_are_one_or_many_and_validated() {
        let one =
            br#"{"severity":"Warning","subject":"decode-1","reason":"ProbeFailed","message":"m"}"#;
        assert_eq!(parse_events(one).unwrap().len(), 1);
        let many = format!(
            "[{}, {}]",
            std::str::from_utf8(one).unwrap(),
            std::str::from_utf8(one).unwrap()
        );
        assert_eq!(parse_events(many.as_bytes()).unwrap().len(), 2);
        let e = parse_events(br#"{"severity":"Loud","subject":"a","reason":"R","message":""}"#)
            .unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse_events(br#"{"severity":"Normal","subject":"","reason":"R","message":""}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("subject"));
        assert!(parse_events(b"not json").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_moved_off_a_worker_make_one_event_per_window() {
        let s = EventStore::default();
        let moved = |s: &EventStore| {
            s.query(&Query {
                subject: Some("decode-1".into()),
                ..Default::default()
            })
        };
        s.resent("decode-1", "transport", true);
        s.resent("decode-1", "transport", true);
        s.resent("decode-1", "worker_left", false);
        s.resent("prefill-0", "draining", false);
        assert!(moved(&s).is_empty(), "recorded before the window closed");
        tokio::time::sleep(RESEND_WINDOW + Duration::from_millis(10)).await;
        let ev = moved(&s);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].severity, ev[0].reason.as_str()),
            (Severity::Warning, "RequestsMoved")
        );
        assert_eq!(
            ev[0].message,
            "3 requests moved off decode-1 to other workers (2 migrated mid-stream, 1 retried before their first token; transport ×2, worker_left ×1)"
        );
        // A later failure opens a new window and a new event.
        s.resent("decode-1", "engine", true);
        tokio::time::sleep(RESEND_WINDOW + Duration::from_millis(10)).await;
        let ev = moved(&s);
        assert_eq!(ev.len(), 2);
        assert!(
            ev[1].message.starts_with("1 request moved off decode-1"),
            "{}",
            ev[1].message
        );
        assert_eq!(s.query(&Query::default()).len(), 3);
    }

    #[test]
    fn the_store_records_and_queries() {
        let s = EventStore::default();
        s.record(Event::new(
            Severity::Normal,
            "demo",
            "StateChanged",
            "Deploying → Running",
        ));
        s.record(Event::new(
            Severity::Error,
            "decode-0",
            "CrashLoop",
            "again",
        ));
        let errors = s.query(&Query {
            severity_at_least: Some(Severity::Error),
            ..Default::default()
        });
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].subject, "decode-0");
        assert_eq!(percent_decode("a%20b+c%zz%"), "a b c%zz%");
    }
}
