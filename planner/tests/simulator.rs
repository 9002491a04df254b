//! The simulator against queueing theory (M/D/1, M/M/c within 3 % of the closed forms,
//! Little's law), its determinism, attainment monotone in rate under common random
//! numbers, and the search's answers on workloads whose right split is known.

use proptest::prelude::*;
use xpyd_planner::PlanError;
use xpyd_planner::queueing::{md1_wait, mmc_wait};
use xpyd_planner::search::{Bottleneck, Slo, goodput, rank, stats};
use xpyd_planner::service::{FitErrors, ServiceModel};
use xpyd_planner::sim::{ClusterConfig, Layout, Outcome, simulate};
use xpyd_planner::traffic::{Process, SimRequest, Traffic};
use xpyd_planner::workload::Rng;

/// Prefill time = `per_token` × tokens exactly (one chunk), decode steps of 10 ms.
fn linear(per_token: f64) -> ServiceModel {
    ServiceModel {
        prefill: [0.0, per_token, 0.0],
        chunk: 1 << 30,
        decode: [0.010, 0.0, 0.0, 0.0],
        transfer_latency_s: 0.0,
        transfer_bytes_per_s: f64::INFINITY,
        kv_bytes_per_token: 0.0,
        layers: 1,
        errors: FitErrors::default(),
    }
}

/// `c` servers sharing one FCFS queue: combined workers of one slot each, one-token
/// outputs (the service is the prefill alone), a queue that never rejects.
fn servers(c: u32) -> ClusterConfig {
    ClusterConfig {
        max_running: 1,
        kv_blocks: u32::MAX / 2,
        max_queue: usize::MAX,
        queue_timeout_s: 1e12,
        drain_s: 1e12,
        ..ClusterConfig::defaults(Layout::Aggregated { workers: c })
    }
}

/// Poisson arrivals at `rate` with service tokens from `tokens`.
fn arrivals(
    n: usize,
    rate: f64,
    seed: u64,
    mut tokens: impl FnMut(&mut Rng) -> u32,
) -> Vec<SimRequest> {
    let mut rng = Rng::new(seed);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            t += rng.exp(rate);
            SimRequest {
                arrival: t,
                input: tokens(&mut rng),
                cached: 0,
                output: 1,
            }
        })
        .collect()
}

fn mean_wait(m: &ServiceModel, c: &ClusterConfig, reqs: &[SimRequest]) -> f64 {
    let r = simulate(m, c, reqs).unwrap();
    assert!(r.requests.iter().all(|q| q.outcome == Outcome::Finished));
    // Skip the first tenth (the empty start).
    let tail = &r.requests[reqs.len() / 10..];
    tail.iter().map(|q| q.queueing).sum::<f64>() / tail.len() as f64
}

#[test]
fn one_server_with_fixed_service_waits_as_m_d_1() {
    // d = 1000 tokens × 1 ms = 1 s.
    let m = linear(0.001);
    for rho in [0.5, 0.8] {
        let reqs = arrivals(300_000, rho, 7, |_| 1000);
        let got = mean_wait(&m, &servers(1), &reqs);
        let want = md1_wait(rho, 1.0);
        assert!(
            (got / want - 1.0).abs() < 0.03,
            "ρ {rho}: simulated {got:.4} s, M/D/1 {want:.4} s"
        );
    }
}

#[test]
fn c_servers_with_exponential_service_wait_as_m_m_c() {
    // Service tokens exponential with mean 2000 at 0.5 ms: mean 1 s.
    let m = linear(0.0005);
    for (c, rho) in [(1u32, 0.7), (3, 0.8), (8, 0.9)] {
        let lambda = rho * f64::from(c);
        let reqs = arrivals(400_000, lambda, 11 + u64::from(c), |r| {
            (r.exp(1.0 / 2000.0).round() as u32).max(1)
        });
        let got = mean_wait(&m, &servers(c), &reqs);
        let want = mmc_wait(c, lambda, 1.0);
        assert!(
            (got / want - 1.0).abs() < 0.03,
            "M/M/{c} at ρ {rho}: simulated {got:.4} s, closed form {want:.4} s"
        );
    }
}

#[test]
fn littles_law_holds_on_the_prefill_queue() {
    // One prefill worker, plenty of decode room: the prefill queue's time-average
    // length equals the arrival rate × the mean wait there.
    let m = linear(0.001);
    let c = ClusterConfig {
        max_running: 100_000,
        kv_blocks: u32::MAX / 2,
        ..ClusterConfig::defaults(Layout::Disaggregated {
            prefill: 1,
            decode: 1,
        })
    };
    let reqs = arrivals(100_000, 0.7, 3, |r| r.range(200, 1800) as u32);
    let r = simulate(&m, &c, &reqs).unwrap();
    let waits: f64 = r.requests.iter().map(|q| q.queueing).sum();
    let l_time_avg = r.workers[0].mean_queue;
    let l_little = waits / r.end;
    assert!(
        (l_time_avg / l_little - 1.0).abs() < 0.01,
        "time average {l_time_avg:.4} vs λW {l_little:.4}"
    );
}

#[test]
fn a_busy_decode_worker_grants_reservations_and_ends_imports_between_its_steps() {
    // Decode steps of 100 ms, prefill of 100 tokens in 10 ms, instant transfers.
    let m = ServiceModel {
        decode: [0.1, 0.0, 0.0, 0.0],
        ..linear(0.0001)
    };
    let c = ClusterConfig::defaults(Layout::Disaggregated {
        prefill: 1,
        decode: 1,
    });
    let req = |arrival, output| SimRequest {
        arrival,
        input: 100,
        cached: 0,
        output,
    };
    // A finds the decode worker idle: its first token comes as its prefill ends (10 ms),
    // and its steps run 0.01–0.11, 0.11–0.21, 0.21–0.31, …
    // B arrives in the middle of the second step: its reservation waits for 0.21, its
    // prefill runs 0.21–0.22 and its first token is answered then (the prefill worker
    // sampled it; the call returns once the KV has landed, without waiting for the decode
    // worker); its import ends with the step in progress at 0.31.
    let r = simulate(&m, &c, &[req(0.0, 50), req(0.15, 2)]).unwrap();
    let (a, b) = (r.requests[0], r.requests[1]);
    assert!((a.ttft - 0.01).abs() < 1e-9, "{a:?}");
    assert!((b.ttft - 0.07).abs() < 1e-9, "{b:?}");
    // B's second token comes from the next step, 0.31–0.41: the wait for the import is
    // in its TPOT.
    assert!((b.e2e - 0.26).abs() < 1e-9, "{b:?}");
    assert!((b.tpot - 0.19).abs() < 1e-9, "{b:?}");
}

/// A SmolLM2-like model on 2 cores.
fn smol() -> ServiceModel {
    ServiceModel::example()
}

fn traffic(input: &str, output: &str, seed: u64) -> Traffic {
    Traffic::Generated {
        input: input.parse().unwrap(),
        output: output.parse().unwrap(),
        process: Process::Poisson,
        prefix_hit: 0.0,
        requests: 600,
        seed,
    }
}

#[test]
fn a_run_is_identical_for_a_fixed_seed() {
    let t = traffic("uniform:50-800", "longtail:4-64-512", 5);
    for layout in [
        Layout::Disaggregated {
            prefill: 1,
            decode: 2,
        },
        Layout::Aggregated { workers: 3 },
    ] {
        let c = ClusterConfig::defaults(layout);
        let a = simulate(&smol(), &c, &t.at_rate(3.0)).unwrap();
        let b = simulate(&smol(), &c, &t.at_rate(3.0)).unwrap();
        assert_eq!(a, b);
        assert!(a.requests.iter().all(|q| q.outcome == Outcome::Finished));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Under common random numbers, more load does not raise attainment — beyond a
    /// request or so at an SLO's edge, which another overlap of the same requests can
    /// flip (a share of 1 % of 600).
    #[test]
    fn attainment_is_monotone_in_rate(seed in 0u64..1000, base in 0.5f64..4.0, split in 1u32..4) {
        let t = traffic("uniform:50-800", "uniform:8-128", seed);
        let slo = Slo { ttft_s: 1.0, tpot_s: 0.05, attainment: 0.9 };
        let layout = if split == 3 {
            Layout::Aggregated { workers: 3 }
        } else {
            Layout::Disaggregated { prefill: split, decode: 3 - split }
        };
        let c = ClusterConfig::defaults(layout);
        let mut last = f64::INFINITY;
        let mut first = None;
        for k in 0..6 {
            let rate = base * 1.5f64.powi(k);
            let r = simulate(&smol(), &c, &t.at_rate(rate)).unwrap();
            let a = stats(&r, &slo, rate).attainment;
            prop_assert!(a <= last + 0.01, "rate {rate}: {a} after {last}");
            last = a;
            first.get_or_insert(a);
        }
        // Over the whole sweep (×7.6 the rate) it falls, or stays at 1 only when even
        // the top rate is easy.
        prop_assert!(last <= first.unwrap_or(1.0) + 1e-9);
    }
}

#[test]
fn the_search_gives_prefill_to_long_prompts_and_decode_to_long_outputs() {
    let slo = Slo {
        ttft_s: 2.0,
        tpot_s: 0.06,
        attainment: 0.9,
    };
    let base = ClusterConfig::defaults(Layout::Aggregated { workers: 1 });
    let best = |t: &Traffic| {
        let r = rank(&smol(), &base, t, &slo, 4, 0.05).unwrap();
        (r[0].layout, r)
    };
    let (long_in, ranked) = best(&traffic("uniform:1500-2500", "uniform:4-16", 1));
    let Layout::Disaggregated { prefill, decode } = long_in else {
        panic!("long prompts: {long_in}: {ranked:?}")
    };
    assert!(prefill > decode, "long prompts: {long_in}");
    let (long_out, ranked) = best(&traffic("uniform:16-64", "uniform:300-600", 1));
    match long_out {
        Layout::Disaggregated { prefill, decode } => {
            assert!(decode > prefill, "long outputs: {long_out}: {ranked:?}")
        }
        Layout::Aggregated { .. } => {}
    }
    // Every split got a goodput or was pruned by a bound below the best one.
    let top = ranked[0].goodput.as_ref().unwrap().rate;
    assert!(top > 0.0);
    for r in &ranked {
        match &r.goodput {
            Some(g) => assert!(g.rate <= top),
            None => assert!(
                r.bound * xpyd_planner::search::PRUNE_MARGIN < top,
                "{r:?} pruned above the best {top}"
            ),
        }
    }
}

#[test]
fn goodput_sits_where_attainment_crosses_the_target() {
    let t = traffic("uniform:100-600", "uniform:16-96", 9);
    let slo = Slo {
        ttft_s: 1.0,
        tpot_s: 0.05,
        attainment: 0.9,
    };
    let c = ClusterConfig::defaults(Layout::Disaggregated {
        prefill: 1,
        decode: 1,
    });
    let g = goodput(&smol(), &c, &t, &slo, 0.05).unwrap();
    assert!(g.rate > 0.0);
    assert!(g.at.attainment >= 0.9, "{g:?}");
    let above = stats(
        &simulate(&smol(), &c, &t.at_rate(g.rate * 1.06)).unwrap(),
        &slo,
        g.rate * 1.06,
    );
    assert!(above.attainment < 0.9 + 0.05, "{above:?}");
    assert!(matches!(
        g.bottleneck,
        Bottleneck::PrefillQueue | Bottleneck::DecodeBatch
    ));
}

#[test]
fn an_slo_no_cluster_can_meet_is_called_infeasible_and_bad_input_is_named() {
    let t = traffic("uniform:1000-2000", "uniform:4-8", 2);
    let base = ClusterConfig::defaults(Layout::Aggregated { workers: 1 });
    let tight = Slo {
        ttft_s: 0.01,
        tpot_s: 0.05,
        attainment: 0.9,
    };
    match rank(&smol(), &base, &t, &tight, 4, 0.05) {
        Err(PlanError::Infeasible(why)) => assert!(why.contains("TTFT SLO of 10 ms"), "{why}"),
        other => panic!("{other:?}"),
    }
    let ok = Slo {
        ttft_s: 2.0,
        ..tight
    };
    assert!(matches!(
        rank(&smol(), &base, &t, &ok, 0, 0.05),
        Err(PlanError::Invalid { field, .. }) if field == "budget"
    ));
    let bad = Slo { tpot_s: -1.0, ..ok };
    assert!(matches!(
        goodput(&smol(), &base, &t, &bad, 0.05),
        Err(PlanError::Invalid { field, .. }) if field == "slo.tpot_s"
    ));
    let empty = ClusterConfig::defaults(Layout::Disaggregated {
        prefill: 0,
        decode: 2,
    });
    assert!(matches!(
        simulate(&smol(), &empty, &t.at_rate(1.0)),
        Err(PlanError::Invalid { field, .. }) if field == "layout"
    ));
}
