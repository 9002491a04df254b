//! KV transfers between separate processes (`xpyd kv-harness`): faults and the
//! prefill → transfer → decode path with the engine on both sides.

mod common;

use common::{real_model, tiny_model, xpyd};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Stdio};
use std::time::{Duration, Instant};

/// Backends built into the binary under test.
fn backends() -> Vec<&'static str> {
    let mut b = vec!["tcp", "shm"];
    if cfg!(feature = "ucx") {
        b.push("ucx");
    }
    b
}

struct Recv {
    child: Child,
    out: BufReader<ChildStdout>,
    target: String,
}

impl Recv {
    fn start(args: &[&str]) -> Recv {
        let mut child = xpyd()
            .args(["kv-harness", "recv"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let target = json_line(&mut out);
        assert!(target.starts_with('{'), "recv printed {target:?}");
        Recv {
            child,
            out,
            target: target.trim().to_string(),
        }
    }

    fn result(mut self) -> Value {
        let line = json_line(&mut self.out);
        let _ = self.child.wait();
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }
}

/// The next line that is JSON (UCX logs to stdout too), or "" at the end.
fn json_line(out: &mut BufReader<ChildStdout>) -> String {
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 || line.starts_with('{') {
            return line;
        }
    }
}

fn send(target: &str, args: &[&str]) -> Child {
    xpyd()
        .args(["kv-harness", "send", "--target", target])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn output(child: Child) -> (bool, Value) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // UCX logs to stdout (e.g. an endpoint timeout at exit): take the last JSON line.
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("{}");
    (
        out.status.success(),
        serde_json::from_str(line).unwrap_or(Value::Null),
    )
}

#[test]
fn synthetic_transfer_between_processes_is_byte_exact() {
    // shm writes straight into the receiver's (scattered) KV blocks; `--staged` is the
    // copy through a staging region.
    let mut cases: Vec<(&str, bool)> = backends().into_iter().map(|b| (b, false)).collect();
    cases.push(("shm", true));
    for (backend, staged) in cases {
        let mut args = vec![
            "--backend",
            backend,
            "--bytes",
            "3072000",
            "--chunk",
            "65536",
        ];
        if staged {
            args.push("--staged");
        }
        let r = Recv::start(&args);
        let target: Value = serde_json::from_str(&r.target).unwrap();
        assert_eq!(
            target["placement"].is_object(),
            backend == "shm" && !staged,
            "{backend}: {target}"
        );
        let (ok, s) = output(send(&r.target, &["--bytes", "3072000", "--chunk", "65536"]));
        let res = r.result();
        assert!(ok && res["ok"] == true, "{backend}: {s} / {res}");
        assert_eq!(res["backend"], backend);
        assert_eq!(
            res["xxh3"], s["xxh3"],
            "{backend}: receiver's bytes differ from the sender's"
        );
        assert_eq!(res["active_after"], 0);
    }
}

#[test]
fn killed_sender_fails_the_receiver_within_the_deadline_and_frees() {
    for backend in backends() {
        let r = Recv::start(&[
            "--backend",
            backend,
            "--bytes",
            "10240000",
            "--chunk",
            "102400",
            "--deadline-ms",
            "8000",
        ]);
        let mut s = send(
            &r.target,
            &[
                "--bytes",
                "10240000",
                "--chunk",
                "102400",
                "--pace-ms",
                "20",
            ],
        );
        std::thread::sleep(Duration::from_millis(400));
        let t0 = Instant::now();
        s.kill().unwrap(); // SIGKILL mid-transfer
        let _ = s.wait();
        let res = r.result();
        assert_eq!(res["ok"], false, "{res}");
        // The control connection's end is seen at once; a UCX receive already posted for
        // the dead sender's data can only end at the deadline.
        let kinds: &[&str] = if backend == "ucx" {
            &["peer_gone", "deadline"]
        } else {
            &["peer_gone"]
        };
        assert!(kinds.contains(&res["kind"].as_str().unwrap_or("")), "{res}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "failed only after {:?}",
            t0.elapsed()
        );
        assert_eq!(res["active_after"], 0, "the reservation is freed");
    }
}

#[test]
fn silent_sender_fails_the_receiver_at_the_deadline() {
    let r = Recv::start(&[
        "--backend",
        "tcp",
        "--bytes",
        "1000",
        "--deadline-ms",
        "500",
    ]);
    let t0 = Instant::now();
    let res = r.result();
    assert_eq!(res["kind"], "deadline", "{res}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(res["active_after"], 0);
}

#[test]
fn killed_receiver_fails_the_sender() {
    let mut r = Recv::start(&["--backend", "tcp", "--bytes", "20000000"]);
    let s = send(
        &r.target,
        &[
            "--bytes",
            "20000000",
            "--chunk",
            "100000",
            "--pace-ms",
            "20",
        ],
    );
    std::thread::sleep(Duration::from_millis(400));
    r.child.kill().unwrap();
    let _ = r.child.wait();
    let (ok, res) = output(s);
    assert!(!ok, "the sender must not report success: {res}");
    assert_eq!(res["ok"], false);
}

#[test]
fn wrong_fingerprint_is_rejected_across_processes() {
    let r = Recv::start(&[
        "--backend",
        "tcp",
        "--bytes",
        "1000",
        "--deadline-ms",
        "3000",
    ]);
    let (ok, res) = output(send(
        &r.target,
        &["--bytes", "1000", "--fingerprint", "another-model"],
    ));
    assert!(!ok);
    assert_eq!(res["kind"], "fingerprint", "{res}");
    let _ = r.result();
}

/// Prefill in one process, stream layer by layer, decode in another; compare with one
/// engine in this process.
fn disaggregated_equals_single(
    model: &std::path::Path,
    prompt: &str,
    chat: bool,
    chunk: usize,
    backends: &[&str],
) {
    let max_tokens = 16;
    let m = model.to_str().unwrap();
    let mut cfg = xpyd_engine::EngineConfig::new(model);
    cfg.prefill_chunk = chunk;
    let mut e = xpyd_engine::Engine::load(cfg).unwrap();
    let chunk = chunk.to_string();
    let ids = if chat {
        e.tokenizer()
            .encode_chat(&[xpyd_engine::ChatMessage::new("user", prompt)])
            .unwrap()
    } else {
        e.tokenizer().encode(prompt).unwrap()
    };
    let n = ids.len().to_string();
    let reference = e
        .generate(
            1,
            ids,
            xpyd_engine::SamplingParams::greedy(max_tokens),
            &mut |_| {},
        )
        .unwrap()
        .tokens;
    for backend in backends {
        for stream in [true, false] {
            let r = Recv::start(&[
                "--backend",
                backend,
                "--decode",
                "--prompt-tokens",
                &n,
                "--model",
                m,
                "--threads",
                "1",
            ]);
            // Over shm the sender writes straight into the decode engine's KV blocks.
            let target: Value = serde_json::from_str(&r.target).unwrap();
            assert_eq!(
                target["placement"]["blocks"].is_array(),
                *backend == "shm",
                "{backend}: {target}"
            );
            let mut args = vec![
                "--prompt",
                prompt,
                "--model",
                m,
                "--threads",
                "1",
                "--prefill-chunk",
                &chunk,
            ];
            let mt = max_tokens.to_string();
            args.extend(["--max-tokens", &mt]);
            if chat {
                args.push("--chat");
            }
            if !stream {
                args.push("--no-stream");
            }
            let (ok, s) = output(send(&r.target, &args));
            let res = r.result();
            assert!(ok && res["ok"] == true, "{backend}: {s} / {res}");
            assert_eq!(res["backend"], *backend);
            let tokens: Vec<u32> = serde_json::from_value(res["tokens"].clone()).unwrap();
            assert_eq!(tokens, reference, "{backend} stream={stream}");
        }
    }
}

#[test]
fn tiny_model_prefill_transfer_decode_across_processes() {
    let (_d, model) = tiny_model();
    disaggregated_equals_single(
        &model,
        "hello there, a prompt that spans several chunks of the tiny model",
        false,
        16,
        &backends(),
    );
}

#[test]
fn real_model_prefill_transfer_decode_across_processes() {
    let Some(model) = real_model() else { return };
    disaggregated_equals_single(
        &model,
        "What is the capital of France?",
        true,
        16,
        &backends(),
    );
}
