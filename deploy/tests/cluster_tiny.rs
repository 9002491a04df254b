//! Cluster behaviour on the tiny model (fast), with real processes from `xpyd up`:
//! routing policies against a live cluster, overload, SLO classes, cancellation freeing
//! every leg, bad inputs, lease expiry, restart of a killed worker and a clean Ctrl-C.

mod common;

use common::cluster::{
    Up, channel, eventually, post_raw, processes_of, sse, worker_pid, worker_pids,
};
use common::etcd::Etcd;
use common::tiny_model;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use xpyd_proto as pb;

fn manifest(name: &str, extra: &str, roles: &str) -> String {
    format!(
        "name: {name}\nmode: disaggregated\ncoordinator: {{ http_port: 0, grpc_port: 0 }}\n{extra}roles:\n{roles}"
    )
}

fn body(prompt: &str, max_tokens: u32) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

fn routed(up: &Up, role: &str) -> HashMap<String, u64> {
    up.workers(role)
        .iter()
        .map(|w| {
            (
                w["worker_id"].as_str().unwrap().to_string(),
                w["routed"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// One HTTP/1.1 POST from a chosen local address (127.0.0.x); returns the status.
fn post_from(src: &str, http: &str, path: &str, body: &Value) -> u16 {
    request_from(src, http, "POST", path, &body.to_string())
}

/// One HTTP/1.1 request from a chosen local address; returns the status.
fn request_from(src: &str, http: &str, method: &str, path: &str, body: &str) -> u16 {
    let addr: std::net::SocketAddr = http.trim_start_matches("http://").parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.split(' ').nth(1).unwrap().parse().unwrap()
    })
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn source_ip_hash_is_sticky_and_spreads() {
    let (_d, model) = tiny_model();
    let up = Up::start(
        &manifest(
            "iphash",
            "routing: { decode: source_ip_hash }\n",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 3 }\n",
        ),
        &model,
    );
    let mut home: HashMap<String, String> = HashMap::new();
    for ip in 2..=7 {
        let src = format!("127.0.0.{ip}");
        for _ in 0..3 {
            let before = routed(&up, "decode");
            assert_eq!(
                post_from(&src, &up.http, "/v1/completions", &body("hello", 2)),
                200
            );
            let after = routed(&up, "decode");
            let w: Vec<&String> = after.keys().filter(|k| after[*k] > before[*k]).collect();
            assert_eq!(w.len(), 1);
            let prev = home.entry(src.clone()).or_insert_with(|| w[0].clone());
            assert_eq!(prev, w[0], "{src} moved between workers");
        }
    }
    let distinct: std::collections::HashSet<&String> = home.values().collect();
    assert!(distinct.len() >= 2, "6 sources all on one worker: {home:?}");
    // Nothing failed, so nothing was re-sent: a two-token request whose decode leg
    // finishes before the prefill's answer arrives is not a failure.
    let resent = common::cluster::metric_sum(&up.http, "xpyd_coordinator_retries_total", "")
        + common::cluster::metric_sum(&up.http, "xpyd_coordinator_migrations_total", "");
    assert_eq!(resent, 0.0, "requests were re-sent on a healthy cluster");
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn least_connections_spreads_concurrent_requests() {
    let (_d, model) = tiny_model();
    let up = Up::start_env(
        &manifest(
            "leastconn",
            "routing: { decode: least_connections }\n",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 2 }\n",
        ),
        &model,
        "decode-0=20,decode-1=20",
    );
    // Slow steps keep each request in flight while the others arrive.
    let url = format!("{}/v1/completions", up.http);
    let hs: Vec<_> = (0..4)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                post_raw(&url, &body(&format!("request {i}"), 40).to_string(), None).0
            })
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), 200);
    }
    let r = routed(&up, "decode");
    assert_eq!(
        r.values().copied().collect::<Vec<_>>().iter().sum::<u64>(),
        4
    );
    assert!(
        r.values().all(|n| *n == 2),
        "least connections did not spread 4 concurrent requests: {r:?}"
    );
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn min_ttft_avoids_a_slow_prefill_worker() {
    let (_d, model) = tiny_model();
    let up = Up::start_env(
        &manifest(
            "minttft",
            "routing: { prefill: min_ttft }\n",
            "  prefill: { replicas: 2, prefill_chunk: 16 }\n  decode: { replicas: 1 }\n",
        ),
        &model,
        "prefill-1=150",
    );
    for i in 0..12 {
        let (code, v, _) = up.post(
            "/v1/completions",
            &body(&format!("{i} {}", "x".repeat(64)), 2),
        );
        assert_eq!(code, 200, "{v}");
    }
    let r = routed(&up, "prefill");
    assert!(
        r["prefill-1"] <= 3 && r["prefill-0"] >= 9,
        "min_ttft kept using the slow worker: {r:?}"
    );
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn overall_load_avoids_a_slow_decode_worker() {
    let (_d, model) = tiny_model();
    let up = Up::start_env(
        &manifest(
            "load",
            "routing: { decode: overall_load }\n",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 2 }\n",
        ),
        &model,
        "decode-1=60",
    );
    let url = format!("{}/v1/completions", up.http);
    let mut hs = vec![];
    for i in 0..12 {
        let url = url.clone();
        hs.push(std::thread::spawn(move || {
            post_raw(&url, &body(&format!("r{i}"), 12).to_string(), None).0
        }));
        std::thread::sleep(Duration::from_millis(120));
    }
    for h in hs {
        assert_eq!(h.join().unwrap(), 200);
    }
    let r = routed(&up, "decode");
    assert!(
        r["decode-0"] > r["decode-1"] + 2,
        "overall_load did not prefer the fast worker: {r:?}"
    );
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn slo_priority_serves_class_0_before_class_3_when_saturated() {
    let (_d, model) = tiny_model();
    let up = Up::start_env(
        &manifest(
            "slo",
            "routing: { decode: slo_priority }\n",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 1, max_running: 1 }\n",
        ),
        &model,
        "decode-0=30",
    );
    let url = format!("{}/v1/completions", up.http);
    let order = Arc::new(Mutex::new(Vec::new()));
    // The blocker holds the only slot while the others queue.
    let blocker = {
        let url = url.clone();
        std::thread::spawn(move || post_raw(&url, &body("blocker", 40).to_string(), None).0)
    };
    std::thread::sleep(Duration::from_millis(400));
    let mut hs = vec![];
    for (i, class) in [3, 3, 3, 0, 0, 0].into_iter().enumerate() {
        let (url, order) = (url.clone(), order.clone());
        hs.push(std::thread::spawn(move || {
            let prio = class.to_string();
            let code = post_raw(
                &url,
                &body(&format!("c{class} {i}"), 2).to_string(),
                Some(("x-xpyd-priority", &prio)),
            )
            .0;
            order.lock().unwrap().push(class);
            code
        }));
        std::thread::sleep(Duration::from_millis(60));
    }
    assert_eq!(blocker.join().unwrap(), 200);
    for h in hs {
        assert_eq!(h.join().unwrap(), 200);
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order, vec![0, 0, 0, 3, 3, 3], "completion order by class");
}

/// `n` requests released together (a barrier): their statuses and Retry-After values.
fn burst(url: &str, n: usize) -> Vec<(u16, Option<String>, Value)> {
    let go = Arc::new(std::sync::Barrier::new(n));
    let hs: Vec<_> = (0..n)
        .map(|i| {
            let (url, go) = (url.to_string(), go.clone());
            std::thread::spawn(move || {
                let b = body(&format!("burst {i}"), 2).to_string();
                go.wait();
                let (code, v, retry) = post_raw(&url, &b, None);
                (code, retry, v)
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Of a burst's answers: how many were 200, and that every other one is a 429 with
/// Retry-After and the OpenAI-style `rate_limit_exceeded` error.
fn admitted(answers: &[(u16, Option<String>, Value)]) -> usize {
    for (code, retry, v) in answers {
        match code {
            200 => {}
            429 => {
                assert!(
                    retry
                        .as_deref()
                        .is_some_and(|r| r.parse::<u64>().unwrap() >= 1)
                );
                assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    answers.iter().filter(|a| a.0 == 200).count()
}

/// A request whose `content-length` is over the limit, from a raw socket that sends its
/// head only: the status and the body of the answer.
fn post_oversized(http: &str, bytes: usize) -> (u16, Value) {
    use std::io::{Read, Write};
    let addr = http.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {bytes}\r\nconnection: close\r\n\r\n{{\"prompt\": \""
    );
    // Only the head: the limit is told from `content-length`, before the body is read.
    s.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    let code = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The service-level rate limit refuses exactly a burst's excess with 429 +
/// Retry-After; a body over the size limit gets 413; a denied address gets 403 before it
/// costs anything, and an address off the list is served.
#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn a_service_rate_limit_refuses_the_excess_and_size_and_access_limits_hold() {
    let (_d, model) = tiny_model();
    let up = Up::start(
        &manifest(
            "limits",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 2 }\n",
        )
        .replace(
            "grpc_port: 0 }",
            "grpc_port: 0, max_request_bytes: 1048576, rate_limit: { rps: 3 }, access: { deny: [127.0.0.3/32] } }",
        ),
        &model,
    );
    let url = format!("{}/v1/completions", up.http);
    // A burst of 7 against 3 per second: 3 served, exactly 4 refused.
    assert_eq!(admitted(&burst(&url, 7)), 3);
    std::thread::sleep(Duration::from_millis(1200));
    // Denied before the rate limit: three of them cost no token.
    for _ in 0..3 {
        assert_eq!(
            post_from("127.0.0.3", &up.http, "/v1/completions", &body("x", 2)),
            403
        );
    }
    assert_eq!(
        post_from("127.0.0.2", &up.http, "/v1/completions", &body("x", 2)),
        200
    );
    let (code, v) = post_oversized(&up.http, 2 << 20);
    assert_eq!(code, 413, "{v}");
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");
    // The probe path stays open to the denied address; the refusals are counted.
    assert_eq!(
        request_from("127.0.0.3", &up.http, "GET", "/health", ""),
        200
    );
    assert_eq!(
        request_from("127.0.0.3", &up.http, "GET", "/v1/models", ""),
        403
    );
    let refused = common::cluster::metric_sum(
        &up.http,
        "xpyd_coordinator_rejected_total",
        "reason=\"rate_limit\"",
    );
    assert_eq!(refused, 4.0);
}

/// The instance-level limit is `rps` per ready decode worker (2 here): a burst over it
/// is refused by exactly its excess, over HTTP and over gRPC (`RESOURCE_EXHAUSTED` with
/// `retry-after` metadata).
#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn an_instance_rate_limit_scales_with_ready_decode_workers_on_http_and_grpc() {
    let (_d, model) = tiny_model();
    let up = Up::start(
        &manifest(
            "limits-instance",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 2 }\n",
        )
        .replace(
            "grpc_port: 0 }",
            "grpc_port: 0, rate_limit: { rps: 2, scope: instance } }",
        ),
        &model,
    );
    let url = format!("{}/v1/completions", up.http);
    assert_eq!(
        admitted(&burst(&url, 7)),
        4,
        "2 per second × 2 decode workers"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let codes = rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(up.grpc.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let calls = (0..7).map(|i| {
            let mut c = pb::inference_client::InferenceClient::new(ch.clone());
            async move {
                c.complete(pb::GenerateRequest {
                    input: Some(pb::generate_request::Input::Prompt(format!("g{i}"))),
                    sampling: Some(pb::Sampling {
                        max_tokens: Some(2),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
            }
        });
        futures_join_all(calls).await
    });
    let mut ok = 0;
    for r in codes {
        match r {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                assert!(s.metadata().get("retry-after").is_some(), "{s:?}");
            }
        }
    }
    assert_eq!(ok, 4);
}

/// Runs futures at once and collects their outputs in order.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let hs: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in hs {
        out.push(h.await.unwrap());
    }
    out
}

/// `xpyd keys create` in the store under `state`: the secret it prints.
fn create_key(state: &Path, args: &[&str]) -> String {
    let out = common::xpyd()
        .args(["keys", "create"])
        .args(args)
        .env("XPYD_STATE_DIR", state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// With `auth: api_key`: the `openai` Python client with a valid key streams a chat; no
/// key or a wrong one gets 401, a key bound to another service 403 — on HTTP, WebSocket
/// and gRPC; operations endpoints want an admin key; `/health` stays open; and no secret
/// is written anywhere in the key store or any process's log.
#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn api_keys_gate_every_api_and_no_secret_is_written_anywhere() {
    let (_d, model) = tiny_model();
    let Some(python) = common::python_with("openai") else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let good = create_key(state.path(), &["--name", "good"]);
    let other = create_key(
        state.path(),
        &["--name", "other", "--services", "elsewhere"],
    );
    let admin = create_key(
        state.path(),
        &["--name", "ops", "--admin", "--services", "keyed"],
    );
    let log = state.path().join("up.log");
    let up = Up::start_logged(
        &manifest(
            "keyed",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
        )
        .replace("grpc_port: 0 }", "grpc_port: 0, auth: api_key }"),
        &model,
        &[("XPYD_STATE_DIR", state.path().to_str().unwrap())],
        &log,
    );
    let chat = format!("{}/v1/chat/completions", up.http);
    let b = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).to_string();
    let bearer = |k: &str| format!("Bearer {k}");
    let call = |k: Option<&str>| {
        let h = k.map(bearer);
        let (code, v, _) = post_raw(&chat, &b, h.as_deref().map(|h| ("authorization", h)));
        (code, v)
    };
    assert_eq!(call(Some(&good)).0, 200);
    assert_eq!(
        call(Some(&admin)).0,
        200,
        "an admin key bound here serves too"
    );
    for (what, key, want) in [
        ("no key", None, 401),
        (
            "a wrong key",
            Some(format!("{}0", &good[..good.len() - 1]).as_str()),
            401,
        ),
        ("a key of another service", Some(other.as_str()), 403),
    ] {
        let (code, v) = call(key);
        assert_eq!(code, want, "{what}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().len() > 10,
            "{what}: {v}"
        );
    }
    // Operations want an admin key; the probe path wants none.
    let get_with = |path: &str, k: Option<&str>| {
        let mut req = ureq::get(&format!("{}{path}", up.http))
            .config()
            .http_status_as_error(false)
            .build();
        if let Some(k) = k {
            req = req.header("authorization", bearer(k));
        }
        let resp = req.call().unwrap();
        let code = resp.status().as_u16();
        let v: Value = serde_json::from_str(&resp.into_body().read_to_string().unwrap())
            .unwrap_or(Value::Null);
        (code, v)
    };
    assert_eq!(get_with("/v1/cluster", Some(&good)).0, 403);
    assert_eq!(get_with("/v1/cluster", Some(&admin)).0, 200);
    assert_eq!(get_with("/metrics", None).0, 401);
    assert_eq!(get_with("/health", None).0, 200);
    let (code, models) = get_with("/v1/models", Some(&good));
    assert_eq!(code, 200);
    let model_id = models["data"][0]["id"].as_str().unwrap().to_string();
    // The official client: streams with the key, an AuthenticationError without.
    let script = format!(
        r#"
import openai, sys
def run(key):
    c = openai.OpenAI(base_url="{}/v1", api_key=key, max_retries=0)
    s = c.chat.completions.create(model="{}", messages=[{{"role": "user", "content": "hi"}}],
        max_tokens=4, temperature=0, stream=True)
    return "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
text = run(sys.argv[1])
try:
    run("xpyd-00000000-00")
    print("NO ERROR")
except openai.AuthenticationError:
    print("401 " + str(len(text) > 0))
"#,
        up.http, model_id
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script, &good])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "401 True");
    // WebSocket: the key on the upgrade request.
    let ws_url = format!("{}/v1/ws", up.http.replace("http://", "ws://"));
    let ws_with = |k: Option<&str>| {
        use tungstenite::client::IntoClientRequest;
        let mut req = ws_url.as_str().into_client_request().unwrap();
        if let Some(k) = k {
            req.headers_mut()
                .insert("authorization", bearer(k).parse().unwrap());
        }
        tungstenite::connect(req)
    };
    for (key, want) in [(None, 401), (Some(other.as_str()), 403)] {
        match ws_with(key) {
            Err(tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), want),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a WebSocket without a valid key was accepted"),
        }
    }
    let (mut ws, _) = ws_with(Some(&good)).unwrap();
    ws.send(tungstenite::Message::text(
        json!({"prompt": "ok", "max_tokens": 2}).to_string(),
    ))
    .unwrap();
    let mut last = Value::Null;
    while last["type"] != "done" {
        last = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
        assert_ne!(last["type"], "error", "{last}");
    }
    // gRPC: metadata `authorization`.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let grpc = |k: Option<String>| {
        let url = up.grpc.clone();
        rt.block_on(async move {
            let ch = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut req = tonic::Request::new(pb::GenerateRequest {
                input: Some(pb::generate_request::Input::Prompt("g".into())),
                sampling: Some(pb::Sampling {
                    max_tokens: Some(2),
                    ..Default::default()
                }),
                ..Default::default()
            });
            if let Some(k) = k {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {k}").parse().unwrap());
            }
            pb::inference_client::InferenceClient::new(ch)
                .complete(req)
                .await
                .map(|_| ())
        })
    };
    assert!(grpc(Some(good.clone())).is_ok());
    assert_eq!(grpc(None).unwrap_err().code(), tonic::Code::Unauthenticated);
    assert_eq!(
        grpc(Some(other.clone())).unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    // Last uses reach the store (written every few seconds), as names only.
    eventually(Duration::from_secs(15), "last use recorded", || {
        let out = common::xpyd()
            .args(["keys", "list", "--json"])
            .env("XPYD_STATE_DIR", state.path())
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .any(|k| k["name"] == "good" && k["last_used_unix"].is_u64())
    });
    drop(up);
    // No secret anywhere: not in the key store, not in any process's log.
    let mut files = vec![log.clone()];
    for e in std::fs::read_dir(state.path().join("keys")).unwrap() {
        files.push(e.unwrap().path());
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for secret in [&good, &other, &admin] {
            let tail = secret.rsplit('-').next().unwrap();
            assert!(!text.contains(tail), "{} holds a secret", f.display());
        }
    }
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn overload_gets_429_with_retry_after_and_the_rest_complete() {
    let (_d, model) = tiny_model();
    let up = Up::start_env(
        &manifest(
            "overload",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 1, max_running: 2 }\n",
        )
        .replace(
            "grpc_port: 0 }",
            "grpc_port: 0, max_queue: 2, queue_timeout_ms: 300 }",
        ),
        &model,
        "decode-0=20",
    );
    let url = format!("{}/v1/completions", up.http);
    let hs: Vec<_> = (0..10)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                post_raw(&url, &body(&format!("o{i}"), 30).to_string(), None)
            })
        })
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for h in hs {
        let (code, v, retry) = h.join().unwrap();
        match code {
            200 => {
                ok += 1;
                assert_eq!(v["usage"]["completion_tokens"], 30);
            }
            429 | 503 => {
                limited += 1;
                assert!(retry.is_some(), "no Retry-After on {code}");
                assert!(v["error"]["message"].as_str().unwrap().len() > 5);
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(ok >= 2 && limited >= 1, "ok {ok}, limited {limited}");
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn a_client_that_leaves_or_times_out_frees_every_leg() {
    let (_d, model) = tiny_model();
    let up = Up::start_env(
        &manifest(
            "cancel",
            "",
            "  prefill: { replicas: 1, prefill_chunk: 16 }\n  decode: { replicas: 1 }\n",
        )
        .replace("grpc_port: 0 }", "grpc_port: 0, first_token_timeout_s: 1 }"),
        &model,
        "prefill-0=150,decode-0=40",
    );
    let p = up.workers("prefill")[0].clone();
    let d = up.workers("decode")[0].clone();
    // 1. Mid-decode disconnect: read a few SSE events, then drop the connection.
    {
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        let resp = agent
            .post(&format!("{}/v1/completions", up.http))
            .header("content-type", "application/json")
            .send(
                json!({"prompt": "abc", "max_tokens": 500, "ignore_eos": true, "stream": true})
                    .to_string(),
            )
            .unwrap();
        let mut r = std::io::BufReader::new(resp.into_body().into_reader());
        let mut line = String::new();
        let mut events = 0;
        while events < 4 {
            line.clear();
            std::io::BufRead::read_line(&mut r, &mut line).unwrap();
            if line.starts_with("data: ") {
                events += 1;
            }
        }
        assert!(up.stats(&d).kv_blocks_used > 0);
    }
    eventually(
        Duration::from_secs(10),
        "decode KV back to zero after disconnect",
        || {
            let s = up.stats(&d);
            s.kv_blocks_used == 0 && s.requests_cancelled >= 1 && s.running == 0
        },
    );
    // 2. A first-token deadline passes during a long prefill: 504, the prefill stops early.
    let prompt = "y".repeat(400); // 25 chunks of 16 tokens at 150 ms each
    let chunks0 = up.stats(&p).prefill_chunks_total;
    let t0 = Instant::now();
    let (code, v, _) = up.post("/v1/completions", &body(&prompt, 5));
    assert_eq!(code, 504, "{v}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "deadline took {:?}",
        t0.elapsed()
    );
    eventually(
        Duration::from_secs(10),
        "prefill cancelled and decode KV freed",
        || {
            let (ps, ds) = (up.stats(&p), up.stats(&d));
            ps.requests_cancelled >= 1
                && ps.running == 0
                && ds.kv_blocks_used == 0
                && ds.kv_blocks_reserved == 0
        },
    );
    let computed = up.stats(&p).prefill_chunks_total - chunks0;
    assert!(
        computed < 20,
        "the prefill ran on after the deadline: {computed} of 25 chunks"
    );
    // The cluster still serves.
    let (code, _, _) = up.post("/v1/completions", &body("still here", 3));
    assert_eq!(code, 200);
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn bad_inputs_get_clear_errors_and_the_cluster_keeps_serving() {
    let (_d, model) = tiny_model();
    let up = Up::start(
        &manifest(
            "badin",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
        ),
        &model,
    );
    let chat = format!("{}/v1/chat/completions", up.http);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            "{\"messages\": [".into(),
            400,
            "invalid JSON",
        ),
        (
            "missing messages",
            json!({"max_tokens": 3}).to_string(),
            400,
            "messages",
        ),
        (
            "negative max_tokens",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}).to_string(),
            400,
            "max_tokens",
        ),
        (
            "temperature out of range",
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}).to_string(),
            400,
            "temperature",
        ),
        (
            "unknown model",
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
            404,
            "gpt-9",
        ),
        (
            "oversized prompt",
            json!({"messages": [{"role": "user", "content": "z".repeat(3000)}]}).to_string(),
            400,
            "context length",
        ),
        (
            "a prompt refused before it is tokenized",
            json!({"messages": [{"role": "user", "content": "z".repeat(5_000_000)}]}).to_string(),
            400,
            "bytes cannot fit",
        ),
        (
            "empty messages",
            json!({"messages": []}).to_string(),
            400,
            "messages",
        ),
    ];
    for (what, b, code, needle) in cases {
        let (got, v, _) = post_raw(&chat, &b, None);
        assert_eq!(got, code, "{what}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        let param = v["error"]["param"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle) || param == needle,
            "{what}: `{msg}` (param {param}) lacks `{needle}`"
        );
    }
    // gRPC: INVALID_ARGUMENT naming the field.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt.block_on(async {
        let mut c = pb::inference_client::InferenceClient::connect(up.grpc.clone())
            .await
            .unwrap();
        c.complete(pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Prompt("hi".into())),
            sampling: Some(pb::Sampling {
                temperature: Some(9.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err()
    });
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("temperature"), "{}", err.message());
    // WebSocket: an error frame, and the socket keeps working.
    let (mut ws, _) =
        tungstenite::connect(format!("{}/v1/ws", up.http.replace("http://", "ws://"))).unwrap();
    ws.send(tungstenite::Message::text("{not json")).unwrap();
    let v: Value = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(v["type"], "error");
    ws.send(tungstenite::Message::text(
        json!({"prompt": "ok", "max_tokens": 2, "temperature": 0}).to_string(),
    ))
    .unwrap();
    let mut kinds = vec![];
    while kinds.last() != Some(&"done".to_string()) {
        let v: Value = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
        kinds.push(v["type"].as_str().unwrap().to_string());
    }
    assert_eq!(kinds, ["delta", "delta", "done"]);
    // Still serving.
    let (_, chunks) = sse(
        &format!("{}/v1/completions", up.http),
        &json!({"prompt": "fine", "max_tokens": 3, "temperature": 0, "stream": true}),
    );
    assert_eq!(chunks.len(), 4, "3 tokens and the finish chunk");
    let (code, v, _) = up.post("/v1/completions", &body("fine", 3));
    assert_eq!(
        (code, v["usage"]["completion_tokens"].as_u64()),
        (200, Some(3))
    );
}

/// What one mock engine in this process answers to `prompt` (greedy).
fn mock_reference(model: &Path, prompt: &str, max_tokens: usize) -> String {
    let mut cfg = xpyd_engine::EngineConfig::new(model);
    cfg.num_blocks = Some(64);
    cfg.mock = Some(xpyd_engine::MockLatency::default());
    let mut e = xpyd_engine::Engine::load(cfg).unwrap();
    let p = e.tokenizer().encode(prompt).unwrap();
    let params = xpyd_engine::SamplingParams::greedy(max_tokens);
    e.generate(1, p, params, &mut |_| {}).unwrap().text
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn mock_engine_clusters_answer_deterministically_in_both_modes() {
    let (_d, model) = tiny_model();
    // 68 byte tokens: four full blocks for the prefill worker's prefix cache.
    let prompt = "The mock engine computes nothing, yet its KV still crosses the wire.";
    let want = mock_reference(&model, prompt, 8);
    // Each call's text, and the prompt tokens it reports cached (`usage.prompt_tokens_details`).
    let call = |up: &Up, sampling: Value| -> (String, u64) {
        let mut b = json!({"prompt": prompt, "max_tokens": 8});
        b.as_object_mut()
            .unwrap()
            .extend(sampling.as_object().unwrap().clone());
        let (code, v, _) = up.post("/v1/completions", &b);
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("no cached_tokens: {v}"));
        (
            v["choices"][0]["text"].as_str().unwrap().to_string(),
            cached,
        )
    };
    let complete = |up: &Up, sampling: Value| call(up, sampling).0;
    let pd = Up::start(
        &manifest(
            "mock-pd",
            "",
            "  prefill: { replicas: 1, engine: mock }\n  decode: { replicas: 1, engine: mock, mock_latency: { decode_base_us: 300, decode_per_seq_us: 100 } }\n",
        ),
        &model,
    );
    let (first, cached) = call(&pd, json!({"temperature": 0}));
    assert_eq!(
        first, want,
        "prefill → KV transfer → decode equals one mock engine"
    );
    assert_eq!(cached, 0, "nothing cached before the first call");
    assert_eq!(
        call(&pd, json!({"temperature": 0})),
        (first.clone(), 64),
        "the repeat reuses four 16-token blocks"
    );
    assert_eq!(
        complete(&pd, json!({"temperature": 1.2, "top_p": 0.9, "seed": 7})),
        first,
        "sampling cannot leave the mock's token"
    );
    let p = pd.stats(&pd.workers("prefill")[0]);
    assert_eq!(
        p.prefix_hit_tokens, 128,
        "the repeats hit the prefix cache: {p:?}"
    );
    pd.stop();
    let single = Up::start(
        "name: mock-single\nmode: single\ncoordinator: { http_port: 0, grpc_port: 0 }\nroles:\n  combined: { replicas: 1, engine: mock }\n",
        &model,
    );
    assert_eq!(call(&single, json!({"temperature": 0})), (want.clone(), 0));
    assert_eq!(
        call(&single, json!({"temperature": 0})),
        (want, 64),
        "combined workers report their prefix-cache hits too"
    );
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn invalid_manifest_fields_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, needle) in [
        (
            "name: x\nmode: disaggregated\nroles:\n  prefill: { replicas: 0 }\n  decode: { replicas: 1 }\n",
            "roles.prefill.replicas",
        ),
        (
            "name: x\nmode: single\nroles:\n  combined: { replicas: 1, thread: 2 }\n",
            "thread",
        ),
        (
            "name: x\nmode: disaggregated\nrouting: { decode: fastest }\nroles:\n  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
            "fastest",
        ),
    ] {
        let f = dir.path().join("bad.yaml");
        std::fs::write(&f, yaml).unwrap();
        let out = common::xpyd().args(["up", "-f"]).arg(&f).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn up_restarts_a_killed_worker_it_leaves_routing_in_time_and_ctrl_c_stops_all() {
    let (_d, model) = tiny_model();
    let up = Up::start(
        &manifest(
            "restart",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 2 }\n",
        ),
        &model,
    );
    let manifest = up.manifest.clone();
    let victim = worker_pids(&manifest, "decode", None);
    assert_eq!(victim.len(), 2, "{victim:?}");
    // Which worker the first pid is, and where it serves.
    let cmd = std::fs::read_to_string(format!("/proc/{}/cmdline", victim[0])).unwrap();
    let index = cmd
        .split('\0')
        .skip_while(|a| *a != "--index")
        .nth(1)
        .unwrap()
        .to_string();
    let id = format!("decode-{index}");
    let url = |up: &Up| {
        up.workers("decode")
            .iter()
            .find(|w| w["worker_id"] == id.as_str() && w["state"] == "ready")
            .map(|w| w["grpc_url"].as_str().unwrap().to_string())
    };
    let old_url = url(&up).unwrap();
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // It leaves routing within the lease TTL (2 s) plus one renewal (0.5 s) and a margin
    // (its replacement, once registered, has a new address).
    eventually(
        Duration::from_secs(10),
        "killed worker left routing",
        || url(&up).as_deref() != Some(old_url.as_str()),
    );
    assert!(
        t0.elapsed() < Duration::from_millis(3500),
        "left routing only after {:?}",
        t0.elapsed()
    );
    // …requests keep working meanwhile, and the supervisor brings it back.
    assert_eq!(up.post("/v1/completions", &body("during", 2)).0, 200);
    eventually(
        Duration::from_secs(60),
        "restarted worker back in routing",
        || {
            let pids = worker_pids(&manifest, "decode", None);
            pids.len() == 2
                && !pids.contains(&victim[0])
                && up
                    .workers("decode")
                    .iter()
                    .filter(|w| w["state"] == "ready")
                    .count()
                    == 2
        },
    );
    // A silent (frozen) worker leaves routing when its lease lapses: TTL 2 s + renewal.
    let other = if index == "0" { "decode-1" } else { "decode-0" };
    let pid = worker_pids(&manifest, "decode", None)
        .into_iter()
        .find(|p| {
            let c = std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default();
            c.split('\0').skip_while(|a| *a != "--index").nth(1) == other.strip_prefix("decode-")
        })
        .unwrap();
    let ready = |up: &Up| {
        up.workers("decode")
            .iter()
            .any(|w| w["worker_id"] == other && w["state"] == "ready")
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    let t0 = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    eventually(
        Duration::from_secs(10),
        "frozen worker left routing",
        || !ready(&up),
    );
    let gone = t0.elapsed();
    assert!(
        gone > Duration::from_millis(1500) && gone < Duration::from_millis(3500),
        "left after {gone:?}"
    );
    assert_eq!(up.post("/v1/completions", &body("while frozen", 2)).0, 200);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    eventually(Duration::from_secs(10), "thawed worker back", || ready(&up));
    let http_port: u16 = up.http.rsplit(':').next().unwrap().parse().unwrap();
    let st = up.stop();
    assert!(st.success(), "xpyd up exited with {st}");
    // No child process and no bound port left behind.
    let left = processes_of(&manifest);
    assert!(left.is_empty(), "processes left: {left}");
    std::net::TcpListener::bind(("127.0.0.1", http_port))
        .expect("the coordinator's port is free again");
}

/// With its membership in etcd, a cluster keeps its API keys there too: `xpyd keys -f`
/// writes them to etcd (nothing to the state directory), the running coordinator sees a
/// key created after it started, records its use there, and refuses it once unbound
/// from the service and deleted.
#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn api_keys_live_in_etcd_when_membership_does() {
    let Some(etcd) = Etcd::start() else { return };
    let (_d, model) = tiny_model();
    let state = tempfile::tempdir().unwrap();
    let yaml = manifest(
        "etcdkeys",
        &format!(
            "registry: {{ backend: etcd, endpoints: [\"{}\"], lease_ttl_ms: 2000, renew_interval_ms: 500 }}\n",
            etcd.url
        ),
        "  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
    )
    .replace("grpc_port: 0 }", "grpc_port: 0, auth: api_key }");
    let file = state.path().join("etcdkeys.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let keys = |args: &[&str]| {
        let out = common::xpyd()
            .arg("keys")
            .args(args)
            .arg("-f")
            .arg(&file)
            .env("XPYD_STATE_DIR", state.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "xpyd keys {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let up = Up::start_with(
        &yaml,
        &model,
        &[("XPYD_STATE_DIR", state.path().to_str().unwrap())],
    );
    let chat = format!("{}/v1/chat/completions", up.http);
    let b = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).to_string();
    let call = |k: &str| {
        let h = format!("Bearer {k}");
        post_raw(&chat, &b, Some(("authorization", h.as_str()))).0
    };
    // Created after the coordinator started, in etcd.
    let secret = keys(&["create", "--name", "late", "--services", "etcdkeys"]);
    eventually(Duration::from_secs(10), "the new key admitted", || {
        call(&secret) == 200
    });
    assert_eq!(call("xpyd-00000000-00"), 401);
    // The records are in etcd, hashed; nothing went to the state directory's store.
    assert!(!state.path().join("keys").exists(), "a key store on disk");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stored = rt.block_on(async {
        let mut c = etcd_client::Client::connect([etcd.url.clone()], None)
            .await
            .unwrap();
        let got = c
            .get(
                "/xpyd/keys/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        got.kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_string(), kv.value().to_vec()))
            .collect::<Vec<_>>()
    });
    let names: Vec<&str> = stored.iter().map(|(k, _)| k.as_str()).collect();
    assert!(names.contains(&"/xpyd/keys/records"), "{names:?}");
    assert!(names.contains(&"/xpyd/keys/hash_key"), "{names:?}");
    for (k, v) in &stored {
        assert!(
            !String::from_utf8_lossy(v).contains(&secret[14..]),
            "the secret is stored in {k}"
        );
    }
    // Its use is recorded there (the coordinator writes every 5 s).
    eventually(Duration::from_secs(15), "last use recorded", || {
        let list: Value = serde_json::from_str(&keys(&["list", "--json"])).unwrap();
        list[0]["last_used_unix"].is_u64()
    });
    // Unbound from this service: 403; bound to another only, then deleted: 401.
    keys(&["bind", "--names", "late", "--services", "other"]);
    keys(&["unbind", "--names", "late", "--services", "etcdkeys"]);
    eventually(Duration::from_secs(10), "the unbound key refused", || {
        call(&secret) == 403
    });
    keys(&["unbind", "--names", "late", "--services", "other"]);
    keys(&["delete", "--name", "late"]);
    eventually(Duration::from_secs(10), "the deleted key refused", || {
        call(&secret) == 401
    });
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn etcd_membership_a_silent_worker_leaves_routing_within_its_lease() {
    let Some(etcd) = Etcd::start() else { return };
    let (_d, model) = tiny_model();
    let yaml = manifest(
        "etcdtest",
        &format!(
            "registry: {{ backend: etcd, endpoints: [\"{}\"], lease_ttl_ms: 2000, renew_interval_ms: 500 }}\n",
            etcd.url
        ),
        "  prefill: { replicas: 1 }\n  decode: { replicas: 2 }\n",
    );
    let up = Up::start(&yaml, &model);
    assert_eq!(up.workers("decode").len(), 2);
    assert_eq!(up.post("/v1/completions", &body("via etcd", 3)).0, 200);
    // Anyone who can write to etcd can put a record there, but the coordinator takes only
    // those signed with the cluster's key: a stranger's worker never joins.
    let forged = xpyd_runtime::WorkerRecord::new(
        &pb::WorkerInfo {
            worker_id: "evil-0".into(),
            role: "decode".into(),
            grpc_url: "http://127.0.0.1:9".into(),
            http_url: "http://127.0.0.1:9".into(),
            model_fingerprint: "x".into(),
            max_running: 8,
        },
        &pb::Load::default(),
    )
    .sign(Some(&xpyd_runtime::plane::ClusterKey::from_token(
        "not-this-cluster-0123",
    )));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut c = etcd_client::Client::connect([etcd.url.as_str()], None)
                .await
                .unwrap();
            c.put(
                "/xpyd/etcdtest/workers/evil-0",
                serde_json::to_string(&forged).unwrap(),
                None,
            )
            .await
            .unwrap();
        });
    std::thread::sleep(Duration::from_millis(500));
    let ids: Vec<Value> = up.cluster()["workers"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 3, "the forged record joined: {ids:?}");
    let pids = worker_pids(&up.manifest, "decode", None);
    let cmd = std::fs::read_to_string(format!("/proc/{}/cmdline", pids[0])).unwrap();
    let index = cmd
        .split('\0')
        .skip_while(|a| *a != "--index")
        .nth(1)
        .unwrap()
        .to_string();
    let id = format!("decode-{index}");
    let url_of = |up: &Up| {
        up.workers("decode")
            .iter()
            .find(|w| w["worker_id"] == id.as_str())
            .map(|w| w["grpc_url"].as_str().unwrap().to_string())
    };
    assert!(url_of(&up).is_some());
    // Freeze it (SIGSTOP): alive, so the supervisor does not replace it, but silent.
    let pid = nix::unistd::Pid::from_raw(pids[0]);
    let t0 = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    eventually(
        Duration::from_secs(10),
        "frozen worker left routing (etcd lease)",
        || url_of(&up).is_none(),
    );
    let gone = t0.elapsed();
    // etcd expires a 2 s lease after 2–3 s (its lease checks run on the leader's tick).
    assert!(
        gone > Duration::from_millis(1500) && gone < Duration::from_millis(4500),
        "left routing after {gone:?}"
    );
    assert_eq!(
        up.post("/v1/completions", &body("still via etcd", 3)).0,
        200
    );
    // Thawed, it finds its lease gone and registers again.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    eventually(
        Duration::from_secs(10),
        "thawed worker registered again",
        || url_of(&up).is_some(),
    );
}

/// Prefix-cache hit ratio over the prefill workers after a run of repeated prefixes.
fn prefix_run(policy: &str, model: &Path) -> (f64, Vec<u64>) {
    let up = Up::start(
        &manifest(
            &format!("prefix-{}", policy.replace('_', "-")),
            &format!("routing: {{ prefill: {policy} }}\n"),
            "  prefill: { replicas: 2 }\n  decode: { replicas: 1 }\n",
        ),
        model,
    );
    // Three 160-token prefixes, four rounds, a fresh suffix each time.
    for round in 0..4 {
        for p in 0..3 {
            let prefix: String = (0..160)
                .map(|i| (b'a' + ((i * 7 + p * 5) % 26) as u8) as char)
                .collect();
            let (code, v, _) = up.post(
                "/v1/completions",
                &body(&format!("{prefix} round {round}"), 2),
            );
            assert_eq!(code, 200, "{v}");
        }
    }
    let (mut hit, mut looked) = (0, 0);
    let mut per_worker = vec![];
    for w in up.workers("prefill") {
        let s = up.stats(&w);
        hit += s.prefix_hit_tokens;
        looked += s.prefix_lookup_tokens;
        per_worker.push(s.prefix_hit_tokens);
    }
    (hit as f64 / looked as f64, per_worker)
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn prefix_aware_routing_hits_the_prefix_cache_more_than_round_robin() {
    let (_d, model) = tiny_model();
    let (aware, aware_w) = prefix_run("prefix_aware", &model);
    let (rr, rr_w) = prefix_run("round_robin", &model);
    // Each prefix after its first request is 160 of ~169 tokens cached (9 of 12 requests).
    assert!(
        aware > 0.6,
        "prefix_aware hit ratio {aware:.2} ({aware_w:?})"
    );
    assert!(
        aware > rr + 0.15,
        "prefix_aware {aware:.2} vs round_robin {rr:.2} ({aware_w:?} / {rr_w:?})"
    );
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn a_dead_prefill_worker_costs_a_retry_not_a_failed_request() {
    let (_d, model) = tiny_model();
    let up = Up::start(
        &manifest(
            "retry",
            "routing: { prefill: round_robin }\n",
            "  prefill: { replicas: 2 }\n  decode: { replicas: 1 }\n",
        ),
        &model,
    );
    // Frozen, not killed: the process stays, so the supervisor sees no exit and cannot
    // take it out of routing first (with SIGKILL it sometimes did, before the first
    // request — no retry, a flaky test). Until its lease lapses the frozen worker is
    // still routed to; the channel's keepalive finds it dead and the requests fail over.
    let pid = nix::unistd::Pid::from_raw(worker_pids(&up.manifest, "prefill", None)[0]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    for i in 0..6 {
        let (code, v, _) = up.post("/v1/completions", &body(&format!("after the crash {i}"), 3));
        assert_eq!(code, 200, "request {i}: {v}");
    }
    let retries = common::cluster::metric_sum(&up.http, "xpyd_coordinator_retries_total", "");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(retries >= 1.0, "no retry recorded");
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn requests_arriving_while_the_only_prefill_worker_is_rebuilt_wait_for_it() {
    let (_d, model) = tiny_model();
    let up = Up::start(
        &manifest(
            "sole",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
        ),
        &model,
    );
    let pid = worker_pid(&up.manifest, "prefill", 0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The first request finds the worker dead (and marks it down); the next ones arrive,
    // 150 ms apart, while no prefill worker is ready: they wait for the rebuilt one and
    // none fails.
    let answers: Vec<(u16, serde_json::Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                std::thread::sleep(Duration::from_millis(150));
                let up = &up;
                s.spawn(move || {
                    let (code, v, _) =
                        up.post("/v1/completions", &body(&format!("while rebuilt {i}"), 3));
                    (code, v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (code, v)) in answers.iter().enumerate() {
        assert_eq!(*code, 200, "request {i}: {v}");
    }
    assert_ne!(worker_pid(&up.manifest, "prefill", 0), pid, "not rebuilt");
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn grpc_health_reflection_status_and_chat_cli() {
    let (_d, model) = tiny_model();
    let up = Up::start(
        &manifest(
            "meta",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
        ),
        &model,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut urls = vec![
        (up.grpc.clone(), String::new()),
        (up.internal.clone(), String::new()),
    ];
    urls.extend(up.cluster()["workers"].as_array().unwrap().iter().map(|w| {
        (
            w["grpc_url"].as_str().unwrap().to_string(),
            w["role"].as_str().unwrap().to_string(),
        )
    }));
    for (url, role) in urls {
        rt.block_on(async {
            let ch = tonic::transport::Endpoint::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
            let st = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                st.status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "{url}"
            );
            // Reflection lists exactly what this port serves, over v1 and v1alpha.
            let mut names = reflection_v1(ch.clone()).await;
            names.sort();
            let mut alpha = reflection_v1alpha(ch).await;
            alpha.sort();
            assert_eq!(names, alpha, "{url}: v1 and v1alpha differ");
            let own: Vec<&String> = names.iter().filter(|n| n.starts_with("xpyd.v1.")).collect();
            // A worker port carries both worker services (a worker can flip role); gRPC
            // health says which one serves now.
            // The public port serves inference only; the registry is on the internal plane.
            let coordinator = url == up.grpc || url == up.internal;
            let expected: &[&str] = if url == up.grpc {
                &["xpyd.v1.Inference"]
            } else if url == up.internal {
                &["xpyd.v1.Registry"]
            } else {
                &["xpyd.v1.DecodeWorker", "xpyd.v1.PrefillWorker"]
            };
            assert_eq!(own, expected, "{url}: {names:?}");
            if !coordinator {
                let mut h = tonic_health::pb::health_client::HealthClient::new(
                    tonic::transport::Endpoint::from_shared(url.clone())
                        .unwrap()
                        .connect()
                        .await
                        .unwrap(),
                );
                for (service, serves) in [
                    ("xpyd.v1.PrefillWorker", role == "prefill"),
                    ("xpyd.v1.DecodeWorker", role == "decode"),
                ] {
                    let st = h
                        .check(tonic_health::pb::HealthCheckRequest {
                            service: service.into(),
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .status;
                    let want = if serves {
                        tonic_health::pb::health_check_response::ServingStatus::Serving
                    } else {
                        tonic_health::pb::health_check_response::ServingStatus::NotServing
                    };
                    assert_eq!(st, want as i32, "{url} ({role}): {service}");
                }
            }
            for std in [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ] {
                assert!(names.iter().any(|n| n == std), "{url}: {names:?}");
            }
        });
        python_reflection_lists(&url);
    }
    // `xpyd status` shows the topology; `xpyd chat` streams an answer.
    let out = common::xpyd()
        .args(["status", "--url", &up.http])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("prefill-0")
            && text.contains("decode-0")
            && text.contains("ready"),
        "{text}"
    );
    let out = common::xpyd()
        .args([
            "chat",
            "--url",
            &up.http,
            "--prompt",
            "hi",
            "--max-tokens",
            "3",
            "--temperature",
            "0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, v, _) = up.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}));
    assert_eq!(code, 200);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{}\n",
            v["choices"][0]["message"]["content"].as_str().unwrap()
        )
    );
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn worker_cancel_rpcs_stop_a_prefill_and_free_a_decode_reservation() {
    let (_d, model) = tiny_model();
    let up = Up::start_env(
        &manifest(
            "cancelrpc",
            "",
            "  prefill: { replicas: 1, prefill_chunk: 16 }\n  decode: { replicas: 1 }\n",
        ),
        &model,
        "prefill-0=100",
    );
    let (p, d) = (
        up.workers("prefill")[0].clone(),
        up.workers("decode")[0].clone(),
    );
    let (purl, durl) = (
        p["grpc_url"].as_str().unwrap().to_string(),
        d["grpc_url"].as_str().unwrap().to_string(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use pb::decode_worker_client::DecodeWorkerClient;
        use pb::prefill_worker_client::PrefillWorkerClient;
        let mut dc = DecodeWorkerClient::with_interceptor(channel(&durl).await, up.badge());
        let mut pc = PrefillWorkerClient::with_interceptor(channel(&purl).await, up.badge());
        // Acting as the coordinator: reserve on the decode worker, prefill against it.
        let req = pb::DecodeRequest {
            request_id: 4242,
            prompt_tokens: 320,
            max_tokens: 4,
            backend: "tcp".into(),
            transfer_deadline_ms: 30_000,
        };
        let mut stream = dc.decode(req).await.unwrap().into_inner();
        let Some(pb::decode_event::Event::Reserved(r)) =
            stream.message().await.unwrap().unwrap().event
        else {
            panic!("no reservation")
        };
        let preq = pb::PrefillRequest {
            request_id: 4242,
            tokens: (0..320).map(|i| 3 + i % 200).collect(),
            sampling: Some(pb::EngineSampling {
                top_p: 1.0,
                max_tokens: 4,
                ..Default::default()
            }),
            target_json: r.target_json,
            target_mac: r.target_mac,
            prompt_len: 0,
        };
        let mut pc2 = pc.clone();
        let prefill = tokio::spawn(async move { pc2.prefill(preq).await });
        tokio::time::sleep(Duration::from_millis(400)).await;
        let found = pc
            .cancel(pb::CancelRequest { request_id: 4242 })
            .await
            .unwrap()
            .into_inner()
            .found;
        assert!(found, "the prefill was not running");
        let err = prefill.await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Cancelled, "{err}");
        let st = pc.stats(pb::StatsRequest {}).await.unwrap().into_inner();
        assert!(st.prefill_chunks_total < 20, "prefill ran on: {st:?}");
        // The decode side saw the transfer end and failed the request; Cancel finds nothing left.
        assert!(stream.message().await.is_err());
        let again = pc
            .cancel(pb::CancelRequest { request_id: 4242 })
            .await
            .unwrap()
            .into_inner()
            .found;
        assert!(!again);
        let t0 = std::time::Instant::now();
        loop {
            let ds = dc.stats(pb::StatsRequest {}).await.unwrap().into_inner();
            if (ds.kv_blocks_used, ds.kv_blocks_reserved) == (0, 0) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "decode KV still held: {ds:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let found = dc
            .cancel(pb::CancelRequest { request_id: 4242 })
            .await
            .unwrap()
            .into_inner()
            .found;
        assert!(!found, "the decode reservation was still held");
    });
}

/// The service names a reflection service lists, through tonic-reflection's own client
/// of that version (`v1` or `v1alpha`).
macro_rules! reflection_list {
    ($name:ident, $version:ident) => {
        async fn $name(ch: tonic::transport::Channel) -> Vec<String> {
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut resp = ServerReflectionClient::new(ch)
                .server_reflection_info(tokio_stream::iter(vec![req]))
                .await
                .unwrap()
                .into_inner();
            match resp.message().await.unwrap().unwrap().message_response {
                Some(MessageResponse::ListServicesResponse(l)) => {
                    l.service.into_iter().map(|s| s.name).collect()
                }
                other => panic!("no service list: {other:?}"),
            }
        }
    };
}
reflection_list!(reflection_v1, v1);
reflection_list!(reflection_v1alpha, v1alpha);

/// Python's `grpcio-reflection` (a v1alpha client) lists the port's services and
/// resolves each of its own to their file descriptor.
fn python_reflection_lists(url: &str) {
    let Some(python) =
        common::python_with("grpc_reflection.v1alpha.proto_reflection_descriptor_database")
    else {
        return;
    };
    let script = r#"
import sys, grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(sys.argv[1]))
names = sorted(db.get_services())
own = [n for n in names if n.startswith("xpyd.v1.")]
assert own, names
for n in own:
    assert db.FindFileContainingSymbol(n).name.endswith("xpyd.proto"), n
print(" ".join(names))
"#;
    let out = std::process::Command::new(&python)
        .args(["-c", script, url.trim_start_matches("http://")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("grpc.health.v1.Health"), "{url}: {listed}");
}

/// Fuzz target over the public APIs of a live cluster: request bodies built from the
/// OpenAI fields with values of any type and size, WebSocket frames of any text, and
/// gRPC requests with any numbers. Every call gets an answer — a result or a clear 4xx /
/// `INVALID_ARGUMENT`-class error, never a 5xx, an internal error or a dropped
/// connection — and the cluster serves an ordinary request afterwards.
/// `PROPTEST_CASES` sets the cases per API (`scripts/fuzz.sh` runs many).
#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn fuzzed_requests_on_every_public_api_get_answers_not_failures() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let (_d, model) = tiny_model();
    let up = Up::start(
        &manifest(
            "fuzz",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
        ),
        &model,
    );
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(48);
    let value = || {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-3.0f64..3.0).prop_map(Value::from),
            prop_oneof![Just(1e308), Just(-1e308), Just(0.0)].prop_map(Value::from),
            "\\PC{0,40}".prop_map(Value::from),
            Just(Value::from("<|im_start|>system\n")),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("role|content|x", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    };
    const FIELDS: &[&str] = &[
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "ignore_eos",
        "n",
        "priority",
        "stream",
        "stream_options",
    ];
    let bodies = proptest::collection::btree_map(proptest::sample::select(FIELDS), value(), 0..8)
        .prop_map(|m| {
            // A valid request with some fields replaced, so both the checks and the
            // serving path behind them are reached.
            let mut o = json!({"messages": [{"role": "user", "content": "hi"}],
                "prompt": "hi", "max_tokens": 2});
            for (k, v) in m {
                o[k] = v;
            }
            // Keep generation short when a request is valid.
            if o["max_tokens"].as_i64().is_none_or(|n| n > 8) {
                o["max_tokens"] = json!(2);
            }
            o
        });
    // A fresh runner for each target: a runner counts its cases across runs.
    let runner = || {
        TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        })
    };
    let served = std::cell::Cell::new(0);
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let url = format!("{}{path}", up.http);
        runner()
            .run(&bodies, |b| {
                let r =
                    common::cluster::try_post_raw(&url, &b.to_string(), Duration::from_secs(60));
                let (code, v) = r.map_err(|e| TestCaseError::fail(format!("{b}: {e}")))?;
                prop_assert!(
                    code == 200 || (400..500).contains(&code),
                    "{path} {b}: {code} {v}"
                );
                served.set(served.get() + u32::from(code == 200));
                Ok(())
            })
            .unwrap();
    }
    eprintln!(
        "fuzzed HTTP: {} of {} requests served",
        served.get(),
        2 * cases
    );
    assert!(
        served.get() > 0,
        "no fuzzed request reached the serving path"
    );
    // WebSocket: any text frame gets an error frame or a whole answer, on one socket.
    let (ws, _) =
        tungstenite::connect(format!("{}/v1/ws", up.http.replace("http://", "ws://"))).unwrap();
    let ws = std::cell::RefCell::new(ws);
    let frame = prop_oneof![bodies.prop_map(|b| b.to_string()), "\\PC{0,200}"];
    runner()
        .run(&frame, |text| {
            let mut ws = ws.borrow_mut();
            ws.send(tungstenite::Message::text(text.clone())).unwrap();
            loop {
                let m = ws
                    .read()
                    .map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
                let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
                match v["type"].as_str() {
                    Some("delta") => continue,
                    Some("done") => break,
                    Some("error") => {
                        let code = v["error"]["code"].as_str().unwrap_or("");
                        prop_assert!(
                            !matches!(code, "internal_error" | "server_error"),
                            "{text}: {v}"
                        );
                        break;
                    }
                    _ => return Err(TestCaseError::fail(format!("{text}: {v}"))),
                }
            }
            Ok(())
        })
        .unwrap();
    // gRPC: any numbers in the sampling fields.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(up.grpc.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        pb::inference_client::InferenceClient::new(ch)
    });
    let req = (
        "\\PC{0,60}",
        proptest::option::of(0u32..5),
        proptest::option::of(any::<f32>()),
        proptest::option::of(any::<f32>()),
        proptest::option::of(any::<u32>()),
        proptest::collection::vec("\\PC{0,6}", 0..3),
        proptest::option::of(any::<u32>()),
        "\\PC{0,10}",
    );
    runner()
        .run(
            &req,
            |(prompt, max_tokens, temperature, top_p, top_k, stop, priority, model)| {
                let r = pb::GenerateRequest {
                    model,
                    input: Some(pb::generate_request::Input::Prompt(prompt)),
                    sampling: Some(pb::Sampling {
                        max_tokens,
                        temperature,
                        top_p,
                        top_k,
                        stop,
                        ..Default::default()
                    }),
                    priority,
                };
                match rt.block_on(client.clone().complete(r)) {
                    Ok(_) => {}
                    Err(s) => prop_assert!(
                        matches!(
                            s.code(),
                            tonic::Code::InvalidArgument | tonic::Code::NotFound
                        ),
                        "{s:?}"
                    ),
                }
                Ok(())
            },
        )
        .unwrap();
    let (code, _, _) = up.post("/v1/completions", &body("still here", 3));
    assert_eq!(code, 200);
}

/// The internal plane trusts no stranger. The public gRPC port serves no registry; the
/// internal port refuses a registration without the cluster's credential (or with
/// another cluster's), and one that would take a live worker's id from another address;
/// random lease ids renew nothing; worker ports refuse calls without the credential,
/// and a prefill worker refuses a target its cluster's decode worker did not sign, or
/// one changed after signing; a worker's `POST /role` needs the credential. Through all
/// of it the cluster serves, and its request ids are random.
#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn the_internal_plane_refuses_strangers_and_forged_targets() {
    use pb::decode_worker_client::DecodeWorkerClient;
    use pb::prefill_worker_client::PrefillWorkerClient;
    use pb::registry_client::RegistryClient;
    use tonic::Code;
    use xpyd_runtime::plane::{Badge, ClusterKey};
    let (_d, model) = tiny_model();
    let up = Up::start(
        &manifest(
            "closed",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
        ),
        &model,
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&up.token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the token file is the owner's only");
    let (p, d) = (
        up.workers("prefill")[0].clone(),
        up.workers("decode")[0].clone(),
    );
    let url = |w: &Value| w["grpc_url"].as_str().unwrap().to_string();
    let (purl, durl) = (url(&p), url(&d));
    let stranger = Badge::new(Some(&ClusterKey::from_token("not-this-cluster-0123")));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fake = |id: &str| pb::RegisterRequest {
            worker: Some(pb::WorkerInfo {
                worker_id: id.into(),
                role: "decode".into(),
                grpc_url: "http://127.0.0.1:9".into(),
                http_url: "http://127.0.0.1:9".into(),
                model_fingerprint: "x".into(),
                max_running: 8,
            }),
            ttl_ms: 60_000,
        };
        // 1. The public port has no registry.
        let e = RegistryClient::new(channel(&up.grpc).await)
            .register(fake("evil-0"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "{e}");
        // 2. The internal port: no credential, another cluster's, then a member taking a
        //    live worker's id from elsewhere.
        let internal = channel(&up.internal).await;
        let e = RegistryClient::new(internal.clone())
            .register(fake("evil-0"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        let e = RegistryClient::with_interceptor(internal.clone(), stranger.clone())
            .register(fake("evil-0"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        let mut member = RegistryClient::with_interceptor(internal.clone(), up.badge());
        let e = member.register(fake("decode-0")).await.unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e}");
        assert!(e.message().contains(&durl), "{e}");
        for guess in [1u64, 2, 3, 1 << 32] {
            let hb = pb::HeartbeatRequest {
                lease_id: guess,
                load: None,
            };
            assert!(!member.heartbeat(hb).await.unwrap().into_inner().ok);
            member
                .deregister(pb::DeregisterRequest { lease_id: guess })
                .await
                .unwrap();
        }
        // 3. Worker ports: nothing without the credential.
        let (dch, pch) = (channel(&durl).await, channel(&purl).await);
        let dreq = |id: u64| pb::DecodeRequest {
            request_id: id,
            prompt_tokens: 8,
            max_tokens: 2,
            backend: "tcp".into(),
            transfer_deadline_ms: 10_000,
        };
        for badge in [Badge::new(None), stranger.clone()] {
            let mut dc = DecodeWorkerClient::with_interceptor(dch.clone(), badge.clone());
            let e = dc.decode(dreq(1)).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{e}");
            let e = dc
                .cancel(pb::CancelRequest { request_id: 1 })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{e}");
            let e = PrefillWorkerClient::with_interceptor(pch.clone(), badge)
                .stats(pb::StatsRequest {})
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        }
        // 4. A member's prefill with a target the decode worker did not sign as given.
        let mut dc = DecodeWorkerClient::with_interceptor(dch.clone(), up.badge());
        let mut pc = PrefillWorkerClient::with_interceptor(pch.clone(), up.badge());
        let mut stream = dc.decode(dreq(77)).await.unwrap().into_inner();
        let Some(pb::decode_event::Event::Reserved(r)) =
            stream.message().await.unwrap().unwrap().event
        else {
            panic!("no reservation")
        };
        assert_eq!(r.target_mac.len(), 32, "the target is signed");
        let mut redirected: Value = serde_json::from_slice(&r.target_json).unwrap();
        redirected["addr"] = json!("127.0.0.1:9");
        let preq = |target_json: Vec<u8>, target_mac: Vec<u8>| pb::PrefillRequest {
            request_id: 77,
            tokens: (0..8).map(|i| 3 + i).collect(),
            sampling: Some(pb::EngineSampling {
                top_p: 1.0,
                max_tokens: 2,
                ..Default::default()
            }),
            target_json,
            target_mac,
            prompt_len: 0,
        };
        let mut flipped = r.target_mac.clone();
        flipped[0] ^= 1;
        for (what, req) in [
            ("unsigned", preq(r.target_json.clone(), Vec::new())),
            ("bad signature", preq(r.target_json.clone(), flipped)),
            (
                "changed after signing",
                preq(
                    serde_json::to_vec(&redirected).unwrap(),
                    r.target_mac.clone(),
                ),
            ),
        ] {
            let e = pc.prefill(req).await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e}");
            assert!(e.message().contains("target"), "{what}: {e}");
        }
        // The signed target as issued works.
        let first = pc
            .prefill(preq(r.target_json.clone(), r.target_mac.clone()))
            .await
            .unwrap()
            .into_inner();
        assert!(first.first.is_some());
        drop(stream);
    });
    // 5. A worker's role change needs the credential.
    let role_url = format!("{}/role", d["http_url"].as_str().unwrap());
    let (code, refused, _) = post_raw(&role_url, r#"{"role":"prefill"}"#, None);
    assert_eq!(code, 401, "{refused}");
    let (code, refused, _) = post_raw(
        &role_url,
        r#"{"role":"prefill"}"#,
        Some(("x-xpyd-cluster", "00ff")),
    );
    assert_eq!(code, 401, "{refused}");
    assert_eq!(up.workers("decode").len(), 1, "still a decode worker");
    // 6. No stranger joined; the cluster serves; ids are not a sequence.
    let ids: Vec<String> = up.cluster()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.iter().all(|i| !i.starts_with("evil")), "{ids:?}");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (code, v, _) = up.post("/v1/completions", &body("hello", 2));
        assert_eq!(code, 200, "{v}");
        seen.push(v["id"].as_str().unwrap().to_string());
    }
    let num = |s: &str| u64::from_str_radix(s.rsplit('-').next().unwrap(), 16).unwrap();
    let gap = num(&seen[0]).abs_diff(num(&seen[1]));
    assert!(gap > 1 << 20, "consecutive ids {seen:?} look sequential");
}

/// Fuzz target over the worker services, called as a member of the cluster would (so
/// past the credential): `Decode` reservations of any size and backend, `Generate` on a
/// worker that is not combined, `Prefill` with any token ids, sampling, resume length and
/// a signed target of any content (ids, epochs, tickets, addresses, placements in a
/// segment that does not exist), and `Cancel` of any id. Every call ends within its
/// deadline with a status, no worker process dies or restarts, and the cluster serves an
/// ordinary request afterwards. `PROPTEST_CASES` sets the cases.
#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn fuzzed_member_calls_on_worker_ports_hurt_no_worker() {
    use pb::decode_worker_client::DecodeWorkerClient;
    use pb::prefill_worker_client::PrefillWorkerClient;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let (_d, model) = tiny_model();
    let up = Up::start(
        &manifest(
            "wfuzz",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
        ),
        &model,
    );
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(32);
    let pids = worker_pids(&up.manifest, "prefill", None)
        .into_iter()
        .chain(worker_pids(&up.manifest, "decode", None))
        .collect::<Vec<_>>();
    let key = xpyd_runtime::plane::ClusterKey::load(&up.token_file).unwrap();
    let url = |role: &str| {
        up.workers(role)[0]["grpc_url"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (dc, pc) = rt.block_on(async {
        (
            DecodeWorkerClient::with_interceptor(channel(&url("decode")).await, up.badge()),
            PrefillWorkerClient::with_interceptor(channel(&url("prefill")).await, up.badge()),
        )
    });
    // A fresh runner for each target: a runner counts its cases across runs.
    let runner = || {
        TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        })
    };
    // Mostly valid numbers, so calls get past the checks; sometimes any.
    let sampling = (
        prop_oneof![3 => 0.0f32..2.0, 1 => any::<f32>()],
        prop_oneof![3 => Just(1.0f32), 1 => any::<f32>()],
        prop_oneof![3 => 0u32..50, 1 => any::<u32>()],
        prop_oneof![3 => 1u32..40, 1 => Just(0u32)],
        any::<bool>(),
        (
            any::<bool>(),
            prop_oneof![3 => 0u32..=21, 1 => any::<u32>()],
            any::<bool>(),
        ),
    )
        .prop_map(
            |(temperature, top_p, top_k, max_tokens, ignore_eos, (logprobs, top, prompt))| {
                pb::EngineSampling {
                    temperature,
                    top_p,
                    top_k,
                    seed: 7,
                    max_tokens,
                    stop: vec!["\n".into()],
                    ignore_eos,
                    logprobs,
                    top_logprobs: top,
                    prompt_logprobs: prompt,
                }
            },
        );
    // Decode and Generate: any numbers, any backend name.
    let decode = (
        any::<u64>(),
        prop_oneof![Just(0u32), 1u32..600, Just(u32::MAX)],
        prop_oneof![Just(0u32), 1u32..64, Just(u32::MAX)],
        prop_oneof![
            Just("tcp"),
            Just("shm"),
            Just("auto"),
            Just("nccl"),
            Just("??")
        ],
        0u32..2000,
        proptest::collection::vec(any::<u32>(), 0..40),
        sampling.clone(),
    );
    runner()
        .run(
            &decode,
            |(id, prompt, max, backend, deadline, tokens, s)| {
                let req = pb::DecodeRequest {
                    request_id: id,
                    prompt_tokens: prompt,
                    max_tokens: max,
                    backend: backend.into(),
                    transfer_deadline_ms: deadline,
                };
                if let Ok(r) = rt.block_on(dc.clone().decode(req)) {
                    // Take the reservation (or its refusal), then let it go.
                    let _ = rt.block_on(r.into_inner().message());
                }
                let local = pb::LocalGenerateRequest {
                    request_id: id,
                    tokens,
                    sampling: Some(s),
                    prompt_len: prompt % 50,
                };
                let e = rt.block_on(dc.clone().generate(local)).err();
                prop_assert!(e.is_some(), "a decode worker does not prefill");
                Ok(())
            },
        )
        .unwrap();
    // Prefill: any tokens and resume length, a target signed as a member would but with
    // any content.
    let target = (
        any::<u64>(),
        any::<u64>(),
        prop_oneof![Just(String::new()), "[0-9a-f]{32}", "\\PC{0,40}"],
        prop_oneof![
            Just("127.0.0.1:9".to_string()),
            Just("nowhere:1".to_string()),
            "\\PC{0,20}"
        ],
        proptest::option::of((
            1u32..64,
            0u64..1 << 20,
            proptest::collection::vec(any::<u32>(), 0..6),
        )),
        prop_oneof![Just("tcp"), Just("shm"), Just("auto")],
    )
        .prop_map(|(transfer_id, epoch, ticket, addr, placement, backend)| {
            let mut t = json!({
                "backend": backend, "addr": addr, "host_id": "x", "transfer_id": transfer_id,
                "epoch": epoch, "ticket": ticket, "shm": null,
                "deadline_unix_ms": 4_000_000_000_000u64,
            });
            if let Some((block_size, row_bytes, blocks)) = placement {
                t["placement"] = json!({
                    "path": "/dev/shm/xpyd-fuzz-absent", "len": 1 << 20,
                    "block_size": block_size, "row_bytes": row_bytes,
                    "pools": [[0, 0]], "blocks": blocks,
                });
            }
            t.to_string().into_bytes()
        });
    let prefill = (
        any::<u64>(),
        proptest::collection::vec(prop_oneof![20 => 3u32..200, 1 => any::<u32>()], 0..64),
        sampling,
        prop_oneof![3 => Just(0u32), 1 => 0u32..80],
        prop_oneof![4 => target, 1 => proptest::collection::vec(any::<u8>(), 0..64)],
    );
    let codes = std::cell::RefCell::new(std::collections::BTreeMap::new());
    runner()
        .run(&prefill, |(id, tokens, s, prompt_len, target_json)| {
            let req = pb::PrefillRequest {
                request_id: id,
                tokens,
                sampling: Some(s),
                target_mac: key.sign(xpyd_runtime::plane::TARGET, &target_json),
                target_json,
                prompt_len,
            };
            let t0 = Instant::now();
            let r = rt.block_on(pc.clone().prefill(req));
            prop_assert!(t0.elapsed() < Duration::from_secs(20));
            let (code, kind) = match &r {
                Ok(_) => (tonic::Code::Ok, None),
                Err(s) => (s.code(), pb::WorkerError::kind_of(s)),
            };
            prop_assert!(code != tonic::Code::Unknown, "{r:?}");
            *codes
                .borrow_mut()
                .entry(format!("{kind:?}/{code:?}"))
                .or_insert(0u32) += 1;
            let c = rt.block_on(pc.clone().cancel(pb::CancelRequest { request_id: id }));
            prop_assert!(c.is_ok(), "{c:?}");
            Ok(())
        })
        .unwrap();
    // Some calls got past the worker's checks into the transfer, which then refused them
    // (a ticket or address it cannot use) or failed (no such receiver). Which of those
    // the random cases hit varies from run to run; that some got that far does not.
    let codes = codes.into_inner();
    eprintln!("fuzzed Prefill answers (kind/code): {codes:?}");
    assert!(
        codes.keys().any(|k| k.starts_with("Some(Transfer)/")),
        "no fuzzed prefill reached a transfer: {codes:?}"
    );
    // And a well-formed target whose receiver is not there fails that one call as
    // unavailable, the answer the coordinator retries elsewhere.
    let dead = json!({
        "backend": "tcp", "addr": "127.0.0.1:9", "host_id": "x", "transfer_id": 1,
        "epoch": 1, "ticket": "00112233445566778899aabbccddeeff", "shm": null,
        "deadline_unix_ms": 4_000_000_000_000u64,
    })
    .to_string()
    .into_bytes();
    let r = rt.block_on(pc.clone().prefill(pb::PrefillRequest {
        request_id: 99,
        tokens: vec![5, 6, 7],
        sampling: Some(pb::EngineSampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 7,
            max_tokens: 4,
            ..Default::default()
        }),
        target_mac: key.sign(xpyd_runtime::plane::TARGET, &dead),
        target_json: dead,
        prompt_len: 0,
    }));
    let e = r.expect_err("no receiver listens on port 9");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert_eq!(
        pb::WorkerError::kind_of(&e),
        Some(pb::worker_error::Kind::Transfer)
    );
    let now = worker_pids(&up.manifest, "prefill", None)
        .into_iter()
        .chain(worker_pids(&up.manifest, "decode", None))
        .collect::<Vec<_>>();
    assert_eq!(now, pids, "a worker died or was rebuilt");
    let (code, v, _) = up.post("/v1/completions", &body("still here", 3));
    assert_eq!(code, 200, "{v}");
}

/// `XPYD_LOG_FORMAT=json`: every line every process of a cluster writes on the shared
/// stderr — the supervisor's notices, the coordinator's and each worker's logs — is one
/// JSON object carrying its level, the writer's role and worker id, and its message;
/// with the default text format, lines start with the writer's tag, and neither format
/// colours a stderr that is not a terminal.
#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn json_logs_parse_line_by_line_and_say_who_wrote_them() {
    let (d, model) = tiny_model();
    let yaml = manifest(
        "logs",
        "",
        "  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
    );
    let run = |format: &str| {
        let log = d.path().join(format!("{format}.log"));
        let env = [("XPYD_LOG_FORMAT", format), ("XPYD_LOG", "info")];
        let up = Up::start_logged(&yaml, &model, &env, &log);
        assert_eq!(up.post("/v1/completions", &body("hello", 3)).0, 200);
        assert!(up.stop().success());
        std::fs::read_to_string(&log).unwrap()
    };
    let text = run("json");
    let mut writers = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for field in ["ts", "level", "role", "target", "message"] {
            assert!(v[field].is_string(), "no `{field}`: {line}");
        }
        let role = v["role"].as_str().unwrap().to_string();
        match role.as_str() {
            "prefill" | "decode" => {
                assert!(
                    v["worker_id"]
                        .as_str()
                        .is_some_and(|id| id.starts_with(&format!("{role}-"))),
                    "{line}"
                );
            }
            _ => assert!(v["worker_id"].is_null(), "{line}"),
        }
        writers.insert(v["worker_id"].as_str().unwrap_or(&role).to_string());
    }
    for w in ["supervisor", "coordinator", "prefill-0", "decode-0"] {
        assert!(writers.contains(w), "no line from {w}: {writers:?}");
    }
    assert!(!text.contains('\x1b'), "colour on a file");
    let text = run("text");
    for tag in ["[coordinator] ", "[prefill-0] ", "[decode-0] "] {
        assert!(
            text.lines().any(|l| l.starts_with(tag)),
            "no {tag}line:\n{text}"
        );
    }
    assert!(!text.contains('\x1b'), "colour on a file");
}

/// The samples of a Prometheus exposition: (name, labels, value).
fn samples(text: &str) -> Vec<(String, HashMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (head, value) = l.rsplit_once(' ')?;
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (head, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some((name.to_string(), labels, value.parse().ok()?))
        })
        .collect()
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn the_managed_products_metric_names_are_exported_and_agree_with_xpyds() {
    let (d, model) = tiny_model();
    // The advisor on (a profile of the simulator's form), for its gauges.
    let profile = d.path().join("profile.json");
    std::fs::write(
        &profile,
        common::profile_with([0.004, 0.0004, 0.0], [0.01, 0.001, 0.0, 0.0]).to_string(),
    )
    .unwrap();
    let advisor = format!(
        "advisor: {{ enabled: true, window_s: 5, profile: {} }}\n",
        profile.display()
    );
    // Decode steps slowed (50 ms) so a request can be caught in flight.
    let up = Up::start_env(
        &manifest(
            "compat",
            &advisor,
            "  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
        ),
        &model,
        "decode-0=50",
    );
    let url = format!("{}/v1/completions", up.http);
    let metrics_url = format!("{}/metrics", up.http);
    // The advisor advises on windows of at least 10 requests: bursts of 12 until its
    // gauges are there.
    let mut served = 0;
    eventually(Duration::from_secs(60), "the advisor's gauges", || {
        served += std::thread::scope(|sc| {
            let calls: Vec<_> = (0..12)
                .map(|i| {
                    let url = &url;
                    sc.spawn(move || {
                        post_raw(url, &body(&format!("burst {i}"), 2).to_string(), None).0
                    })
                })
                .collect();
            calls
                .into_iter()
                .map(|c| c.join().unwrap())
                .filter(|code| *code == 200)
                .count()
        });
        std::thread::sleep(Duration::from_secs(6));
        let (_, t) = common::cluster::get(&metrics_url);
        t.as_str().unwrap().contains("xpyd_advisor_replicas")
    });
    for i in 0..6 {
        let (code, v, _) = post_raw(&url, &body(&format!("count {i}"), 6).to_string(), None);
        assert_eq!(code, 200, "{v}");
    }
    assert_eq!(post_raw(&url, "{not json", None).0, 400);
    // A request in flight is one connection.
    let connections = || {
        let (_, t) = common::cluster::get(&metrics_url);
        samples(t.as_str().unwrap())
            .into_iter()
            .find(|(n, _, _)| n == "infer_service_request_connect_count")
            .map_or(f64::NAN, |s| s.2)
    };
    std::thread::scope(|sc| {
        let slow = sc.spawn(|| post_raw(&url, &body("long one", 60).to_string(), None).0);
        eventually(Duration::from_secs(10), "one connection counted", || {
            connections() == 1.0
        });
        assert_eq!(slow.join().unwrap(), 200);
    });
    // The min/avg/max gauges and the role gauges are refreshed once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let (code, text) = common::cluster::get(&metrics_url);
    assert_eq!(code, 200);
    let text = text.as_str().unwrap().to_string();
    let s = samples(&text);
    let one = |name: &str, want: &[(&str, &str)]| -> f64 {
        let found: Vec<f64> = s
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert_eq!(found.len(), 1, "{name} {want:?} in:\n{text}");
        found[0]
    };
    let instance = up.http.trim_start_matches("http://").to_string();
    let id = [
        ("service_name", "compat"),
        ("group_id", "compat"),
        ("instance_name", instance.as_str()),
    ];
    let names = [
        "infer_service_request_total",
        "infer_service_request_connect_count",
        "infer_service_token_count",
        "infer_service_first_token_avg_cost",
        "infer_service_first_token_min_cost",
        "infer_service_first_token_max_cost",
        "infer_service_per_token_avg_cost",
        "infer_service_per_token_min_cost",
        "infer_service_per_token_max_cost",
        "infer_service_token_latency_avg_cost",
        "infer_service_token_latency_min_cost",
        "infer_service_token_latency_max_cost",
        "infer_service_request_cost_count",
        "infer_service_first_token_cost_count",
        "infer_service_per_token_cost_count",
        "infer_service_input_token_quantity_count",
        "infer_service_output_token_quantity_count",
    ];
    for name in names {
        assert!(
            s.iter().any(|(n, l, _)| n == name
                && id
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))),
            "{name} with {id:?} in:\n{text}"
        );
    }
    let path = ("path", "/v1/completions");
    assert_eq!(
        one(
            "infer_service_request_total",
            &[("code", "200"), ("method", "POST"), path]
        ),
        (served + 7) as f64
    );
    assert_eq!(
        one(
            "infer_service_request_total",
            &[("code", "400"), ("method", "POST"), path]
        ),
        1.0
    );
    // The same measurements as xpyd's own histograms: counts equal, sums ×1000.
    for (ms, secs) in [
        (
            "infer_service_first_token_cost",
            "xpyd_coordinator_ttft_seconds",
        ),
        (
            "infer_service_per_token_cost",
            "xpyd_coordinator_tpot_seconds",
        ),
        ("infer_service_request_cost", "xpyd_coordinator_e2e_seconds"),
    ] {
        let (c_ms, c_s) = (
            one(&format!("{ms}_count"), &id),
            one(&format!("{secs}_count"), &[]),
        );
        assert_eq!(c_ms, c_s, "{ms} vs {secs}");
        assert!(c_ms >= 7.0, "{ms}: {c_ms}");
        let (s_ms, s_s) = (
            one(&format!("{ms}_sum"), &id),
            one(&format!("{secs}_sum"), &[]),
        );
        assert!(
            ((s_ms / 1e3) - s_s).abs() <= 1e-9 * s_s.max(1.0),
            "{ms} {s_ms} vs {secs} {s_s}"
        );
    }
    for (q, t) in [
        (
            "infer_service_input_token_quantity",
            "xpyd_coordinator_input_tokens",
        ),
        (
            "infer_service_output_token_quantity",
            "xpyd_coordinator_output_tokens",
        ),
    ] {
        assert_eq!(
            one(&format!("{q}_count"), &id),
            one(&format!("{t}_count"), &[])
        );
        assert_eq!(one(&format!("{q}_sum"), &id), one(&format!("{t}_sum"), &[]));
    }
    assert_eq!(
        one("infer_service_token_count", &id),
        one("xpyd_coordinator_output_tokens_sum", &[]),
    );
    assert_eq!(one("infer_service_request_connect_count", &id), 0.0);
    // The window's min/avg/max (every request above is in it) against xpyd's histograms:
    // the averages are the histograms' means (ms); token latency is e2e / output tokens
    // per request, so the ratio of the sums lies within its min and max.
    let mean = |h: &str| one(&format!("{h}_sum"), &[]) / one(&format!("{h}_count"), &[]) * 1e3;
    let e2e_per_token = one("xpyd_coordinator_e2e_seconds_sum", &[]) * 1e3
        / one("xpyd_coordinator_output_tokens_sum", &[]);
    for (amm, want) in [
        ("first_token", Some(mean("xpyd_coordinator_ttft_seconds"))),
        ("per_token", Some(mean("xpyd_coordinator_tpot_seconds"))),
        ("token_latency", None),
    ] {
        let (lo, avg, hi) = (
            one(&format!("infer_service_{amm}_min_cost"), &id),
            one(&format!("infer_service_{amm}_avg_cost"), &id),
            one(&format!("infer_service_{amm}_max_cost"), &id),
        );
        assert!(0.0 < lo && lo <= avg && avg <= hi, "{amm}: {lo} {avg} {hi}");
        match want {
            Some(w) => assert!((avg - w).abs() <= 1e-6 * w, "{amm}: {avg} vs {w}"),
            None => assert!(
                lo <= e2e_per_token && e2e_per_token <= hi,
                "{amm}: {lo} {e2e_per_token} {hi}"
            ),
        }
    }
    // PD metrics: KV moved on the one link (bytes, seconds), role gauges, this process.
    let link = [("source", "prefill-0"), ("target", "decode-0")];
    assert!(one("xpyd_coordinator_kv_transfer_bytes_total", &link) > 0.0);
    assert!(one("xpyd_coordinator_kv_transfer_microseconds_total", &link) > 0.0);
    assert_eq!(
        one("xpyd_coordinator_kv_transfer_seconds_count", &link),
        one("xpyd_coordinator_ttft_seconds_count", &[]),
        "one transfer per request"
    );
    let backend = s
        .iter()
        .find(|(n, _, _)| n == "xpyd_coordinator_kv_transfer_bytes_total")
        .and_then(|(_, l, _)| l.get("backend").cloned())
        .unwrap_or_default();
    assert!(
        ["tcp", "shm"].contains(&backend.as_str()),
        "backend `{backend}`"
    );
    assert!(
        one(
            "xpyd_role_kv_blocks",
            &[("role", "decode"), ("state", "free")]
        ) > 0.0
    );
    assert_eq!(one("xpyd_role_queue_depth", &[("role", "prefill")]), 0.0);
    assert!(one("process_resident_memory_bytes", &[]) > 1e6);
    assert!(one("process_cpu_seconds_total", &[]) > 0.0);
    // And on a worker.
    let w = &up.workers("decode")[0];
    let (_, wtext) = common::cluster::get(&format!("{}/metrics", w["http_url"].as_str().unwrap()));
    let ws = samples(wtext.as_str().unwrap());
    assert!(
        ws.iter()
            .any(|(n, _, v)| n == "process_resident_memory_bytes" && *v > 1e6),
        "{wtext}"
    );
    // Every series the Grafana dashboard queries is on a live /metrics (the coordinator's
    // or a worker's) — but migrations, which appear with the first one.
    let mut live: std::collections::HashSet<String> =
        s.iter().chain(&ws).map(|(n, _, _)| n.clone()).collect();
    let w = &up.workers("prefill")[0];
    let (_, ptext) = common::cluster::get(&format!("{}/metrics", w["http_url"].as_str().unwrap()));
    live.extend(
        samples(ptext.as_str().unwrap())
            .into_iter()
            .map(|(n, _, _)| n),
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/xpyd.json")).unwrap(),
    )
    .unwrap();
    let mut missing = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                let ours = ["xpyd_", "infer_service_", "process_"]
                    .iter()
                    .any(|p| word.starts_with(p));
                if ours && word != "xpyd_coordinator_migrations_total" && !live.contains(word) {
                    missing.push(word.to_string());
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "Grafana queries series no process exports: {missing:?}"
    );
}

/// The reference logprobs of `prompt` and its greedy continuation of `n` tokens, from an
/// engine in this process: (prompt tokens, generated tokens, logprob of every token
/// after the first given the ones before it).
fn reference_logprobs(model: &Path, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut e = xpyd_engine::Engine::load(xpyd_engine::EngineConfig::new(model)).unwrap();
    let generated = e
        .generate(
            1,
            prompt.to_vec(),
            xpyd_engine::SamplingParams {
                ignore_eos: true,
                ..xpyd_engine::SamplingParams::greedy(n)
            },
            &mut |_| {},
        )
        .unwrap()
        .tokens;
    let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
    let lps = (1..all.len())
        .map(|i| {
            let logits = e.next_logits(&all[..i]).unwrap();
            xpyd_engine::sampling::logprobs(&logits, all[i], 0).logprob
        })
        .collect();
    (generated, lps)
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn logprobs_are_the_models_on_every_api_and_bad_requests_name_the_field() {
    let (_d, model) = tiny_model();
    let up = Up::start(
        &manifest(
            "logprobs",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
        ),
        &model,
    );
    let info = xpyd_engine::ModelInfo::load(&model).unwrap();
    let close = |got: &Value, want: f32| {
        let g = got
            .as_f64()
            .unwrap_or_else(|| panic!("not a number: {got}"));
        assert!((g - want as f64).abs() < 1e-5, "{g} vs {want}");
    };

    // Completions with echo: the prompt's tokens (the first unscored) and the completion's,
    // each with the model's own logprob; alternatives best first with the chosen one.
    let text = "hello world";
    let ptoks = info.tokenizer.encode(text).unwrap();
    let (generated, want) = reference_logprobs(&model, &ptoks, 5);
    let (code, v, _) = up.post(
        "/v1/completions",
        &json!({"prompt": text, "max_tokens": 5, "temperature": 0, "ignore_eos": true,
                "logprobs": 3, "echo": true}),
    );
    assert_eq!(code, 200, "{v}");
    let c = &v["choices"][0];
    assert!(c["text"].as_str().unwrap().starts_with(text), "{c}");
    let lp = &c["logprobs"];
    let n = ptoks.len() + generated.len();
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[key].as_array().unwrap().len(), n, "{key}: {lp}");
    }
    assert!(lp["token_logprobs"][0].is_null());
    for (i, w) in want.iter().enumerate() {
        close(&lp["token_logprobs"][i + 1], *w);
        let top = lp["top_logprobs"][i + 1].as_object().unwrap();
        // Up to 3 alternatives and the chosen token, keyed by text (texts may collide).
        assert!((1..=4).contains(&top.len()), "{top:?}");
        assert!(top.contains_key(lp["tokens"][i + 1].as_str().unwrap()));
    }
    let gen_text: String = generated
        .iter()
        .map(|t| info.tokenizer.token_piece(*t).0)
        .collect();
    let shown: String = lp["tokens"].as_array().unwrap()[ptoks.len()..]
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(shown, gen_text);

    // Chat, streamed: one content entry per token, the greedy token the best alternative.
    let (_, chunks) = sse(
        &format!("{}/v1/chat/completions", up.http),
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                "temperature": 0, "ignore_eos": true, "stream": true,
                "logprobs": true, "top_logprobs": 2}),
    );
    let entries: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"].get("content").is_some())
        .map(|c| &c["choices"][0]["logprobs"]["content"])
        .collect();
    assert_eq!(entries.len(), 6);
    for e in entries {
        let [e] = e.as_array().unwrap().as_slice() else {
            panic!("one entry per chunk: {e}")
        };
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(e["token"], top[0]["token"], "greedy picks the best");
        assert_eq!(e["logprob"], top[0]["logprob"]);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
        assert!(e["bytes"].is_array());
    }
    let (code, v, _) = up.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(code, 200);
    assert!(v["choices"][0]["logprobs"].is_null(), "none unless asked");

    // gRPC: ids and texts, the prompt's on request.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = pb::inference_client::InferenceClient::new(channel(&up.grpc).await);
        let req = |sampling: pb::Sampling| pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Prompt(text.into())),
            sampling: Some(sampling),
            ..Default::default()
        };
        let r = c
            .complete(req(pb::Sampling {
                max_tokens: Some(5),
                temperature: Some(0.0),
                ignore_eos: true,
                logprobs: true,
                top_logprobs: Some(1),
                prompt_logprobs: true,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.token_ids, generated);
        assert_eq!(r.prompt_logprobs.len(), ptoks.len() - 1);
        let all: Vec<&pb::TokenLogprob> = r.prompt_logprobs.iter().chain(&r.logprobs).collect();
        assert_eq!(all.len(), want.len());
        for ((l, w), id) in all
            .iter()
            .zip(&want)
            .zip(ptoks[1..].iter().chain(&generated))
        {
            assert_eq!(l.id, *id);
            assert!((l.logprob - w).abs() < 1e-5);
            assert_eq!(l.token, info.tokenizer.token_piece(*id).0);
            assert_eq!(l.top.len(), 1);
        }
        for (s, field) in [
            (
                pb::Sampling {
                    logprobs: true,
                    top_logprobs: Some(21),
                    ..Default::default()
                },
                "top_logprobs",
            ),
            (
                pb::Sampling {
                    prompt_logprobs: true,
                    ..Default::default()
                },
                "prompt_logprobs",
            ),
        ] {
            let e = c.complete(req(s)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(field), "{}", e.message());
        }
    });

    // Out of bounds or in the other API's form: 400 naming the field.
    let msgs = json!([{"role": "user", "content": "hi"}]);
    for (path, body, param) in [
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "top_logprobs": -1, "logprobs": true}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "logprobs": 3}),
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "logprobs": 21}),
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "logprobs": true}),
            "logprobs",
        ),
    ] {
        let (code, v, _) = up.post(path, &body);
        assert_eq!(code, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let (code, _, _) = up.post("/v1/completions", &body("still serving", 3));
    assert_eq!(code, 200);
    drop(up);

    // A combined worker gives the same numbers.
    let single = Up::start(
        "name: logprobs-single\nmode: single\ncoordinator: { http_port: 0, grpc_port: 0 }\nroles:\n  combined: { replicas: 1 }\n",
        &model,
    );
    let (code, v, _) = single.post(
        "/v1/completions",
        &json!({"prompt": text, "max_tokens": 5, "temperature": 0, "ignore_eos": true,
                "logprobs": 0, "echo": true}),
    );
    assert_eq!(code, 200, "{v}");
    let got = v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(got.len(), want.len() + 1);
    for (g, w) in got[1..].iter().zip(&want) {
        close(g, *w);
    }
}

/// `xpyd up --parent-pid P` (what a program that starts clusters passes): when P dies —
/// here a shell killed with SIGKILL, as a bench killed mid-run — the cluster stops as on
/// SIGTERM and leaves no process behind.
#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn up_stops_the_cluster_when_its_parent_dies() {
    let (d, model) = tiny_model();
    let file = d.path().join("orphan.yaml");
    std::fs::write(
        &file,
        manifest(
            "orphan",
            "",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
        ),
    )
    .unwrap();
    // The shell names itself the parent, starts the cluster and waits on it.
    let out = d.path().join("up.out");
    let mut shell = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' up -f '{}' --model '{}' --parent-pid $$ >'{}' 2>&1; sleep 600",
            env!("CARGO_BIN_EXE_xpyd"),
            file.display(),
            model.display(),
            out.display()
        ))
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(60), "the cluster ready", || {
        std::fs::read_to_string(&out).is_ok_and(|o| o.lines().any(|l| l == "ready"))
    });
    assert_eq!(worker_pids(&file, "prefill", None).len(), 1);
    assert_eq!(worker_pids(&file, "decode", None).len(), 1);
    shell.kill().unwrap();
    shell.wait().unwrap();
    eventually(
        Duration::from_secs(30),
        "no process of the cluster left",
        || processes_of(&file).is_empty(),
    );
    let said = std::fs::read_to_string(&out).unwrap();
    assert!(said.contains("is gone; stopping"), "{said}");
}
