//! Hosts failing, as close as this machine gets: the coordinator and each worker in a
//! network namespace of their own, joined by veth links to a bridge (the test creates and
//! removes them; it needs root). A worker whose link goes down mid-stream leaves routing
//! within two seconds and its streams migrate with exact output; when the link comes
//! back, it rejoins.

mod common;

use common::streams::{mix, reference, run_round};
use common::tiny_model;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `ip` with these arguments; panics naming the command when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge in a hub namespace, one namespace per node linked to it, and a link from the
/// test's own namespace. Everything is removed on drop.
struct Net {
    tag: String,
    subnet: String,
    nodes: usize,
    procs: Vec<Child>,
}

impl Net {
    /// `nodes` namespaces at `10.77.S.1 ..= 10.77.S.nodes`; the test reaches them from
    /// `10.77.S.254`.
    fn new(nodes: usize) -> Net {
        let tag = format!("x{}", std::process::id() % 100_000);
        let subnet = format!("10.77.{}", std::process::id() % 250);
        let net = Net {
            tag,
            subnet,
            nodes,
            procs: Vec::new(),
        };
        let hub = net.hub();
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for i in 0..nodes {
            let (ns, port) = (net.node(i), net.port(i));
            ip(&["netns", "add", &ns]);
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.addr(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let host = format!("{}h", net.tag);
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "host", "netns", &hub,
        ]);
        ip(&["-n", &hub, "link", "set", "host", "master", "br0", "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{}.254/24", net.subnet),
            "dev",
            &host,
        ]);
        ip(&["link", "set", &host, "up"]);
        net
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.tag)
    }

    fn node(&self, i: usize) -> String {
        format!("{}-n{i}", self.tag)
    }

    fn port(&self, i: usize) -> String {
        format!("p{i}")
    }

    fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    /// Takes node `i`'s link down (a partition) or up again.
    fn link(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.hub(),
            "link",
            "set",
            &self.port(i),
            if up { "up" } else { "down" },
        ]);
    }

    /// Starts `xpyd ARGS` inside node `i`'s namespace.
    fn spawn(&mut self, i: usize, args: &[&str], env: &[(&str, &str)]) -> &mut Child {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.node(i)])
            .arg(env!("CARGO_BIN_EXE_xpyd"))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.procs.push(child);
        self.procs.last_mut().unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}h", self.tag)])
            .status();
        for i in 0..self.nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.node(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub()])
            .status();
    }
}

/// True when this process may create network namespaces (root with `ip`); outside CI a
/// machine that cannot skips, in CI it fails.
fn can_make_namespaces() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let ok = root
        && Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "network-namespace tests need root and iproute2 (./scripts/test.sh installs it)"
        );
        eprintln!("SKIPPED: not root, or no `ip`");
    }
    ok
}

fn cluster(http: &str) -> Value {
    ureq::get(&format!("{http}/v1/cluster"))
        .call()
        .ok()
        .and_then(|r| r.into_body().read_to_string().ok())
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

fn state(http: &str, id: &str) -> String {
    cluster(http)["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["worker_id"] == id)
        .and_then(|w| w["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn a_partitioned_worker_leaves_routing_its_streams_migrate_and_it_rejoins() {
    if !can_make_namespaces() {
        return;
    }
    let (_d, model) = tiny_model();
    let mut net = Net::new(4);
    let dir = tempfile::tempdir().unwrap();
    let manifest: PathBuf = dir.path().join("netns.yaml");
    std::fs::write(
        &manifest,
        format!(
            "name: netns\nmode: disaggregated\ncoordinator: {{ host: {}, http_port: 0, grpc_port: 0 }}\nkv: {{ backend: tcp }}\nroles:\n  prefill: {{ replicas: 1 }}\n  decode: {{ replicas: 2 }}\n",
            net.addr(0)
        ),
    )
    .unwrap();
    let m = manifest.to_str().unwrap().to_string();
    let model_s = model.to_str().unwrap().to_string();
    // The cluster's credential, as an operator would copy it to each host (mode 0600).
    let token = manifest.with_file_name("netns.token");
    std::fs::write(&token, "netns-test-token-0123456789abcdef").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let token_s = token.to_str().unwrap().to_string();
    let coord = net.spawn(
        0,
        &[
            "coordinator",
            "-f",
            &m,
            "--model",
            &model_s,
            "--cluster-token-file",
            &token_s,
        ],
        &[],
    );
    let line = BufReader::new(coord.stdout.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    let urls: Value = serde_json::from_str(&line).unwrap();
    let (http, grpc, internal) = (
        urls["http"].as_str().unwrap().to_string(),
        urls["grpc"].as_str().unwrap().to_string(),
        urls["internal"].as_str().unwrap().to_string(),
    );
    let delays = [("XPYD_DEBUG_DELAY", "decode-0=25,decode-1=25")];
    for (node, role, index) in [(1, "prefill", "0"), (2, "decode", "0"), (3, "decode", "1")] {
        let host = net.addr(node);
        let args = [
            "worker",
            "-f",
            &m,
            "--role",
            role,
            "--index",
            index,
            "--model",
            &model_s,
            "--registry-url",
            &internal,
            "--cluster-token-file",
            &token_s,
            "--host",
            &host,
        ];
        net.spawn(node, &args, &delays);
    }
    wait_until(Duration::from_secs(60), "three ready workers", || {
        ["prefill-0", "decode-0", "decode-1"]
            .iter()
            .all(|id| state(&http, id) == "ready")
    });
    let reqs = mix(0, 12);
    let refs: Vec<String> = reqs
        .iter()
        .map(|r| reference(Path::new(&model), r))
        .collect();
    let mut left_after = None;
    run_round(&http, &grpc, &reqs, &refs, || {
        std::thread::sleep(Duration::from_millis(600));
        let t0 = Instant::now();
        net.link(3, false);
        wait_until(Duration::from_secs(10), "decode-1 out of routing", || {
            state(&http, "decode-1") != "ready"
        });
        left_after = Some(t0.elapsed());
    });
    let left = left_after.unwrap();
    assert!(left < Duration::from_secs(2), "left routing after {left:?}");
    // decode-1 held streams when its link went down: they were re-sent, not lost.
    let migrated = common::cluster::metric_sum(&http, "xpyd_coordinator_migrations_total", "");
    assert!(
        migrated >= 1.0,
        "no stream migrated off the partitioned worker"
    );
    eprintln!("partitioned decode-1 left routing after {left:?}; every stream exact");
    net.link(3, true);
    wait_until(
        Duration::from_secs(20),
        "decode-1 back after the link",
        || state(&http, "decode-1") == "ready",
    );
}
