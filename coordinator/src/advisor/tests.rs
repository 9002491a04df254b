use super::*;

fn live() -> Live {
    Live::new(Setup::default())
}

#[test]
fn apply_bodies_name_the_role() {
    assert_eq!(parse_apply(b"", false).unwrap(), None);
    assert_eq!(parse_apply(b"{}", true).unwrap(), None);
    assert_eq!(
        parse_apply(br#"{"prefill": 1, "decode": 3}"#, false).unwrap(),
        Some(Layout::Disaggregated {
            prefill: 1,
            decode: 3
        })
    );
    assert_eq!(
        parse_apply(br#"{"combined": 4}"#, true).unwrap(),
        Some(Layout::Aggregated { workers: 4 })
    );
    for (body, single, field) in [
        (&br#"{"router": 1}"#[..], false, "role"),
        (br#"{"prefill": 1}"#, false, "role"),
        (br#"{"combined": 2}"#, false, "role"),
        (br#"{"prefill": 1, "decode": 1}"#, true, "role"),
        (br#"{"prefill": 0, "decode": 1}"#, false, "prefill"),
        (br#"{"prefill": 1, "decode": "x"}"#, false, "decode"),
        (b"[1]", false, "body"),
    ] {
        let e = parse_apply(body, single).unwrap_err();
        assert_eq!(
            (e.status, e.param.as_deref()),
            (400, Some(field)),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn config_patches_are_checked_by_field_and_keep_the_rest() {
    let l = live();
    let v = l
        .patch_config(
            br#"{"enabled": true, "window_s": 10, "slo": {"ttft_ms": 500}, "mode": "auto"}"#,
        )
        .unwrap();
    assert_eq!(v["enabled"], true);
    assert_eq!(v["window_s"], 10);
    assert_eq!(v["slo"]["ttft_ms"], 500.0);
    assert_eq!(
        v["slo"]["tpot_ms"], 100.0,
        "untouched keys keep their value"
    );
    assert_eq!(v["mode"], "auto");
    assert_eq!(l.schedule(), (true, Duration::from_secs(10)));
    for (body, field) in [
        (&br#"{"window_s": 1}"#[..], "window_s"),
        (br#"{"budget": 0}"#, "budget"),
        (br#"{"slo": {"ttft_ms": -1}}"#, "slo.ttft_ms"),
        (br#"{"slo": {"ttft_ms": 1e15}}"#, "slo.ttft_ms"),
        (br#"{"slo": {"tpot_ms": 0}}"#, "slo.tpot_ms"),
        (br#"{"slo": {"tpot_ms": 60001}}"#, "slo.tpot_ms"),
        (br#"{"slo": {"attainment": 2}}"#, "slo.attainment"),
        (br#"{"slo": {"ttft": 5}}"#, "ttft"),
        (br#"{"mode": "sometimes"}"#, "mode"),
        (br#"{"streak": 0}"#, "streak"),
        (br#"{"colour": "red"}"#, "colour"),
        (b"not json", "body"),
    ] {
        let e = l.patch_config(body).unwrap_err();
        assert_eq!(
            (e.status, e.param.as_deref()),
            (400, Some(field)),
            "{}: {}",
            String::from_utf8_lossy(body),
            e.message
        );
    }
    // A refused patch changed nothing.
    assert_eq!(l.schedule(), (true, Duration::from_secs(10)));
    assert_eq!(l.config_json()["mode"], "auto");
}

#[test]
fn the_ring_is_bounded_and_read_by_arrival() {
    let l = live();
    for i in 0..(RING_CAP + 10) {
        l.record_at(
            i as f64,
            Finished {
                arrival: i as f64,
                input: 10,
                cached: 0,
                output: 5,
                ttft: 0.1,
                tpot: 0.01,
            },
        );
    }
    assert_eq!(l.ring().len(), RING_CAP);
    assert_eq!(l.since(0.0)[0].arrival, 10.0, "the oldest fell out");
    assert_eq!(l.since((RING_CAP as f64) + 5.0).len(), 5);
}

#[test]
fn a_window_holds_what_finished_in_it_in_arrival_order() {
    let l = live();
    // (arrival, finished): the first arrived long before the window (an overloaded
    // cluster) but finished in it; the last arrived in it and is still running.
    for (arrival, finished) in [(0.5, 4.0), (1.0, 10.0), (9.5, 10.5), (3.0, 11.0)] {
        l.record_at(
            finished,
            Finished {
                arrival,
                input: 10,
                cached: 0,
                output: 5,
                ttft: 0.1,
                tpot: 0.01,
            },
        );
    }
    let w: Vec<f64> = l.since(9.0).iter().map(|f| f.arrival).collect();
    assert_eq!(w, [1.0, 3.0, 9.5]);
}

#[test]
fn apply_records_desired_generations_and_history() {
    let l = live();
    assert!(l.desired().is_none());
    assert_eq!(l.recommendation().unwrap_err().status, 409);
    let a = Layout::Disaggregated {
        prefill: 1,
        decode: 3,
    };
    let b = Layout::Disaggregated {
        prefill: 2,
        decode: 2,
    };
    assert_eq!(l.apply(a, Some(b), "operator", None).generation, 1);
    let d = l.apply(b, Some(a), "advisor (auto)", Some((1.0, 1.5)));
    assert_eq!((d.generation, d.layout), (2, b));
    assert_eq!(d.replicas(), json!({"prefill": 2, "decode": 2}));
    let s = l.status_json(Some(a), 0);
    assert_eq!(s["converged"], false);
    assert_eq!(s["history"].as_array().unwrap().len(), 2);
    assert_eq!(s["history"][1]["by"], "advisor (auto)");
    assert_eq!(s["desired"]["layout"], "2P2D");
    assert!(
        s["profile"]["error"]
            .as_str()
            .unwrap()
            .contains("advisor.profile")
    );
}

#[test]
fn a_profile_measured_after_the_start_is_picked_up() {
    let path =
        std::env::temp_dir().join(format!("xpyd-advisor-profile-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let l = Live::new(Setup {
        reload: Some((path.clone(), 256)),
        ..Setup::default()
    });
    assert!(l.model().is_err());
    let fit = |kind: &str, c: &[f64]| json!({"model": {"kind": kind, "coeffs": c}, "fit_error": {"mean_abs_rel": 0.02}});
    let profile = json!({
        "version": xpyd_planner::profile::PROFILE_VERSION, "kind": "xpyd-performance-profile",
        "model": {"kv_bytes_per_token": 23040, "layers": 30},
        "prefill": {"fit_by_chunk": {"256": fit("polynomial", &[0.004, 0.0004, 2e-8])}},
        "decode_step": {"fit": fit("bilinear", &[0.012, 0.001, 1e-6, 2e-7])},
        "kv_transfer": null,
    });
    std::fs::write(&path, profile.to_string()).unwrap();
    assert_eq!(l.model().unwrap().prefill, [0.004, 0.0004, 2e-8]);
    std::fs::remove_file(&path).unwrap();
    assert!(l.model().is_ok(), "kept once read");
}
