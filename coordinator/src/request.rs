//! Turning an API request (OpenAI JSON, WebSocket frame or gRPC message) into a validated,
//! tokenized [`Prepared`] request, with errors that name the offending field.

use crate::App;
use crate::error::ApiError;
use crate::flow::Prepared;
use serde::Deserialize;
use std::net::IpAddr;
use std::sync::Arc;
use xpyd_engine::{ChatMessage, SamplingParams};

/// Default `max_tokens` when the client gives none.
pub const DEFAULT_MAX_TOKENS: i64 = 128;

/// `stop` as OpenAI accepts it: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `logprobs` as OpenAI takes it: a switch on chat completions, a count of alternatives
/// on (legacy) completions.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum Logprobs {
    /// Chat: return logprobs (`top_logprobs` says how many alternatives).
    On(bool),
    /// Completions: return logprobs with this many alternatives.
    Top(i64),
}

/// A chat message as clients send it.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// system, user, assistant…
    pub role: String,
    /// The text (`null` is treated as empty).
    #[serde(default)]
    pub content: Option<String>,
}

/// The fields shared by chat and text completions (OpenAI names; extensions marked).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenFields {
    /// Model id.
    #[serde(default)]
    pub model: Option<String>,
    /// Chat messages (chat API, WebSocket).
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
    /// Raw prompt (completions API).
    #[serde(default)]
    pub prompt: Option<String>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Newer OpenAI name for `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// 0..=2.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Extension: top-k (0 = off).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Reproducible sampling.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Extension: keep going past EOS.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Choices; only 1 is supported.
    #[serde(default)]
    pub n: Option<i64>,
    /// Extension: SLO class 0..=3 (header `x-xpyd-priority` overrides).
    #[serde(default)]
    pub priority: Option<i64>,
    /// Log-probabilities: a boolean on chat, 0..=20 alternatives on completions.
    #[serde(default)]
    pub logprobs: Option<Logprobs>,
    /// Chat: alternatives per position, 0..=20 (needs `logprobs: true`).
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// Completions: the prompt comes back before the completion (with its logprobs when
    /// `logprobs` is set).
    #[serde(default)]
    pub echo: Option<bool>,
    /// gRPC: the prompt's logprobs too (HTTP says this with `echo`).
    #[serde(skip)]
    pub prompt_logprobs: bool,
}

/// The prompt, owned, for the tokenizer's thread.
enum Source {
    Chat(Vec<ChatMessage>),
    Text(String),
}

/// What the prompt is.
pub enum Input<'a> {
    /// Chat messages → chat template.
    Chat(&'a [Message]),
    /// Raw text.
    Text(&'a str),
}

/// Parses a priority header value.
///
/// # Errors
/// 400 naming the header.
pub fn class_from_header(v: Option<&str>) -> Result<Option<u8>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) => match s.trim().parse::<u8>() {
            Ok(c) if c <= 3 => Ok(Some(c)),
            _ => Err(ApiError::invalid(
                "x-xpyd-priority",
                format!("`{s}` is not a class 0..=3"),
            )),
        },
    }
}

/// Whether logprobs are asked for and how many alternatives, from OpenAI's two forms:
/// a switch `logprobs: bool` + `top_logprobs` (chat, and gRPC and WebSocket whatever
/// their input), or completions' count `logprobs: n`.
///
/// # Errors
/// 400 naming `logprobs`, `top_logprobs` or `prompt_logprobs`.
fn logprobs_of(f: &GenFields, switch: bool) -> Result<(bool, usize), ApiError> {
    let max = xpyd_engine::MAX_TOP_LOGPROBS as i64;
    let range = |field: &'static str, n: i64| {
        if (0..=max).contains(&n) {
            Ok(n as usize)
        } else {
            Err(ApiError::invalid(
                field,
                format!("{n} is outside 0..={max}"),
            ))
        }
    };
    let on = match (f.logprobs, switch) {
        (None, _) => false,
        (Some(Logprobs::On(on)), true) => on,
        (Some(Logprobs::Top(n)), false) => return Ok((true, range("logprobs", n)?)),
        (Some(Logprobs::On(_)), false) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("completions take a number of alternatives 0..={max}"),
            ));
        }
        (Some(Logprobs::Top(_)), true) => {
            return Err(ApiError::invalid(
                "logprobs",
                "chat completions take true or false (alternatives: top_logprobs)",
            ));
        }
    };
    let top = match f.top_logprobs {
        None => 0,
        Some(n) => range("top_logprobs", n)?,
    };
    for (asked, field) in [
        (top > 0, "top_logprobs"),
        (f.prompt_logprobs, "prompt_logprobs"),
    ] {
        if asked && !on {
            return Err(ApiError::invalid(field, "needs `logprobs: true`"));
        }
    }
    Ok((on, top))
}

/// Validates and tokenizes. A prompt that cannot fit the context is refused before it is
/// tokenized, and tokenization runs on a blocking thread, never on the async runtime's.
///
/// # Errors
/// 400/404 naming the field at fault.
pub async fn prepare(
    app: &Arc<App>,
    f: &GenFields,
    input: Input<'_>,
    header_class: Option<u8>,
    source_ip: Option<IpAddr>,
    api: &'static str,
) -> Result<Prepared, ApiError> {
    if let Some(m) = &f.model
        && !m.is_empty()
        && m != &app.model_id
    {
        return Err(ApiError::unknown_model(m, &app.model_id));
    }
    if let Some(n) = f.n
        && n != 1
    {
        return Err(ApiError::invalid(
            "n",
            format!("{n}: only n = 1 is supported"),
        ));
    }
    let max_tokens = f
        .max_completion_tokens
        .or(f.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    if !(1..=1_000_000).contains(&max_tokens) {
        return Err(ApiError::invalid(
            "max_tokens",
            format!("{max_tokens} is out of range; must be at least 1"),
        ));
    }
    let temperature = f.temperature.unwrap_or(1.0);
    if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("{temperature} is outside 0..=2"),
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !top_p.is_finite() || top_p <= 0.0 || top_p > 1.0 {
        return Err(ApiError::invalid(
            "top_p",
            format!("{top_p} is outside (0, 1]"),
        ));
    }
    let top_k = f.top_k.unwrap_or(0);
    if !(0..=1_000_000).contains(&top_k) {
        return Err(ApiError::invalid(
            "top_k",
            format!("{top_k} must be 0 (off) or positive"),
        ));
    }
    let seed = match f.seed {
        Some(s) => s as u64,
        None => app.next_id() ^ 0x5EED_5EED_5EED_5EED,
    };
    let stop = match &f.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    let class = match header_class {
        Some(c) => c,
        None => match f.priority {
            None => 1,
            Some(c) if (0..=3).contains(&c) => c as u8,
            Some(c) => {
                return Err(ApiError::invalid(
                    "priority",
                    format!("{c} is not a class 0..=3"),
                ));
            }
        },
    };
    // Only the completions API counts alternatives with `logprobs: n` (and has `echo`).
    let completions = api == "completions";
    let (logprobs, top_logprobs) = logprobs_of(f, !completions)?;
    let params = SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k: top_k as usize,
        seed,
        max_tokens: max_tokens as usize,
        stop,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        logprobs,
        top_logprobs,
        prompt_logprobs: logprobs && (f.prompt_logprobs || (completions && f.echo == Some(true))),
    };
    params.validate().map_err(|e| match e {
        xpyd_engine::EngineError::InvalidParam { field, reason } => {
            ApiError::invalid(field, reason)
        }
        other => ApiError::bad_body(other.to_string()),
    })?;
    let ctx = app.model.config.context_length;
    let (bytes, param) = match input {
        Input::Chat(msgs) => {
            if msgs.is_empty() {
                return Err(ApiError::invalid(
                    "messages",
                    "must contain at least one message",
                ));
            }
            let text = msgs
                .iter()
                .map(|m| m.role.len() + m.content.as_ref().map_or(0, String::len));
            (text.sum(), "messages")
        }
        Input::Text(t) => (t.len(), "prompt"),
    };
    if app.model.tokenizer.certainly_reaches(bytes, ctx) {
        let mut e = ApiError::invalid(
            param,
            format!(
                "This model's maximum context length is {ctx} tokens; the prompt's {bytes} bytes cannot fit it"
            ),
        );
        e.code = Some("context_length_exceeded");
        return Err(e);
    }
    let source = match input {
        Input::Chat(msgs) => Source::Chat(
            msgs.iter()
                .map(|m| ChatMessage::new(m.role.clone(), m.content.clone().unwrap_or_default()))
                .collect(),
        ),
        Input::Text(t) => Source::Text(t.to_owned()),
    };
    let worker = app.clone();
    let tokens = tokio::task::spawn_blocking(move || {
        let tok = &worker.model.tokenizer;
        match source {
            Source::Chat(msgs) => tok.encode_chat(&msgs),
            Source::Text(t) => tok.encode(&t),
        }
    })
    .await
    .map_err(|e| ApiError::upstream(500, format!("tokenizer task: {e}")))?;
    let tokens = tokens.map_err(|e| ApiError::invalid(param, e.to_string()))?;
    if tokens.is_empty() {
        return Err(ApiError::invalid(param, "the prompt is empty"));
    }
    if tokens.len() >= ctx {
        let mut e = ApiError::context(tokens.len(), ctx);
        e.param = Some(param.into());
        return Err(e);
    }
    Ok(Prepared {
        tokens: tokens.into(),
        params,
        class,
        source_ip,
        api,
    })
}
