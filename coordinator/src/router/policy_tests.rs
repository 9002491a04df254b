//! Unit tests of the selection policies in `policy.rs`.

use std::collections::{BTreeMap, HashMap};

use super::*;

fn cand(id: &str) -> Candidate {
    Candidate {
        id: id.to_owned(),
        ..Candidate::default()
    }
}

fn cands(ids: &[&str]) -> Vec<Candidate> {
    ids.iter().map(|id| cand(id)).collect()
}

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

fn counts(picks: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for p in picks {
        *m.entry(p).or_insert(0) += 1;
    }
    m
}

#[test]
fn round_robin_visits_all_equally() {
    let cs = cands(&["c", "a", "b"]);
    let mut r = Rotor::default();
    let picks: Vec<String> = (0..30)
        .map(|_| cs[r.next(&cs).unwrap()].id.clone())
        .collect();
    assert_eq!(
        &picks[..3],
        ["a", "b", "c"],
        "rotates in id order, not slice order"
    );
    assert!(counts(picks).values().all(|&n| n == 10));
}

#[test]
fn round_robin_stays_fair_when_the_set_changes() {
    let mut r = Rotor::default();
    let abc = cands(&["a", "b", "c"]);
    assert_eq!(abc[r.next(&abc).unwrap()].id, "a");
    assert_eq!(abc[r.next(&abc).unwrap()].id, "b");
    // "b" left and "d" joined, in a different slice order: continue after "b".
    let dca = cands(&["d", "c", "a"]);
    let picks: Vec<&str> = (0..6)
        .map(|_| dca[r.next(&dca).unwrap()].id.as_str())
        .collect();
    assert_eq!(picks, ["c", "d", "a", "c", "d", "a"]);
    assert_eq!(r.next(&[]), None);
}

#[test]
fn source_ip_hash_is_sticky_and_spreads() {
    let cs = cands(&["w0", "w1", "w2"]);
    let mut r = Rotor::default();
    let ips: Vec<String> = (1..=32)
        .map(|i| format!("10.0.{}.{}", i / 7, i * 13 % 256))
        .collect();
    let mut home = HashMap::new();
    for addr in &ips {
        let first = source_ip_hash(&mut r, &cs, ip(addr)).unwrap();
        for _ in 0..100 {
            assert_eq!(
                source_ip_hash(&mut r, &cs, ip(addr)),
                Some(first),
                "{addr} moved"
            );
        }
        home.insert(addr.clone(), cs[first].id.clone());
    }
    let spread = counts(home.values().cloned());
    assert_eq!(
        spread.len(),
        3,
        "32 clients should land on all 3 workers: {spread:?}"
    );
    assert!(spread.values().all(|&n| n >= 4), "badly skewed: {spread:?}");
    // Independent of candidate order.
    let rev = cands(&["w2", "w1", "w0"]);
    for addr in &ips {
        let i = source_ip_hash(&mut r, &rev, ip(addr)).unwrap();
        assert_eq!(rev[i].id, home[addr]);
    }
}

#[test]
fn source_ip_hash_removal_moves_only_the_removed_workers_clients() {
    let cs = cands(&["w0", "w1", "w2"]);
    let fewer = cands(&["w0", "w2"]);
    let mut r = Rotor::default();
    let mut moved = 0;
    for i in 0..200u32 {
        let addr = Some(IpAddr::from([192, 168, (i >> 8) as u8, i as u8]));
        let before = &cs[source_ip_hash(&mut r, &cs, addr).unwrap()].id;
        let after = &fewer[source_ip_hash(&mut r, &fewer, addr).unwrap()].id;
        if before == "w1" {
            moved += 1;
        } else {
            assert_eq!(before, after, "a client of a surviving worker was remapped");
        }
    }
    assert!(moved > 0, "w1 had no clients; test proves nothing");
}

#[test]
fn source_ip_hash_is_pinned_across_processes() {
    // Golden values: a change here re-homes every client after an upgrade.
    let cs = cands(&["prefill-0", "prefill-1", "prefill-2", "prefill-3"]);
    let mut r = Rotor::default();
    let got: Vec<usize> = ["1.2.3.4", "10.0.0.7", "2001:db8::1", "172.16.5.9"]
        .iter()
        .map(|a| source_ip_hash(&mut r, &cs, ip(a)).unwrap())
        .collect();
    assert_eq!(got, [0, 1, 1, 3]);
}

#[test]
fn source_ip_hash_without_ip_round_robins() {
    let cs = cands(&["a", "b"]);
    let mut r = Rotor::default();
    let picks: Vec<_> = (0..4)
        .map(|_| source_ip_hash(&mut r, &cs, None).unwrap())
        .collect();
    assert_eq!(picks, [0, 1, 0, 1]);
    assert_eq!(source_ip_hash(&mut r, &[], ip("1.1.1.1")), None);
}

#[test]
fn least_connections_picks_min_then_worker_load_then_spreads() {
    let mut cs = cands(&["a", "b", "c"]);
    cs[0].connections = 3;
    cs[1].connections = 1;
    cs[2].connections = 2;
    let mut r = Rotor::default();
    assert_eq!(least_connections(&mut r, &cs), Some(1));
    cs[2].connections = 1;
    cs[1].queued = 2;
    cs[2].running = 1;
    assert_eq!(
        least_connections(&mut r, &cs),
        Some(2),
        "tie on connections → less worker load"
    );
    let equal = cands(&["a", "b", "c"]);
    let picks: Vec<_> = (0..6)
        .map(|_| least_connections(&mut r, &equal).unwrap())
        .collect();
    assert_eq!(
        counts(picks.iter().map(|i| i.to_string())).len(),
        3,
        "ties must spread: {picks:?}"
    );
}

#[test]
fn min_ttft_avoids_slow_and_probes_unknown_first() {
    let mut cs = cands(&["fast", "slow", "new"]);
    cs[0].ttft_ms = 40.0;
    cs[1].ttft_ms = 400.0;
    let mut r = Rotor::default();
    assert_eq!(
        min_ttft(&mut r, &cs),
        Some(2),
        "unmeasured idle worker is probed first"
    );
    cs[2].connections = 1; // probe in flight
    for _ in 0..5 {
        assert_eq!(
            min_ttft(&mut r, &cs),
            Some(0),
            "then the fastest, never the slow one"
        );
    }
    cs[2].ttft_ms = 30.0;
    assert_eq!(
        min_ttft(&mut r, &cs),
        Some(2),
        "measured faster → preferred"
    );
    let mut tie = cands(&["a", "b"]);
    tie[0].ttft_ms = 50.0;
    tie[1].ttft_ms = 50.0;
    tie[0].connections = 2;
    assert_eq!(
        min_ttft(&mut r, &tie),
        Some(1),
        "equal TTFT → fewer connections"
    );
    // All unmeasured and busy: fewest connections.
    let mut busy = cands(&["a", "b"]);
    busy[0].connections = 3;
    busy[1].connections = 1;
    assert_eq!(min_ttft(&mut r, &busy), Some(1));
}

#[test]
fn overall_load_matches_hand_computation() {
    let w = LoadWeights::default();
    let c = Candidate {
        id: "x".into(),
        connections: 2,
        queued: 3,
        running: 50,
        ttft_ms: 250.0,
        kv_used: 0.5,
    };
    // 1*2 + 1*3 + 1*(250/100) + 4*0.5 = 9.5 (running is not in the score).
    assert_eq!(load_score(&w, &c), 9.5);
    let custom = LoadWeights {
        connections: 2.0,
        queued: 0.5,
        ttft: 3.0,
        ttft_ref_ms: 50.0,
        kv: 10.0,
    };
    // 2*2 + 0.5*3 + 3*(250/50) + 10*0.5 = 25.5
    assert_eq!(load_score(&custom, &c), 25.5);
    let mut cs = vec![c.clone(), cand("idle"), c];
    cs[1].connections = 9; // 9.0 < 9.5
    let mut r = Rotor::default();
    assert_eq!(overall_load(&mut r, &w, &cs), Some(1));
    cs[1].kv_used = 0.25; // 9 + 1 = 10 > 9.5; entries 0 and 2 tie and alternate
    cs[2].id = "y".into();
    let picks: Vec<_> = (0..4)
        .map(|_| overall_load(&mut r, &w, &cs).unwrap())
        .collect();
    assert_eq!(picks, [0, 2, 0, 2]);
}

#[test]
fn overall_load_sanitises_peer_numbers() {
    let w = LoadWeights {
        ttft: 0.0,
        ..LoadWeights::default()
    };
    let mut c = Candidate {
        ttft_ms: f64::INFINITY,
        kv_used: f64::NAN,
        ..cand("a")
    };
    assert_eq!(load_score(&w, &c), 0.0, "0 weight × inf must not be NaN");
    c.kv_used = 7.0;
    assert_eq!(load_score(&w, &c), 4.0, "kv_used clamps to 1");
    let bad_ref = LoadWeights {
        ttft_ref_ms: 0.0,
        ..LoadWeights::default()
    };
    c.ttft_ms = 100.0;
    assert_eq!(load_score(&bad_ref, &c), 4.0);
}

#[test]
fn prefix_aware_prefers_longest_match_then_fewer_connections() {
    let cfg = RouterConfig::default();
    let pick = |cfg: &RouterConfig, cs: &[Candidate], m: &[usize]| {
        prefix_aware(&mut Rotor::default(), cfg, cs, m)
    };
    let mut cs = cands(&["a", "b", "c"]);
    cs[0].connections = 1;
    cs[1].connections = 3;
    assert_eq!(
        pick(&cfg, &cs, &[0, 4, 2]),
        Some(1),
        "longest match despite more load"
    );
    assert_eq!(
        pick(&cfg, &cs, &[4, 4, 2]),
        Some(0),
        "tie → fewer connections"
    );
    assert_eq!(
        pick(&cfg, &cs, &[0, 0, 0]),
        Some(2),
        "no match → least connections"
    );
    let strict = RouterConfig {
        prefix_min_match_blocks: 5,
        ..RouterConfig::default()
    };
    assert_eq!(
        pick(&strict, &cs, &[0, 4, 0]),
        Some(2),
        "below minimum → fallback"
    );
    assert_eq!(
        pick(&strict, &cs, &[0, 5, 0]),
        Some(1),
        "at minimum → prefix"
    );
    cs[0].connections = 12; // spread 12 > 8
    assert_eq!(
        pick(&cfg, &cs, &[9, 0, 0]),
        Some(2),
        "imbalance → least connections"
    );
    cs[0].connections = 8; // spread 8 == limit: still prefix
    assert_eq!(pick(&cfg, &cs, &[9, 0, 0]), Some(0));
    assert_eq!(pick(&cfg, &[], &[]), None);
    assert_eq!(
        pick(&cfg, &cs, &[1]),
        Some(0),
        "short matched slice is safe"
    );
}
