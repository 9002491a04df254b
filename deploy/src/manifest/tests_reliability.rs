//! Tests for the reliability sections (probes, rebuild scope, graceful shutdown, upgrade
//! strategy, events) and for what an upgrade may change.

use super::*;
use std::time::Duration;

/// A 1P2D manifest whose decode role gets `decode` appended and which gets `extra`
/// top-level keys.
fn pd(decode: &str, extra: &str) -> Result<Manifest, ManifestError> {
    Manifest::from_yaml(&format!(
        "name: demo\nmode: disaggregated\n{extra}roles:\n  prefill: {{ replicas: 1 }}\n  decode: {{ replicas: 2{decode} }}\n"
    ))
}

#[track_caller]
fn assert_invalid(res: Result<impl std::fmt::Debug, ManifestError>, field: &str, needle: &str) {
    match res {
        Err(ManifestError::Invalid { field: f, reason }) => {
            assert_eq!(f, field, "wrong field ({reason})");
            assert!(reason.contains(needle), "`{reason}` lacks `{needle}`");
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
fn defaults_are_documented_values() {
    let m = pd("", "").unwrap();
    let d = m.roles.decode.as_ref().unwrap();
    assert_eq!(d.rebuild_scope, RebuildScope::Process);
    assert_eq!(d.graceful_shutdown.timeout_s, 30);
    assert_eq!(d.graceful_shutdown.shutdown_command, None);
    assert_eq!(
        m.coordinator.graceful_shutdown.timeout(),
        Duration::from_secs(30)
    );
    let startup = d.probes.startup.resolve(ProbeKind::Startup);
    assert_eq!(startup.action, ProbeAction::HttpGet("/health".into()));
    assert_eq!(
        (
            startup.delay,
            startup.interval,
            startup.timeout,
            startup.failure_threshold
        ),
        (
            Duration::from_secs(1),
            Duration::from_secs(1),
            Duration::from_secs(5),
            300
        )
    );
    let r = d.probes.readiness.resolve(ProbeKind::Readiness);
    assert_eq!(
        (
            r.interval.as_secs(),
            r.timeout.as_secs(),
            r.failure_threshold
        ),
        (2, 2, 3)
    );
    let l = d.probes.liveness.resolve(ProbeKind::Liveness);
    assert_eq!(
        (
            l.interval.as_secs(),
            l.timeout.as_secs(),
            l.failure_threshold
        ),
        (5, 5, 3)
    );
    assert_eq!(m.upgrade.percents(), (1, 1));
    assert_eq!(
        (m.events.retention_s, m.events.max_events),
        (2_592_000, 10_000)
    );
}

#[test]
fn probes_parse_http_paths_and_commands() {
    let m = pd(
        ", probes: { readiness: { command: \"test -e /tmp/{worker_id}\", interval_s: 1 }, liveness: { command: [\"true\"], failure_threshold: 2147483647 }, startup: { http_path: /ready/x_y-z } }",
        "",
    )
    .unwrap();
    let p = &m.roles.decode.as_ref().unwrap().probes;
    let r = p.readiness.resolve(ProbeKind::Readiness);
    assert_eq!(
        r.action,
        ProbeAction::Command(vec![
            "sh".into(),
            "-c".into(),
            "test -e /tmp/{worker_id}".into()
        ])
    );
    assert_eq!((r.interval.as_secs(), r.failure_threshold), (1, 3));
    let l = p.liveness.resolve(ProbeKind::Liveness);
    assert_eq!(l.action, ProbeAction::Command(vec!["true".into()]));
    assert_eq!(l.failure_threshold, 2_147_483_647);
    let s = p.startup.resolve(ProbeKind::Startup);
    assert_eq!(s.action, ProbeAction::HttpGet("/ready/x_y-z".into()));
    let text = serde_saphyr::to_string(&m).unwrap();
    assert_eq!(
        Manifest::from_yaml(&text).unwrap(),
        m,
        "round trip:\n{text}"
    );
}

#[test]
fn probe_fields_out_of_range_or_of_the_wrong_kind_are_named() {
    for (field, v) in [
        ("delay_s", "0"),
        ("interval_s", "2147483648"),
        ("timeout_s", "0"),
        ("failure_threshold", "99999999999"),
    ] {
        assert_invalid(
            pd(&format!(", probes: {{ liveness: {{ {field}: {v} }} }}"), ""),
            &format!("roles.decode.probes.liveness.{field}"),
            &format!("{v} is out of range 1..=2147483647"),
        );
    }
    assert_parse_err(
        pd(", probes: { readiness: { interval_s: -1 } }", ""),
        &["roles.decode.probes.readiness.interval_s"],
    );
    assert_parse_err(
        pd(", probes: { readiness: { timeout_s: soon } }", ""),
        &["roles.decode.probes.readiness.timeout_s"],
    );
    assert_parse_err(
        pd(", probes: { startup: { period_s: 1 } }", ""),
        &["unknown field `period_s`", "interval_s"],
    );
    assert_parse_err(
        pd(", probes: { warmup: {} }", ""),
        &["unknown field `warmup`"],
    );
    assert_parse_err(
        pd(", probes: { liveness: { command: { run: x } } }", ""),
        &["roles.decode.probes.liveness.command"],
    );
    for bad in ["health", "/he alth", "/x?y=1", "/ü"] {
        assert_invalid(
            pd(
                &format!(", probes: {{ startup: {{ http_path: \"{bad}\" }} }}"),
                "",
            ),
            "roles.decode.probes.startup.http_path",
            "must match ^/[a-zA-Z0-9-_/]{0,1024}$",
        );
    }
    let long = format!("/{}", "a".repeat(1025));
    assert_invalid(
        pd(
            &format!(", probes: {{ startup: {{ http_path: {long} }} }}"),
            "",
        ),
        "roles.decode.probes.startup.http_path",
        "must match",
    );
    assert!(
        pd(
            &format!(
                ", probes: {{ startup: {{ http_path: /{} }} }}",
                "a".repeat(1024)
            ),
            ""
        )
        .is_ok()
    );
    assert_invalid(
        pd(
            ", probes: { readiness: { http_path: /health, command: \"true\" } }",
            "",
        ),
        "roles.decode.probes.readiness.command",
        "either http_path or command",
    );
    for empty in ["\"\"", "[]", "[\"\"]", "\"  \""] {
        assert_invalid(
            pd(
                &format!(", probes: {{ liveness: {{ command: {empty} }} }}"),
                "",
            ),
            "roles.decode.probes.liveness.command",
            "non-empty command",
        );
    }
}

#[test]
fn rebuild_scope_and_graceful_shutdown_are_checked() {
    for (yaml, want) in [
        ("process", RebuildScope::Process),
        ("unit_replica", RebuildScope::UnitReplica),
        ("unit", RebuildScope::Unit),
        ("deployment_replica", RebuildScope::DeploymentReplica),
    ] {
        let m = pd(&format!(", rebuild_scope: {yaml}"), "").unwrap();
        assert_eq!(m.roles.decode.unwrap().rebuild_scope, want);
        assert_eq!(want.name(), yaml);
    }
    assert_parse_err(
        pd(", rebuild_scope: pod", ""),
        &[
            "roles.decode.rebuild_scope",
            "unit_replica",
            "deployment_replica",
        ],
    );
    assert_parse_err(
        pd(", rebuild_scope: 3", ""),
        &["roles.decode.rebuild_scope"],
    );
    assert_invalid(
        pd(", graceful_shutdown: { timeout_s: 0 }", ""),
        "roles.decode.graceful_shutdown.timeout_s",
        "0 is out of range 1..=3600",
    );
    assert_invalid(
        pd(", graceful_shutdown: { timeout_s: 3601 }", ""),
        "roles.decode.graceful_shutdown.timeout_s",
        "1..=3600",
    );
    assert_invalid(
        pd(
            "",
            "coordinator: { graceful_shutdown: { timeout_s: 4000 } }\n",
        ),
        "coordinator.graceful_shutdown.timeout_s",
        "1..=3600",
    );
    assert_invalid(
        pd(", graceful_shutdown: { shutdown_command: \"\" }", ""),
        "roles.decode.graceful_shutdown.shutdown_command",
        "non-empty",
    );
    assert_parse_err(
        pd(", graceful_shutdown: { timeout: 5 }", ""),
        &["unknown field `timeout`", "timeout_s"],
    );
    let m = pd(
        ", graceful_shutdown: { timeout_s: 120, shutdown_command: \"echo bye\" }",
        "",
    )
    .unwrap();
    let g = m.roles.decode.unwrap().graceful_shutdown;
    assert_eq!(g.timeout_s, 120);
    assert_eq!(g.shutdown_command.unwrap()[2], "echo bye");
}

#[test]
fn upgrade_strategy_and_events_are_checked() {
    for (preset, want) in [
        ("zero_disruption", (1, 1)),
        ("fast", (25, 25)),
        ("gray", (10, 10)),
        ("emergency", (100, 100)),
    ] {
        let m = pd("", &format!("upgrade: {{ preset: {preset} }}\n")).unwrap();
        assert_eq!(m.upgrade.percents(), want);
    }
    let m = pd(
        "",
        "upgrade: { max_surge_percent: 50, max_unavailable_percent: 0 }\n",
    )
    .unwrap();
    assert_eq!(m.upgrade.percents(), (50, 0));
    assert_invalid(
        pd("", "upgrade: { preset: fast, max_surge_percent: 5 }\n"),
        "upgrade.max_surge_percent",
        "not both",
    );
    assert_invalid(
        pd("", "upgrade: { max_unavailable_percent: 101 }\n"),
        "upgrade.max_unavailable_percent",
        "101 is out of range 0..=100",
    );
    assert_invalid(
        pd(
            "",
            "upgrade: { max_surge_percent: 0, max_unavailable_percent: 0 }\n",
        ),
        "upgrade.max_surge_percent",
        "both 0",
    );
    let m = pd("", "upgrade: { preset: fast, progress_deadline_s: 10 }\n").unwrap();
    assert_eq!(m.upgrade.progress_deadline(), Duration::from_secs(10));
    assert_eq!(
        pd("", "").unwrap().upgrade.progress_deadline(),
        Duration::from_secs(600)
    );
    assert_invalid(
        pd("", "upgrade: { progress_deadline_s: 9 }\n"),
        "upgrade.progress_deadline_s",
        "10..=3600",
    );
    assert_parse_err(
        pd("", "upgrade: { preset: slow }\n"),
        &["upgrade.preset", "zero_disruption", "emergency"],
    );
    assert_invalid(
        pd("", "events: { retention_s: 59 }\n"),
        "events.retention_s",
        "60..=31536000",
    );
    assert_invalid(
        pd("", "events: { max_events: 5 }\n"),
        "events.max_events",
        "100..=1000000",
    );
}

#[test]
fn an_upgrade_may_roll_and_scale_roles() {
    let old = pd("", "").unwrap();
    let same = old.upgrade_to(&old).unwrap();
    assert!(same.roll.is_empty());
    assert_eq!(same.replicas, [(Role::Prefill, 1), (Role::Decode, 2)]);
    let new = pd(
        ", max_running: 8, probes: { liveness: { interval_s: 9 } }",
        "",
    )
    .unwrap();
    assert_eq!(old.upgrade_to(&new).unwrap().roll, [Role::Decode]);
    let scaled = Manifest::from_yaml(
        "name: demo\nmode: disaggregated\nroles:\n  prefill: { replicas: 1 }\n  decode: { replicas: 3 }\n",
    )
    .unwrap();
    let c = old.upgrade_to(&scaled).unwrap();
    assert!(c.roll.is_empty());
    assert_eq!(c.replicas, [(Role::Prefill, 1), (Role::Decode, 3)]);
    let strategy = pd(
        "",
        "upgrade: { preset: emergency }\ncoordinator: { graceful_shutdown: { timeout_s: 5 } }\n",
    )
    .unwrap();
    assert!(old.upgrade_to(&strategy).unwrap().roll.is_empty());
}

#[test]
fn an_upgrade_that_changes_the_model_or_the_coordinator_is_refused_by_field() {
    let old = pd("", "").unwrap();
    let model = pd("", "model: /models/other.gguf\n").unwrap();
    assert_invalid(
        old.upgrade_to(&model),
        "model",
        "changes the model (`default` → `/models/other.gguf`)",
    );
    let engine = pd(", engine: mock", "").unwrap();
    assert_invalid(
        old.upgrade_to(&engine),
        "roles.decode.engine",
        "model fingerprint (real → mock)",
    );
    let dtype = pd(", kv_dtype: f16", "").unwrap();
    assert_invalid(old.upgrade_to(&dtype), "roles.decode.kv_dtype", "KV format");
    let name = Manifest::from_yaml(
        "name: other\nmode: disaggregated\nroles:\n  prefill: { replicas: 1 }\n  decode: { replicas: 2 }\n",
    )
    .unwrap();
    assert_invalid(
        old.upgrade_to(&name),
        "name",
        "not the running cluster `demo`",
    );
    let single =
        Manifest::from_yaml("name: demo\nmode: single\nroles: { combined: { replicas: 1 } }\n")
            .unwrap();
    assert_invalid(old.upgrade_to(&single), "mode", "disaggregated → single");
    for (extra, field) in [
        ("coordinator: { max_queue: 7 }\n", "coordinator.max_queue"),
        ("routing: { decode: round_robin }\n", "routing.decode"),
        ("kv: { backend: tcp }\n", "kv.backend"),
        (
            "registry: { lease_ttl_ms: 3000 }\n",
            "registry.lease_ttl_ms",
        ),
        ("events: { max_events: 100 }\n", "events.max_events"),
    ] {
        let new = pd("", extra).unwrap();
        assert_invalid(old.upgrade_to(&new), field, "restart the cluster");
    }
}

#[test]
fn tls_and_etcd_tls_fields_are_checked_and_named() {
    let m = pd(
        "",
        "tls: { public: true, internal: true, hosts: [gpu-1.example] }\n",
    )
    .unwrap();
    assert!(m.tls.public && m.tls.internal);
    pd("", "tls: { public: true, cert: a.pem, key: a.key }\n").unwrap();
    assert_invalid(
        pd("", "tls: { public: true, cert: a.pem }\n"),
        "tls.key",
        "with tls.cert",
    );
    assert_invalid(
        pd("", "tls: { public: true, key: a.key }\n"),
        "tls.cert",
        "with tls.key",
    );
    assert_invalid(
        pd("", "tls: { cert: a.pem, key: a.key }\n"),
        "tls.public",
        "public: true",
    );
    assert_invalid(
        pd("", "tls: { public: true }\n"),
        "tls.public",
        "internal: true",
    );
    assert_invalid(
        pd("", "tls: { internal: true, hosts: [\"a b\"] }\n"),
        "tls.hosts",
        "`a b`",
    );
    assert_parse_err(pd("", "tls: { internal: yes-please }\n"), &["tls.internal"]);
    let etcd = |extra: &str| {
        pd(
            "",
            &format!(
                "registry: {{ backend: etcd, endpoints: [\"https://127.0.0.1:2379\"]{extra} }}\n"
            ),
        )
    };
    assert_invalid(etcd(""), "registry.ca", "tls.internal");
    etcd(", ca: etcd-ca.pem").unwrap();
    assert_invalid(
        pd(
            "",
            "registry: { backend: etcd, endpoints: [\"https://a:1\", \"http://b:1\"], ca: c.pem }\n",
        ),
        "registry.endpoints",
        "all https://",
    );
    assert_invalid(
        pd("", "registry: { ca: c.pem }\n"),
        "registry.ca",
        "only used",
    );
}
