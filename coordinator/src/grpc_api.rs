//! The public gRPC API `xpyd.v1.Inference`: `Generate` streams text deltas (the last
//! message carries finish reason and usage), `Complete` returns it whole, `ListModels`.
//! The SLO class comes from the `priority` field or metadata `x-xpyd-priority`.

use crate::App;
use crate::error::ApiError;
use crate::flow::{self, Delta, Usage};
use crate::logprobs::to_pb;
use crate::request::{GenFields, Input, Logprobs, Message, Stop, class_from_header, prepare};
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use xpyd_proto as pb;
use xpyd_runtime::worker::finish_to_pb;

/// The `path` label of gRPC calls in `infer_service_request_total`.
pub const GRPC_PATH: &str = "/xpyd.v1.Inference";

/// The service.
pub struct InferenceService {
    /// Shared coordinator state.
    pub app: Arc<App>,
}

fn usage_pb(u: Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.total_tokens,
        cached_tokens: u.cached_tokens,
    }
}

impl InferenceService {
    /// The access list, then the API key (metadata `authorization: Bearer <key>`).
    fn guard<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let checked = self
            .app
            .access(req.remote_addr().map(|a| a.ip()))
            .and_then(|()| self.app.authorize(auth, crate::keys::Need::Service));
        match checked {
            Ok(_) => Ok(()),
            Err(e) => {
                self.app.compat.request(e.status, "POST", GRPC_PATH);
                Err(e.grpc())
            }
        }
    }

    async fn start(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<mpsc::Receiver<Delta>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        self.guard(&req)?;
        self.app
            .limiter
            .admit(|| self.app.cluster.serving_instances())
            .map_err(|e| e.grpc())?;
        let header = req
            .metadata()
            .get("x-xpyd-priority")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let r = req.into_inner();
        let s = r.sampling.unwrap_or_default();
        let fields = GenFields {
            model: Some(r.model),
            max_tokens: s.max_tokens.map(i64::from),
            temperature: s.temperature.map(f64::from),
            top_p: s.top_p.map(f64::from),
            top_k: s.top_k.map(i64::from),
            seed: s.seed.map(|x| x as i64),
            stop: (!s.stop.is_empty()).then_some(Stop::Many(s.stop)),
            ignore_eos: Some(s.ignore_eos),
            priority: r.priority.map(i64::from),
            // The switch form, as chat's, for either input.
            logprobs: Some(Logprobs::On(s.logprobs)),
            top_logprobs: s.top_logprobs.map(i64::from),
            prompt_logprobs: s.prompt_logprobs,
            ..Default::default()
        };
        let msgs: Vec<Message>;
        let input = match &r.input {
            Some(pb::generate_request::Input::Prompt(p)) => Input::Text(p),
            Some(pb::generate_request::Input::Chat(c)) => {
                msgs = c
                    .messages
                    .iter()
                    .map(|m| Message {
                        role: m.role.clone(),
                        content: Some(m.content.clone()),
                    })
                    .collect();
                Input::Chat(&msgs)
            }
            None => return Err(ApiError::invalid("input", "give `prompt` or `chat`").grpc()),
        };
        let class = class_from_header(header.as_deref()).map_err(|e| e.grpc())?;
        let p = prepare(&self.app, &fields, input, class, peer, "grpc")
            .await
            .map_err(|e| e.grpc())?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(flow::serve(self.app.clone(), p, tx));
        Ok(rx)
    }
}

type GenStream = tokio_stream::wrappers::ReceiverStream<Result<pb::GenerateResponse, Status>>;

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    type GenerateStream = GenStream;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let mut rx = self.start(req).await?;
        let (tx, out) = mpsc::channel(64);
        let request_id = format!("{:x}", self.app.next_id());
        let app = self.app.clone();
        tokio::spawn(async move {
            let tok = &app.model.tokenizer;
            while let Some(d) = rx.recv().await {
                let msg = match d {
                    Delta::Text {
                        text,
                        id,
                        logprobs,
                        prompt_logprobs,
                    } => Ok(pb::GenerateResponse {
                        text,
                        token_ids: vec![id],
                        request_id: request_id.clone(),
                        logprobs: logprobs.iter().map(|l| to_pb(tok, l)).collect(),
                        prompt_logprobs: prompt_logprobs.iter().map(|l| to_pb(tok, l)).collect(),
                        ..Default::default()
                    }),
                    Delta::Done { finish, usage } => Ok(pb::GenerateResponse {
                        finish_reason: finish_to_pb(Some(finish)) as i32,
                        usage: Some(usage_pb(usage)),
                        request_id: request_id.clone(),
                        ..Default::default()
                    }),
                    Delta::Error(e) => Err(e.grpc()),
                };
                if tx.send(msg).await.is_err() {
                    return; // client gone: dropping `rx` cancels the request
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            out,
        )))
    }

    async fn complete(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let mut rx = self.start(req).await?;
        let mut out = pb::CompleteResponse {
            request_id: format!("{:x}", self.app.next_id()),
            model: self.app.model_id.clone(),
            ..Default::default()
        };
        let tok = &self.app.model.tokenizer;
        while let Some(d) = rx.recv().await {
            match d {
                Delta::Text {
                    text,
                    id,
                    logprobs,
                    prompt_logprobs,
                } => {
                    out.text.push_str(&text);
                    out.token_ids.push(id);
                    out.logprobs.extend(logprobs.iter().map(|l| to_pb(tok, l)));
                    out.prompt_logprobs
                        .extend(prompt_logprobs.iter().map(|l| to_pb(tok, l)));
                }
                Delta::Done { finish, usage } => {
                    out.finish_reason = finish_to_pb(Some(finish)) as i32;
                    out.usage = Some(usage_pb(usage));
                    return Ok(Response::new(out));
                }
                Delta::Error(e) => return Err(e.grpc()),
            }
        }
        Err(Status::internal("request ended without a result"))
    }

    async fn list_models(
        &self,
        req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.guard(&req)?;
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![pb::ModelInfo {
                id: self.app.model_id.clone(),
                context_length: self.app.model.config.context_length as u32,
                fingerprint: self.app.model.fingerprint.clone(),
            }],
        }))
    }
}
