//! The supervisor with real processes (`xpyd up`) on the tiny model: probes and states
//! (readiness out of routing and back, liveness rebuild, a startup probe that never
//! passes), each rebuild scope restarting exactly its workers, rolling upgrades under
//! load (and one to a broken manifest, rolled back), scaling under load, the stop paths
//! (SIGTERM with requests in flight, a second signal, `xpyd down`, SIGKILL of `xpyd up`),
//! the events of each with their severities, the control plane's refusals naming the
//! field, and role flips (an applied split within the same processes).
//! Run one at a time: `cargo test --release -p xpyd --test cluster_supervisor --
//! --ignored --test-threads=1`.

mod common;
mod supervisor;

use common::cluster::{eventually, sse, try_post_raw};
use common::tiny_model;
use nix::sys::signal::Signal;
use serde_json::json;
use std::time::Duration;
use supervisor::{Load, Sup, alive, manifest};

/// A probe whose command fails while `{dir}/<worker id>.<tag>` exists.
fn file_probe(kind: &str, tag: &str) -> String {
    format!(
        "{kind}: {{ command: \"test ! -e {{dir}}/{{worker_id}}.{tag}\", delay_s: 1, interval_s: 1, timeout_s: 2, failure_threshold: 2 }}"
    )
}

const LONG: Duration = Duration::from_secs(30);

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn a_worker_failing_readiness_leaves_routing_and_returns() {
    let (_d, model) = tiny_model();
    let yaml = manifest(
        "sup-ready",
        "",
        &format!(", probes: {{ {} }}", file_probe("readiness", "unready")),
        "",
    );
    let up = Sup::start(&yaml, &model, &[], true);
    let pid = up.worker("decode-0").unwrap()["pid"].as_u64().unwrap();
    std::fs::write(up.dir.path().join("decode-0.unready"), "").unwrap();
    eventually(LONG, "decode-0 NotReady and unroutable", || {
        up.worker("decode-0").unwrap()["state"] == "NotReady"
            && up.routed("decode-0").unwrap().0 == "unroutable"
    });
    assert_eq!(
        up.status()["state"],
        "Alarm",
        "a probe failure while running"
    );
    let before = up.routed("decode-0").unwrap().1;
    let load = Load::start(&up.http, 2);
    eventually(LONG, "requests served", || load.ok() >= 10);
    let (ok, failed) = load.stop();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(
        up.routed("decode-0").unwrap().1,
        before,
        "nothing routed to it in {ok} requests"
    );
    std::fs::remove_file(up.dir.path().join("decode-0.unready")).unwrap();
    eventually(LONG, "decode-0 back", || {
        up.worker("decode-0").unwrap()["state"] == "Ready"
            && up.routed("decode-0").unwrap().0 == "ready"
    });
    eventually(LONG, "service Running", || {
        up.status()["state"] == "Running"
    });
    assert_eq!(
        up.worker("decode-0").unwrap()["pid"].as_u64(),
        Some(pid),
        "not rebuilt"
    );
    assert!(up.has_event(
        "decode-0",
        "ProbeFailed",
        "Warning",
        "readiness probe failed (1/2)"
    ));
    assert!(up.has_event("decode-0", "StateChanged", "Warning", "Ready → NotReady"));
    assert!(up.has_event("decode-0", "StateChanged", "Normal", "NotReady → Ready"));
    assert!(up.has_event("sup-ready", "StateChanged", "Warning", "Running → Alarm"));
    assert!(up.has_event("sup-ready", "StateChanged", "Normal", "Alarm → Running"));
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn a_worker_failing_liveness_is_rebuilt_alone() {
    let (_d, model) = tiny_model();
    let yaml = manifest(
        "sup-live",
        "",
        &format!(", probes: {{ {} }}", file_probe("liveness", "dead")),
        "",
    );
    let up = Sup::start(&yaml, &model, &[], true);
    let coordinator = up.status()["coordinator"]["pid"].as_u64().unwrap();
    let before = up.pids();
    let victim = before.iter().find(|(id, _)| id == "decode-1").unwrap().1;
    let mark = up.dir.path().join("decode-1.dead");
    std::fs::write(&mark, "").unwrap();
    eventually(LONG, "decode-1 rebuilt", || {
        up.worker("decode-1")
            .and_then(|w| w["pid"].as_u64())
            .is_some_and(|p| p != victim)
    });
    std::fs::remove_file(&mark).unwrap();
    eventually(LONG, "decode-1 ready again", || {
        up.worker("decode-1").unwrap()["state"] == "Ready"
    });
    assert!(!alive(victim));
    assert_eq!(up.worker("decode-1").unwrap()["restarts"], 1);
    for (id, pid) in before.iter().filter(|(id, _)| id != "decode-1") {
        assert_eq!(
            up.worker(id).unwrap()["pid"].as_u64(),
            Some(*pid),
            "{id} untouched"
        );
    }
    assert!(up.has_event(
        "decode-1",
        "StateChanged",
        "Error",
        "→ Failed: liveness probe failed 2 times"
    ));
    assert_eq!(
        up.status()["coordinator"]["pid"].as_u64(),
        Some(coordinator),
        "the coordinator untouched"
    );
    assert!(up.has_event(
        "decode-1",
        "Rebuild",
        "Warning",
        "rebuild (scope process): decode-1 after decode-1 liveness probe failed 2 times"
    ));
    // The crash made the service Alarm (a Warning) until decode-1 was ready again.
    eventually(LONG, "sup-live Running → Alarm → Running", || {
        up.has_event("sup-live", "StateChanged", "Warning", "Running → Alarm")
            && up.has_event("sup-live", "StateChanged", "Normal", "Alarm → Running")
    });
    assert_eq!(up.post_completion(), 200);
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn a_startup_probe_that_never_passes_makes_the_service_abnormal() {
    let (_d, model) = tiny_model();
    let probe =
        ", probes: { startup: { command: \"false\", interval_s: 1, failure_threshold: 2 } }";
    let mut up = Sup::start(&manifest("sup-abnormal", "", probe, ""), &model, &[], false);
    eventually(LONG, "Abnormal", || up.status()["state"] == "Abnormal");
    eventually(LONG, "the events", || {
        up.has_event(
            "sup-abnormal",
            "StateChanged",
            "Warning",
            "Deploying → Abnormal",
        ) && up.has_event(
            "decode-0",
            "StateChanged",
            "Error",
            "Starting → Failed: startup probe failed 2 times",
        )
    });
    // Each failure restarts it after a backoff of 0.5 s, 1 s, ...; the third failure in a
    // row (about 10 s in: 1 s delay + 1 s interval per start) is a crash loop.
    eventually(LONG, "a CrashLoop event", || {
        up.has_event(
            "decode-0",
            "CrashLoop",
            "Error",
            "failed 3 times in a row (last: startup probe failed 2 times",
        )
    });
    let warnings = up.events("severity=warning&subject=decode");
    assert!(
        warnings.iter().all(|e| e["severity"] != "Normal"),
        "{warnings:?}"
    );
    assert!(warnings.iter().any(|e| e["reason"] == "Rebuild"));
    assert!(warnings.iter().any(|e| e["reason"] == "CrashLoop"));
    assert_eq!(up.worker("prefill-0").unwrap()["state"], "Ready");
    let (st, _) = up.signal_and_wait(Signal::SIGINT, Duration::from_secs(40));
    assert!(st.success(), "{st}");
}

/// Fails worker `id` through its liveness file and waits until `expect` are rebuilt;
/// asserts their old processes are gone, the Rebuild event names exactly them with
/// `scope`, and every other worker and the coordinator kept its process (same pid, no
/// restart).
fn fail_and_check_scope(up: &Sup, id: &str, scope: &str, expect: &[&str]) {
    let coordinator = up.status()["coordinator"]["pid"].as_u64().unwrap();
    let before = up.pids();
    let restarts = |w: &str| up.worker(w).unwrap()["restarts"].as_u64().unwrap();
    let restarts_before: Vec<(String, u64)> = before
        .iter()
        .map(|(w, _)| (w.clone(), restarts(w)))
        .collect();
    std::fs::write(up.dir.path().join(format!("{id}.dead")), "").unwrap();
    let changed = |w: &str| {
        let old = before.iter().find(|(i, _)| i == w).unwrap().1;
        up.worker(w)
            .and_then(|v| v["pid"].as_u64())
            .is_some_and(|p| p != old)
    };
    eventually(LONG, &format!("{expect:?} rebuilt"), || {
        expect.iter().all(|w| changed(w))
    });
    std::fs::remove_file(up.dir.path().join(format!("{id}.dead"))).unwrap();
    eventually(LONG, "all ready again", || {
        up.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["state"] == "Ready")
    });
    for (w, pid) in &before {
        if expect.contains(&w.as_str()) {
            assert!(!alive(*pid), "{w}'s old process {pid} is gone");
            continue;
        }
        assert_eq!(
            up.worker(w).unwrap()["pid"].as_u64(),
            Some(*pid),
            "{w} is outside the scope"
        );
        assert!(alive(*pid), "{w} ({pid}) still runs");
        let was = restarts_before.iter().find(|(i, _)| i == w).unwrap().1;
        assert_eq!(restarts(w), was, "{w} was not restarted");
    }
    assert_eq!(
        up.status()["coordinator"]["pid"].as_u64(),
        Some(coordinator),
        "the coordinator is outside every scope"
    );
    let mut names = expect.to_vec();
    names.sort_unstable();
    let text = format!(
        "rebuild (scope {scope}): {} after {id} liveness probe failed",
        names.join(", ")
    );
    eventually(Duration::from_secs(10), &text, || {
        up.has_event(id, "Rebuild", "Warning", &text)
    });
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn rebuild_scopes_unit_and_unit_replica_restart_exactly_their_workers() {
    let (_d, model) = tiny_model();
    let live = file_probe("liveness", "dead");
    let yaml = format!(
        "name: sup-scopes\nmode: disaggregated\nroles:\n  prefill: {{ replicas: 2, rebuild_scope: unit_replica, probes: {{ {live} }} }}\n  decode: {{ replicas: 2, rebuild_scope: unit, probes: {{ {live} }} }}\n"
    );
    let up = Sup::start(&yaml, &model, &[], true);
    fail_and_check_scope(&up, "decode-1", "unit", &["decode-0", "decode-1"]);
    fail_and_check_scope(&up, "prefill-0", "unit_replica", &["prefill-0", "decode-0"]);
    assert_eq!(up.post_completion(), 200);
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn rebuild_scope_deployment_replica_restarts_every_worker_but_not_the_coordinator() {
    let (_d, model) = tiny_model();
    let yaml = manifest("sup-deploy", "", ", rebuild_scope: deployment_replica", "");
    let up = Sup::start(&yaml, &model, &[], true);
    let coordinator = up.status()["coordinator"]["pid"].as_u64().unwrap();
    let before = up.pids();
    let victim = before.iter().find(|(id, _)| id == "decode-0").unwrap().1;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    eventually(LONG, "every worker rebuilt and ready", || {
        let now = up.pids();
        now.len() == 3
            && before
                .iter()
                .all(|(id, p)| now.iter().any(|(i, q)| i == id && q != p))
            && up.status()["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["state"] == "Ready")
    });
    let s = up.status();
    assert_eq!(s["coordinator"]["pid"].as_u64(), Some(coordinator));
    assert_eq!(s["coordinator"]["restarts"], 0, "{s}");
    assert!(alive(coordinator), "the coordinator still runs");
    for (id, pid) in &before {
        assert!(!alive(*pid), "{id}'s old process {pid} is gone");
    }
    assert!(up.has_event("decode-0", "StateChanged", "Error", "exited unexpectedly"));
    assert!(up.has_event(
        "decode-0",
        "Rebuild",
        "Warning",
        "rebuild (scope deployment_replica): decode-0, decode-1, prefill-0 after decode-0 \
         exited unexpectedly"
    ));
    assert_eq!(up.post_completion(), 200);
}

impl Sup {
    /// The coordinator's audit entries of `action`.
    fn audited(&self, action: &str) -> Vec<serde_json::Value> {
        let (code, v) = common::cluster::get(&format!("{}/v1/audit?limit=1000", self.http));
        assert_eq!(code, 200, "{v}");
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == action)
            .cloned()
            .collect()
    }

    fn post_completion(&self) -> u16 {
        let body = json!({"prompt": "hello", "max_tokens": 4, "temperature": 0});
        common::cluster::post_raw(
            &format!("{}/v1/completions", self.http),
            &body.to_string(),
            None,
        )
        .0
    }
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn a_rolling_upgrade_under_load_fails_no_request() {
    let (_d, model) = tiny_model();
    let up = Sup::start(
        &manifest("sup-upgrade", "", ", max_running: 16", ""),
        &model,
        &[],
        true,
    );
    let old = up.pids();
    let new = up.dir.path().join("v2.yaml");
    std::fs::write(&new, manifest("sup-upgrade", "", ", max_running: 8", "")).unwrap();
    let load = Load::start(&up.http, 3);
    eventually(LONG, "load running", || load.ok() >= 5);
    let n = load.ok();
    let out = common::xpyd()
        .args(["upgrade", "-f"])
        .arg(&new)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("v1 → v2 complete"), "{stdout}");
    let during = load.ok();
    assert!(
        during > n,
        "no request succeeded during the upgrade ({n} before, {during} after): {:?}",
        load.failures()
    );
    eventually(LONG, "serving after the upgrade", || {
        load.ok() >= during + 10
    });
    let (ok, failed) = load.stop();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok + failed.len() as u64
    );
    let s = up.status();
    assert_eq!(s["version"], 2);
    // The upgrade is in the coordinator's audit log, as its own control call reported.
    eventually(LONG, "the upgrade audited", || {
        up.audited("POST /v1/upgrade (supervisor)").iter().any(|e| {
            e["status"] == 202 && e["who"] == "cluster token (supervisor control endpoint)"
        })
    });
    let decode: Vec<_> = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["role"] == "decode")
        .collect();
    assert_eq!(decode.len(), 2);
    for w in &decode {
        assert_eq!(w["version"], 2, "{w}");
        assert!(
            !old.iter().any(|(_, p)| Some(*p) == w["pid"].as_u64()),
            "{w} is new"
        );
    }
    let prefill = up.worker("prefill-0").unwrap();
    assert_eq!(
        prefill["version"], 1,
        "prefill did not change and was not rolled"
    );
    assert!(up.has_event(
        "sup-upgrade",
        "UpgradeStep",
        "Normal",
        "upgrade v1 → v2 complete"
    ));
    assert!(up.has_event(
        "sup-upgrade",
        "StateChanged",
        "Normal",
        "Running → Upgrading"
    ));
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn an_upgrade_to_a_broken_manifest_stops_and_the_old_version_keeps_serving() {
    let (_d, model) = tiny_model();
    let up = Sup::start(&manifest("sup-broken", "", "", ""), &model, &[], true);
    let old = up.pids();
    let broken = up.dir.path().join("broken.yaml");
    let probe =
        ", probes: { startup: { command: \"false\", interval_s: 1, failure_threshold: 2 } }";
    std::fs::write(&broken, manifest("sup-broken", "", probe, "")).unwrap();
    let load = Load::start(&up.http, 2);
    eventually(LONG, "load running", || load.ok() >= 5);
    let n = load.ok();
    let out = common::xpyd()
        .args(["upgrade", "-f"])
        .arg(&broken)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rolled back"), "{stderr}");
    let during = load.ok();
    assert!(
        during > n,
        "no request succeeded during the upgrade ({n} before, {during} after): {:?}",
        load.failures()
    );
    eventually(LONG, "back to the old workers", || {
        let s = up.status();
        s["upgrade"].is_null() && s["workers"].as_array().unwrap().len() == 3
    });
    let after = load.ok();
    eventually(LONG, "serving after the rollback", || {
        load.ok() >= after + 10
    });
    let (ok, failed) = load.stop();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok + failed.len() as u64
    );
    assert_eq!(up.pids(), old, "the old workers never stopped");
    for (id, pid) in &old {
        assert!(alive(*pid), "{id} ({pid}) still runs");
        assert_eq!(up.worker(id).unwrap()["version"], 1);
        assert_eq!(
            up.worker(id).unwrap()["restarts"],
            0,
            "{id} never restarted"
        );
    }
    assert_eq!(up.status()["version"], 1);
    assert!(up.has_event("sup-broken", "Rollback", "Error", "rolling back to v1"));
    assert!(up.has_event("sup-broken", "Rollback", "Error", "rolled back to v1"));
    assert_eq!(up.post_completion(), 200);
    // A model change is refused, naming the field, before anything happens.
    let other = up.dir.path().join("model.yaml");
    std::fs::write(
        &other,
        manifest("sup-broken", "", "", "model: /elsewhere/other.gguf\n"),
    )
    .unwrap();
    let out = common::xpyd()
        .args(["upgrade", "-f"])
        .arg(&other)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("model: changes the model"), "{stderr}");
    // New workers that start but never become ready: the progress deadline ends the
    // upgrade, rolls it back, and the old workers serve on.
    let unready = up.dir.path().join("unready.yaml");
    let probe =
        ", probes: { readiness: { command: \"false\", interval_s: 1, failure_threshold: 1 } }";
    let extra = "upgrade: { progress_deadline_s: 10 }\n";
    std::fs::write(&unready, manifest("sup-broken", probe, "", extra)).unwrap();
    let t0 = std::time::Instant::now();
    let out = common::xpyd()
        .args(["upgrade", "-f"])
        .arg(&unready)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rolled back"), "{stderr}");
    assert!(
        t0.elapsed() >= Duration::from_secs(10),
        "rolled back after {:?}, before the deadline",
        t0.elapsed()
    );
    assert!(up.has_event(
        "sup-broken",
        "Rollback",
        "Error",
        "no progress within the deadline of 10s"
    ));
    eventually(LONG, "back to the old workers again", || {
        let s = up.status();
        s["upgrade"].is_null() && s["workers"].as_array().unwrap().len() == 3
    });
    assert_eq!(up.pids(), old, "the old workers never stopped");
    assert_eq!(up.post_completion(), 200);
    // The model file changed on disk under the running cluster (a byte appended: a new
    // fingerprint): an upgrade is refused, naming the field, before anything happens.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&model)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0]).unwrap();
    drop(f);
    let out = common::xpyd()
        .args(["upgrade", "-f"])
        .arg(&unready)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("model: the model file"), "{stderr}");
    assert!(stderr.contains("new fingerprint"), "{stderr}");
    assert_eq!(up.pids(), old);
}

/// `xpyd scale` and `POST /v1/scale` refuse an unknown role or a bad count naming the
/// field; after a crash of the last decode worker (rebuilt, the service Alarm and back),
/// `xpyd events --severity warning` returns those events and none of the Normal ones.
fn check_scale_refusals_and_events(up: &Sup, scale: &dyn Fn(&str, &str) -> std::process::Output) {
    // Refusals name the field.
    let out = scale("combined", "2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("role: `combined` is not a role of this cluster (prefill, decode)"),
        "{stderr}"
    );
    // Only the cluster's own calls change it: without the credential, 401.
    let (code, v, _) = common::cluster::post_raw(
        &format!("{}/v1/scale", up.control),
        &json!({"role": "decode", "replicas": 2}).to_string(),
        None,
    );
    assert_eq!(code, 401, "{v}");
    let (code, v) = up.control_post("/v1/scale", &json!({"role": "decode", "replicas": 0}));
    assert_eq!(
        (code, v["error"]["field"].as_str()),
        (400, Some("replicas")),
        "{v}"
    );
    let (code, v) = up.control_post("/v1/scale", &json!({"role": "encode", "replicas": 1}));
    assert_eq!(
        (
            code,
            v["error"]["field"].as_str(),
            v["error"]["param"].as_str()
        ),
        (400, Some("role"), Some("role")),
        "{v}"
    );
    // Refused or not, every change call that carried the credential is audited.
    eventually(LONG, "the refused scale audited", || {
        up.audited("POST /v1/scale (supervisor)").iter().any(|e| {
            e["status"] == 400 && e["request"]["role"] == "encode" && e["peer"].is_string()
        })
    });
    // A crash of the last decode worker: its Rebuild and the service's Alarm are
    // Warnings, for the severity filter to return among the Normal scaling events.
    let (victim, pid) = up
        .pids()
        .into_iter()
        .find(|(id, _)| id.starts_with("decode-"))
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    eventually(LONG, "the crash's events", || {
        up.has_event(&victim, "Rebuild", "Warning", "exited unexpectedly")
            && up.has_event("sup-scale", "StateChanged", "Warning", "Running → Alarm")
    });
    eventually(LONG, "rebuilt and Running again", || {
        let s = up.status();
        s["state"] == "Running"
            && s["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["state"] == "Ready" && w["pid"].is_u64())
    });
    // `xpyd events --json` reads them back, with and without a severity filter.
    let events = |args: &[&str]| -> Vec<serde_json::Value> {
        let out = common::xpyd()
            .args(["events", "-f"])
            .arg(&up.manifest)
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
        let list = v["events"].as_array().cloned();
        list.unwrap_or_else(|| panic!("no events: {stdout}"))
    };
    let all = events(&["--subject", "sup-scale"]);
    assert!(all.iter().any(|e| e["reason"] == "Scaled"), "{all:?}");
    let warnings = events(&["--severity", "warning"]);
    assert!(!warnings.is_empty());
    assert!(
        warnings
            .iter()
            .all(|e| e["severity"] == "Warning" || e["severity"] == "Error"),
        "{warnings:?}"
    );
    assert!(
        !warnings.iter().any(|e| e["reason"] == "Scaled"),
        "{warnings:?}"
    );
    let alarm = |e: &serde_json::Value| {
        let m = e["message"].as_str().unwrap_or("");
        e["subject"] == "sup-scale"
            && e["reason"] == "StateChanged"
            && m.contains("Running → Alarm")
    };
    assert!(warnings.iter().any(alarm), "{warnings:?}");
    assert!(
        warnings
            .iter()
            .any(|e| e["subject"] == victim.as_str() && e["reason"] == "Rebuild"),
        "{warnings:?}"
    );
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn scale_up_and_down_under_load_fails_no_request_and_down_stops_all() {
    let (_d, model) = tiny_model();
    let mut up = Sup::start(&manifest("sup-scale", "", "", ""), &model, &[], true);
    let file = up.manifest.clone();
    let scale = |role: &str, n: &str| {
        common::xpyd()
            .args(["scale", "-f"])
            .arg(&file)
            .args(["--role", role, "--replicas", n])
            .output()
            .unwrap()
    };
    let load = Load::start(&up.http, 3);
    eventually(LONG, "load running", || load.ok() >= 5);
    let out = scale("decode", "3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("decode: 2 → 3"));
    eventually(LONG, "decode-2 routed", || {
        up.routed("decode-2").is_some_and(|r| r.0 == "ready")
    });
    let n = load.ok();
    eventually(LONG, "decode-2 takes requests", || {
        load.ok() > n + 10 && up.routed("decode-2").unwrap().1 > 0
    });
    // A planned scale-up is not an alarm (new workers starting count as starting, not
    // missing).
    assert!(
        !up.has_event("sup-scale", "StateChanged", "Warning", "Running → Alarm"),
        "{:?}",
        up.events("subject=sup-scale")
    );
    let decode = || {
        let mut v = up.pids();
        v.retain(|(id, _)| id.starts_with("decode-"));
        v
    };
    let three = decode();
    assert_eq!(three.len(), 3, "{three:?}");
    let n = load.ok();
    assert!(scale("decode", "1").status.success());
    eventually(LONG, "one decode worker left", || {
        up.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["role"] == "decode")
            .count()
            == 1
    });
    let during = load.ok();
    assert!(
        during > n,
        "no request succeeded during the scale-down: {:?}",
        load.failures()
    );
    // The one left kept its process; the two removed ones' processes are gone.
    let one = decode();
    assert_eq!(one.len(), 1, "{one:?}");
    assert!(three.contains(&one[0]), "{one:?} is one of {three:?}");
    let removed: Vec<u64> = three
        .iter()
        .filter(|w| **w != one[0])
        .map(|(_, p)| *p)
        .collect();
    assert_eq!(removed.len(), 2);
    eventually(
        Duration::from_secs(10),
        "removed workers' processes gone",
        || removed.iter().all(|p| !alive(*p)),
    );
    let n = load.ok();
    eventually(LONG, "still serving", || load.ok() > n + 10);
    let (ok, failed) = load.stop();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok + failed.len() as u64
    );
    assert!(up.has_event("sup-scale", "Scaled", "Normal", "decode: 2 → 3 replicas"));
    assert!(up.has_event("sup-scale", "Scaled", "Normal", "decode: 3 → 1 replicas"));
    check_scale_refusals_and_events(&up, &scale);
    // `xpyd down` stops everything and returns once `xpyd up` has exited.
    let children: Vec<u64> = up.pids().into_iter().map(|(_, p)| p).collect();
    let out = common::xpyd()
        .args(["down", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = up.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{st}");
    assert!(
        children.iter().all(|p| !alive(*p)),
        "children left: {children:?}"
    );
}

/// A 1P2D cluster whose processes have 20 s to stop gracefully and whose decode steps
/// take `step_ms`.
fn graceful_20s(name: &str, model: &std::path::Path, step_ms: u32) -> Sup {
    let graceful = ", graceful_shutdown: { timeout_s: 20 }";
    let yaml = manifest(
        name,
        graceful,
        graceful,
        "coordinator: { graceful_shutdown: { timeout_s: 20 } }\n",
    );
    let delay = format!("decode-0={step_ms},decode-1={step_ms}");
    Sup::start(&yaml, model, &[("XPYD_DEBUG_DELAY", &delay)], true)
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn sigterm_with_requests_in_flight_lets_them_finish_within_the_timeout() {
    let (_d, model) = tiny_model();
    let mut up = graceful_20s("sup-term", &model, 30);
    let url = format!("{}/v1/completions", up.http);
    let streams: Vec<_> = (0..4)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let body = json!({"prompt": format!("stream {i}"), "max_tokens": 60, "temperature": 0,
                    "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
                sse(&url, &body).1
            })
        })
        .collect();
    eventually(LONG, "streams in flight", || {
        ["decode-0", "decode-1"]
            .iter()
            .map(|w| up.routed(w).unwrap().1)
            .sum::<u64>()
            >= 4
    });
    std::thread::sleep(Duration::from_millis(300));
    let (st, took) = up.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60));
    assert!(st.success(), "{st}");
    assert!(took < Duration::from_secs(45), "stopped after {took:?}");
    for s in streams {
        let chunks = s.join().expect("stream completed");
        let usage = chunks
            .iter()
            .rev()
            .find(|c| c["usage"].is_object())
            .expect("usage chunk");
        assert_eq!(usage["usage"]["completion_tokens"], 60, "{usage}");
    }
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn a_second_signal_kills_every_process_at_once_and_exits_130() {
    let (_d, model) = tiny_model();
    // 150 tokens at 100 ms a step: a stream of about 15 s, which the graceful stop waits
    // for (up to 20 s).
    let mut up = graceful_20s("sup-term2", &model, 100);
    let mut children: Vec<u64> = up.pids().into_iter().map(|(_, p)| p).collect();
    children.push(up.status()["coordinator"]["pid"].as_u64().unwrap());
    let url = format!("{}/v1/completions", up.http);
    let body = json!({"prompt": "a long stream", "max_tokens": 150, "temperature": 0,
        "ignore_eos": true, "stream": true});
    let stream = std::thread::spawn(move || try_post_raw(&url, &body.to_string(), LONG));
    eventually(LONG, "the stream in flight", || {
        ["decode-0", "decode-1"]
            .iter()
            .map(|w| up.routed(w).unwrap().1)
            .sum::<u64>()
            >= 1
    });
    std::thread::sleep(Duration::from_millis(300));
    let up_pid = nix::unistd::Pid::from_raw(up.pid() as i32);
    nix::sys::signal::kill(up_pid, Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        !stream.is_finished(),
        "the graceful stop waits for the stream"
    );
    let (st, took) = up.signal_and_wait(Signal::SIGINT, Duration::from_secs(10));
    assert_eq!(st.code(), Some(130), "{st}");
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after the second signal"
    );
    eventually(Duration::from_secs(5), "every child killed", || {
        children.iter().all(|p| !alive(*p))
    });
    // The stream was cut, not finished.
    eventually(Duration::from_secs(10), "the stream ended", || {
        stream.is_finished()
    });
    if let Ok((_, raw)) = stream.join().unwrap() {
        let raw = raw.as_str().unwrap_or("");
        assert!(!raw.contains("[DONE]"), "{raw}");
    }
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn sigkill_of_up_leaves_no_child() {
    let (_d, model) = tiny_model();
    let mut up = Sup::start(&manifest("sup-kill", "", "", ""), &model, &[], true);
    let mut children: Vec<u64> = up.pids().into_iter().map(|(_, p)| p).collect();
    children.push(up.status()["coordinator"]["pid"].as_u64().unwrap());
    assert_eq!(children.len(), 4);
    let (st, _) = up.signal_and_wait(Signal::SIGKILL, Duration::from_secs(10));
    assert!(!st.success());
    eventually(Duration::from_secs(45), "every child gone", || {
        children.iter().all(|p| !alive(*p))
    });
}

/// The pid of worker `id` in a `Sup::pids` list.
fn pid_of(pids: &[(String, u64)], id: &str) -> u64 {
    pids.iter()
        .find(|(w, _)| w == id)
        .unwrap_or_else(|| panic!("no worker {id} in {pids:?}"))
        .1
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn an_applied_split_flips_a_worker_in_place_under_load_and_fails_no_request() {
    let (_d, model) = tiny_model();
    let yaml = "name: flip\nmode: disaggregated\nroles:\n  prefill: { replicas: 2 }\n  decode: { replicas: 1 }\n";
    let up = Sup::start(yaml, &model, &[], true);
    let before = up.pids();
    assert_eq!(before.len(), 3, "{before:?}");
    let load = Load::start(&up.http, 3);
    eventually(Duration::from_secs(30), "load flowing", || load.ok() > 10);
    let apply = |body: &str| {
        let url = format!("{}/v1/advisor/apply", up.http);
        let (code, v, _) = common::cluster::post_raw(&url, body, None);
        assert_eq!(code, 200, "{v}");
    };
    // 2P1D → 1P2D keeps three processes: the highest-index prefill worker flips (its KV
    // pools move into shared memory for placed transfers).
    apply(r#"{"prefill": 1, "decode": 2}"#);
    eventually(Duration::from_secs(60), "prefill-1 flipped", || {
        up.has_event("decode-1", "Flipped", "Normal", "same process, no reload")
    });
    let flipped = up.pids();
    assert_eq!(
        pid_of(&flipped, "decode-1"),
        pid_of(&before, "prefill-1"),
        "the same process serves the new role: {flipped:?}"
    );
    let mut pids: Vec<u64> = flipped.iter().map(|p| p.1).collect();
    let mut old: Vec<u64> = before.iter().map(|p| p.1).collect();
    pids.sort_unstable();
    old.sort_unstable();
    assert_eq!(pids, old, "no process was started or stopped");
    // The coordinator routes requests to it as a decode worker.
    eventually(Duration::from_secs(30), "decode-1 decodes", || {
        up.routed("decode-1")
            .is_some_and(|(state, routed)| state == "ready" && routed > 2)
    });
    assert!(
        up.routed("prefill-1").is_none(),
        "the old identity is gone from the cluster"
    );
    let w = up.worker("decode-1").unwrap();
    let worker_http = w["http"].as_str().unwrap().to_string();
    let (code, role) = common::cluster::get(&format!("{worker_http}/role"));
    assert_eq!(code, 200);
    assert_eq!(
        (role["role"].as_str(), role["worker_id"].as_str()),
        (Some("decode"), Some("decode-1")),
        "{role}"
    );
    // The supervisor refuses a flip that would leave a role empty, naming the field.
    let (code, v) = up.control_post(
        "/v1/flip",
        &json!({"from": "prefill", "to": "decode", "count": 1}),
    );
    assert_eq!(
        (code, v["error"]["field"].as_str()),
        (400, Some("count")),
        "{v}"
    );
    // Back: 1P2D → 2P1D flips the highest-index decode worker, this one.
    apply(r#"{"prefill": 2, "decode": 1}"#);
    eventually(Duration::from_secs(60), "decode-1 flipped back", || {
        up.has_event("prefill-1", "Flipped", "Normal", "same process")
    });
    assert_eq!(
        pid_of(&up.pids(), "prefill-1"),
        pid_of(&before, "prefill-1")
    );
    eventually(Duration::from_secs(30), "prefill-1 prefills again", || {
        up.routed("prefill-1")
            .is_some_and(|(state, routed)| state == "ready" && routed > 2)
    });
    let flips =
        common::cluster::metric_sum(&worker_http, "xpyd_worker_role_flip_seconds_count", "");
    assert_eq!(flips, 2.0, "the worker counted its two flips");
    // The worker's endpoint takes only the cluster's own calls, names what is wrong and
    // changes nothing.
    let credential = xpyd_runtime::plane::ClusterKey::load(&up.token_file)
        .unwrap()
        .bearer()
        .to_string();
    let post = |body: &str| {
        common::cluster::post_raw(
            &format!("{worker_http}/role"),
            body,
            Some((xpyd_runtime::plane::METADATA, &credential)),
        )
    };
    let (code, v, _) = common::cluster::post_raw(
        &format!("{worker_http}/role"),
        r#"{"role": "decode"}"#,
        None,
    );
    assert_eq!(code, 401, "{v}");
    for (body, field) in [
        (r#"{"role": "router"}"#, "role"),
        (r#"{"role": "combined"}"#, "role"),
        (r#"{"role": "decode", "worker_id": "bad id!"}"#, "worker_id"),
    ] {
        let (code, v, _) = post(body);
        assert_eq!(
            (code, v["error"]["field"].as_str()),
            (400, Some(field)),
            "{body}: {v}"
        );
    }
    let (code, v, _) = post("not json");
    assert_eq!(code, 400, "{v}");
    assert_eq!(
        common::cluster::get(&format!("{worker_http}/role")).1["role"],
        "prefill"
    );
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
    let events = up.events("");
    assert!(
        events.iter().all(|e| e["reason"] != "FlipFailed"),
        "no flip failed: {events:?}"
    );
    assert!(
        events.iter().all(|e| e["reason"] != "Started"
            || before.iter().any(|(id, _)| e["subject"] == id.as_str())),
        "no worker process was started for the new split"
    );
}
