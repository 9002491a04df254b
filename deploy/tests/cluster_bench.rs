//! Smoke runs of `xpyd bench load` and `xpyd bench compare` against tiny-model clusters
//! started by `xpyd up`: the load generator's records add up, the Prometheus histograms
//! count the same requests, and compare produces every field it promises. No timing
//! asserts: only counts, shapes and consistency.

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
            "--rates",
            "4,8",
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
        assert_eq!(points.len(), 2, "{m}");
        for p in points {
            assert_eq!(p["point"]["summary"]["requests"], 12);
            // Attainment for all six SLOs of the grid, each a share.
            let att = p["attainment"].as_object().unwrap();
            assert_eq!(att.len(), 6, "{p}");
            assert!(
                att.values()
                    .all(|a| (0.0..=1.0).contains(&a.as_f64().unwrap()))
            );
        }
        assert!(m["unloaded"]["summary"]["ttft"]["p50"].as_f64().unwrap() > 0.0);
    }
    // Latency ratios are numbers (both modes served every request at 8/s).
    for key in ["tpot_p99_ratio", "ttft_p90_ratio"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    assert_eq!(v["ratios_at_rate"], 8.0);
    // The goodput ratio is a number exactly when its kind says a mode met the SLO.
    let kind = v["goodput_ratio_kind"].as_str().unwrap();
    assert!(
        ["estimate", "lower_bound", "upper_bound", "none"].contains(&kind),
        "{kind}"
    );
    assert_eq!(v["goodput_ratio"].is_number(), kind != "none", "{v}");
    assert!(v["slo"]["ttft_s"].as_f64().unwrap() > 0.0);
    assert!(v["slo"]["tpot_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["goodput_by_slo"].as_array().unwrap().len(), 6);
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
    // 8 unloaded + 2 × 12 per mode.
    assert_eq!(records.lines().count(), 2 * (8 + 24));
}
