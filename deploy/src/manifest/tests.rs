//! Tests for manifest parsing, defaults, validation messages and the shipped examples.

use super::types::KvBackend;
use super::*;
use std::path::Path;

const MINIMAL_PD: &str = "
name: demo
mode: disaggregated
roles:
  prefill: { replicas: 1 }
  decode: { replicas: 2 }
";

/// Parses [`MINIMAL_PD`] with top-level `extra` keys appended (keys absent from the base).
fn with(extra: &str) -> Result<Manifest, ManifestError> {
    Manifest::from_yaml(&format!("{MINIMAL_PD}{extra}"))
}

/// Asserts that `res` failed validation on `field` and that the message contains `needle`.
#[track_caller]
fn assert_invalid(res: Result<Manifest, ManifestError>, field: &str, needle: &str) {
    match res {
        Err(e @ ManifestError::Invalid { .. }) => {
            let ManifestError::Invalid { field: f, .. } = &e else {
                unreachable!()
            };
            assert_eq!(f, field, "wrong field in `{e}`");
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("{field}: ")), "{msg}");
            assert!(msg.contains(needle), "`{msg}` lacks `{needle}`");
        }
        other => panic!("expected Invalid on {field}, got {other:?}"),
    }
}

#[track_caller]
fn assert_parse_err(res: Result<Manifest, ManifestError>, needles: &[&str]) {
    match res {
        Err(ManifestError::Parse(msg)) => {
            for n in needles {
                assert!(msg.contains(n), "`{msg}` lacks `{n}`");
            }
        }
        other => panic!("expected Parse error, got {other:?}"),
    }
}

#[test]
fn every_example_loads_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/examples exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let m = Manifest::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!m.worker_roles().is_empty(), "{}", path.display());
            seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    for want in ["single.yaml", "1p1d.yaml", "1p2d.yaml", "2p2d-etcd.yaml"] {
        assert!(
            seen.iter().any(|s| s == want),
            "missing example {want}: {seen:?}"
        );
    }
}

#[test]
fn examples_have_the_documented_shapes() {
    let load = |f: &str| {
        Manifest::load(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples")
                .join(f),
        )
        .unwrap()
    };
    let shape = |m: &Manifest| {
        m.worker_roles()
            .iter()
            .map(|(r, s)| (*r, s.replicas))
            .collect::<Vec<_>>()
    };
    let single = load("single.yaml");
    assert_eq!(single.mode, Mode::Single);
    assert_eq!(shape(&single), [(Role::Combined, 2)]);
    let p1d1 = load("1p1d.yaml");
    assert_eq!(shape(&p1d1), [(Role::Prefill, 1), (Role::Decode, 1)]);
    assert_eq!(
        p1d1.roles.prefill.as_ref().unwrap().cpus.as_deref(),
        Some("0")
    );
    assert_eq!(
        p1d1.roles.decode.as_ref().unwrap().cpus.as_deref(),
        Some("1")
    );
    assert_eq!(
        shape(&load("1p2d.yaml")),
        [(Role::Prefill, 1), (Role::Decode, 2)]
    );
    let etcd = load("2p2d-etcd.yaml");
    assert_eq!(shape(&etcd), [(Role::Prefill, 2), (Role::Decode, 2)]);
    assert_eq!(etcd.registry.backend, RegistryBackend::Etcd);
    assert_eq!(etcd.registry.endpoints, ["http://127.0.0.1:2379"]);
    assert_eq!(etcd.routing.prefill, RoutingPolicy::PrefixAware);
}

#[test]
fn minimal_manifest_gets_defaults() {
    let m = with("").unwrap();
    assert_eq!(m.name, "demo");
    assert_eq!(m.model, "default");
    assert_eq!(m.coordinator, CoordinatorSpec::default());
    assert_eq!(m.coordinator.host, "127.0.0.1");
    assert_eq!(m.coordinator.max_queue, 256);
    assert_eq!(m.coordinator.queue_timeout_ms, 10_000);
    assert_eq!(m.coordinator.first_token_timeout_s, 120);
    assert_eq!(m.coordinator.request_timeout_s, 3600);
    assert_eq!(m.coordinator.max_request_bytes, 10 * 1024 * 1024);
    assert_eq!(m.registry.backend, RegistryBackend::Embedded);
    assert_eq!(m.registry.prefix, "/xpyd/");
    assert_eq!(
        (m.registry.lease_ttl_ms, m.registry.renew_interval_ms),
        (2000, 500)
    );
    assert_eq!(m.routing.prefill, RoutingPolicy::RoundRobin);
    assert_eq!(m.routing.decode, RoutingPolicy::LeastConnections);
    assert_eq!(m.routing.block_size, 16);
    assert_eq!(m.kv.backend, KvBackend::Auto);
    assert_eq!(m.kv.transfer_deadline_ms, 30_000);
    let p = m.roles.prefill.as_ref().unwrap();
    assert_eq!(*p, RoleSpec::with_replicas(1));
    assert_eq!((p.threads, p.kv_blocks, p.prefill_chunk), (1, 0, 256));
    assert_eq!(
        (p.kv_dtype, p.engine, p.prefix_cache_blocks),
        (KvDtype::F32, EngineKind::Real, 1024)
    );
    assert_eq!(p.max_running_for(Role::Prefill), 4);
    let d = m.roles.decode.as_ref().unwrap();
    assert_eq!(d.max_running_for(Role::Decode), 16);
    assert_eq!(m.total_replicas(), 3);
}

#[test]
fn worker_roles_follow_mode_and_start_order() {
    let m = with("").unwrap();
    let roles: Vec<_> = m
        .worker_roles()
        .iter()
        .map(|(r, s)| (r.name(), s.replicas))
        .collect();
    assert_eq!(roles, [("prefill", 1), ("decode", 2)]);
    let s =
        Manifest::from_yaml("name: s\nmode: single\nroles: { combined: { replicas: 3 } }").unwrap();
    let roles: Vec<_> = s
        .worker_roles()
        .iter()
        .map(|(r, s)| (*r, s.replicas))
        .collect();
    assert_eq!(roles, [(Role::Combined, 3)]);
    assert_eq!(s.routing.policy_for(Role::Combined), s.routing.decode);
}

#[test]
fn serialized_manifest_round_trips() {
    let m = with("routing: { prefill: prefix_aware }\n").unwrap();
    let text = serde_saphyr::to_string(&m).unwrap();
    assert_eq!(Manifest::from_yaml(&text).unwrap(), m);
}

#[test]
fn unknown_fields_are_rejected_with_their_name() {
    for (extra, field) in [
        ("colour: blue\n", "colour"),
        ("coordinator: { http_prot: 8000 }\n", "http_prot"),
        ("registry: { lease_ttl: 2000 }\n", "lease_ttl"),
        ("routing: { combined: round_robin }\n", "combined"),
        ("kv: { deadline_ms: 5 }\n", "deadline_ms"),
    ] {
        assert_parse_err(with(extra), &[&format!("unknown field `{field}`")]);
    }
    let nested = "name: d\nmode: disaggregated\nroles:\n  prefill: { replicas: 1, thread: 2 }\n  decode: { replicas: 1 }\n";
    assert_parse_err(
        Manifest::from_yaml(nested),
        &["unknown field `thread`", "roles.prefill", "threads"],
    );
    let role = "name: d\nmode: disaggregated\nroles:\n  prefill: { replicas: 1 }\n  decoder: { replicas: 1 }\n";
    assert_parse_err(Manifest::from_yaml(role), &["unknown field `decoder`"]);
}

#[test]
fn load_names_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, format!("{MINIMAL_PD}extra_knob: 1\n")).unwrap();
    let msg = Manifest::load(&path).unwrap_err().to_string();
    assert!(
        msg.contains("bad.yaml") && msg.contains("extra_knob") && msg.contains("line "),
        "{msg}"
    );

    std::fs::write(&path, MINIMAL_PD.replace("replicas: 2", "replicas: 0")).unwrap();
    let err = Manifest::load(&path).unwrap_err();
    assert!(
        matches!(&err, ManifestError::Invalid { field, .. } if field == "roles.decode.replicas")
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("roles.decode.replicas: 0 is out of range 1..=64"),
        "{msg}"
    );
    assert!(msg.contains("bad.yaml"), "{msg}");

    let missing = dir.path().join("nope.yaml");
    let err = Manifest::load(&missing).unwrap_err();
    assert!(matches!(err, ManifestError::Io { .. }));
    assert!(err.to_string().contains("nope.yaml"), "{err}");
}

#[test]
fn replicas_out_of_range_names_the_field() {
    assert_invalid(
        Manifest::from_yaml(&MINIMAL_PD.replace("replicas: 2", "replicas: 0")),
        "roles.decode.replicas",
        "0 is out of range 1..=64",
    );
    assert_invalid(
        Manifest::from_yaml(&MINIMAL_PD.replace("replicas: 1", "replicas: 65")),
        "roles.prefill.replicas",
        "65 is out of range 1..=64",
    );
}

#[test]
fn role_ranges_name_their_fields() {
    let role = |spec: &str| {
        Manifest::from_yaml(&format!(
            "name: s\nmode: single\nroles:\n  combined: {{ replicas: 1, {spec} }}\n"
        ))
    };
    assert_invalid(role("threads: 0"), "roles.combined.threads", "1..=256");
    assert_invalid(
        role("max_running: 2000"),
        "roles.combined.max_running",
        "2000 is out of range 1..=1024",
    );
    assert_invalid(
        role("kv_blocks: 8"),
        "roles.combined.kv_blocks",
        "0 (auto) or 16..=10000000",
    );
    assert_invalid(
        role("prefill_chunk: 8"),
        "roles.combined.prefill_chunk",
        "16..=8192",
    );
    assert!(role("kv_blocks: 16, max_running: 1024, prefill_chunk: 8192").is_ok());
    assert_parse_err(
        role("kv_dtype: bf16"),
        &["roles.combined.kv_dtype", "f32", "f16", "line 4"],
    );
    assert_parse_err(role("engine: fake"), &["real", "mock"]);
}

#[test]
fn mock_latency_needs_engine_mock_and_names_its_fields() {
    let role = |spec: &str| {
        Manifest::from_yaml(&format!(
            "name: s\nmode: single\nroles:\n  combined: {{ replicas: 1, {spec} }}\n"
        ))
    };
    let m = role("engine: mock, mock_latency: { prefill_per_token_us: 40, decode_base_us: 9000 }")
        .unwrap();
    let c = m.roles.combined.unwrap();
    assert_eq!(c.engine, EngineKind::Mock);
    assert_eq!(
        c.mock_latency,
        Some(xpyd_engine::MockLatency {
            prefill_base_us: 0,
            prefill_per_token_us: 40,
            decode_base_us: 9000,
            decode_per_seq_us: 0,
            ..Default::default()
        })
    );
    let bare = role("engine: mock").unwrap().roles.combined.unwrap();
    assert_eq!(bare.mock_latency, None, "zero latency unless given");
    assert!(role("engine: mock, mock_latency: { decode_per_seq_us: 10000000 }").is_ok());
    assert_invalid(
        role("mock_latency: { decode_base_us: 5 }"),
        "roles.combined.mock_latency",
        "only used with engine: mock (this role has engine: real)",
    );
    assert_invalid(
        role("engine: real, mock_latency: {}"),
        "roles.combined.mock_latency",
        "engine: mock",
    );
    assert_invalid(
        role("engine: mock, mock_latency: { prefill_base_us: 10000001 }"),
        "roles.combined.mock_latency.prefill_base_us",
        "10000001 is out of range 0..=10000000",
    );
    assert_parse_err(
        role("engine: mock, mock_latency: { decode_us: 1 }"),
        &["unknown field `decode_us`", "decode_base_us"],
    );
    assert_parse_err(
        role("engine: mock, mock_latency: { decode_base_us: -1 }"),
        &["roles.combined.mock_latency"],
    );
}

#[test]
fn cpu_lists_are_checked() {
    let role = |cpus: &str| {
        Manifest::from_yaml(&format!(
            "name: s\nmode: single\nroles:\n  combined: {{ replicas: 1, cpus: {cpus} }}\n"
        ))
    };
    for bad in [
        "\"a-b\"",
        "\"\"",
        "\"3-1\"",
        "\"0,,1\"",
        "\"-1\"",
        "\"0-99999\"",
    ] {
        assert_invalid(role(bad), "roles.combined.cpus", "is not a CPU list like");
    }
    for good in ["\"0\"", "\"0-1\"", "\"0,2\"", "\"0, 2-3\"", "1"] {
        assert!(role(good).is_ok(), "{good}: {:?}", role(good));
    }
    assert_eq!(
        role("1").unwrap().roles.combined.unwrap().cpus.as_deref(),
        Some("1")
    );
    assert_eq!(
        xpyd_engine::compute::parse_cpu_list("0,2-4").unwrap(),
        [0, 2, 3, 4]
    );
}

#[test]
fn coordinator_ranges_name_their_fields() {
    let c = |kv: &str| with(&format!("coordinator: {{ {kv} }}\n"));
    assert_invalid(
        c("queue_timeout_ms: 0"),
        "coordinator.queue_timeout_ms",
        "0 is out of range 1..=600000",
    );
    assert_invalid(
        c("max_queue: 100001"),
        "coordinator.max_queue",
        "0..=100000",
    );
    assert_invalid(
        c("first_token_timeout_s: 1201"),
        "coordinator.first_token_timeout_s",
        "1..=1200",
    );
    assert_invalid(
        c("request_timeout_s: 7200"),
        "coordinator.request_timeout_s",
        "1..=3600",
    );
    assert_invalid(
        c("first_token_timeout_s: 600, request_timeout_s: 300"),
        "coordinator.first_token_timeout_s",
        "exceeds coordinator.request_timeout_s",
    );
    assert_invalid(
        c("max_migrations: 17"),
        "coordinator.max_migrations",
        "0..=16",
    );
    assert_invalid(
        c("client_stall_timeout_s: 0"),
        "coordinator.client_stall_timeout_s",
        "1..=3600",
    );
    assert_invalid(
        c("max_request_bytes: 1000"),
        "coordinator.max_request_bytes",
        "1048576..=52428800",
    );
    assert_invalid(
        c("host: \"not a host\""),
        "coordinator.host",
        "not an IP address or host name",
    );
    assert_invalid(
        c("http_port: 8000, grpc_port: 8000"),
        "coordinator.grpc_port",
        "must differ",
    );
    assert_invalid(
        c("grpc_port: 8001, internal_port: 8001"),
        "coordinator.internal_port",
        "is also coordinator.grpc_port",
    );
    assert_parse_err(c("http_port: 70000"), &["coordinator.http_port"]);
    assert_invalid(
        c("rate_limit: { rps: 0 }"),
        "coordinator.rate_limit.rps",
        "1..=10000",
    );
    assert_invalid(
        c("rate_limit: { rps: 10001, scope: instance }"),
        "coordinator.rate_limit.rps",
        "1..=10000",
    );
    assert_parse_err(c("rate_limit: { rps: 5, scope: replica }"), &["scope"]);
    assert_invalid(
        c("access: { allow: [10.0.0.0/8, 300.1.1.1] }"),
        "coordinator.access.allow[1]",
        "`300.1.1.1` is not a CIDR network or an address",
    );
    assert_invalid(
        c("access: { allow: [10.0.0.0/8], deny: [10.1.0.0/16] }"),
        "coordinator.access.allow",
        "not both",
    );
    let eleven: Vec<String> = (0..11).map(|i| format!("10.0.0.{i}")).collect();
    assert_invalid(
        c(&format!("access: {{ deny: [{}] }}", eleven.join(", "))),
        "coordinator.access.deny",
        "at most 10",
    );
    let m =
        c("rate_limit: { rps: 50, scope: instance }, access: { deny: [127.0.0.3/32] }").unwrap();
    assert_eq!(m.coordinator.rate_limit.unwrap().scope, RateScope::Instance);
    assert_eq!(m.coordinator.access.deny, ["127.0.0.3/32"]);
    assert!(c("host: 0.0.0.0, http_port: 8000, grpc_port: 8001").is_ok());
    assert!(c("host: localhost").is_ok());
}

#[test]
fn registry_rules_name_their_fields() {
    let r = |kv: &str| with(&format!("registry: {{ {kv} }}\n"));
    assert_invalid(
        r("lease_ttl_ms: 100"),
        "registry.lease_ttl_ms",
        "100 is out of range 500..=60000",
    );
    assert_invalid(
        r("lease_ttl_ms: 2000, renew_interval_ms: 1500"),
        "registry.renew_interval_ms",
        "100..=1000",
    );
    assert_invalid(
        r("renew_interval_ms: 50"),
        "registry.renew_interval_ms",
        "50 is out of range",
    );
    assert_invalid(
        r("backend: etcd"),
        "registry.endpoints",
        "at least one endpoint",
    );
    assert_invalid(
        r("backend: etcd, endpoints: []"),
        "registry.endpoints",
        "when registry.backend is etcd",
    );
    assert_invalid(
        r("backend: etcd, endpoints: [\"http://127.0.0.1:2379\"], lease_ttl_ms: 1500"),
        "registry.lease_ttl_ms",
        "whole number of seconds",
    );
    assert_invalid(
        r("backend: etcd, endpoints: [\"http://a:2379\", \"127.0.0.1:2379\"]"),
        "registry.endpoints[1]",
        "http://host:port",
    );
    assert_invalid(
        r("endpoints: [\"http://a:2379\"]"),
        "registry.endpoints",
        "only used with",
    );
    assert_invalid(
        r("prefix: xpyd"),
        "registry.prefix",
        "start and end with `/`",
    );
    assert_parse_err(
        r("backend: consul"),
        &["registry.backend", "embedded", "etcd"],
    );
    assert!(
        r("backend: etcd, endpoints: [\"https://[::1]:2379\", \"https://etcd-0.etcd:2379\"], ca: ca.pem")
            .is_ok()
    );
    assert!(r("backend: etcd, endpoints: [\"http://etcd-0.etcd:2379\"]").is_ok());
}

#[test]
fn mode_decides_which_roles_are_allowed() {
    let single_with_prefill =
        "name: s\nmode: single\nroles:\n  combined: { replicas: 1 }\n  prefill: { replicas: 1 }\n";
    assert_invalid(
        Manifest::from_yaml(single_with_prefill),
        "roles.prefill",
        "not allowed in mode single",
    );
    let single_without = "name: s\nmode: single\nroles:\n  decode: { replicas: 1 }\n";
    assert_invalid(
        Manifest::from_yaml(single_without),
        "roles.combined",
        "required in mode single",
    );
    let missing_decode = "name: d\nmode: disaggregated\nroles:\n  prefill: { replicas: 1 }\n";
    assert_invalid(
        Manifest::from_yaml(missing_decode),
        "roles.decode",
        "required in mode disaggregated",
    );
    assert_invalid(
        with_role_combined(),
        "roles.combined",
        "not allowed in mode disaggregated",
    );
    assert_parse_err(
        Manifest::from_yaml("name: d\nmode: aggregated\nroles: {}\n"),
        &["mode", "disaggregated", "single"],
    );
    assert_parse_err(
        Manifest::from_yaml("name: d\nroles: {}\n"),
        &["missing field `mode`"],
    );
}

fn with_role_combined() -> Result<Manifest, ManifestError> {
    Manifest::from_yaml(&MINIMAL_PD.replace(
        "  decode: { replicas: 2 }",
        "  decode: { replicas: 2 }\n  combined: { replicas: 1 }",
    ))
}

#[test]
fn bad_routing_policy_lists_the_allowed_names() {
    assert_parse_err(
        with("routing: { prefill: fastest }\n"),
        &[
            "routing.prefill",
            "unknown variant `fastest`",
            "line 7",
            "round_robin",
            "source_ip_hash",
            "least_connections",
            "min_ttft",
            "overall_load",
            "slo_priority",
            "prefix_aware",
        ],
    );
    assert_invalid(
        with("routing: { block_size: 0 }\n"),
        "routing.block_size",
        "1..=1024",
    );
}

#[test]
fn other_top_level_fields_are_checked() {
    let named =
        |n: &str| Manifest::from_yaml(&MINIMAL_PD.replace("name: demo", &format!("name: {n}")));
    for bad in ["Demo", "-demo", "demo-", "de_mo", "\"\"", &"a".repeat(64)] {
        assert_invalid(named(bad), "name", "[a-z0-9-]");
    }
    assert!(named(&"a".repeat(63)).is_ok());
    assert_invalid(
        with("model: weights.bin\n"),
        "model",
        "`default` or a path to a .gguf file",
    );
    assert!(with("model: /models/x.Q4_0.gguf\n").is_ok());
    assert_invalid(
        with("kv: { transfer_deadline_ms: 50 }\n"),
        "kv.transfer_deadline_ms",
        "100..=600000",
    );
    assert_parse_err(
        with("kv: { backend: rdma }\n"),
        &["kv.backend", "tcp", "shm", "ucx", "nccl"],
    );
}

#[test]
fn replicas_get_their_own_cores_with_pin_replica() {
    let parse = |extra: &str| {
        Manifest::from_yaml(&format!(
            "name: s\nmode: single\nroles:\n  combined: {{ {extra} }}\n"
        ))
    };
    let role = |extra: &str| parse(extra).unwrap().roles.combined.unwrap();
    let shared = role("replicas: 3, cpus: \"0-1\"");
    assert_eq!(shared.cpus_of(2).unwrap(), Some(vec![0, 1]));
    let own = role("replicas: 2, cpus: \"0-1\", pin: replica");
    assert_eq!(own.cpus_of(0).unwrap(), Some(vec![0]));
    assert_eq!(own.cpus_of(1).unwrap(), Some(vec![1]));
    let two = role("replicas: 2, threads: 2, cpus: \"0-3\", pin: replica");
    assert_eq!(two.cpus_of(1).unwrap(), Some(vec![2, 3]));
    assert_invalid(
        parse("replicas: 3, cpus: \"0-1\", pin: replica"),
        "roles.combined.pin",
        "needs 3 cores",
    );
    assert_invalid(
        parse("replicas: 1, pin: replica"),
        "roles.combined.pin",
        "needs a `cpus` list",
    );
    assert_parse_err(parse("replicas: 1, pin: core"), &["replica"]);
}

#[test]
fn mock_profile_needs_engine_mock_and_excludes_mock_latency() {
    let role = |spec: &str| {
        Manifest::from_yaml(&format!(
            "name: s\nmode: single\nroles:\n  combined: {{ replicas: 1, {spec} }}\n"
        ))
    };
    let c = role("engine: mock, mock_profile: prof.json")
        .unwrap()
        .roles
        .combined
        .unwrap();
    assert_eq!(c.mock_profile.as_deref(), Some(Path::new("prof.json")));
    assert_invalid(
        role("mock_profile: prof.json"),
        "roles.combined.mock_profile",
        "engine: mock",
    );
    assert_invalid(
        role("engine: mock, mock_profile: p.json, mock_latency: { decode_base_us: 1 }"),
        "roles.combined.mock_profile",
        "not both",
    );
}

#[test]
fn advisor_settings_name_their_fields() {
    let m = with(
        "advisor: { enabled: true, window_s: 10, mode: auto, budget: 4, slo: { ttft_ms: 500 } }\n",
    )
    .unwrap();
    let c = m.advisor.planner_config();
    assert!(m.advisor.enabled);
    assert_eq!((c.budget, c.slo.ttft_s, c.slo.tpot_s), (4, 0.5, 0.1));
    assert_eq!(c.mode, xpyd_planner::advisor::Mode::Auto);
    assert_eq!(with("").unwrap().advisor, super::AdvisorSpec::default());
    let a = |kv: &str| with(&format!("advisor: {{ {kv} }}\n"));
    assert_invalid(a("window_s: 4"), "advisor.window_s", "5..=3600");
    assert_invalid(a("budget: 0"), "advisor.budget", "1..=1024");
    assert_invalid(a("slo: { ttft_ms: 0 }"), "advisor.slo.ttft_ms", "> 0");
    assert_invalid(
        a("slo: { attainment: 1.5 }"),
        "advisor.slo.attainment",
        "(0, 1]",
    );
    assert_invalid(a("streak: 0"), "advisor.streak", "1..=100");
    assert_invalid(a("history: 61"), "advisor.history", "1..=60");
    assert_parse_err(a("mode: sometimes"), &["advisor.mode", "sometimes"]);
    assert_parse_err(a("colour: red"), &["advisor", "colour"]);
}

mod fuzz {
    //! Fuzz target over manifests: text built from the manifest's own keys and YAML's
    //! punctuation, and mutations of a valid manifest, always load or fail with a
    //! `ManifestError` — never a panic.
    use super::*;
    use proptest::prelude::*;

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(vec![
                "name",
                "mode",
                "roles",
                "prefill",
                "decode",
                "combined",
                "replicas",
                "coordinator",
                "rate_limit",
                "rps",
                "scope",
                "access",
                "allow",
                "deny",
                "auth",
                "api_key",
                "kv",
                "backend",
                "routing",
                "advisor",
                "threads",
                "cpus",
                "engine",
                "mock",
                "max_running",
                "registry",
                "etcd",
                "endpoints",
                "probes",
                "upgrade",
            ])
            .prop_map(String::from),
            proptest::sample::select(vec![
                ":",
                " ",
                "\n",
                "  ",
                "{",
                "}",
                "[",
                "]",
                ",",
                "-",
                "\"",
                "'",
                "&a",
                "*a",
                "!!str",
                "#",
                "0",
                "-1",
                "99999999999999999999",
                "1e309",
                "0.5",
                "true",
                "null",
                "~",
            ])
            .prop_map(String::from),
            "\\PC{0,8}",
        ]
    }

    proptest! {
        #[test]
        fn any_text_loads_or_fails_typed(tokens in proptest::collection::vec(token(), 0..60)) {
            let _ = Manifest::from_yaml(&tokens.concat());
        }

        #[test]
        fn mutated_manifests_load_or_fail_typed(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), token()), 1..5),
        ) {
            let mut text = format!("{MINIMAL_PD}coordinator: {{ rate_limit: {{ rps: 5 }}, access: {{ allow: [10.0.0.0/8] }} }}\n");
            for (at, t) in edits {
                let mut i = at.index(text.len() + 1);
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                text.insert_str(i, &t);
            }
            let _ = Manifest::from_yaml(&text);
        }
    }
}
