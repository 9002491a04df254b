//! No request lost when a worker dies, freezes, panics or drains (tiny model, real
//! processes through `xpyd up`): concurrent streaming requests over SSE and gRPC, greedy
//! and seeded, each compared token for token with one engine's output for the same
//! request, while workers are SIGKILLed, SIGSTOPped, SIGTERMed or panic mid-stream.

mod common;

use common::cluster::{Up, eventually, get, metric_sum, worker_pid, worker_pids};
use common::streams::{mix, reference, run_round};
use common::tiny_model;
use std::time::{Duration, Instant};

fn manifest(name: &str, roles: &str) -> String {
    format!(
        "name: {name}\nmode: disaggregated\ncoordinator: {{ http_port: 0, grpc_port: 0 }}\nkv: {{ backend: tcp }}\nroles:\n{roles}"
    )
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

/// A counter of the coordinator's metrics (summed over labels).
fn counter(up: &Up, name: &str) -> f64 {
    metric_sum(&up.http, name, "")
}

/// Requests the coordinator answered with a 5xx, over every API.
fn server_errors(up: &Up) -> f64 {
    metric_sum(&up.http, "xpyd_coordinator_requests_total", "code=\"5")
}

fn ready(up: &Up, id: &str) -> bool {
    up.cluster()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["worker_id"] == id && w["state"] == "ready")
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn killed_frozen_and_drained_workers_lose_no_request() {
    let (_d, model) = tiny_model();
    // Slow steps so requests are mid-stream when the chaos comes.
    let up = Up::start_env(
        &manifest(
            "chaos",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 2 }\n",
        ),
        &model,
        "decode-0=25,decode-1=25,prefill-0=15",
    );
    let m = up.manifest.clone();
    let n = 16;
    for (round, what) in [
        "SIGKILL decode",
        "SIGKILL prefill",
        "SIGSTOP decode",
        "SIGTERM decode",
    ]
    .into_iter()
    .enumerate()
    {
        let reqs = mix(round, n);
        let refs: Vec<String> = reqs.iter().map(|r| reference(&model, r)).collect();
        let before = counter(&up, "xpyd_coordinator_migrations_total")
            + counter(&up, "xpyd_coordinator_retries_total");
        let mut frozen = None;
        let t0 = Instant::now();
        run_round(&up.http, &up.grpc, &reqs, &refs, || match what {
            "SIGKILL decode" => {
                std::thread::sleep(Duration::from_millis(700));
                signal(
                    worker_pid(&m, "decode", 1),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            "SIGKILL prefill" => {
                std::thread::sleep(Duration::from_millis(100));
                signal(
                    worker_pid(&m, "prefill", 0),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            "SIGSTOP decode" => {
                std::thread::sleep(Duration::from_millis(700));
                let pid = worker_pid(&m, "decode", 0);
                signal(pid, nix::sys::signal::Signal::SIGSTOP);
                frozen = Some(pid);
            }
            _ => {
                std::thread::sleep(Duration::from_millis(700));
                signal(
                    worker_pid(&m, "decode", 1),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        });
        eprintln!("{what}: {n} streams exact in {:?}", t0.elapsed());
        let resent = counter(&up, "xpyd_coordinator_migrations_total")
            + counter(&up, "xpyd_coordinator_retries_total")
            - before;
        if what != "SIGTERM decode" {
            // A drain may finish every stream in place; the others must have re-sent.
            assert!(resent >= 1.0, "{what}: nothing was re-sent");
        }
        if what == "SIGKILL decode" {
            // The streams moved off the dead worker make one Warning event (after the
            // 2 s window), not one per stream.
            let moved = || {
                let (_, v) = get(&format!(
                    "{}/v1/events?subject=decode-1&severity=Warning",
                    up.http
                ));
                let list = v["events"].as_array().cloned().unwrap_or_default();
                list.into_iter()
                    .filter(|e| e["reason"] == "RequestsMoved")
                    .collect::<Vec<_>>()
            };
            eventually(Duration::from_secs(10), "a RequestsMoved event", || {
                !moved().is_empty()
            });
            let ev = moved();
            assert_eq!(ev.len(), 1, "{ev:?}");
            let msg = ev[0]["message"].as_str().unwrap_or("");
            assert!(msg.contains("moved off decode-1"), "{msg}");
        }
        if let Some(pid) = frozen {
            signal(pid, nix::sys::signal::Signal::SIGCONT);
        }
        // The supervisor brings every worker back (a frozen one rejoins on its own).
        eventually(Duration::from_secs(60), "all workers ready again", || {
            ready(&up, "prefill-0") && ready(&up, "decode-0") && ready(&up, "decode-1")
        });
    }
    assert_eq!(server_errors(&up), 0.0, "no request may fail");
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn a_panicking_engine_makes_its_worker_fail_and_be_rebuilt_without_loss() {
    let (_d, model) = tiny_model();
    // decode-0's engine thread panics at its 15th step, in the middle of the streams.
    let up = Up::start_with(
        &manifest(
            "panic",
            "  prefill: { replicas: 1 }\n  decode: { replicas: 2 }\n",
        ),
        &model,
        &[
            ("XPYD_DEBUG_DELAY", "decode-0=25,decode-1=25"),
            ("XPYD_DEBUG_PANIC", "decode-0=15"),
        ],
    );
    let m = up.manifest.clone();
    let before = worker_pid(&m, "decode", 0);
    let reqs = mix(9, 12);
    let refs: Vec<String> = reqs.iter().map(|r| reference(&model, r)).collect();
    run_round(&up.http, &up.grpc, &reqs, &refs, || {});
    eventually(Duration::from_secs(60), "decode-0 rebuilt", || {
        let now = worker_pids(&m, "decode", Some(0));
        !now.is_empty() && !now.contains(&before) && ready(&up, "decode-0")
    });
    assert!(counter(&up, "xpyd_coordinator_migrations_total") >= 1.0);
}

/// Decode KV blocks in use, as the coordinator last heard from the worker's lease.
fn decode_kv_used(up: &Up) -> u64 {
    up.workers("decode")
        .iter()
        .map(|w| w["kv_blocks_used"].as_u64().unwrap())
        .sum()
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn a_client_that_stops_reading_is_cut_off_and_its_kv_freed() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("long.gguf");
    // Room for a stream long enough to fill every buffer between engine and client (the
    // coordinator's socket send buffer alone grows to 4 MiB: some 25,000 tokens).
    xpyd_engine::testing::TinyModel {
        context: 65536,
        ..Default::default()
    }
    .write(&model)
    .unwrap();
    let up = Up::start(
        "name: stall\nmode: disaggregated\ncoordinator: { client_stall_timeout_s: 2 }\nkv: { backend: tcp }\nregistry: { renew_interval_ms: 200 }\nroles:\n  prefill: { replicas: 1 }\n  decode: { replicas: 1, kv_blocks: 4200 }\n",
        &model,
    );
    eventually(Duration::from_secs(10), "decode KV at its baseline", || {
        decode_kv_used(&up) == 0
    });
    // A client with a tiny receive buffer that reads the response headers, then nothing.
    let addr = up.http.trim_start_matches("http://").to_string();
    let sock = {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
        let fd = nix::sys::socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        // Before connecting, so the window the client offers is small from the start.
        nix::sys::socket::setsockopt(&fd, sockopt::RcvBuf, &2048).unwrap();
        let to: std::net::SocketAddrV4 = addr.parse().unwrap();
        nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to))
            .unwrap();
        std::net::TcpStream::from(fd)
    };
    let body =
        r#"{"prompt":"stall","max_tokens":60000,"ignore_eos":true,"stream":true,"temperature":0}"#;
    write!(
        &sock,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut head = [0u8; 64];
    let n = (&sock).read(&mut head).unwrap();
    assert!(
        String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );
    eventually(
        Duration::from_secs(10),
        "the stream holds decode KV",
        || decode_kv_used(&up) > 0,
    );
    let held = Instant::now();
    // Other clients are served meanwhile.
    let (text, _) = up.chat("hello", 8);
    assert!(!text.is_empty());
    eventually(
        Duration::from_secs(150),
        "the stalled stream is cut off and decode KV returns to its baseline",
        || decode_kv_used(&up) == 0,
    );
    eprintln!(
        "stalled client cut off, KV freed after {:?}",
        held.elapsed()
    );
    assert_eq!(counter(&up, "xpyd_coordinator_stalled_clients_total"), 1.0);
    drop(sock);
}
