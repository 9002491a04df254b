//! Smoke runs of `xpyd bench load`, `compare`, `advisor` and `flip` against tiny-model
//! clusters started by `xpyd up`, and of `bench profile` on the tiny model: the load
//! generator's records add up, the Prometheus histograms count the same requests, and
//! compare produces every field it promises. No timing asserts: only counts, shapes and
//! consistency.

mod common;

use common::cluster::Up;
use common::{tiny_model, xpyd};
use serde_json::Value;

fn run_json(args: &[&str], model: &std::path::Path) -> Value {
    let out = xpyd()
        .args(args)
        .arg("--model")
        .arg(model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xpyd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn load_generator_records_every_request_and_agrees_with_prometheus() {
    let (_d, model) = tiny_model();
    let up = Up::start(
        "name: b\nmode: disaggregated\ncoordinator: { http_port: 0, grpc_port: 0 }\nroles:\n  prefill: { replicas: 1 }\n  decode: { replicas: 1 }\n",
        &model,
    );
    let v = run_json(
        &[
            "bench",
            "load",
            "--grpc",
            &up.grpc,
            "--http",
            &up.http,
            "--rate",
            "20",
            "--requests",
            "24",
            "--input",
            "uniform:8-40",
            "--output",
            "uniform:2-9",
            "--seed",
            "3",
            "--json",
        ],
        &model,
    );
    let s = &v["point"]["summary"];
    assert_eq!(s["requests"], 24, "{v}");
    assert_eq!(s["errors"], 0, "{v}");
    assert!(s["request_rate"].as_f64().unwrap() > 0.0);
    assert!(s["output_token_rate"].as_f64().unwrap() > s["request_rate"].as_f64().unwrap());
    let (p50, p90, p99) = (
        s["ttft"]["p50"].as_f64().unwrap(),
        s["ttft"]["p90"].as_f64().unwrap(),
        s["ttft"]["p99"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p90 && p90 <= p99, "{s}");
    assert_eq!(v["point"]["rate"], 20.0);
    // The coordinator counted exactly these requests in its TTFT histogram, and each
    // request with more than one token in its TPOT histogram.
    let prom = &v["point"]["prometheus"];
    assert_eq!(prom["ttft"]["count"], 24.0, "{prom}");
    assert_eq!(prom["tpot"]["count"], 24.0, "{prom}");
    assert_eq!(prom["ttft"]["agree"], true, "{prom}");
    assert_eq!(prom["tpot"]["agree"], true, "{prom}");
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn goodput_search_and_closed_loop_run_against_a_live_cluster() {
    let (_d, model) = tiny_model();
    let up = Up::start(
        "name: b\nmode: single\ncoordinator: { http_port: 0, grpc_port: 0 }\nroles:\n  combined: { replicas: 1 }\n",
        &model,
    );
    let v = run_json(
        &[
            "bench",
            "load",
            "--grpc",
            &up.grpc,
            "--clients",
            "3",
            "--requests",
            "9",
            "--input",
            "16",
            "--output",
            "4",
            "--json",
        ],
        &model,
    );
    assert_eq!(v["point"]["clients"], 3);
    assert_eq!(v["point"]["summary"]["errors"], 0);
    // The same workload through the OpenAI-compatible HTTP API (streamed completions),
    // as the bench drives any such server: every token counted and timed.
    let records = _d.path().join("openai.jsonl");
    let v = run_json(
        &[
            "bench",
            "load",
            "--openai",
            &up.http,
            "--clients",
            "3",
            "--requests",
            "9",
            "--input",
            "16",
            "--output",
            "5",
            "--records",
            records.to_str().unwrap(),
            "--json",
        ],
        &model,
    );
    assert_eq!(
        (v["api"].as_str(), v["target"].as_str()),
        (Some("openai"), Some(up.http.as_str())),
        "{v}"
    );
    assert_eq!(v["point"]["summary"]["errors"], 0, "{v}");
    let lines = std::fs::read_to_string(&records).unwrap();
    let recs: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 9);
    for r in recs.iter().map(|r| &r["record"]) {
        assert_eq!(r["output_tokens"], 5, "{r}");
        assert_eq!(r["gaps"].as_array().unwrap().len(), 4, "{r}");
        assert!(r["ttft"].as_f64().unwrap() > 0.0, "{r}");
    }
    // A server that is not there: every request an error, none a hang.
    let v = run_json(
        &[
            "bench",
            "load",
            "--openai",
            "http://127.0.0.1:9",
            "--openai-model",
            "m",
            "--requests",
            "2",
            "--input",
            "8",
            "--output",
            "2",
            "--json",
        ],
        &model,
    );
    assert_eq!(v["point"]["summary"]["errors"], 2, "{v}");
    // A generous SLO: every rate the search tries meets it, so the search only climbs.
    let v = run_json(
        &[
            "bench",
            "load",
            "--grpc",
            &up.grpc,
            "--goodput",
            "30,10",
            "--rate",
            "2",
            "--max-points",
            "3",
            "--requests",
            "10",
            "--input",
            "16",
            "--output",
            "4",
            "--json",
        ],
        &model,
    );
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 3, "{v}");
    let rates: Vec<f64> = points
        .iter()
        .map(|p| p["point"]["rate"].as_f64().unwrap())
        .collect();
    assert!(rates.windows(2).all(|w| w[1] > w[0]), "{rates:?}");
    assert!(points.iter().all(|p| p["attainment"] == 1.0), "{v}");
    assert_eq!(v["goodput"].as_f64().unwrap(), *rates.last().unwrap());
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn compare_reports_both_modes_ratios_and_plots() {
    let (_d, model) = tiny_model();
    let out = tempfile::tempdir().unwrap();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let v = run_json(
        &[
            "bench",
            "compare",
            "--aggregated",
            examples.join("bench-single.yaml").to_str().unwrap(),
            "--disaggregated",
            examples.join("bench-1p1d.yaml").to_str().unwrap(),
            // A generous SLO the tiny model meets at every rate: each search doubles
            // from 4/s until its points run out.
            "--slo",
            "30,5",
            "--start-rate",
            "4",
            "--max-points",
            "3",
            "--requests",
            "12",
            "--input",
            "uniform:8-32",
            "--output",
            "uniform:2-6",
            "--out-dir",
            out.path().to_str().unwrap(),
            "--json",
        ],
        &model,
    );
    let modes = v["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2);
    for m in modes {
        let points = m["points"].as_array().unwrap();
        let rates: Vec<f64> = points
            .iter()
            .map(|p| p["point"]["rate"].as_f64().unwrap())
            .collect();
        assert_eq!(rates, [4.0, 8.0, 16.0], "{m}");
        for p in points {
            assert_eq!(p["point"]["summary"]["requests"], 12);
            assert_eq!(p["point"]["summary"]["errors"], 0);
            assert_eq!(p["attainment"], 1.0, "{p}");
        }
        assert!(m["unloaded"]["summary"]["ttft"]["p50"].as_f64().unwrap() > 0.0);
        assert_eq!(m["goodput"], 16.0, "{m}");
        assert!(m["goodput_below"].is_null(), "{m}");
        assert_eq!(m["at_goodput"]["requests"], 12, "{m}");
    }
    // Both met the SLO at every rate tried: the ratio is an estimate of 1 whose range
    // is open above (neither search found where its mode stops meeting it).
    assert_eq!(v["goodput_ratio"], 1.0, "{v}");
    assert_eq!(v["goodput_ratio_kind"], "estimate", "{v}");
    assert!(v["goodput_ratio_range"][1].is_null(), "{v}");
    assert_eq!(v["slo"]["ttft_s"], 30.0);
    assert_eq!(v["slo"]["tpot_s"], 5.0);
    assert!(v["slo"]["derived_from"].is_null(), "{v}");
    for f in ["compare.json", "attainment.svg", "tpot_p99.svg"] {
        let text = std::fs::read_to_string(out.path().join(f)).unwrap();
        assert!(!text.is_empty(), "{f}");
    }
    let svg = std::fs::read_to_string(out.path().join("attainment.svg")).unwrap();
    assert!(
        svg.contains(">aggregated<") && svg.contains(">disaggregated<"),
        "{svg}"
    );
    let records = std::fs::read_to_string(out.path().join("records.jsonl")).unwrap();
    // 8 unloaded + 3 × 12 per mode.
    assert_eq!(records.lines().count(), 2 * (8 + 36));
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn bench_advisor_measures_every_split_and_scores_the_recommendation() {
    let (d, model) = tiny_model();
    let profile = d.path().join("profile.json");
    std::fs::write(&profile, common::slow_prefill_profile().to_string()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let v = run_json(
        &[
            "bench",
            "advisor",
            "--profile",
            profile.to_str().unwrap(),
            "--budgets",
            "2",
            "--workloads",
            "custom",
            "--input",
            "uniform:100-300",
            "--output",
            "2",
            "--slo",
            "2,0.5",
            "--requests",
            "16",
            "--max-points",
            "2",
            "--validate-at",
            "0.5",
            "--calibrate-at",
            "0.3",
            "--out-dir",
            out.path().to_str().unwrap(),
            "--json",
        ],
        &model,
    );
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 1, "{v}");
    let c = &cases[0];
    assert_eq!(c["case"], "custom N=2", "{c}");
    // The case names the profile it ran on.
    assert_eq!(v["profiles"][0]["case"], "custom N=2", "{v}");
    assert!(
        v["profiles"][0]["profile"]
            .as_str()
            .is_some_and(|p| p.ends_with("profile.json")),
        "{v}"
    );
    let splits: Vec<&str> = c["splits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["split"].as_str().unwrap())
        .collect();
    assert_eq!(splits, ["1P1D", "aggregated ×2"], "{c}");
    let mut requests = 0;
    for s in c["splits"].as_array().unwrap() {
        let points = s["points"].as_u64().unwrap();
        assert!((1..=2).contains(&points), "{s}");
        requests += 16 * points;
        assert!(s["goodput"].as_f64().unwrap() >= 0.0, "{s}");
        // Calibrated once, on 16 requests of its own, before the search; factors at the
        // clamp would mean the replay never met the run (the mock follows the profile).
        let cal = &s["calibration"];
        assert!(cal["rate"].as_f64().unwrap() > 0.0, "{s}");
        for role in ["prefill", "decode"] {
            let f = cal[role].as_f64().unwrap();
            assert!(f > 0.5 && f < 2.0, "{role}: {s}");
        }
        requests += 16;
        // The advisor simulated every split it did not prune.
        assert!(s["predicted_goodput"].is_number() || s["predicted_goodput"].is_null());
    }
    // The advisor's pick and the formula's are splits of this budget, each scored
    // against the best measured split.
    assert!(splits.contains(&c["recommended"].as_str().unwrap()), "{c}");
    assert_eq!(c["dynamo"], "1P1D", "{c}");
    let best = c["best_goodput"].as_f64().unwrap();
    if best > 0.0 {
        let share = c["recommended_share_of_best"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&share), "{c}");
        assert!((c["regret"].as_f64().unwrap() - (1.0 - share)).abs() < 1e-9);
    }
    for f in ["advisor.json", "manifests/1p1d.yaml", "manifests/agg2.yaml"] {
        assert!(out.path().join(f).is_file(), "{f}");
    }
    // Every measured point beside the simulator's run of the same requests; a split
    // with a goodput also has its validation point at half of it.
    let validation = c["validation"].as_array().unwrap();
    assert_eq!(validation.len(), 2, "{c}");
    for (s, v) in c["splits"].as_array().unwrap().iter().zip(validation) {
        assert_eq!(s["split"], v["split"]);
        let points = v["points"].as_array().unwrap();
        let extra = u64::from(s["goodput"].as_f64().unwrap() > 0.0);
        assert_eq!(
            points.len() as u64,
            s["points"].as_u64().unwrap() + extra,
            "{v}"
        );
        requests += 16 * extra;
        for p in points {
            for who in ["measured", "simulated"] {
                let att = p[who]["attainment"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&att), "{p}");
            }
            let pp = p["attainment_error_pp"].as_f64().unwrap();
            let diff = p["simulated"]["attainment"].as_f64().unwrap()
                - p["measured"]["attainment"].as_f64().unwrap();
            assert!((pp - 100.0 * diff).abs() < 1e-9, "{p}");
            // And beside the calibrated simulation, in the same form.
            let cal = &p["calibrated"];
            let att = cal["simulated"]["attainment"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&att), "{p}");
            let diff = att - p["measured"]["attainment"].as_f64().unwrap();
            let pp = cal["attainment_error_pp"].as_f64().unwrap();
            assert!((pp - 100.0 * diff).abs() < 1e-9, "{p}");
        }
    }
    let records = std::fs::read_to_string(out.path().join("records.jsonl")).unwrap();
    assert_eq!(records.lines().count() as u64, requests);
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn bench_flip_times_flips_both_ways_and_a_worker_start() {
    let (_d, model) = tiny_model();
    let v = run_json(
        &["bench", "flip", "--rounds", "1", "--clients", "1", "--json"],
        &model,
    );
    let rows = v["rounds"].as_array().unwrap();
    let paths: Vec<&str> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "flip decode→prefill",
            "flip prefill→decode",
            "start prefill worker"
        ],
        "{v}"
    );
    for r in &rows[..2] {
        for k in [
            "drain_ms",
            "switch_ms",
            "register_ms",
            "worker_total_ms",
            "routed_ms",
        ] {
            assert!(r[k].as_f64().is_some_and(|x| x >= 0.0), "{k}: {r}");
        }
        let parts = ["drain_ms", "switch_ms", "register_ms"]
            .iter()
            .map(|k| r[k].as_f64().unwrap())
            .sum::<f64>();
        let total = r["worker_total_ms"].as_f64().unwrap();
        assert!((parts - total).abs() < 1.0, "the parts add up: {r}");
    }
    assert_eq!(rows[0]["worker_id"], "prefill-1", "{v}");
    assert_eq!(rows[1]["worker_id"], "decode-1", "{v}");
    assert!(rows[2]["routed_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["start_over_flip"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["requests_failed"], 0, "{v}");
    assert!(v["requests_ok"].as_u64().unwrap() > 0, "{v}");
    assert!(v["cpu"].is_string() && v["threads_per_worker"] == 1, "{v}");
}

#[test]
fn bench_profile_measures_every_decode_point_and_the_planner_reads_it() {
    // Each decode point copies the prompt's KV to every other sequence of the batch by
    // export and import (a failed import fails the run); the profile carries the version
    // the planner reads.
    let (d, model) = tiny_model();
    let out = d.path().join("profile.json");
    let run = xpyd()
        .args(["bench", "profile", "--threads", "1", "--kv-backend", "none"])
        .args(["--prompts", "16,32,64", "--chunks", "16"])
        .args(["--batches", "1,3", "--contexts", "16,40", "--steps", "2"])
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["version"].as_u64(),
        Some(xpyd_planner::profile::PROFILE_VERSION)
    );
    let points = v["decode_step"]["points"].as_array().unwrap();
    let got: Vec<(u64, u64)> = points
        .iter()
        .map(|p| (p["context"].as_u64().unwrap(), p["batch"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, [(16, 1), (16, 3), (40, 1), (40, 3)]);
    assert!(
        points.iter().all(|p| p["seconds"].as_f64().unwrap() > 0.0),
        "{points:?}"
    );
    xpyd_planner::profile::service_model(&text, 16).expect("the planner reads the profile");
}
