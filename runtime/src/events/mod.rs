//! The cluster's event log: every state change, probe failure, rebuild, scale, upgrade
//! step and rollback, with a severity, a time, a subject and a message. Pure and
//! synchronous ([`EventLog`]): the coordinator holds the cluster's log behind a mutex and
//! serves it over HTTP; the supervisor reports its events there. Events are kept for a
//! configurable time (default 30 days) and bounded in count (oldest dropped first).
//!
//! Times are Unix milliseconds; [`format_rfc3339`] and [`parse_since`] convert to and from
//! what people type (`2024-05-01T12:00:00Z`, `10m`, `2h`, or plain milliseconds).

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

mod time;

pub use time::{format_rfc3339, now_ms, parse_since};

/// How serious an event is. Ordered: `Normal < Warning < Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    /// Expected operations: a worker became ready, a scale step, an upgrade step.
    Normal,
    /// Something degraded that may heal: a failed probe, a rebuild, Alarm/Abnormal.
    Warning,
    /// Something failed: a crash loop, a failed upgrade and its rollback, a Failed state.
    Error,
}

impl Severity {
    /// `Normal`, `Warning` or `Error`.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Normal => "Normal",
            Severity::Warning => "Warning",
            Severity::Error => "Error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Severity {
    type Err = EventError;
    /// Case-insensitive `normal`, `warning` or `error`.
    fn from_str(s: &str) -> Result<Self, EventError> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Ok(Severity::Normal),
            "warning" => Ok(Severity::Warning),
            "error" => Ok(Severity::Error),
            _ => Err(EventError::Invalid {
                field: "severity",
                reason: format!("`{s}` is not one of normal, warning, error"),
            }),
        }
    }
}

/// Why an event or a query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// A field of an event or a query parameter is not allowed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field or parameter, e.g. `since` or `subject`.
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> EventError {
    EventError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Longest subject (a worker id, `coordinator`, the service name).
pub const MAX_SUBJECT: usize = 256;
/// Longest reason (a short CamelCase word such as `StateChanged`).
pub const MAX_REASON: usize = 64;
/// Longest message.
pub const MAX_MESSAGE: usize = 4096;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log (assigned by [`EventLog::push`]; ignored on input).
    #[serde(default)]
    pub seq: u64,
    /// When it happened, Unix milliseconds; 0 on input means "now".
    #[serde(default)]
    pub time_ms: u64,
    /// `time_ms` as RFC 3339 UTC (filled in by the log; ignored on input).
    #[serde(default)]
    pub time: String,
    /// Normal, Warning or Error.
    pub severity: Severity,
    /// What it is about: a worker id (`decode-1`), `coordinator`, or the service name.
    pub subject: String,
    /// A short machine-readable kind: `StateChanged`, `ProbeFailed`, `Rebuild`,
    /// `CrashLoop`, `Scaled`, `UpgradeStep`, `Rollback`, …
    pub reason: String,
    /// What happened, for people (`Ready → NotReady: readiness probe failed 3 times`).
    pub message: String,
}

impl Event {
    /// An event at `time_ms` (0 = when it is pushed).
    pub fn new(
        severity: Severity,
        subject: impl Into<String>,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Event {
            seq: 0,
            time_ms: 0,
            time: String::new(),
            severity,
            subject: subject.into(),
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// Checks the lengths of the text fields (events arrive over HTTP).
    ///
    /// # Errors
    /// [`EventError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), EventError> {
        for (field, v, max) in [
            ("subject", &self.subject, MAX_SUBJECT),
            ("reason", &self.reason, MAX_REASON),
        ] {
            if v.is_empty() || v.len() > max {
                return Err(invalid(field, format!("must be 1..={max} bytes")));
            }
        }
        if self.message.len() > MAX_MESSAGE {
            return Err(invalid(
                "message",
                format!("must be at most {MAX_MESSAGE} bytes"),
            ));
        }
        Ok(())
    }
}

/// How long and how many events are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Events older than this are dropped (default 30 days).
    pub max_age: Duration,
    /// At most this many events are kept, the oldest dropped first (default 10,000).
    pub max_events: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_events: 10_000,
        }
    }
}

/// A query: events at or after `since_ms`, at least as severe as `severity_at_least`,
/// about `subject` (exactly, or a prefix ending at `-`: `decode` matches `decode-0`), the
/// newest `limit` of them in the order they were logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Earliest time, Unix ms.
    pub since_ms: Option<u64>,
    /// Lowest severity.
    pub severity_at_least: Option<Severity>,
    /// Subject or subject prefix.
    pub subject: Option<String>,
    /// Most events returned (0 = [`DEFAULT_LIMIT`]).
    pub limit: usize,
}

/// Events a query returns when it gives no limit.
pub const DEFAULT_LIMIT: usize = 1000;

impl Query {
    fn matches(&self, e: &Event) -> bool {
        self.since_ms.is_none_or(|s| e.time_ms >= s)
            && self.severity_at_least.is_none_or(|s| e.severity >= s)
            && self
                .subject
                .as_deref()
                .is_none_or(|s| subject_matches(s, &e.subject))
    }
}

/// `decode-0` matches `decode-0`; `decode` matches `decode-0` and `decode-12` but not
/// `decoder`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    subject == pattern
        || subject
            .strip_prefix(pattern)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// The log: events in the order they arrived, within [`Retention`].
#[derive(Debug)]
pub struct EventLog {
    retention: Retention,
    events: VecDeque<Event>,
    next_seq: u64,
}

impl EventLog {
    /// An empty log.
    pub fn new(retention: Retention) -> Self {
        EventLog {
            retention,
            events: VecDeque::new(),
            next_seq: 1,
        }
    }

    /// The retention it applies.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Events held.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    fn cutoff(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.retention.max_age.as_millis() as u64)
    }

    /// Appends `e` (time 0 = `now_ms`), assigning its sequence number, and drops what
    /// retention no longer allows. Returns the number, or `None` when the event was
    /// already too old to keep.
    pub fn push(&mut self, mut e: Event, now_ms: u64) -> Option<u64> {
        if e.time_ms == 0 {
            e.time_ms = now_ms;
        }
        self.prune(now_ms);
        if e.time_ms < self.cutoff(now_ms) || self.retention.max_events == 0 {
            return None;
        }
        e.seq = self.next_seq;
        self.next_seq += 1;
        e.time = format_rfc3339(e.time_ms);
        self.events.push_back(e);
        while self.events.len() > self.retention.max_events {
            self.events.pop_front();
        }
        self.next_seq.checked_sub(1)
    }

    /// Drops events older than the retention time (events arrive nearly in time order;
    /// one that arrived late behind a newer one goes when the newer one goes, and queries
    /// never show it past its time).
    pub fn prune(&mut self, now_ms: u64) {
        let cutoff = self.cutoff(now_ms);
        while self.events.front().is_some_and(|e| e.time_ms < cutoff) {
            self.events.pop_front();
        }
    }

    /// The events `q` selects, oldest first.
    pub fn query(&self, q: &Query, now_ms: u64) -> Vec<Event> {
        let cutoff = self.cutoff(now_ms);
        let limit = if q.limit == 0 { DEFAULT_LIMIT } else { q.limit };
        let mut out: Vec<Event> = self
            .events
            .iter()
            .rev()
            .filter(|e| e.time_ms >= cutoff && q.matches(e))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn ev(sev: Severity, subject: &str, time_ms: u64) -> Event {
        let mut e = Event::new(sev, subject, "Test", format!("{subject} at {time_ms}"));
        e.time_ms = time_ms;
        e
    }

    #[test]
    fn push_assigns_sequence_numbers_and_times() {
        let mut log = EventLog::new(Retention::default());
        assert_eq!(
            log.push(Event::new(Severity::Normal, "a", "R", "m"), T0),
            Some(1)
        );
        assert_eq!(log.push(ev(Severity::Error, "b", T0 - 5), T0), Some(2));
        let all = log.query(&Query::default(), T0);
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].seq, all[0].time_ms), (1, T0));
        assert_eq!(all[0].time, "2023-11-14T22:13:20.000Z");
        assert_eq!(all[1].time_ms, T0 - 5);
    }

    #[test]
    fn retention_drops_old_events_and_bounds_the_count() {
        let r = Retention {
            max_age: Duration::from_secs(60),
            max_events: 3,
        };
        let mut log = EventLog::new(r);
        assert_eq!(log.push(ev(Severity::Normal, "old", T0 - 61_000), T0), None);
        for i in 0..5 {
            log.push(ev(Severity::Normal, &format!("w-{i}"), T0 + i), T0 + i);
        }
        let subjects: Vec<_> = log
            .query(&Query::default(), T0 + 5)
            .into_iter()
            .map(|e| e.subject)
            .collect();
        assert_eq!(subjects, ["w-2", "w-3", "w-4"]);
        // A minute later they are gone from queries, and from the log on the next push.
        assert!(log.query(&Query::default(), T0 + 61_000).is_empty());
        log.push(ev(Severity::Normal, "new", T0 + 61_000), T0 + 61_000);
        assert_eq!(log.len(), 1);
    }

    #[test]
    fn queries_filter_by_time_severity_and_subject() {
        let mut log = EventLog::new(Retention::default());
        log.push(ev(Severity::Normal, "decode-0", T0), T0);
        log.push(ev(Severity::Warning, "decode-1", T0 + 10), T0 + 10);
        log.push(ev(Severity::Error, "decode-12", T0 + 20), T0 + 20);
        log.push(ev(Severity::Error, "decoder", T0 + 30), T0 + 30);
        log.push(ev(Severity::Warning, "prefill-0", T0 + 40), T0 + 40);
        let subjects = |q: Query| -> Vec<String> {
            log.query(&q, T0 + 50)
                .into_iter()
                .map(|e| e.subject)
                .collect()
        };
        let q = |since, sev, subject: Option<&str>, limit| Query {
            since_ms: since,
            severity_at_least: sev,
            subject: subject.map(String::from),
            limit,
        };
        assert_eq!(
            subjects(q(Some(T0 + 10), None, None, 0)),
            ["decode-1", "decode-12", "decoder", "prefill-0"]
        );
        assert_eq!(
            subjects(q(None, Some(Severity::Warning), Some("decode"), 0)),
            ["decode-1", "decode-12"]
        );
        assert_eq!(
            subjects(q(None, Some(Severity::Error), None, 0)),
            ["decode-12", "decoder"]
        );
        assert_eq!(subjects(q(None, None, Some("decode-1"), 0)), ["decode-1"]);
        assert_eq!(
            subjects(q(None, None, None, 2)),
            ["decoder", "prefill-0"],
            "the newest `limit`, oldest first"
        );
    }

    #[test]
    fn severities_order_and_parse() {
        assert!(Severity::Normal < Severity::Warning && Severity::Warning < Severity::Error);
        assert_eq!("WARNING".parse::<Severity>().unwrap(), Severity::Warning);
        let e = "fatal".parse::<Severity>().unwrap_err().to_string();
        assert!(e.starts_with("severity: `fatal`"), "{e}");
        let json = serde_json::to_string(&Severity::Error).unwrap();
        assert_eq!(json, "\"Error\"");
    }

    #[test]
    fn events_validate_their_text_fields() {
        assert!(
            Event::new(Severity::Normal, "a", "R", "")
                .validate()
                .is_ok()
        );
        let e = Event::new(Severity::Normal, "", "R", "m")
            .validate()
            .unwrap_err();
        assert!(e.to_string().starts_with("subject:"), "{e}");
        let long = "x".repeat(MAX_REASON + 1);
        let e = Event::new(Severity::Normal, "a", long, "m")
            .validate()
            .unwrap_err();
        assert!(e.to_string().starts_with("reason:"), "{e}");
        let e = Event::new(Severity::Normal, "a", "R", "x".repeat(MAX_MESSAGE + 1));
        assert!(
            e.validate()
                .unwrap_err()
                .to_string()
                .starts_with("message:")
        );
    }

    /// The log agrees with a naive model (a plain list filtered on every query) under
    /// random pushes, times and queries.
    #[test]
    fn matches_a_naive_model() {
        let r = Retention {
            max_age: Duration::from_millis(500),
            max_events: 7,
        };
        let mut log = EventLog::new(r);
        let mut model: Vec<Event> = Vec::new();
        let mut x: u64 = 12345;
        let mut rnd = |n: u64| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (x >> 33) % n
        };
        let mut now = T0;
        let subjects = ["decode-0", "decode-1", "prefill-0", "demo"];
        for _ in 0..3000 {
            now += rnd(50);
            let sev = [Severity::Normal, Severity::Warning, Severity::Error][rnd(3) as usize];
            let e = ev(sev, subjects[rnd(4) as usize], now.saturating_sub(rnd(30)));
            if log.push(e.clone(), now).is_some() {
                model.push(e);
            }
            let cutoff = now - 500;
            // The model keeps the newest 7 pushed; expiry is by time.
            if model.len() > 7 {
                model.remove(0);
            }
            let q = Query {
                since_ms: (rnd(2) == 0).then(|| now - rnd(400)),
                severity_at_least: (rnd(2) == 0).then_some(Severity::Warning),
                subject: (rnd(2) == 0).then(|| ["decode", "demo"][rnd(2) as usize].to_string()),
                limit: rnd(4) as usize,
            };
            let want: Vec<(String, u64)> = {
                let lim = if q.limit == 0 { DEFAULT_LIMIT } else { q.limit };
                let m: Vec<_> = model
                    .iter()
                    .filter(|e| e.time_ms >= cutoff && q.matches(e))
                    .map(|e| (e.subject.clone(), e.time_ms))
                    .collect();
                m[m.len().saturating_sub(lim)..].to_vec()
            };
            let got: Vec<(String, u64)> = log
                .query(&q, now)
                .into_iter()
                .map(|e| (e.subject, e.time_ms))
                .collect();
            assert_eq!(got, want);
            assert!(log.len() <= 7);
        }
    }
}
