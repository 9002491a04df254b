//! What the supervisor tells the coordinator, and what it reads back (I/O): a reporter
//! task that posts events to `POST /v1/events`, the control endpoint's answered
//! changes to `POST /v1/audit`, and each worker's routing switch to
//! `POST /v1/workers/{id}/routing`, retrying while the coordinator is down or
//! restarting (events are kept up to [`MAX_PENDING`], the routing switches as the
//! latest value per worker, all re-sent after a coordinator restart); and a poller of
//! `/v1/cluster` that keeps the ids of the workers the coordinator routes to.

use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use xpyd_runtime::events::{Event, Severity};

/// Events kept while the coordinator cannot take them (oldest dropped first).
pub const MAX_PENDING: usize = 10_000;
/// Bound of one call to the coordinator.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Wait before retrying after a failed call.
const RETRY: Duration = Duration::from_millis(500);
/// How often `/v1/cluster` is read.
const POLL: Duration = Duration::from_millis(300);

enum Report {
    Event(Event),
    Audit(Value),
    Routing { id: String, enabled: bool },
    Reassert,
}

/// Handle of the reporter task (cheap to clone; never blocks the caller).
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::Sender<Report>,
}

impl Reporter {
    /// Sends `e` to the coordinator's log (and prints Warning/Error ones on stderr).
    pub fn event(&self, e: Event) {
        if e.severity >= Severity::Warning {
            let level = if e.severity >= Severity::Error {
                xpyd_runtime::logging::Level::ERROR
            } else {
                xpyd_runtime::logging::Level::WARN
            };
            xpyd_runtime::logging::say(
                level,
                &format!(
                    "xpyd up: [{}] {} {}: {}",
                    e.severity, e.subject, e.reason, e.message
                ),
            );
        }
        if self.tx.try_send(Report::Event(e)).is_err() {
            xpyd_runtime::logging::say(
                xpyd_runtime::logging::Level::WARN,
                "xpyd up: event queue full; an event was dropped",
            );
        }
    }

    /// Sends an audit record (`{who, peer, action, request, status, outcome}`) to the
    /// coordinator's log.
    pub fn audit(&self, record: Value) {
        if self.tx.try_send(Report::Audit(record)).is_err() {
            xpyd_runtime::logging::say(
                xpyd_runtime::logging::Level::WARN,
                "xpyd up: report queue full; an audit record was dropped",
            );
        }
    }

    /// Puts worker `id` in or out of the coordinator's routing.
    pub fn routing(&self, id: &str, enabled: bool) {
        let r = Report::Routing {
            id: id.to_string(),
            enabled,
        };
        if self.tx.try_send(r).is_err() {
            xpyd_runtime::logging::say(
                xpyd_runtime::logging::Level::WARN,
                "xpyd up: report queue full; a routing change was dropped",
            );
        }
    }

    /// Sends every routing switch again (the coordinator restarted and forgot them).
    pub fn reassert(&self) {
        let _ = self.tx.try_send(Report::Reassert);
    }
}

/// Starts the reporter for the coordinator at `http`; its audit records carry the
/// cluster's credential `badge` (`x-xpyd-cluster`), which vouches for their `who`.
pub fn spawn(http: String, badge: Option<String>, stop: CancellationToken) -> Reporter {
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(run(http, badge, rx, stop));
    Reporter { tx }
}

#[derive(Default)]
struct Pending {
    events: VecDeque<Event>,
    audit: VecDeque<Value>,
    routing: BTreeMap<String, bool>,
    dirty: BTreeSet<String>,
}

impl Pending {
    fn take(&mut self, r: Report) {
        match r {
            Report::Event(e) => {
                if self.events.len() >= MAX_PENDING {
                    self.events.pop_front();
                }
                self.events.push_back(e);
            }
            Report::Audit(r) => {
                if self.audit.len() >= MAX_PENDING {
                    self.audit.pop_front();
                }
                self.audit.push_back(r);
            }
            Report::Routing { id, enabled } => {
                self.routing.insert(id.clone(), enabled);
                self.dirty.insert(id);
            }
            Report::Reassert => self.dirty.extend(self.routing.keys().cloned()),
        }
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.audit.is_empty() && self.dirty.is_empty()
    }
}

async fn run(
    http: String,
    badge: Option<String>,
    mut rx: mpsc::Receiver<Report>,
    stop: CancellationToken,
) {
    let mut p = Pending::default();
    loop {
        if p.is_empty() {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => p.take(r),
                    None => return,
                },
                _ = stop.cancelled() => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            p.take(r);
        }
        if !flush(&http, badge.as_deref(), &mut p).await {
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Sends what is pending; false when a call failed (the rest stays pending).
async fn flush(http: &str, badge: Option<&str>, p: &mut Pending) -> bool {
    while let Some(id) = p.dirty.first().cloned() {
        let enabled = p.routing.get(&id).copied().unwrap_or(true);
        let url = format!("{http}/v1/workers/{id}/routing");
        if post(url, json!({ "enabled": enabled }), None)
            .await
            .is_err()
        {
            return false;
        }
        p.dirty.remove(&id);
    }
    while let Some(r) = p.audit.front() {
        let badge = badge.map(str::to_string);
        if post(format!("{http}/v1/audit"), r.clone(), badge)
            .await
            .is_err()
        {
            return false;
        }
        p.audit.pop_front();
    }
    if p.events.is_empty() {
        return true;
    }
    let n = p.events.len().min(500);
    let batch: Vec<&Event> = p.events.iter().take(n).collect();
    let body = serde_json::to_value(batch).unwrap_or(Value::Null);
    if post(format!("{http}/v1/events"), body, None).await.is_err() {
        return false;
    }
    p.events.drain(..n);
    true
}

async fn post(url: String, body: Value, badge: Option<String>) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        let mut req = xpyd_bench::http::with_auth(xpyd_bench::http::agent().post(&url));
        if let Some(b) = &badge {
            req = req.header(xpyd_runtime::plane::METADATA, b);
        }
        let resp = req
            .header("content-type", "application/json")
            .config()
            .timeout_global(Some(CALL_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .send(body.to_string())
            .map_err(|e| format!("POST {url}: {e}"))?;
        let code = resp.status().as_u16();
        match code {
            200..=299 => Ok(()),
            // The coordinator refused it as invalid: retrying will not help.
            400..=499 => {
                xpyd_runtime::logging::say(
                    xpyd_runtime::logging::Level::WARN,
                    &format!("xpyd up: POST {url}: HTTP {code}"),
                );
                Ok(())
            }
            _ => Err(format!("POST {url}: HTTP {code}")),
        }
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// Polls the coordinator's `/v1/cluster`: the ids of the workers it routes to (state
/// `ready`). Ends with `stop`.
pub fn poll_cluster(http: String, stop: CancellationToken) -> watch::Receiver<HashSet<String>> {
    let (tx, rx) = watch::channel(HashSet::new());
    tokio::spawn(async move {
        let url = format!("{http}/v1/cluster");
        loop {
            let u = url.clone();
            let got = tokio::task::spawn_blocking(move || {
                xpyd_bench::http::get_json(&u, CALL_TIMEOUT).ok()
            })
            .await
            .ok()
            .flatten();
            if let Some(v) = got {
                let ready = v["workers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|w| w["state"] == "ready")
                    .filter_map(|w| w["worker_id"].as_str().map(String::from))
                    .collect();
                let _ = tx.send(ready);
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_keeps_the_latest_switch_and_bounds_events() {
        let mut p = Pending::default();
        for enabled in [false, true, false] {
            p.take(Report::Routing {
                id: "decode-0".into(),
                enabled,
            });
        }
        assert!(!p.routing["decode-0"]);
        assert_eq!(p.dirty.len(), 1);
        p.dirty.clear();
        p.take(Report::Reassert);
        assert!(p.dirty.contains("decode-0"));
        for i in 0..MAX_PENDING + 5 {
            p.take(Report::Event(Event::new(
                Severity::Normal,
                "s",
                "R",
                i.to_string(),
            )));
        }
        assert_eq!(p.events.len(), MAX_PENDING);
        assert_eq!(p.events[0].message, "5");
    }
}
