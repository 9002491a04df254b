//! The dashboard in headless chromium (Debian's, through chromedriver) against a mock
//! cluster under `xpyd up` — real processes, the mock engine timed by the profile the
//! advisor simulates with, a prefill-bound load: the page loads with no console error;
//! the topology lists every worker; the charts receive points; a SIGKILLed worker shows
//! down within seconds, then ready again, and its Rebuild event appears; the advisor
//! panel shows a recommendation; a what-if change updates the prediction (bad ones name
//! the field); Apply, confirmed, changes the cluster's split, which the topology then
//! shows; a second apply meanwhile is a 409, and of two at once exactly one is taken;
//! the audit log lists the apply, on the page, at `/v1/audit` and in its file.
//! Screenshots go to `target/dashboard/`.
//! Run: `cargo test --release -p xpyd --test cluster_dashboard -- --ignored`.

mod browser;
mod common;
mod supervisor;

use browser::Browser;
use common::cluster::{eventually, get, post_raw};
use common::{real_model, tiny_model};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use supervisor::{Load, Sup};

fn manifest(profile: &str) -> String {
    let role = format!("engine: mock, mock_profile: {profile}, prefill_chunk: 256");
    format!(
        "name: dashboard-live\nmode: disaggregated\n\
         coordinator: {{ graceful_shutdown: {{ timeout_s: 60 }} }}\n\
         advisor: {{ enabled: true, window_s: 5, streak: 1, profile: {profile}, slo: {{ ttft_ms: 3000, tpot_ms: 200 }} }}\n\
         roles:\n  prefill: {{ replicas: 1, {role} }}\n  decode: {{ replicas: 3, {role} }}\n"
    )
}

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard")
}

/// The topology table as (worker, state) pairs.
fn topology(b: &Browser) -> Vec<(String, String)> {
    let v = b.eval(
        "return [...document.querySelectorAll('#topology tbody tr')].map(r => [r.dataset.worker, r.dataset.state]);",
    );
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap_or("").to_string(),
                p[1].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn state_of(b: &Browser, worker: &str) -> Option<String> {
    topology(b)
        .into_iter()
        .find(|(w, _)| w == worker)
        .map(|(_, s)| s)
}

#[test]
#[ignore = "starts a cluster and a browser; scripts/test.sh runs it with --ignored"]
fn the_dashboard_shows_the_cluster_live_and_applies_the_advisors_split() {
    let (_d, model) = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.json");
    std::fs::write(&profile, common::slow_prefill_profile().to_string()).unwrap();
    let state = dir.path().join("state");
    let state_env = state.display().to_string();
    let mut up = Sup::start(
        &manifest(&profile.display().to_string()),
        &model,
        &[(xpyd_runtime::env::STATE_DIR, &state_env)],
        true,
    );
    let http = up.http.clone();
    assert_eq!(
        up.dashboard,
        format!("{http}/dashboard"),
        "xpyd up prints it"
    );
    // Long prompts, 2 output tokens: prefill-bound, so the advisor asks for more prefill.
    let load = Load::shaped(&http, 4, 150, 2);

    let b = Browser::start();
    b.open(&up.dashboard);
    let timing = b.eval(
        "const t = performance.getEntriesByType('navigation')[0]; return [t.domContentLoadedEventEnd, t.loadEventEnd, t.transferSize];",
    );
    eprintln!(
        "dashboard page: DOMContentLoaded {} ms, load {} ms",
        timing[0], timing[1]
    );
    eventually(Duration::from_secs(20), "the stream ticks", || {
        b.eval("return window.xpyd.ticks").as_u64().unwrap_or(0) >= 2
    });

    // The topology lists every worker.
    eventually(
        Duration::from_secs(20),
        "every worker listed, ready",
        || {
            let t = topology(&b);
            let mut ids: Vec<&str> = t.iter().map(|(w, _)| w.as_str()).collect();
            ids.sort_unstable();
            ids == ["decode-0", "decode-1", "decode-2", "prefill-0"]
                && t.iter().all(|(_, s)| s == "ready")
        },
    );
    // The charts receive data under load.
    eventually(Duration::from_secs(30), "points with traffic", || {
        b.eval("return window.xpyd.points.filter(p => p.qps > 0 && p.ttft_ms.p90 > 0).length")
            .as_u64()
            .unwrap_or(0)
            >= 3
    });
    let charts = b.eval("return document.querySelectorAll('#charts .uplot').length");
    assert!(charts.as_u64().unwrap() >= 8, "{charts}");
    b.screenshot(&shots().join("1-live.png"));

    // A SIGKILLed worker leaves (turns down) and comes back; its events appear.
    let victim = up
        .pids()
        .into_iter()
        .find(|(id, _)| id == "decode-2")
        .expect("decode-2 runs")
        .1;
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    eventually(Duration::from_secs(15), "decode-2 shown down", || {
        std::thread::sleep(Duration::from_millis(100));
        state_of(&b, "decode-2").as_deref() == Some("down")
    });
    let shown = killed.elapsed();
    eprintln!("decode-2 shown down {shown:?} after SIGKILL");
    // "Within a second or two", with room for a loaded machine.
    assert!(
        shown < Duration::from_secs(6),
        "down shown {shown:?} after the kill"
    );
    b.screenshot(&shots().join("2-worker-down.png"));
    eventually(Duration::from_secs(90), "decode-2 back and ready", || {
        state_of(&b, "decode-2").as_deref() == Some("ready")
    });
    // The crash's own event (the supervisor's Rebuild warning), not the start-up ones.
    eventually(Duration::from_secs(30), "decode-2's Rebuild event", || {
        b.eval("return [...document.querySelectorAll('#events tbody tr[data-subject=\"decode-2\"]')].some(r => r.dataset.reason === 'Rebuild' && r.dataset.severity === 'Warning')")
            == true
    });
    // The severity filter keeps it and drops the Normal start-up events.
    let rows = |b: &Browser| {
        b.eval("return [...document.querySelectorAll('#events tbody tr')].map(r => r.dataset.severity + ' ' + r.dataset.reason)")
    };
    let all = rows(&b);
    assert!(all.to_string().contains("Normal"), "{all}");
    b.eval("const s = document.getElementById('severity'); s.value = 'Warning'; s.dispatchEvent(new Event('change')); return null");
    let warnings = rows(&b);
    let warnings: Vec<&str> = warnings
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(warnings.contains(&"Warning Rebuild"), "{warnings:?}");
    assert!(
        warnings
            .iter()
            .all(|r| r.starts_with("Warning") || r.starts_with("Error")),
        "{warnings:?}"
    );
    b.eval("const s = document.getElementById('severity'); s.value = 'Normal'; s.dispatchEvent(new Event('change')); return null");
    // Another time range reloads the charts' history for it.
    b.eval("const r = document.getElementById('range'); r.value = '900'; r.dispatchEvent(new Event('change')); return null");
    eventually(Duration::from_secs(10), "the 15 min range loaded", || {
        b.eval("return window.xpyd.range === 900 && window.xpyd.points.length > 0") == true
    });

    // The advisor panel shows a recommendation for more prefill.
    let mut recommended = String::new();
    eventually(Duration::from_secs(120), "a recommendation", || {
        let v = b.eval(
            "const a = window.xpyd.advisor; return a && a.advice ? [a.advice.action, a.advice.recommended, document.getElementById('adv-apply').disabled, document.getElementById('adv-curve').dataset.splits] : null;",
        );
        std::thread::sleep(Duration::from_millis(500));
        if v.is_null() {
            return false;
        }
        recommended = v[1].as_str().unwrap_or("").to_string();
        v[0] == "suggest" && v[2] == false && v[3] == "4" && !recommended.starts_with("1P")
    });
    eprintln!("the page recommends {recommended}");

    // A what-if change updates the prediction: a budget of 6 ranks 6 splits.
    let before = b.eval("return window.xpyd.whatifs").as_u64().unwrap();
    b.type_into("#wi-budget", "6");
    eventually(
        Duration::from_secs(60),
        "the what-if answer for 6 units",
        || {
            let v = b.eval(
            "return [window.xpyd.whatifs, document.getElementById('wi-result').dataset.status, document.querySelectorAll('#wi-ranked tbody tr').length];",
        );
            v[0].as_u64().unwrap_or(0) > before && v[1] == "200" && v[2] == 6
        },
    );
    b.screenshot(&shots().join("3-advisor.png"));
    // Bad what-ifs are refused naming the field.
    for (body, param) in [
        (r#"{"colour": 1}"#, "colour"),
        (r#"{"budget": 500}"#, "budget"),
        (r#"{"slo": {"ttft_ms": 0}}"#, "slo.ttft_ms"),
    ] {
        let (code, v, _) = post_raw(&format!("{http}/v1/advisor/whatif"), body, None);
        assert_eq!(
            (code, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}: {v}"
        );
    }

    // Apply, confirmed: the cluster runs the recommended split and the topology shows it.
    b.click("#adv-apply");
    let asked = b
        .accept_confirmation()
        .expect("Apply asks for confirmation");
    assert!(asked.contains(&recommended), "{asked}");
    eventually(Duration::from_secs(20), "the page's apply answered", || {
        b.eval("return document.getElementById('adv-apply-result').textContent")
            .as_str()
            .is_some_and(|t| t.starts_with("applied"))
    });
    let (code, v, _) = post_raw(&format!("{http}/v1/advisor/apply"), "{}", None);
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (409, Some("apply")),
        "a second apply while the first is carried out: {v}"
    );
    eventually(
        Duration::from_secs(120),
        "the topology shows the new split",
        || {
            let s = b.eval("return document.getElementById('split').dataset.split");
            std::thread::sleep(Duration::from_millis(500));
            s == recommended.as_str()
        },
    );
    // The audit log lists the apply: on the page, at /v1/audit and in its file.
    eventually(
        Duration::from_secs(20),
        "the apply in the page's audit log",
        || {
            b.eval("return [...document.querySelectorAll('#audit tbody tr')].some(r => r.dataset.action === 'POST /v1/advisor/apply')")
            == true
        },
    );
    b.screenshot(&shots().join("4-applied.png"));
    let (code, audit) = get(&format!("{http}/v1/audit"));
    assert_eq!(code, 200, "{audit}");
    let entries = audit["entries"].as_array().unwrap();
    let applied: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "POST /v1/advisor/apply")
        .collect();
    assert_eq!(applied.len(), 2, "{audit}");
    assert_eq!(
        (applied[0]["status"].as_u64(), applied[1]["status"].as_u64()),
        (Some(200), Some(409)),
        "{audit}"
    );
    assert_eq!(applied[0]["who"], "anyone (no API keys)", "{audit}");
    assert_eq!(
        applied[0]["outcome"]["layout"],
        recommended.as_str(),
        "{audit}"
    );
    let file = std::fs::read_to_string(state.join("audit/dashboard-live.jsonl")).unwrap();
    assert!(
        file.lines().any(|l| l.contains("POST /v1/advisor/apply")),
        "{file}"
    );

    // Two applies at once: exactly one is taken, the other waits its turn (409).
    // (The cluster runs the recommended split now, so the last apply is carried out.)
    let (p, d) = recommended[..recommended.len() - 1]
        .split_once('P')
        .unwrap();
    let d: u32 = d.parse().unwrap();
    let body = format!(r#"{{"prefill": {p}, "decode": {}}}"#, d + 1);
    let answers: Vec<u16> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..2)
            .map(|_| s.spawn(|| post_raw(&format!("{http}/v1/advisor/apply"), &body, None).0))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let mut sorted = answers.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [200, 409], "{answers:?}");
    let want = format!("{p}P{}D", d + 1);
    eventually(
        Duration::from_secs(60),
        "the topology shows the applied split",
        || {
            std::thread::sleep(Duration::from_millis(300));
            b.eval("return document.getElementById('split').dataset.split") == want.as_str()
        },
    );

    // Scale through the page's endpoint: bad input names the field; a good one runs.
    let scale = format!("{http}/v1/dashboard/scale");
    let (code, v, _) = post_raw(&scale, r#"{"role": "decode", "replicas": 0}"#, None);
    assert_eq!(
        (code, v["error"]["field"].as_str()),
        (400, Some("replicas")),
        "{v}"
    );
    let (code, v, _) = post_raw(&scale, r#"{"role": "decode", "replicas": 2}"#, None);
    assert_eq!(code, 200, "{v}");
    let want = format!("{}2D", &recommended[..recommended.find('P').unwrap() + 1]);
    eventually(
        Duration::from_secs(60),
        "the topology shows the scaled split",
        || {
            std::thread::sleep(Duration::from_millis(300));
            b.eval("return document.getElementById('split').dataset.split") == want.as_str()
        },
    );
    eventually(
        Duration::from_secs(10),
        "the scale in the audit log",
        || {
            get(&format!("{http}/v1/audit")).1["entries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["action"] == "POST /v1/dashboard/scale" && e["status"] == 200)
        },
    );
    let (_, audit) = get(&format!("{http}/v1/audit?limit=1000"));
    assert!(
        !audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "POST /v1/scale (supervisor)"),
        "the page's scale is audited once, by the coordinator: {audit}"
    );
    b.screenshot(&shots().join("5-scaled.png"));

    // No console error all along.
    b.assert_no_console_errors();
    // A killed worker, an apply and a scale cost no request.
    let (ok, failures) = load.stop();
    eprintln!("load: {ok} ok, {} failed", failures.len());
    assert!(ok > 0 && failures.is_empty(), "{failures:?}");
    // (Last: while the coordinator is down the page's calls fail, which the browser
    // logs.) The audit log survives a coordinator restart: SIGKILL it; the supervisor restarts
    // it on the same ports and it reads the log back.
    let coordinator = up.status()["coordinator"]["pid"].as_u64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(coordinator as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    eventually(
        Duration::from_secs(60),
        "the restarted coordinator's audit log",
        || {
            std::thread::sleep(Duration::from_millis(300));
            up.status()["coordinator"]["pid"]
                .as_u64()
                .is_some_and(|p| p != coordinator)
                && common::cluster::try_get(&format!("{http}/v1/audit")).is_some_and(|(code, v)| {
                    code == 200
                        && v["entries"].as_array().is_some_and(|e| {
                            e.iter().any(|e| {
                                e["action"] == "POST /v1/advisor/apply" && e["status"] == 200
                            })
                        })
                })
        },
    );
    // The page reconnects to the new coordinator.
    let before = b.eval("return window.xpyd.ticks").as_u64().unwrap();
    eventually(
        Duration::from_secs(30),
        "ticks from the restarted coordinator",
        || {
            std::thread::sleep(Duration::from_millis(300));
            b.eval("return window.xpyd.ticks").as_u64().unwrap() > before + 2
        },
    );
    // An open page does not hold the coordinator's graceful stop (60 s here) open.
    let (status, took) = up.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30));
    eprintln!("xpyd up stopped in {took:?} with the page open ({status})");
    assert!(status.success(), "{status}");
}

#[test]
#[ignore = "starts a cluster and a browser; scripts/test.sh runs it with --ignored"]
fn the_dashboard_follows_a_real_model_cluster() {
    let Some(model) = real_model() else { return };
    let yaml = "name: dashboard-real\nmode: disaggregated\nroles:\n  prefill: { replicas: 1, threads: 1 }\n  decode: { replicas: 1, threads: 1 }\n";
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().display().to_string();
    let up = Sup::start(
        yaml,
        &model,
        &[(xpyd_runtime::env::STATE_DIR, &state)],
        true,
    );
    let load = Load::shaped(&up.http, 2, 40, 16);
    let b = Browser::start();
    b.open(&up.dashboard);
    eventually(
        Duration::from_secs(30),
        "both workers listed, ready",
        || {
            let t = topology(&b);
            t.len() == 2 && t.iter().all(|(_, s)| s == "ready")
        },
    );
    eventually(
        Duration::from_secs(60),
        "points with tokens and KV moved",
        || {
            std::thread::sleep(Duration::from_millis(300));
            b.eval("return window.xpyd.points.filter(p => p.output_tps > 0 && p.kv_gbps > 0 && p.tpot_ms.p50 > 0).length")
            .as_u64()
            .unwrap_or(0)
            >= 3
        },
    );
    b.screenshot(&shots().join("real-model.png"));
    b.assert_no_console_errors();
    let (ok, failures) = load.stop();
    assert!(ok > 0 && failures.is_empty(), "{ok} ok, {failures:?}");
}
