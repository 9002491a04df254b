//! The live ratio advisor on a mock cluster under `xpyd up` (real processes, the mock
//! engine timed by the same profile the advisor simulates with): a 1P3D cluster under
//! long prompts and short outputs — prefill-bound — gets advice for more prefill
//! workers within a few windows; the admin API names bad input; the window replays as
//! a trace; `xpyd recommend --url` ranks the live traffic; switched to auto mode, the
//! advisor applies the split itself and the supervisor converges to it — flipping decode
//! workers to prefill in place — with no request failed.
//! Run: `cargo test --release -p xpyd --test cluster_advisor -- --ignored`.

mod common;
mod supervisor;

use common::cluster::{eventually, get, post_raw};
use common::tiny_model;
use serde_json::{Value, json};
use std::time::Duration;
use supervisor::{Load, Sup};

fn manifest(profile: &str) -> String {
    let role = format!("engine: mock, mock_profile: {profile}, prefill_chunk: 256");
    format!(
        "name: advisor-live\nmode: disaggregated\n\
         advisor: {{ enabled: true, window_s: 5, streak: 1, profile: {profile}, slo: {{ ttft_ms: 3000, tpot_ms: 200 }} }}\n\
         roles:\n  prefill: {{ replicas: 1, {role} }}\n  decode: {{ replicas: 3, {role} }}\n"
    )
}

fn put(url: &str, body: &Value) -> (u16, Value) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let resp = agent
        .put(url)
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap();
    let code = resp.status().as_u16();
    let text = resp.into_body().read_to_string().unwrap();
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `(prefill, decode)` replicas in an advice's `recommended_replicas`.
fn split(v: &Value) -> (u64, u64) {
    (
        v["prefill"].as_u64().unwrap_or(0),
        v["decode"].as_u64().unwrap_or(0),
    )
}

#[test]
#[ignore = "starts a cluster; scripts/test.sh runs it with --ignored"]
fn the_live_advisor_suggests_then_applies_more_prefill_for_long_prompts() {
    let (_d, model) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profile.json");
    std::fs::write(&path, common::slow_prefill_profile().to_string()).unwrap();
    let up = Sup::start(&manifest(&path.display().to_string()), &model, &[], true);
    let http = up.http.clone();
    let advisor = |path: &str| get(&format!("{http}/v1/advisor{path}"));
    let (code, s) = advisor("");
    assert_eq!(code, 200, "{s}");
    assert!(s["profile"]["fit_error"].is_object(), "{s}");
    assert_eq!(s["current"], "1P3D", "{s}");
    // Long prompts (a few hundred tokens), 2 output tokens: prefill-bound.
    let load = Load::shaped(&http, 4, 150, 2);
    let mut last = Value::Null;
    eventually(Duration::from_secs(90), "advice for more prefill", || {
        last = advisor("").1;
        eprintln!(
            "advisor: {} ok, {} failed: {} / {} → {} ({})",
            load.ok(),
            load.failures().len(),
            last["status"],
            last["advice"]["action"],
            last["advice"]["recommended"],
            last["advice"]["why"]
        );
        std::thread::sleep(Duration::from_millis(900));
        last["advice"]["action"] == "suggest"
            && split(&last["advice"]["recommended_replicas"]).0 > 1
    });
    let a = &last["advice"];
    assert_eq!(a["current"], "1P3D", "{a}");
    assert_eq!(a["curve"].as_array().unwrap().len(), 4, "{a}");
    assert!(
        a["goodput"]["recommended"].as_f64().unwrap() > a["goodput"]["current"].as_f64().unwrap()
    );
    assert!(a["now"]["ttft_ms"]["p90"].is_number() && a["after"]["tpot_ms"]["p90"].is_number());
    assert!(a["why"].as_str().unwrap().contains("goodput"), "{a}");
    assert!(last["window_requests"].as_u64().unwrap() >= 10, "{last}");
    // The window is a replayable trace of what was served.
    let (code, _) = advisor("/window");
    assert_eq!(code, 200);
    let text = ureq::get(&format!("{http}/v1/advisor/window"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 10, "{text}");
    eprintln!(
        "window: {}\nadvice: {a}",
        lines
            .iter()
            .take(3)
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        lines
            .iter()
            .all(|l| l["input"].as_u64().unwrap() > 150 && l["output"] == 2)
    );
    // Bad input names the field; nothing changes.
    let (code, v) = put(
        &format!("{http}/v1/advisor/config"),
        &json!({"window_s": 1}),
    );
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (400, Some("window_s")),
        "{v}"
    );
    let (code, v) = put(&format!("{http}/v1/advisor/config"), &json!({"budget": 0}));
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (400, Some("budget")),
        "{v}"
    );
    let (code, v, _) = post_raw(
        &format!("{http}/v1/advisor/apply"),
        &json!({"router": 2}).to_string(),
        None,
    );
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (400, Some("role")),
        "{v}"
    );
    // The CLI ranks the live traffic with the coordinator's profile.
    let out = common::xpyd()
        .args(["recommend", "--url", &http, "--slo", "3000,200"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("1P3D") && table.contains("recommended: "),
        "{table}"
    );
    // Auto mode: the advisor applies the split itself; the supervisor converges.
    let (code, v) = put(
        &format!("{http}/v1/advisor/config"),
        &json!({"mode": "auto"}),
    );
    assert_eq!(code, 200, "{v}");
    eventually(Duration::from_secs(60), "an auto apply", || {
        last = advisor("").1;
        last["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|c| c["by"] == "advisor (auto)"))
    });
    let target = split(&last["desired"]["replicas"]);
    assert!(target.0 > 1 && target.0 + target.1 == 4, "{last}");
    eventually(
        Duration::from_secs(90),
        "the cluster runs the applied split",
        || {
            let s = advisor("").1;
            s["converged"] == true
                && split(&s["current_replicas"]) == target
                && up.ready_workers() == 4
        },
    );
    // Same number of processes: the supervisor flipped decode workers in place.
    let flips = up
        .events("")
        .iter()
        .filter(|e| e["reason"] == "Flipped")
        .count() as u64;
    assert_eq!(flips, target.0 - 1, "one flip per prefill worker added");
    let n = load.ok();
    eventually(Duration::from_secs(30), "still serving", || {
        load.ok() > n + 10
    });
    let (ok, failed) = load.stop();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok + failed.len() as u64
    );
    assert!(
        up.events("subject=advisor")
            .iter()
            .any(|e| e["reason"] == "RatioApplied"),
        "no RatioApplied event"
    );
}
