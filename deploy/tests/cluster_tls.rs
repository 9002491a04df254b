//! TLS across the cluster: with `tls: { public: true, internal: true }`, `xpyd up` makes
//! the cluster's CA and a certificate per process; the official `openai` client streams
//! a chat over HTTPS trusting that CA, gRPC clients call over TLS, and — watched on the
//! loopback interface with a raw packet socket — no process speaks plaintext: not the
//! prompt, not a generated token, not the model fingerprint every KV `Open` and worker
//! registration carries. The same watch over a cluster without TLS sees them on the
//! internal and KV ports, so the check can fail.

mod common;

use common::cluster::{Up, get, try_get};
use common::{python_with, tiny_model};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use xpyd_proto as pb;

/// One TCP segment seen on 127.0.0.1: source port, destination port, payload.
struct Segment {
    ports: (u16, u16),
    payload: Vec<u8>,
}

/// Every TCP segment between 127.0.0.1 addresses while it runs (an `AF_PACKET` socket:
/// root only, which CI is).
struct Capture {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Segment>>,
}

impl Capture {
    fn start() -> Capture {
        use nix::sys::socket::{
            AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, setsockopt, socket,
            sockopt,
        };
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::EthAll,
        )
        .expect("a raw packet socket (the TLS test watches loopback traffic; run as root)");
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 1 << 17];
            while !done.load(Ordering::Relaxed) {
                let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) else {
                    continue;
                };
                if let Some(s) = tcp_segment(&buf[..n]) {
                    out.push(s);
                }
            }
            out
        });
        Capture { stop, thread }
    }

    fn finish(self) -> Vec<Segment> {
        // Let the last segments arrive.
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The TCP segment of an Ethernet frame carrying IPv4 between 127.0.0.1 addresses.
fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    if ip.get(12..16)? != [127, 0, 0, 1] || ip.get(16..20)? != [127, 0, 0, 1] {
        return None;
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let ip = ip.get(..total.min(ip.len()))?;
    let tcp = ip.get(((ip[0] & 0xf) as usize) * 4..)?;
    let data = tcp.get(((*tcp.get(12)? >> 4) as usize) * 4..)?;
    Some(Segment {
        ports: (
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        ),
        payload: data.to_vec(),
    })
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// What one cluster run showed.
struct Seen {
    segments: Vec<Segment>,
    /// Generated pieces (openai deltas and gRPC tokens) of 3 bytes or more.
    pieces: Vec<String>,
    /// The coordinator's public ports.
    public: HashSet<u16>,
    /// The coordinator's internal port and the workers' gRPC ports.
    grpc: HashSet<u16>,
}

/// A field of every transfer target (JSON the coordinator passes between workers).
const TARGET_FIELD: &[u8] = b"\"transfer_id\"";

const PROMPT: &str = "Tell the lighthouse keeper a secret about the harbour";

/// Streams a chat with the official client (trusting `ca` when given); its deltas.
fn openai_chat(python: &str, http: &str, ca: Option<&std::path::Path>) -> Vec<String> {
    let script = r#"
import json, ssl, sys, openai
url, ca, prompt = sys.argv[1:4]
kw = {}
if ca:
    kw["http_client"] = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca))
c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120, **kw)
model = c.models.list().data[0].id
s = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
    max_tokens=16, temperature=0, stream=True, extra_body={"ignore_eos": True})
print(json.dumps([ch.choices[0].delta.content or "" for ch in s if ch.choices]))
"#;
    let ca = ca.map(|p| p.display().to_string()).unwrap_or_default();
    let out = std::process::Command::new(python)
        .args(["-c", script, http, &ca, PROMPT])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deltas: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        deltas.iter().any(|d| !d.is_empty()),
        "the stream brought no text"
    );
    deltas
}

/// Generates over the public gRPC API (over TLS trusting `ca` when given); the tokens.
fn grpc_generate(url: &str, ca: Option<&std::path::Path>) -> Vec<String> {
    let roots = ca.map(|p| xpyd_runtime::tls::Roots::load(p).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = xpyd_runtime::tls::endpoint(url, roots.as_ref())
            .unwrap()
            .timeout(Duration::from_secs(60))
            .connect()
            .await
            .unwrap();
        let mut c = pb::inference_client::InferenceClient::new(ch);
        let req = pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Prompt(format!(
                "{PROMPT}, again"
            ))),
            sampling: Some(pb::Sampling {
                max_tokens: Some(16),
                temperature: Some(0.0),
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut s = c.generate(req).await.unwrap().into_inner();
        let mut out = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            out.push(m.text);
        }
        assert!(out.iter().any(|t| !t.is_empty()), "gRPC brought no text");
        out
    })
}

/// Runs a 1P1D cluster (KV over tcp), with TLS or without, and watches one chat over
/// each API.
fn run(model: &std::path::Path, python: &str, name: &str, tls: bool) -> Seen {
    let tls_line = if tls {
        "tls: { public: true, internal: true }\n"
    } else {
        ""
    };
    let up = Up::start(
        &format!(
            "name: {name}\nmode: disaggregated\ncoordinator: {{ http_port: 0, grpc_port: 0 }}\nkv: {{ backend: tcp }}\n{tls_line}roles:\n  prefill: {{ replicas: 1 }}\n  decode: {{ replicas: 1 }}\n"
        ),
        model,
    );
    let scheme = if tls { "https://" } else { "http://" };
    for url in [&up.http, &up.grpc, &up.internal] {
        assert!(url.starts_with(scheme), "{url}");
    }
    assert_eq!(up.tls_ca.is_some(), tls);
    let mut grpc: HashSet<u16> = [port_of(&up.internal)].into();
    for role in ["prefill", "decode"] {
        for w in up.workers(role) {
            let url = w["grpc_url"].as_str().unwrap();
            assert!(url.starts_with(scheme), "{url}");
            // The worker's HTTP side too (`/health` the supervisor probes, `POST /role`).
            let http = w["http_url"].as_str().unwrap();
            assert!(http.starts_with(scheme), "{http}");
            grpc.insert(port_of(url));
        }
    }
    let cap = Capture::start();
    let mut pieces = openai_chat(python, &up.http, up.tls_ca.as_deref());
    pieces.extend(grpc_generate(&up.grpc, up.tls_ca.as_deref()));
    let segments = cap.finish();
    if tls {
        // Plaintext callers get nothing from a TLS port.
        let plain_http = up.http.replace("https://", "http://");
        assert!(
            try_get(&format!("{plain_http}/health")).is_none(),
            "plain HTTP answered on the HTTPS port"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let plain_internal = up.internal.replace("https://", "http://");
        let refused = rt.block_on(async {
            let ch = tonic::transport::Endpoint::from_shared(plain_internal)
                .unwrap()
                .timeout(Duration::from_secs(5))
                .connect()
                .await;
            match ch {
                Err(_) => true,
                Ok(ch) => tonic_health::pb::health_client::HealthClient::new(ch)
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .is_err(),
            }
        });
        assert!(refused, "the internal plane answered plaintext gRPC");
        // Over TLS with the CA, the health endpoint answers.
        assert_eq!(get(&format!("{}/health", up.http)).0, 200);
        // The CLI and the bench driver trust the CA `$XPYD_TLS_CA` names, and nothing
        // else.
        let ca = up.tls_ca.as_deref().unwrap();
        let status = |ca: Option<&std::path::Path>| {
            let mut c = common::xpyd();
            c.args(["status", "--url", &up.http]);
            c.env_remove("XPYD_TLS_CA");
            if let Some(ca) = ca {
                c.env("XPYD_TLS_CA", ca);
            }
            c.output().unwrap()
        };
        let ok = status(Some(ca));
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert!(String::from_utf8_lossy(&ok.stdout).contains("decode-0"));
        let refused = status(None);
        assert!(!refused.status.success(), "status trusted an unknown CA");
        let load = common::xpyd()
            .args(["bench", "load", "--grpc", &up.grpc, "--http", &up.http])
            .args([
                "--requests",
                "3",
                "--clients",
                "1",
                "--input",
                "16",
                "--output",
                "4",
            ])
            .arg("--model")
            .arg(model)
            .env("XPYD_TLS_CA", ca)
            .output()
            .unwrap();
        assert!(
            load.status.success(),
            "bench load over TLS: {}",
            String::from_utf8_lossy(&load.stderr)
        );
    }
    let public = [port_of(&up.http), port_of(&up.grpc)].into();
    up.stop();
    Seen {
        segments,
        pieces: pieces.into_iter().filter(|p| p.len() >= 3).collect(),
        public,
        grpc,
    }
}

#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn a_tls_cluster_serves_https_and_grpc_with_its_ca_and_no_process_speaks_plaintext() {
    let Some(python) = python_with("openai") else {
        return;
    };
    let (_d, model) = tiny_model();
    let fingerprint = xpyd_engine::fingerprint(&model).unwrap();
    let fp = fingerprint.as_bytes();

    // Without TLS the watch sees the fingerprint on a KV port (neither public nor gRPC:
    // the `Open` of a transfer) and generated text on the internal gRPC ports.
    let plain = run(&model, &python, "tls-off", false);
    let kv_plain = plain.segments.iter().any(|s| {
        let (a, b) = s.ports;
        let other = |p| !plain.public.contains(&p) && !plain.grpc.contains(&p);
        other(a) && other(b) && contains(&s.payload, fp)
    });
    assert!(
        kv_plain,
        "the fingerprint was not seen on a KV port of the plain cluster"
    );
    // And on the workers' gRPC ports, the transfer targets the coordinator carries from
    // the decode worker to the prefill worker (JSON inside the protobuf).
    let internal_plain = plain.segments.iter().any(|s| {
        (plain.grpc.contains(&s.ports.0) || plain.grpc.contains(&s.ports.1))
            && contains(&s.payload, TARGET_FIELD)
    });
    assert!(
        internal_plain,
        "no transfer target seen on the plain cluster's internal gRPC ports"
    );

    // With TLS nothing of the kind appears on any port.
    let tls = run(&model, &python, "tls-on", true);
    let bytes: usize = tls.segments.iter().map(|s| s.payload.len()).sum();
    assert!(bytes > 10_000, "the watch saw only {bytes} bytes");
    let mut needles: Vec<&[u8]> = vec![fp, PROMPT.as_bytes(), TARGET_FIELD, b"xpyd.v1"];
    needles.extend(tls.pieces.iter().map(|p| p.as_bytes()));
    for s in &tls.segments {
        for n in &needles {
            assert!(
                !contains(&s.payload, n),
                "plaintext {:?} on {:?}",
                String::from_utf8_lossy(n),
                s.ports
            );
        }
    }
}

/// etcd over TLS: an etcd serving `https://` with a certificate from the cluster's CA
/// (made before `xpyd up`, which then keeps it); workers register and the coordinator
/// watches over TLS, and a client that speaks plaintext to that etcd gets nowhere.
#[test]
#[ignore = "starts clusters; scripts/test.sh runs these one at a time with --ignored"]
fn etcd_over_https_with_the_cluster_ca_carries_membership() {
    let (_d, model) = tiny_model();
    let state = tempfile::tempdir().unwrap();
    let name = "tls-etcd";
    let ca_dir = state.path().join("tls").join(name);
    let ca = xpyd_runtime::tls::Authority::open_or_create(&ca_dir, name).unwrap();
    let (cert, key) = ca.issue("etcd", &["127.0.0.1".into()]).unwrap();
    let roots = xpyd_runtime::tls::Roots::load(&ca.ca_file()).unwrap();
    let Some(etcd) = common::etcd::Etcd::start_tls(&cert, &key, &roots) else {
        return;
    };
    let url = etcd.url.clone();
    let plain = url.replace("https://", "http://");
    assert!(
        common::etcd::Etcd::status_of(&plain, None).is_err(),
        "etcd answered plaintext"
    );
    let up = Up::start_with(
        &format!(
            "name: {name}\nmode: disaggregated\ncoordinator: {{ http_port: 0, grpc_port: 0 }}\nregistry: {{ backend: etcd, endpoints: [\"{url}\"], lease_ttl_ms: 2000, renew_interval_ms: 500 }}\ntls: {{ internal: true }}\nroles:\n  prefill: {{ replicas: 1 }}\n  decode: {{ replicas: 1 }}\n"
        ),
        &model,
        &[("XPYD_STATE_DIR", state.path().to_str().unwrap())],
    );
    assert_eq!(up.tls_ca.as_deref(), Some(ca.ca_file().as_path()));
    assert_eq!(up.workers("decode").len(), 1);
    let (code, v, _) = up.post(
        "/v1/completions",
        &serde_json::json!({"prompt": "over etcd with tls", "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(code, 200, "{v}");
    up.stop();
}
