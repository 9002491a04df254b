//! The live ratio advisor under a workload that shifts — a validation run, recorded in
//! `docs/BENCHMARKS.md`, not part of CI (it takes minutes; `cluster_advisor` is the
//! small version CI runs). A 2P2D cluster of mock workers timed by a profile whose
//! prefill costs 0.2 ms per prompt token and whose decode step costs 10 ms + 2 ms per
//! sequence, under `xpyd up`, with the real model's tokenizer:
//!
//! 1. manual mode, open-loop load (`xpyd bench load --phases`) that shifts from short
//!    prompts and long outputs (decode-bound) to long prompts and short outputs
//!    (prefill-bound): the advice follows the shift — how many windows it takes is
//!    printed and must be at most 2 beyond the advisor's streak;
//! 2. the advice applied: the measured goodput of the prefill-bound workload (a search
//!    with `xpyd bench load --goodput`) before and after;
//! 3. auto mode under the decode-bound load: the cluster reaches the advised split by
//!    itself with no request failed;
//! 4. the same load held for 10 windows: no further change (no flapping).
//!
//! Run: `XPYD_MODEL=… cargo test --release -p xpyd --test advisor_online -- --ignored --nocapture`.

mod common;
mod supervisor;

use common::cluster::{eventually, get, post_raw};
use common::real_model;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use supervisor::Sup;

/// Window of the advisor (seconds).
const WINDOW_S: u64 = 5;
/// Windows in a row before a suggestion.
const STREAK: u64 = 2;

/// Short prompts, long outputs: decode-bound.
const DECODE_BOUND: &str = "uniform:16-64/uniform:96-160";
/// Long prompts, short outputs: prefill-bound.
const PREFILL_BOUND: &str = "uniform:1200-1600/uniform:2-4";

/// Prefill 4 ms + 0.2 ms per prompt token; a decode step 10 ms + 2 ms per sequence.
fn profile() -> Value {
    common::profile_with([0.004, 0.0002, 0.0], [0.010, 0.002, 0.0, 0.0])
}

fn manifest(profile: &Path) -> String {
    let p = profile.display();
    let role = format!("engine: mock, mock_profile: {p}, prefill_chunk: 256");
    format!(
        "name: advisor-online\nmode: disaggregated\n\
         advisor: {{ enabled: true, window_s: {WINDOW_S}, streak: {STREAK}, cooldown_s: 20, profile: {p}, \
         slo: {{ ttft_ms: 2000, tpot_ms: 50 }} }}\n\
         roles:\n  prefill: {{ replicas: 2, {role} }}\n  decode: {{ replicas: 2, {role}, max_running: 16 }}\n"
    )
}

fn put(url: &str, body: &Value) -> u16 {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    agent
        .put(url)
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap()
        .status()
        .as_u16()
}

/// `xpyd bench load` against the cluster, in the background.
fn load(grpc: &str, model: &Path, args: &[&str]) -> Child {
    common::xpyd()
        .args(["bench", "load", "--grpc", grpc, "--json", "--model"])
        .arg(model)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "bench load failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The advice's recommended split as `xPyD`, if any.
fn advised(s: &Value) -> Option<String> {
    s["advice"]["recommended"].as_str().map(str::to_string)
}

fn converged_on(up: &Sup, http: &str, split: &str) -> bool {
    let s = get(&format!("{http}/v1/advisor")).1;
    s["converged"] == true && s["current"] == split && up.ready_workers() == 4
}

#[test]
#[ignore = "a validation run of minutes; see docs/BENCHMARKS.md"]
fn the_advisor_follows_a_shifting_workload_without_flapping() {
    let Some(model) = real_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profile.json");
    std::fs::write(&path, profile().to_string()).unwrap();
    let up = Sup::start(&manifest(&path), &model, &[], true);
    let http = up.http.clone();
    let grpc = up.status()["coordinator"]["grpc"]
        .as_str()
        .unwrap()
        .to_string();
    let advisor = || get(&format!("{http}/v1/advisor")).1;
    assert_eq!(advisor()["current"], "2P2D");

    // 1. Manual mode, a shift from decode-bound to prefill-bound at 3 requests/s.
    let (n_a, n_b, rate) = (240usize, 240usize, 3.0);
    let phases = format!("{n_a}*1:{DECODE_BOUND},{n_b}*1:{PREFILL_BOUND}");
    let t0 = Instant::now();
    let shift_at = n_a as f64 / rate;
    let bench = load(
        &grpc,
        &model,
        &["--rate", "3", "--phases", &phases, "--timeout-s", "60"],
    );
    let mut seen: Vec<(f64, String)> = Vec::new();
    let mut after_shift = None;
    while t0.elapsed().as_secs_f64() < shift_at + 12.0 * WINDOW_S as f64 {
        std::thread::sleep(Duration::from_secs(1));
        let t = t0.elapsed().as_secs_f64();
        let Some(a) = advised(&advisor()) else {
            continue;
        };
        if seen.last().map(|(_, s)| s) != Some(&a) {
            eprintln!("{t:6.1} s: advice {a}");
            seen.push((t, a.clone()));
        }
        let prefill: u32 = a.split('P').next().unwrap().parse().unwrap_or(0);
        if t > shift_at && prefill > 2 && after_shift.is_none() {
            after_shift = Some(t - shift_at);
        }
    }
    let v = finish(bench);
    eprintln!("shifting load: {}", v["point"]["summary"]);
    let before_shift: Vec<&String> = seen
        .iter()
        .filter(|(t, _)| *t < shift_at)
        .map(|(_, s)| s)
        .collect();
    assert!(
        before_shift.iter().any(|s| s.starts_with("1P")),
        "no advice for more decode workers before the shift: {seen:?}"
    );
    let lag = after_shift.unwrap_or_else(|| panic!("no advice for more prefill: {seen:?}"));
    let windows = lag / WINDOW_S as f64;
    eprintln!(
        "the advice followed the shift after {lag:.1} s = {windows:.1} windows (streak {STREAK})"
    );
    assert!(windows <= (STREAK + 2) as f64, "{windows} windows");

    // 2. Apply it: goodput of the prefill-bound workload before and after.
    let search = |label: &str| -> f64 {
        let v = finish(load(
            &grpc,
            &model,
            &[
                "--goodput",
                "2.0,0.05",
                "--rate",
                "3",
                "--max-points",
                "5",
                "--requests",
                "90",
                "--input",
                PREFILL_BOUND.split('/').next().unwrap(),
                "--output",
                PREFILL_BOUND.split('/').nth(1).unwrap(),
            ],
        ));
        let g = v["goodput"].as_f64().unwrap();
        eprintln!(
            "{label}: goodput {g:.3} requests/s (below {})",
            v["goodput_below"]
        );
        g
    };
    let before = search("2P2D");
    let (code, v, _) = post_raw(&format!("{http}/v1/advisor/apply"), "{}", None);
    assert_eq!(code, 200, "{v}");
    let target = v["layout"].as_str().unwrap().to_string();
    eprintln!("applied {target}");
    eventually(Duration::from_secs(120), "the applied split runs", || {
        converged_on(&up, &http, &target)
    });
    let after = search(&target);
    assert!(after > before, "goodput {before} → {after}");

    // 3. Auto mode under the decode-bound load: the cluster changes by itself, nothing fails.
    assert_eq!(
        put(
            &format!("{http}/v1/advisor/config"),
            &json!({"mode": "auto"})
        ),
        200
    );
    let n = 600;
    let steady = format!("{n}*1:{DECODE_BOUND}");
    let t1 = Instant::now();
    let bench = load(
        &grpc,
        &model,
        &["--rate", "3", "--phases", &steady, "--timeout-s", "60"],
    );
    let mut applied_at = None;
    let mut history_len = 0;
    let mut converged_at = 0.0;
    let mut said = String::new();
    while t1.elapsed() < Duration::from_secs((n / 3) as u64) {
        std::thread::sleep(Duration::from_secs(1));
        let s = advisor();
        let h = s["history"].as_array().map_or(0, Vec::len);
        let now = format!(
            "{} / {} → {}: {}",
            s["status"], s["advice"]["action"], s["advice"]["recommended"], s["advice"]["why"]
        );
        if now != said {
            eprintln!("{:6.1} s: {now}", t1.elapsed().as_secs_f64());
            said = now;
        }
        let auto = s["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|c| c["by"] == "advisor (auto)"));
        if auto && applied_at.is_none() {
            applied_at = Some(t1.elapsed().as_secs_f64());
            eprintln!(
                "{:6.1} s: auto applied {}",
                t1.elapsed().as_secs_f64(),
                s["desired"]
            );
        }
        // 4. Once converged, the next 10 windows add nothing to the history.
        if let Some(t) = applied_at
            && s["converged"] == true
            && history_len == 0
        {
            history_len = h;
            converged_at = t1.elapsed().as_secs_f64();
            eprintln!(
                "{:6.1} s: converged on {} ({h} changes so far)",
                t1.elapsed().as_secs_f64() - t,
                s["current"]
            );
        }
    }
    let v = finish(bench);
    let summary = &v["point"]["summary"];
    eprintln!("steady load: {summary}");
    assert!(applied_at.is_some(), "auto mode applied nothing");
    assert_eq!(
        summary["errors"], 0,
        "requests failed during the change: {summary}"
    );
    let s = advisor();
    let h = s["history"].as_array().map_or(0, Vec::len);
    assert!(history_len > 0, "never converged");
    let held = t1.elapsed().as_secs_f64() - converged_at;
    assert!(
        held >= 10.0 * WINDOW_S as f64,
        "held only {held:.0} s after converging"
    );
    eprintln!(
        "no change in the {:.0} windows after converging",
        held / WINDOW_S as f64
    );
    assert_eq!(h, history_len, "flapping: {}", s["history"]);
}
