//! The acceptance run on the real model: 1P2D, then 2P2D, 16 concurrent streaming
//! requests (greedy and seeded; SSE through OpenAI's Python client, and gRPC) while a decode worker is SIGKILLed, then a
//! prefill worker, then a decode worker is SIGSTOPped — every stream ends with exactly
//! its single-process reference, nothing fails, and the killed workers are rebuilt. Prints
//! the stall migrated streams saw (their longest gap between two chunks, over the usual
//! one) for docs/BENCHMARKS.md.

mod common;

use common::cluster::{Up, eventually, metric_sum, worker_pid};
use common::real_model;
use common::streams::{OpenAi, Req, mix, reference, run_round};
use nix::sys::signal::Signal;
use std::path::Path;
use std::time::Duration;

fn signal(pid: i32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

fn all_ready(up: &Up, prefill: u32, decode: u32) -> bool {
    let ready = |role: &str| {
        up.workers(role)
            .iter()
            .filter(|w| w["state"] == "ready")
            .count() as u32
    };
    ready("prefill") == prefill && ready("decode") == decode
}

/// Stall of the streams that migrated: the `n` longest chunk gaps of the round (`n` =
/// the streams the coordinator migrated), each over the round's median gap.
fn stalls(gaps: &[Duration], n: usize) -> Vec<Duration> {
    let mut sorted = gaps.to_vec();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    sorted.iter().rev().take(n).map(|g| *g - median).collect()
}

/// A counter (or histogram `_count`) of the coordinator's metrics, summed over labels.
fn metric(up: &Up, name: &str) -> f64 {
    metric_sum(&up.http, name, "")
}

fn chaos(model: &Path, python: &str, prefill: u32) {
    let yaml = format!(
        "name: chaos-real-{prefill}p\nmode: disaggregated\ncoordinator: {{ http_port: 0, grpc_port: 0 }}\nroles:\n  prefill: {{ replicas: {prefill} }}\n  decode: {{ replicas: 2 }}\n"
    );
    let up = Up::start(&yaml, model);
    let m = up.manifest.clone();
    let openai = OpenAi {
        python: python.to_string(),
        model: up.cluster_model(),
    };
    let mut migrated = Vec::new();
    for (round, what) in ["SIGKILL decode", "SIGKILL prefill", "SIGSTOP decode"]
        .into_iter()
        .enumerate()
    {
        // The HTTP half through OpenAI's own Python client, as a new user would.
        let reqs: Vec<Req> = mix(round, 16)
            .into_iter()
            .map(|r| Req {
                openai: (!r.grpc).then(|| openai.clone()),
                ..r
            })
            .collect();
        let refs: Vec<String> = reqs.iter().map(|r| reference(model, r)).collect();
        let mut frozen = None;
        let migrations = metric(&up, "xpyd_coordinator_migrations_total");
        let resends = migrations + metric(&up, "xpyd_coordinator_retries_total");
        let firsts = metric(&up, "xpyd_coordinator_ttft_seconds_count");
        let gaps = run_round(&up.http, &up.grpc, &reqs, &refs, || {
            // Strike mid-stream: once half the requests have their first token (a prefill
            // strikes earlier, while prompts still queue for it).
            let wanted = if what == "SIGKILL prefill" { 2.0 } else { 8.0 };
            eventually(Duration::from_secs(60), "streams under way", || {
                metric(&up, "xpyd_coordinator_ttft_seconds_count") >= firsts + wanted
            });
            match what {
                "SIGKILL decode" => signal(worker_pid(&m, "decode", 1), Signal::SIGKILL),
                "SIGKILL prefill" => signal(worker_pid(&m, "prefill", 0), Signal::SIGKILL),
                _ => {
                    let pid = worker_pid(&m, "decode", 0);
                    signal(pid, Signal::SIGSTOP);
                    frozen = Some(pid);
                }
            }
        });
        let moved = (metric(&up, "xpyd_coordinator_migrations_total") - migrations) as usize;
        let resent = metric(&up, "xpyd_coordinator_migrations_total")
            + metric(&up, "xpyd_coordinator_retries_total")
            - resends;
        assert!(resent >= 1.0, "{prefill}P2D {what}: no request was re-sent");
        let s = stalls(&gaps, moved);
        eprintln!(
            "{prefill}P2D {what}: 16 streams exact; {resent} re-sent, {moved} mid-stream: {s:?}"
        );
        migrated.extend(s);
        if let Some(pid) = frozen {
            signal(pid, Signal::SIGCONT);
        }
        eventually(Duration::from_secs(120), "every worker ready again", || {
            all_ready(&up, prefill, 2)
        });
    }
    migrated.sort();
    if !migrated.is_empty() {
        let p = |q: f64| migrated[((migrated.len() - 1) as f64 * q).round() as usize];
        eprintln!(
            "{prefill}P2D: {} migrated streams, added stall p50 {:?}, p99 {:?}",
            migrated.len(),
            p(0.5),
            p(0.99)
        );
    }
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn real_model_streams_survive_killed_and_frozen_workers_1p2d_then_2p2d() {
    let Some(model) = real_model() else { return };
    let Some(python) = common::python_with("openai") else {
        return;
    };
    chaos(&model, &python, 1);
    chaos(&model, &python, 2);
}
