//! A golden snapshot of one advice: a prefill-bound window on 1P3D, every number the
//! advisor reports (rounded to 6 significant digits) compared with
//! `tests/golden/advice.txt`. A change to the simulator, the search or the decision that
//! moves any of them shows here; when the move is intended, regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p xpyd-planner --test advice_golden` and review the diff.

use std::fmt::Write;
use xpyd_planner::advisor::{Advice, Advisor, AdvisorConfig, Finished, Mode};
use xpyd_planner::search::{RunStats, Slo};
use xpyd_planner::service::{FitErrors, ServiceModel};
use xpyd_planner::sim::{ClusterConfig, Layout, simulate};
use xpyd_planner::traffic::{Process, Traffic};
use xpyd_planner::workload::LengthDist;

fn model() -> ServiceModel {
    ServiceModel {
        errors: FitErrors {
            prefill: 0.02,
            decode: 0.03,
            transfer: 0.01,
        },
        ..ServiceModel::example()
    }
}

/// Six significant digits: the snapshot does not hang on the last bits of a float.
fn sig(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x == 0.0 {
        return "0".into();
    }
    format!("{x:.5e}")
}

fn run(out: &mut String, name: &str, r: &RunStats) {
    let _ = writeln!(
        out,
        "{name}: rate {} attainment {} failed {} ttft p50/p90/p99 {} {} {} tpot p50/p90/p99 {} {} {}",
        sig(r.rate),
        sig(r.attainment),
        sig(r.failed),
        sig(r.ttft.p50),
        sig(r.ttft.p90),
        sig(r.ttft.p99),
        sig(r.tpot.p50),
        sig(r.tpot.p90),
        sig(r.tpot.p99)
    );
}

fn snapshot(a: &Advice) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "current: {}", a.current);
    let _ = writeln!(out, "recommended: {}", a.recommended);
    let _ = writeln!(out, "action: {:?}", a.action);
    let _ = writeln!(
        out,
        "rate: observed {} forecast {}",
        sig(a.observed_rate),
        sig(a.forecast_rate)
    );
    let _ = writeln!(
        out,
        "goodput: current {} recommended {}",
        sig(a.goodput.0),
        sig(a.goodput.1)
    );
    run(&mut out, "now", &a.now);
    run(&mut out, "after", &a.after);
    for (l, g) in &a.curve {
        let _ = writeln!(out, "curve {l}: {}", g.map_or("pruned".into(), sig));
    }
    let _ = writeln!(
        out,
        "calibration: {} {}",
        sig(a.calibration.0),
        sig(a.calibration.1)
    );
    let _ = writeln!(out, "confidence: {}", sig(a.confidence));
    let _ = writeln!(out, "why: {}", a.why);
    out
}

#[test]
fn one_advice_matches_its_golden_snapshot() {
    let current = Layout::Disaggregated {
        prefill: 1,
        decode: 3,
    };
    let traffic = Traffic::Generated {
        input: LengthDist::Uniform { lo: 800, hi: 1600 },
        output: LengthDist::Uniform { lo: 8, hi: 32 },
        process: Process::Poisson,
        prefix_hit: 0.0,
        requests: 240,
        seed: 7,
    };
    let reqs = traffic.at_rate(4.0);
    let observed = simulate(&model(), &ClusterConfig::defaults(current), &reqs).unwrap();
    let window: Vec<Finished> = reqs
        .iter()
        .zip(&observed.requests)
        .map(|(q, o)| Finished::observed(q, o))
        .collect();
    let slo = Slo {
        ttft_s: 2.0,
        tpot_s: 0.06,
        attainment: 0.9,
    };
    let mut cfg = AdvisorConfig::new(slo, 4);
    cfg.streak = 1;
    cfg.mode = Mode::Manual;
    let mut a = Advisor::new(cfg, model(), ClusterConfig::defaults(current), current).unwrap();
    let span = window.last().unwrap().arrival;
    let advice = a.observe(span, span, &window).unwrap();
    let got = snapshot(&advice);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/advice.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; write it with UPDATE_GOLDEN=1 and review it",
            path.display()
        )
    });
    assert_eq!(
        got, want,
        "the advice moved; if intended, regenerate with UPDATE_GOLDEN=1 and review the diff"
    );
    // The snapshot itself says what it should.
    assert!(want.contains("action: Suggest"), "{want}");
    assert!(!want.contains("recommended: 1P3D"), "{want}");
}
