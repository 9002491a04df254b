//! Log-probabilities in the APIs' shapes: OpenAI chat's `logprobs.content` entries,
//! legacy completions' parallel arrays, and the public gRPC messages. Workers send ids;
//! the token texts and bytes come from the coordinator's tokenizer.

use serde_json::{Map, Value, json};
use xpyd_engine::{TokenLogprobs, Tokenizer};
use xpyd_proto as pb;

/// One chat `logprobs.content` entry: `token`, `logprob`, `bytes`, `top_logprobs`.
pub fn chat_entry(tok: &Tokenizer, l: &TokenLogprobs) -> Value {
    let (token, bytes) = tok.token_piece(l.token);
    let top: Vec<Value> = l
        .top
        .iter()
        .map(|(id, lp)| {
            let (token, bytes) = tok.token_piece(*id);
            json!({"token": token, "logprob": lp, "bytes": bytes})
        })
        .collect();
    json!({"token": token, "logprob": l.logprob, "bytes": bytes, "top_logprobs": top})
}

/// Legacy completions' `logprobs` object, built token by token: `tokens`,
/// `token_logprobs`, `top_logprobs` (a map of token text to logprob, the chosen token
/// included) and `text_offset` (characters into the returned text).
#[derive(Debug, Default)]
pub struct TextLogprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
    /// Characters of text before the next token.
    offset: usize,
}

impl TextLogprobs {
    /// An empty object whose first token starts `offset` characters into the text.
    pub fn at(offset: usize) -> Self {
        TextLogprobs {
            offset,
            ..Default::default()
        }
    }

    /// A token with no logprob: the prompt's first, which nothing predicts.
    pub fn push_unscored(&mut self, tok: &Tokenizer, id: u32) {
        let (text, _) = tok.token_piece(id);
        self.add(text, Value::Null, Value::Null);
    }

    /// A scored token.
    pub fn push(&mut self, tok: &Tokenizer, l: &TokenLogprobs) {
        let (text, _) = tok.token_piece(l.token);
        let mut top = Map::new();
        // Texts can collide (bytes of a split character all show as U+FFFD): the more
        // likely token keeps the key.
        for (id, lp) in &l.top {
            top.entry(tok.token_piece(*id).0).or_insert(json!(lp));
        }
        top.entry(text.clone()).or_insert(json!(l.logprob));
        self.add(text, json!(l.logprob), Value::Object(top));
    }

    fn add(&mut self, text: String, logprob: Value, top: Value) {
        self.text_offset.push(self.offset);
        self.offset += text.chars().count();
        self.tokens.push(Value::String(text));
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top);
    }

    /// The object so far; the next one continues at the same offset.
    pub fn take(&mut self) -> Value {
        json!({
            "tokens": std::mem::take(&mut self.tokens),
            "token_logprobs": std::mem::take(&mut self.token_logprobs),
            "top_logprobs": std::mem::take(&mut self.top_logprobs),
            "text_offset": std::mem::take(&mut self.text_offset),
        })
    }
}

/// The public gRPC form, with token texts.
pub fn to_pb(tok: &Tokenizer, l: &TokenLogprobs) -> pb::TokenLogprob {
    let mut out = xpyd_runtime::worker::logprobs_to_pb(l);
    out.token = tok.token_piece(out.id).0;
    for t in &mut out.top {
        t.token = tok.token_piece(t.id).0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use xpyd_engine::testing::TinyModel;

    #[test]
    fn completions_arrays_stay_parallel_and_offsets_count_characters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        TinyModel::default().write(&path).unwrap();
        let info = xpyd_engine::ModelInfo::load(&path).unwrap();
        let tok = &info.tokenizer;
        let ids = tok.encode("hello world").unwrap();
        let mut t = TextLogprobs::at(3);
        t.push_unscored(tok, ids[0]);
        for id in &ids[1..] {
            t.push(
                tok,
                &TokenLogprobs {
                    token: *id,
                    logprob: -0.5,
                    top: vec![(ids[0], -0.25)],
                },
            );
        }
        let v = t.take();
        let n = ids.len();
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            assert_eq!(v[key].as_array().unwrap().len(), n, "{key}");
        }
        assert!(v["token_logprobs"][0].is_null() && v["top_logprobs"][0].is_null());
        assert_eq!(v["token_logprobs"][1], json!(-0.5));
        let first = v["tokens"][0].as_str().unwrap().chars().count();
        assert_eq!(v["text_offset"][0], json!(3));
        assert_eq!(v["text_offset"][1], json!(3 + first));
        let top = v["top_logprobs"][1].as_object().unwrap();
        assert!(
            top.contains_key(v["tokens"][1].as_str().unwrap()),
            "chosen token listed"
        );
        assert_eq!(t.take()["tokens"], json!([]), "taken once");
    }
}
