//! The cluster on the real model, through real processes started by `xpyd up`: every API
//! (HTTP, SSE, WebSocket, gRPC) over every KV transport built gives exactly what one
//! process gives; sampled output with a seed too; usage and finish reasons; 16 concurrent
//! streams over 1P2D; an OpenAI client library we did not write.

mod common;

use common::cluster::{Up, reference, sse};
use common::real_model;
use serde_json::{Value, json};
use std::path::Path;
use xpyd_proto as pb;

const PROMPT: &str = "What is the capital of France?";

fn manifest(mode: &str, backend: &str, decode: u32) -> String {
    let roles = if mode == "single" {
        format!("  combined: {{ replicas: {decode} }}\n")
    } else {
        format!("  prefill: {{ replicas: 1 }}\n  decode: {{ replicas: {decode} }}\n")
    };
    format!(
        "name: real-{backend}\nmode: {mode}\ncoordinator: {{ http_port: 0, grpc_port: 0 }}\nkv: {{ backend: {backend} }}\nroles:\n{roles}"
    )
}

fn backends() -> Vec<&'static str> {
    let mut b = vec!["tcp", "shm"];
    if cfg!(feature = "ucx") {
        b.push("ucx");
    }
    b
}

fn ws_chat(up: &Up, body: &Value) -> (String, Value) {
    let url = format!("{}/v1/ws", up.http.replace("http://", "ws://"));
    let (mut ws, _) = tungstenite::connect(url).unwrap();
    ws.send(tungstenite::Message::text(body.to_string()))
        .unwrap();
    let mut text = String::new();
    loop {
        let msg = ws.read().unwrap();
        let tungstenite::Message::Text(t) = msg else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        match v["type"].as_str().unwrap() {
            "delta" => text.push_str(v["content"].as_str().unwrap()),
            "done" => return (text, v),
            other => panic!("unexpected frame {other}: {v}"),
        }
    }
}

fn grpc_generate(up: &Up, sampling: pb::Sampling) -> (String, Vec<u32>, pb::GenerateResponse) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = pb::inference_client::InferenceClient::connect(up.grpc.clone())
            .await
            .unwrap();
        let req = pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Chat(pb::ChatInput {
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: PROMPT.into(),
                }],
            })),
            sampling: Some(sampling),
            ..Default::default()
        };
        let mut s = c.generate(req).await.unwrap().into_inner();
        let (mut text, mut ids, mut last) = (String::new(), vec![], None);
        while let Some(m) = s.message().await.unwrap() {
            text.push_str(&m.text);
            ids.extend(&m.token_ids);
            last = Some(m);
        }
        (text, ids, last.unwrap())
    })
}

fn check_cluster(model: &Path, backend: &str, ref_text: &str, ref_ids: &[u32]) {
    let up = Up::start(&manifest("disaggregated", backend, 1), model);
    let n = 24;
    // HTTP, whole.
    let (text, v) = up.chat(PROMPT, n);
    assert_eq!(text, ref_text, "{backend}: HTTP");
    assert_eq!(v["usage"]["completion_tokens"], ref_ids.len());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{backend}: the first call has nothing cached: {v}"
    );
    let cached = |usage: &Value| usage["prompt_tokens_details"]["cached_tokens"].as_u64();
    // SSE with usage.
    let body = json!({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": n, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}});
    let (text, chunks) = sse(&format!("{}/v1/chat/completions", up.http), &body);
    assert_eq!(text, ref_text, "{backend}: SSE");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let last = chunks.last().unwrap();
    assert_eq!(last["usage"]["completion_tokens"], n);
    assert!(cached(&last["usage"]) >= Some(32), "{backend}: SSE {last}");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    // WebSocket.
    let (text, done) = ws_chat(
        &up,
        &json!({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": n, "temperature": 0}),
    );
    assert_eq!(text, ref_text, "{backend}: WebSocket");
    assert_eq!(done["finish_reason"], "length");
    assert_eq!(done["usage"]["completion_tokens"], n);
    assert!(
        cached(&done["usage"]) >= Some(32),
        "{backend}: WebSocket {done}"
    );
    // gRPC: token for token.
    let (text, ids, last) = grpc_generate(
        &up,
        pb::Sampling {
            max_tokens: Some(n),
            temperature: Some(0.0),
            ..Default::default()
        },
    );
    assert_eq!(text, ref_text, "{backend}: gRPC");
    assert_eq!(ids, ref_ids, "{backend}: gRPC token ids");
    assert_eq!(last.finish_reason, pb::FinishReason::Length as i32);
    let usage = last.usage.unwrap();
    assert_eq!(usage.completion_tokens, n);
    assert!(usage.cached_tokens >= 32, "{backend}: gRPC {usage:?}");
    // Calls after the first reused the prompt's cached prefix blocks, with equal output.
    let p = &up.workers("prefill")[0];
    let st = up.stats(p);
    assert!(
        st.prefix_hit_tokens >= 3 * 32,
        "{backend}: prefix cache unused: {st:?}"
    );
    // The KV really went over this backend (the decode worker's transfer metrics).
    let d = &up.workers("decode")[0];
    let metrics = common::cluster::get(&format!("{}/metrics", d["http_url"].as_str().unwrap())).1;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        metrics.contains(&format!("backend=\"{backend}\"")),
        "{backend} not in decode metrics:\n{metrics}"
    );
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn disaggregated_equals_single_process_on_every_api_and_transport() {
    let Some(model) = real_model() else { return };
    let (ref_text, ref_ids) = reference(&model, PROMPT, &["--max-tokens", "24"]);
    assert_eq!(ref_ids.len(), 24);
    for b in backends() {
        check_cluster(&model, b, &ref_text, &ref_ids);
    }
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn sampled_output_finish_reasons_and_usage() {
    let Some(model) = real_model() else { return };
    let up = Up::start(&manifest("disaggregated", "auto", 1), &model);
    // Temperature > 0 with a seed: disaggregated equals single-process.
    let (ref_text, ref_ids) = reference(
        &model,
        PROMPT,
        &["--max-tokens", "32", "--temperature", "0.9", "--seed", "7"],
    );
    let (code, v, _) = up.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 32, "temperature": 0.9, "seed": 7}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], ref_text.as_str());
    assert_eq!(v["usage"]["completion_tokens"], ref_ids.len());
    // A stop string: the text ends before it, finish_reason stop.
    let (greedy, _) = reference(&model, PROMPT, &["--max-tokens", "24"]);
    let stop = greedy.split(' ').nth(2).unwrap().to_string();
    let (code, v, _) = up.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 24, "temperature": 0, "stop": [stop.clone()]}),
    );
    assert_eq!(code, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(text, &greedy[..greedy.find(&stop).unwrap()]);
    // End of sequence: a short answer ends by itself before max_tokens.
    let (eos_text, eos_ids) = reference(
        &model,
        "Reply with one word: hello.",
        &["--max-tokens", "200"],
    );
    assert!(
        eos_ids.len() < 200,
        "the reference did not stop: {eos_text}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let resp = rt.block_on(async {
        let mut c = pb::inference_client::InferenceClient::connect(up.grpc.clone())
            .await
            .unwrap();
        c.complete(pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Chat(pb::ChatInput {
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: "Reply with one word: hello.".into(),
                }],
            })),
            sampling: Some(pb::Sampling {
                max_tokens: Some(200),
                temperature: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(resp.text, eos_text);
    assert_eq!(resp.token_ids, eos_ids);
    assert_eq!(resp.finish_reason, pb::FinishReason::Eos as i32);
    assert_eq!(
        resp.usage.unwrap().completion_tokens as usize,
        eos_ids.len()
    );
    // ListModels.
    let models = rt.block_on(async {
        let mut c = pb::inference_client::InferenceClient::connect(up.grpc.clone())
            .await
            .unwrap();
        c.list_models(pb::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(models.models.len(), 1);
    assert!(models.models[0].context_length >= 2048);
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn sixteen_concurrent_streams_over_1p2d_match_their_references() {
    let Some(model) = real_model() else { return };
    let prompts: Vec<String> = (0..16)
        .map(|i| format!("Write one sentence about the number {i}."))
        .collect();
    // References from one in-process engine (same numerics as `xpyd generate`).
    let mut engine = xpyd_engine::Engine::load(xpyd_engine::EngineConfig::new(&model)).unwrap();
    let refs: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let toks = engine
                .tokenizer()
                .encode_chat(&[xpyd_engine::ChatMessage::new("user", p)])
                .unwrap();
            engine
                .generate(
                    i as u64,
                    toks,
                    xpyd_engine::SamplingParams::greedy(20),
                    &mut |_| {},
                )
                .unwrap()
                .text
        })
        .collect();
    drop(engine);
    let up = Up::start(&manifest("disaggregated", "auto", 2), &model);
    let url = format!("{}/v1/chat/completions", up.http);
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (url, p) = (url.clone(), p.clone());
            std::thread::spawn(move || {
                let body = json!({"messages": [{"role": "user", "content": p}], "max_tokens": 20, "temperature": 0, "stream": true});
                sse(&url, &body).0
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), refs[i], "request {i}");
    }
    let decode = up.workers("decode");
    assert_eq!(decode.len(), 2);
    for d in &decode {
        assert!(
            d["routed"].as_u64().unwrap() > 0,
            "decode worker unused: {d}"
        );
    }
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn an_openai_client_library_streams_a_chat_completion() {
    let Some(model) = real_model() else { return };
    let Some(python) = common::python_with("openai") else {
        return;
    };
    let (ref_text, _) = reference(&model, PROMPT, &["--max-tokens", "24"]);
    let up = Up::start(&manifest("disaggregated", "auto", 1), &model);
    let script = format!(
        r#"
import openai, sys
c = openai.OpenAI(base_url="{}/v1", api_key="unused")
s = c.chat.completions.create(model="{}", messages=[{{"role": "user", "content": sys.argv[1]}}],
    max_tokens=24, temperature=0, stream=True)
sys.stdout.write("".join(ch.choices[0].delta.content or "" for ch in s if ch.choices))
"#,
        up.http,
        up.cluster_model()
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script, PROMPT])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), ref_text);
}
