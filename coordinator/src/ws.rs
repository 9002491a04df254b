//! WebSocket streaming at `/v1/ws`. Protocol (JSON text frames), any number of requests
//! one after another on one socket:
//! - client → server: a request frame shaped like the chat completions body
//!   (`messages`, or `prompt` for a raw completion, plus the sampling fields);
//! - server → client: `{"type":"delta","content":"…"}` per token,
//!   then `{"type":"done","finish_reason":"stop"|"length","usage":{…}}`;
//!   on failure `{"type":"error","error":{"message","type","param","code"}}` (the socket
//!   stays open for the next request).
//!
//! Closing the socket mid-stream cancels the request.

use crate::App;
use crate::error::ApiError;
use crate::flow::{self, Delta};
use crate::logprobs::chat_entry;
use crate::request::{GenFields, Input, class_from_header, prepare};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Upgrades to the streaming protocol.
pub async fn upgrade(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let class = class_from_header(headers.get("x-xpyd-priority").and_then(|v| v.to_str().ok()));
    // A message, like an HTTP body, is bounded by the request size limit.
    let limit = app.cfg.max_request_bytes;
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| session(app, socket, peer, class))
}

fn error_frame(e: &ApiError) -> Message {
    let mut v = e.body();
    v["type"] = json!("error");
    Message::Text(v.to_string().into())
}

async fn session(
    app: Arc<App>,
    mut socket: WebSocket,
    peer: SocketAddr,
    class: Result<Option<u8>, ApiError>,
) {
    while let Some(Ok(msg)) = socket.recv().await {
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => return,
            _ => continue,
        };
        let prepared = async {
            // Each request on the socket counts against the rate limit.
            app.limiter.admit(|| app.cluster.serving_instances())?;
            let class = class.clone()?;
            let f: GenFields = serde_json::from_str(&text)
                .map_err(|e| ApiError::bad_body(format!("invalid JSON frame: {e}")))?;
            let input = match (&f.messages, &f.prompt) {
                (Some(m), _) => Input::Chat(m),
                (None, Some(p)) => Input::Text(p),
                (None, None) => {
                    return Err(ApiError::invalid("messages", "is required (or `prompt`)"));
                }
            };
            prepare(&app, &f, input, class, Some(peer.ip()), "ws").await
        }
        .await;
        let p = match prepared {
            Ok(p) => p,
            Err(e) => {
                if socket.send(error_frame(&e)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let (tx, mut rx) = mpsc::channel(64);
        tokio::spawn(flow::serve(app.clone(), p, tx));
        while let Some(d) = rx.recv().await {
            let frame = match d {
                Delta::Text { text, logprobs, .. } => {
                    let mut v = json!({"type": "delta", "content": text});
                    if let Some(l) = &logprobs {
                        // Chat's shape: one `logprobs.content` entry per token.
                        v["logprobs"] = json!({"content": [chat_entry(&app.model.tokenizer, l)]});
                    }
                    Message::Text(v.to_string().into())
                }
                Delta::Done { finish, usage } => Message::Text(
                    json!({"type": "done", "finish_reason": finish.as_openai(), "usage": usage})
                        .to_string()
                        .into(),
                ),
                Delta::Error(e) => error_frame(&e),
            };
            if socket.send(frame).await.is_err() {
                return; // dropping `rx` cancels the request
            }
        }
    }
}
