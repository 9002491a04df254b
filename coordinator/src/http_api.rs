//! The OpenAI-compatible HTTP API: `POST /v1/chat/completions`, `POST /v1/completions`
//! (JSON, or SSE chunks ending with `data: [DONE]` when `stream` is true), `GET /v1/models`,
//! plus `/health`, `/metrics`, `/v1/cluster` (topology) and the WebSocket endpoint `/v1/ws`.

use crate::App;
use crate::error::ApiError;
use crate::flow::{self, Delta, Usage};
use crate::keys::Need;
use crate::logprobs::{TextLogprobs, chat_entry};
use crate::request::{GenFields, Input, class_from_header, prepare};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use xpyd_engine::TokenLogprobs;

/// The HTTP router.
pub fn router(app: Arc<App>) -> Router {
    let limit = app.cfg.max_request_bytes;
    let generate = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route_layer(middleware::from_fn_with_state(app.clone(), limits));
    Router::new()
        .merge(generate)
        .route("/v1/models", get(models))
        .route("/v1/cluster", get(cluster))
        .route("/v1/ws", get(crate::ws::upgrade))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(crate::admin_api::routes())
        .merge(crate::audit::routes())
        .merge(crate::dashboard::routes())
        .layer(middleware::from_fn_with_state(app.clone(), audited))
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .layer(middleware::from_fn_with_state(app.clone(), access))
        .layer(middleware::from_fn_with_state(app.clone(), counted))
        .with_state(app)
}

/// `infer_service_request_total{code, method, path}` for every call, refusals
/// included; `path` is the route's pattern (`/v1/workers/{id}/routing`), or `other` for
/// a path no route has, so callers cannot grow the label set.
async fn counted(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_string();
    let path = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let r = next.run(req).await;
    app.compat.request(r.status().as_u16(), &method, &path);
    r
}

/// The access list, before anything else, on every route but `/health` (the
/// supervisor's probe).
async fn access(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if req.uri().path() != "/health"
        && let Err(e) = app.cfg.access.check(peer.ip())
    {
        return refused(e, "http");
    }
    next.run(req).await
}

/// The inference routes: any key scoped to the service opens them; every other route
/// but `/health` is an operations route and needs an admin key (or the cluster's token).
const INFERENCE: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/ws",
];

/// Routes anyone the access list lets in may read: the supervisor's probe, and the
/// dashboard's page and assets (they hold no data; the page asks for a key when the
/// service requires one, and its data comes from admin routes).
fn open_route(path: &str) -> bool {
    path == "/health" || path == "/dashboard" || path.starts_with("/dashboard/")
}

/// The API key, after the access list: 401/403 as OpenAI-style errors. Who called is
/// left in the request's extensions for the audit log.
async fn authenticate(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !open_route(path) {
        let need = if INFERENCE.contains(&path) {
            Need::Service
        } else {
            Need::Admin
        };
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match app.authorize(auth, need) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
            }
            Err(e) => return refused(e, "http"),
        }
    }
    next.run(req).await
}

/// The admin operations the audit log records (any method but GET).
fn is_audited(method: &axum::http::Method, path: &str) -> bool {
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        return false;
    }
    matches!(
        path,
        "/v1/advisor/config" | "/v1/advisor/apply" | "/v1/dashboard/scale"
    ) || (path.starts_with("/v1/workers/") && path.ends_with("/routing"))
}

/// Records an admin operation in the audit log once it has been answered: who, from
/// where, the request's body, the status and the answer.
async fn audited(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if !is_audited(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let action = format!("{} {}", req.method(), req.uri().path());
    let who = req
        .extensions()
        .get::<crate::keys::Caller>()
        .map_or_else(|| "unknown".to_string(), ToString::to_string);
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, app.cfg.max_request_bytes).await {
        Ok(b) => b,
        Err(_) => return too_large(app.cfg.max_request_bytes).into_response(),
    };
    let request = crate::audit::body_value(&body);
    let resp = next
        .run(Request::from_parts(parts, axum::body::Body::from(body)))
        .await;
    let (parts, body) = resp.into_parts();
    let answer = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    crate::audit::record(
        &app.audit,
        crate::audit::Record {
            who,
            peer: peer.to_string(),
            action,
            request,
            status: parts.status.as_u16(),
            outcome: crate::audit::body_value(&answer),
        },
    );
    Response::from_parts(parts, axum::body::Body::from(answer))
}

/// The rate limit of the inference routes, then their size limit told from
/// `content-length` — both before a byte of the body is read (a body without a length
/// is cut off at the limit as it is read).
async fn limits(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Err(e) = app.limiter.admit(|| app.cluster.serving_instances()) {
        return refused(e, "http");
    }
    let limit = app.cfg.max_request_bytes;
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return refused(too_large(limit), "http");
    }
    next.run(req).await
}

fn too_large(limit: usize) -> ApiError {
    ApiError::refusal(
        413,
        "invalid_request_error",
        "request_too_large",
        format!("the request body is larger than {limit} bytes"),
    )
}

fn refused(e: ApiError, api: &'static str) -> Response {
    metrics::counter!(xpyd_runtime::metrics::COORD_REQUESTS_TOTAL, "api" => api, "code" => e.status.to_string()).increment(1);
    e.into_response()
}

/// A body over the size limit is a 413 with an OpenAI-style error.
fn body_or_413(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(limit)
        } else {
            ApiError::bad_body(r.body_text())
        }
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct Body {
    #[serde(flatten)]
    fields: GenFields,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// Which OpenAI object family a response belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Text,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn parse(body: &Bytes) -> Result<Body, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_body(format!("invalid JSON body: {e}")))
}

fn header_class(h: &HeaderMap) -> Result<Option<u8>, ApiError> {
    class_from_header(h.get("x-xpyd-priority").and_then(|v| v.to_str().ok()))
}

async fn chat(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(app, peer, headers, body, Kind::Chat).await
}

async fn completions(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(app, peer, headers, body, Kind::Text).await
}

async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    h: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Response {
    let api = if kind == Kind::Chat {
        "chat"
    } else {
        "completions"
    };
    let prepared = async {
        let b = parse(&body_or_413(body, app.cfg.max_request_bytes)?)?;
        let input = match kind {
            Kind::Chat => Input::Chat(
                b.fields
                    .messages
                    .as_deref()
                    .ok_or_else(|| ApiError::invalid("messages", "is required"))?,
            ),
            Kind::Text => Input::Text(
                b.fields
                    .prompt
                    .as_deref()
                    .ok_or_else(|| ApiError::invalid("prompt", "is required"))?,
            ),
        };
        let p = prepare(
            &app,
            &b.fields,
            input,
            header_class(&h)?,
            Some(peer.ip()),
            api,
        )
        .await?;
        let echo = match (kind, b.fields.echo, &b.fields.prompt) {
            (Kind::Text, Some(true), Some(prompt)) => Some(prompt.clone()),
            _ => None,
        };
        Ok::<_, ApiError>((
            p,
            b.stream.unwrap_or(false),
            b.stream_options.unwrap_or_default(),
            echo,
        ))
    }
    .await;
    let (p, stream, opts, echo) = match prepared {
        Ok(x) => x,
        Err(e) => {
            metrics::counter!(xpyd_runtime::metrics::COORD_REQUESTS_TOTAL, "api" => api, "code" => e.status.to_string()).increment(1);
            return e.into_response();
        }
    };
    let shape = Shape {
        kind,
        logprobs: p.params.logprobs,
        echo: echo.map(|text| (text, p.tokens[0])),
    };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(flow::serve(app.clone(), p, tx));
    let id = format!(
        "{}-{:x}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        app.next_id()
    );
    if stream {
        sse(app, rx, id, shape, opts.include_usage).await
    } else {
        whole(app, rx, id, shape).await
    }
}

/// What a response carries besides the text: logprobs, and (completions) the prompt.
struct Shape {
    kind: Kind,
    logprobs: bool,
    /// `echo`: the prompt's text and first token.
    echo: Option<(String, u32)>,
}

/// Turns token deltas into the text and logprobs a response shows, in either API's form.
struct Rendering<'a> {
    shape: &'a Shape,
    tok: &'a xpyd_engine::Tokenizer,
    /// Chat: `logprobs.content` entries not yet sent.
    content: Vec<Value>,
    /// Completions: the `logprobs` object not yet sent.
    text: TextLogprobs,
    /// The echoed prompt is out.
    echoed: bool,
}

impl<'a> Rendering<'a> {
    fn new(shape: &'a Shape, tok: &'a xpyd_engine::Tokenizer) -> Self {
        Rendering {
            shape,
            tok,
            content: Vec::new(),
            text: TextLogprobs::default(),
            echoed: false,
        }
    }

    /// A token's text as the response shows it (the echoed prompt before the first),
    /// noting its logprobs.
    fn token(
        &mut self,
        text: String,
        lp: Option<&TokenLogprobs>,
        prompt_lp: &[TokenLogprobs],
    ) -> String {
        let mut out = String::new();
        if let Some((prompt, first)) = &self.shape.echo
            && !self.echoed
        {
            self.echoed = true;
            out.push_str(prompt);
            if self.shape.logprobs {
                self.text.push_unscored(self.tok, *first);
                for l in prompt_lp {
                    self.text.push(self.tok, l);
                }
            }
        }
        out.push_str(&text);
        if let Some(l) = lp {
            match self.shape.kind {
                Kind::Chat => self.content.push(chat_entry(self.tok, l)),
                Kind::Text => self.text.push(self.tok, l),
            }
        }
        out
    }

    /// The `logprobs` of what was noted since the last call (null when not asked for).
    fn logprobs(&mut self) -> Value {
        if !self.shape.logprobs {
            return Value::Null;
        }
        match self.shape.kind {
            Kind::Chat => json!({"content": std::mem::take(&mut self.content)}),
            Kind::Text => self.text.take(),
        }
    }
}

async fn whole(app: Arc<App>, mut rx: mpsc::Receiver<Delta>, id: String, shape: Shape) -> Response {
    let kind = shape.kind;
    let mut r = Rendering::new(&shape, &app.model.tokenizer);
    let mut text = String::new();
    while let Some(d) = rx.recv().await {
        match d {
            Delta::Text {
                text: t,
                logprobs,
                prompt_logprobs,
                ..
            } => text.push_str(&r.token(t, logprobs.as_ref(), &prompt_logprobs)),
            Delta::Error(e) => return e.into_response(),
            Delta::Done { finish, usage } => {
                let logprobs = r.logprobs();
                let choice = match kind {
                    Kind::Chat => {
                        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish.as_openai(), "logprobs": logprobs})
                    }
                    Kind::Text => {
                        json!({"index": 0, "text": text, "finish_reason": finish.as_openai(), "logprobs": logprobs})
                    }
                };
                let object = if kind == Kind::Chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                return axum::Json(
                    json!({"id": id, "object": object, "created": now_s(), "model": app.model_id,
                    "choices": [choice], "usage": usage}),
                )
                .into_response();
            }
        }
    }
    ApiError::upstream(500, "request ended without a result").into_response()
}

/// One streamed chunk in OpenAI's format.
pub(crate) fn chunk(
    app: &App,
    id: &str,
    kind: Kind,
    text: Option<&str>,
    finish: Option<&str>,
    first: bool,
    logprobs: Value,
) -> Value {
    let (object, choice) = match kind {
        Kind::Chat => {
            let mut delta = json!({});
            if first {
                delta["role"] = json!("assistant");
            }
            if let Some(t) = text {
                delta["content"] = json!(t);
            }
            (
                "chat.completion.chunk",
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}),
            )
        }
        Kind::Text => (
            "text_completion",
            json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": logprobs}),
        ),
    };
    json!({"id": id, "object": object, "created": now_s(), "model": app.model_id, "choices": [choice]})
}

fn usage_chunk(app: &App, id: &str, kind: Kind, usage: Usage) -> Value {
    let object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    json!({"id": id, "object": object, "created": now_s(), "model": app.model_id, "choices": [], "usage": usage})
}

async fn sse(
    app: Arc<App>,
    mut rx: mpsc::Receiver<Delta>,
    id: String,
    shape: Shape,
    include_usage: bool,
) -> Response {
    // Errors before the first token are plain HTTP errors (status codes still possible).
    let first = match rx.recv().await {
        Some(Delta::Error(e)) => return e.into_response(),
        Some(d) => d,
        None => return ApiError::upstream(500, "request ended without a result").into_response(),
    };
    let (etx, erx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let kind = shape.kind;
        let mut r = Rendering::new(&shape, &app.model.tokenizer);
        let mut next = Some(first);
        let mut first_chunk = true;
        loop {
            // Not `next.take().or(rx.recv().await)`: that would drop a delta.
            let d = match next.take() {
                Some(d) => d,
                None => match rx.recv().await {
                    Some(d) => d,
                    None => break,
                },
            };
            let events: Vec<Value> = match d {
                Delta::Text {
                    text,
                    logprobs,
                    prompt_logprobs,
                    ..
                } => {
                    let text = r.token(text, logprobs.as_ref(), &prompt_logprobs);
                    let c = chunk(
                        &app,
                        &id,
                        kind,
                        Some(&text),
                        None,
                        first_chunk,
                        r.logprobs(),
                    );
                    first_chunk = false;
                    vec![c]
                }
                Delta::Done { finish, usage } => {
                    let mut v = vec![chunk(
                        &app,
                        &id,
                        kind,
                        None,
                        Some(finish.as_openai()),
                        first_chunk,
                        Value::Null,
                    )];
                    if include_usage {
                        v.push(usage_chunk(&app, &id, kind, usage));
                    }
                    v
                }
                Delta::Error(e) => vec![e.body()],
            };
            for v in events {
                if etx
                    .send(Event::default().data(v.to_string()))
                    .await
                    .is_err()
                {
                    return; // client gone: dropping `rx` cancels the request
                }
            }
        }
        let _ = etx.send(Event::default().data("[DONE]")).await;
    });
    let stream = ReceiverStream::new(erx).map(Ok::<_, Infallible>);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    axum::Json(
        json!({"object": "list", "data": [{"id": app.model_id, "object": "model", "created": 0,
        "owned_by": "xpyd", "context_length": app.model.config.context_length}]}),
    )
    .into_response()
}

async fn cluster(State(app): State<Arc<App>>) -> Response {
    axum::Json(
        json!({"mode": if app.cfg.single {"single"} else {"disaggregated"},
        "routing": {"prefill": app.cluster.policy(crate::cluster::Leg::Prefill).name(),
                    "decode": app.cluster.policy(crate::cluster::Leg::Decode).name()},
        "queued": app.cluster.queued(), "workers": app.cluster.snapshot()}),
    )
    .into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let ready = app.cluster.snapshot().iter().any(|w| w.state == "ready");
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(json!({"status": if ready {"ok"} else {"no ready workers"}})),
    )
        .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> String {
    xpyd_runtime::metrics::sample_process();
    app.compat.refresh();
    app.metrics.render()
}
