//! The supervisor's control endpoint (I/O), bound on 127.0.0.1 at an ephemeral port that
//! the cluster's state file records. The CLI (`xpyd scale/upgrade/down`), and later the
//! ratio advisor and the dashboard, call it:
//!
//! | call | answer |
//! |---|---|
//! | `GET /v1/supervisor` | service state, version, coordinator, every worker (state, pid, restarts), the upgrade in progress and the last one |
//! | `POST /v1/scale {"role": R, "replicas": N}` | 200 `{role, from, to}`; 400 naming `role` or `replicas`; 409 during an upgrade or a stop |
//! | `POST /v1/flip {"from": R, "to": R, "count": N}` | 200 `{flipped: [{id, ok, worker_id, report} …]}` once every flip ended (N ready workers of `from` serve `to` in place, no reload); 400 naming the field; 409 when busy or too few are ready |
//! | `POST /v1/upgrade {"manifest": YAML, "dir": D}` | 202 `{from, to, roll}`; 400 naming the manifest field; 409 when busy |
//! | `POST /v1/down` | 202; the cluster stops gracefully |
//!
//! The `POST` calls need the cluster's credential in `x-xpyd-cluster` (401 without).
//! Each one answered goes to the coordinator's audit log (through the reporter) unless
//! the coordinator made it on an operator's behalf and audited it itself
//! (`xpyd_coordinator::audit::AUDITED`).
//!
//! Each call becomes a [`Command`] to the supervisor's actor over a bounded channel and
//! waits for its reply. Errors are `{"error": {"message", "field", "param"}}` (`param`: the same field, in the
//! coordinator's admin API's name).

use super::report::Reporter;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// A refused control call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlError {
    /// HTTP status (400 bad input, 409 busy, 503 the supervisor is gone).
    pub status: u16,
    /// The field at fault, if any.
    pub field: Option<String>,
    /// What is wrong; starts with `field: ` when there is a field.
    pub message: String,
}

impl CtlError {
    /// 400 naming `field`.
    pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Self {
        CtlError {
            status: 400,
            field: Some(field.into()),
            message: format!("{field}: {reason}"),
        }
    }

    /// 409: not now.
    pub fn busy(reason: impl Into<String>) -> Self {
        CtlError {
            status: 409,
            field: None,
            message: reason.into(),
        }
    }
}

impl IntoResponse for CtlError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let body =
            json!({"error": {"message": self.message, "field": self.field, "param": self.field}});
        (status, axum::Json(body)).into_response()
    }
}

/// A reply to a control call.
pub type Reply = oneshot::Sender<Result<Value, CtlError>>;

/// What the endpoint asks the actor.
pub enum Command {
    /// `GET /v1/supervisor`.
    Status(oneshot::Sender<Value>),
    /// `POST /v1/scale`.
    Scale {
        /// Role name as given.
        role: String,
        /// Wanted replicas, `1..=64`.
        replicas: u32,
        /// The answer.
        reply: Reply,
    },
    /// `POST /v1/upgrade`.
    Upgrade {
        /// The new manifest's YAML.
        manifest: String,
        /// Directory relative paths in it are relative to (where it was read).
        dir: Option<PathBuf>,
        /// The answer.
        reply: Reply,
    },
    /// Flip `count` ready workers of role `from` to role `to` (the ratio follower, when
    /// a split keeps the number of processes).
    Flip {
        /// Role they serve now.
        from: String,
        /// Role they are to serve.
        to: String,
        /// How many.
        count: u32,
        /// The answer, once every flip has ended: `{"flipped": [{id, ok, …}]}`.
        reply: Reply,
    },
    /// `POST /v1/down`.
    Down(oneshot::Sender<()>),
}

/// Largest request body the audit middleware reads (an upgrade carries a manifest).
const MAX_AUDITED_BODY: usize = 1 << 20;

/// Reports an answered change call to the coordinator's audit log: who (the cluster's
/// credential, the only one the endpoint takes), from where, the call and its body,
/// the status and the answer.
async fn audit(
    State(reporter): State<Reporter>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.headers().contains_key(xpyd_coordinator::audit::AUDITED) {
        return next.run(req).await;
    }
    let action = format!("{} {} (supervisor)", req.method(), req.uri().path());
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_AUDITED_BODY).await else {
        return CtlError {
            status: 413,
            field: None,
            message: format!("the body is over {MAX_AUDITED_BODY} bytes"),
        }
        .into_response();
    };
    let request = body_json(&body);
    let resp = next
        .run(axum::extract::Request::from_parts(
            parts,
            axum::body::Body::from(body),
        ))
        .await;
    let (parts, body) = resp.into_parts();
    let answer = axum::body::to_bytes(body, MAX_AUDITED_BODY)
        .await
        .unwrap_or_default();
    reporter.audit(json!({
        "who": "cluster token (supervisor control endpoint)",
        "peer": peer.to_string(),
        "action": action,
        "request": request,
        "status": parts.status.as_u16(),
        "outcome": body_json(&answer),
    }));
    Response::from_parts(parts, axum::body::Body::from(answer))
}

/// A body as JSON when it parses, else as text.
fn body_json(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into()))
}

/// Serves the control endpoint on `listener` until `stop`. Every call that changes the
/// cluster needs its credential (`x-xpyd-cluster`, as on the internal plane): another
/// user of the host cannot scale, flip, upgrade or stop it; the status stays readable.
/// Answered changes are reported to the coordinator's audit log through `reporter`.
pub async fn serve(
    listener: TcpListener,
    cmds: mpsc::Sender<Command>,
    key: xpyd_runtime::plane::ClusterKey,
    reporter: Reporter,
    stop: CancellationToken,
) {
    let member = axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let admitted = key.admits(
                req.headers()
                    .get(xpyd_runtime::plane::METADATA)
                    .and_then(|v| v.to_str().ok()),
            );
            async move {
                if admitted {
                    next.run(req).await
                } else {
                    CtlError {
                        status: 401,
                        field: None,
                        message: format!(
                            "{}; `xpyd scale/upgrade/down` read it from the cluster's token file",
                            xpyd_runtime::plane::unauthenticated().message()
                        ),
                    }
                    .into_response()
                }
            }
        },
    );
    let changes = Router::new()
        .route("/v1/scale", post(scale))
        .route("/v1/flip", post(flip))
        .route("/v1/upgrade", post(upgrade))
        .route("/v1/down", post(down))
        .route_layer(axum::middleware::from_fn_with_state(reporter, audit))
        .route_layer(member)
        .with_state(cmds.clone());
    let app = Router::new()
        .route("/v1/supervisor", get(status))
        .with_state(cmds)
        .merge(changes);
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await })
    .await;
    if let Err(e) = served {
        xpyd_runtime::logging::say(
            xpyd_runtime::logging::Level::WARN,
            &format!("xpyd up: control endpoint: {e}"),
        );
    }
}

fn gone() -> CtlError {
    CtlError {
        status: 503,
        field: None,
        message: "the supervisor is stopping".into(),
    }
}

async fn ask(cmds: &mpsc::Sender<Command>, make: impl FnOnce(Reply) -> Command) -> Response {
    let (tx, rx) = oneshot::channel();
    if cmds.send(make(tx)).await.is_err() {
        return gone().into_response();
    }
    match rx.await {
        Ok(Ok(v)) => {
            let code = if v.get("accepted").is_some() {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            (code, axum::Json(v)).into_response()
        }
        Ok(Err(e)) => e.into_response(),
        Err(_) => gone().into_response(),
    }
}

async fn status(State(cmds): State<mpsc::Sender<Command>>) -> Response {
    let (tx, rx) = oneshot::channel();
    if cmds.send(Command::Status(tx)).await.is_err() {
        return gone().into_response();
    }
    match rx.await {
        Ok(v) => axum::Json(v).into_response(),
        Err(_) => gone().into_response(),
    }
}

fn json_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, CtlError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(CtlError::invalid("body", "must be a JSON object")),
        Err(e) => Err(CtlError::invalid("body", format!("invalid JSON: {e}"))),
    }
}

/// `{role, replicas}` of a scale call.
pub fn parse_scale(body: &[u8]) -> Result<(String, u32), CtlError> {
    let m = json_body(body)?;
    if let Some(k) = m.keys().find(|k| *k != "role" && *k != "replicas") {
        return Err(CtlError::invalid(k, "unknown field (role, replicas)"));
    }
    let role = match m.get("role") {
        Some(Value::String(r)) => r.clone(),
        Some(v) => return Err(CtlError::invalid("role", format!("{v} is not a role name"))),
        None => return Err(CtlError::invalid("role", "is required")),
    };
    let replicas = match m.get("replicas") {
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| CtlError::invalid("replicas", format!("{v} is out of range 1..=64")))?,
        None => return Err(CtlError::invalid("replicas", "is required")),
    };
    Ok((role, replicas as u32))
}

/// `{from, to, count}` of a flip call (`count` 1..=64, default 1).
pub fn parse_flip(body: &[u8]) -> Result<(String, String, u32), CtlError> {
    let m = json_body(body)?;
    if let Some(k) = m
        .keys()
        .find(|k| !["from", "to", "count"].contains(&k.as_str()))
    {
        return Err(CtlError::invalid(k, "unknown field (from, to, count)"));
    }
    let role = |k: &str| match m.get(k) {
        Some(Value::String(r)) => Ok(r.clone()),
        Some(v) => Err(CtlError::invalid(k, format!("{v} is not a role name"))),
        None => Err(CtlError::invalid(k, "is required")),
    };
    let count = match m.get("count") {
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| CtlError::invalid("count", format!("{v} is out of range 1..=64")))?,
        None => 1,
    };
    Ok((role("from")?, role("to")?, count as u32))
}

async fn flip(State(cmds): State<mpsc::Sender<Command>>, body: Bytes) -> Response {
    match parse_flip(&body) {
        Ok((from, to, count)) => {
            ask(&cmds, |reply| Command::Flip {
                from,
                to,
                count,
                reply,
            })
            .await
        }
        Err(e) => e.into_response(),
    }
}

async fn scale(State(cmds): State<mpsc::Sender<Command>>, body: Bytes) -> Response {
    match parse_scale(&body) {
        Ok((role, replicas)) => {
            ask(&cmds, |reply| Command::Scale {
                role,
                replicas,
                reply,
            })
            .await
        }
        Err(e) => e.into_response(),
    }
}

async fn upgrade(State(cmds): State<mpsc::Sender<Command>>, body: Bytes) -> Response {
    let m = match json_body(&body) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let Some(Value::String(manifest)) = m.get("manifest").cloned() else {
        return CtlError::invalid("manifest", "is required: the new manifest's YAML text")
            .into_response();
    };
    let dir = m.get("dir").and_then(|d| d.as_str()).map(PathBuf::from);
    ask(&cmds, |reply| Command::Upgrade {
        manifest,
        dir,
        reply,
    })
    .await
}

async fn down(State(cmds): State<mpsc::Sender<Command>>) -> Response {
    let (tx, rx) = oneshot::channel();
    if cmds.send(Command::Down(tx)).await.is_err() || rx.await.is_err() {
        return gone().into_response();
    }
    (StatusCode::ACCEPTED, axum::Json(json!({"accepted": true}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_bodies_are_checked_by_field() {
        assert_eq!(
            parse_flip(br#"{"from":"decode","to":"prefill"}"#).unwrap(),
            ("decode".into(), "prefill".into(), 1)
        );
        assert_eq!(
            parse_flip(br#"{"from":"a","to":"b","count":3}"#).unwrap().2,
            3
        );
        for (body, field) in [
            (&br#"{"to":"prefill"}"#[..], "from"),
            (br#"{"from":"decode"}"#, "to"),
            (br#"{"from":1,"to":"prefill"}"#, "from"),
            (br#"{"from":"decode","to":"prefill","count":0}"#, "count"),
            (br#"{"from":"decode","to":"prefill","count":65}"#, "count"),
            (br#"{"from":"decode","to":"prefill","n":1}"#, "n"),
            (b"nope", "body"),
        ] {
            let e = parse_flip(body).unwrap_err();
            assert_eq!(
                e.field.as_deref(),
                Some(field),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(e.status, 400);
        }
    }

    #[test]
    fn scale_bodies_are_checked_by_field() {
        assert_eq!(
            parse_scale(br#"{"role":"decode","replicas":3}"#).unwrap(),
            ("decode".into(), 3)
        );
        for (body, field) in [
            (&br#"{"replicas":3}"#[..], "role"),
            (br#"{"role":7,"replicas":3}"#, "role"),
            (br#"{"role":"decode"}"#, "replicas"),
            (br#"{"role":"decode","replicas":0}"#, "replicas"),
            (br#"{"role":"decode","replicas":65}"#, "replicas"),
            (br#"{"role":"decode","replicas":"two"}"#, "replicas"),
            (br#"{"role":"decode","replicas":-1}"#, "replicas"),
            (br#"{"role":"decode","replicas":2,"force":true}"#, "force"),
            (b"[1]", "body"),
            (b"nope", "body"),
        ] {
            let e = parse_scale(body).unwrap_err();
            assert_eq!(
                e.field.as_deref(),
                Some(field),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(e.status, 400);
            assert!(
                e.message.starts_with(&format!("{field}: ")),
                "{}",
                e.message
            );
        }
    }
}
