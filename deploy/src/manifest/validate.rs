//! Range and consistency checks for a parsed manifest; each error names its field path.

use super::reliability::{GracefulShutdown, PROBE_MAX, ProbeKind, ProbeSpec};
use super::{
    AdvisorSpec, CoordinatorSpec, EngineKind, EventsSpec, KvSpec, Manifest, ManifestError, Mode,
    PinScope, RegistryBackend, RegistrySpec, Role, RoleSpec, RoutingSpec, UpgradeSpec,
};
use std::fmt::Display;

type Result<T = ()> = std::result::Result<T, ManifestError>;

/// Checks `lo <= v <= hi`, reporting `<field>: <v> is out of range <lo>..=<hi>`.
fn range<T: PartialOrd + Display>(field: impl Display, v: T, lo: T, hi: T) -> Result {
    if v < lo || v > hi {
        return Err(ManifestError::invalid(
            field.to_string(),
            format!("{v} is out of range {lo}..={hi}"),
        ));
    }
    Ok(())
}

pub(super) fn manifest(m: &Manifest) -> Result {
    name(&m.name)?;
    model(&m.model)?;
    roles_for_mode(m)?;
    coordinator(&m.coordinator)?;
    registry(&m.registry)?;
    routing(&m.routing)?;
    kv(&m.kv)?;
    upgrade(&m.upgrade)?;
    events(&m.events)?;
    advisor(&m.advisor)?;
    tls(&m.tls)?;
    etcd_tls(m)?;
    for role in Role::ALL {
        if let Some(spec) = m.roles.get(role) {
            role_spec(role, spec)?;
        }
    }
    Ok(())
}

/// `https://` etcd endpoints need roots to check them against; endpoints do not mix.
fn etcd_tls(m: &Manifest) -> Result {
    let r = &m.registry;
    let https = r
        .endpoints
        .iter()
        .filter(|e| e.starts_with("https://"))
        .count();
    if https > 0 && https < r.endpoints.len() {
        return Err(ManifestError::invalid(
            "registry.endpoints",
            "are all https:// or all http://",
        ));
    }
    if https > 0 && r.ca.is_none() && !m.tls.internal {
        return Err(ManifestError::invalid(
            "registry.ca",
            "needed for https:// endpoints (or tls.internal: true, to trust the cluster's CA)",
        ));
    }
    if r.ca.is_some() && r.backend != RegistryBackend::Etcd {
        return Err(ManifestError::invalid(
            "registry.ca",
            "is only used with registry.backend etcd",
        ));
    }
    Ok(())
}

fn tls(t: &super::TlsSpec) -> Result {
    match (&t.cert, &t.key) {
        (Some(_), None) => return Err(ManifestError::invalid("tls.key", "needed with tls.cert")),
        (None, Some(_)) => return Err(ManifestError::invalid("tls.cert", "needed with tls.key")),
        (Some(_), Some(_)) if !t.public => {
            return Err(ManifestError::invalid(
                "tls.public",
                "tls.cert is served only with public: true",
            ));
        }
        (None, None) if t.public && !t.internal => {
            return Err(ManifestError::invalid(
                "tls.public",
                "needs tls.cert and tls.key, or internal: true (the cluster's CA then issues the public certificate)",
            ));
        }
        _ => {}
    }
    if t.hosts.len() > 16 {
        return Err(ManifestError::invalid("tls.hosts", "at most 16 entries"));
    }
    if let Some(h) = t.hosts.iter().find(|h| {
        h.is_empty() || h.len() > 253 || h.contains(|c: char| c.is_whitespace() || c == '/')
    }) {
        return Err(ManifestError::invalid(
            "tls.hosts",
            format!("`{h}` is not a host name or address"),
        ));
    }
    Ok(())
}

fn name(n: &str) -> Result {
    let ok_chars = n
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !n.starts_with('-') && !n.ends_with('-');
    if n.is_empty() || n.len() > 63 || !ok_chars || !ok_ends {
        return Err(ManifestError::invalid(
            "name",
            format!(
                "`{n}` must be 1..=63 characters of [a-z0-9-], starting and ending with a letter or digit"
            ),
        ));
    }
    Ok(())
}

fn model(m: &str) -> Result {
    if m == "default" || (m.len() > ".gguf".len() && m.to_ascii_lowercase().ends_with(".gguf")) {
        return Ok(());
    }
    Err(ManifestError::invalid(
        "model",
        format!("`{m}` must be `default` or a path to a .gguf file"),
    ))
}

fn roles_for_mode(m: &Manifest) -> Result {
    let (required, forbidden): (&[Role], &[Role]) = match m.mode {
        Mode::Disaggregated => (&[Role::Prefill, Role::Decode], &[Role::Combined]),
        Mode::Single => (&[Role::Combined], &[Role::Prefill, Role::Decode]),
    };
    let allowed = required
        .iter()
        .map(|r| r.name())
        .collect::<Vec<_>>()
        .join(" and ");
    for &role in required {
        if m.roles.get(role).is_none() {
            return Err(ManifestError::invalid(
                format!("roles.{role}"),
                format!("is required in mode {} (roles: {allowed})", m.mode),
            ));
        }
    }
    for &role in forbidden {
        if m.roles.get(role).is_some() {
            return Err(ManifestError::invalid(
                format!("roles.{role}"),
                format!("is not allowed in mode {} (roles: {allowed})", m.mode),
            ));
        }
    }
    Ok(())
}

fn coordinator(c: &CoordinatorSpec) -> Result {
    host("coordinator.host", &c.host)?;
    let ports = [
        ("http_port", c.http_port),
        ("grpc_port", c.grpc_port),
        ("internal_port", c.internal_port),
    ];
    for (i, (field, port)) in ports.iter().enumerate() {
        if let Some((other, _)) = ports[..i].iter().find(|(_, p)| *p != 0 && p == port) {
            return Err(ManifestError::invalid(
                format!("coordinator.{field}"),
                format!("{port} is also coordinator.{other}; the ports must differ"),
            ));
        }
    }
    range("coordinator.max_queue", c.max_queue, 0, 100_000)?;
    range(
        "coordinator.queue_timeout_ms",
        c.queue_timeout_ms,
        1,
        600_000,
    )?;
    range(
        "coordinator.first_token_timeout_s",
        c.first_token_timeout_s,
        1,
        1200,
    )?;
    range(
        "coordinator.request_timeout_s",
        c.request_timeout_s,
        1,
        3600,
    )?;
    range("coordinator.max_migrations", c.max_migrations, 0, 16)?;
    range(
        "coordinator.client_stall_timeout_s",
        c.client_stall_timeout_s,
        1,
        3600,
    )?;
    if c.first_token_timeout_s > c.request_timeout_s {
        return Err(ManifestError::invalid(
            "coordinator.first_token_timeout_s",
            format!(
                "{} exceeds coordinator.request_timeout_s ({})",
                c.first_token_timeout_s, c.request_timeout_s
            ),
        ));
    }
    const MIB: u64 = 1024 * 1024;
    range(
        "coordinator.max_request_bytes",
        c.max_request_bytes,
        MIB,
        50 * MIB,
    )?;
    if let Some(r) = &c.rate_limit {
        range("coordinator.rate_limit.rps", r.rps, 1, 10_000)?;
    }
    xpyd_coordinator::guard::Access::parse(&c.access.allow, &c.access.deny).map_err(|e| {
        let (field, reason) = e.split_once(": ").unwrap_or(("", &e));
        ManifestError::invalid(format!("coordinator.access.{field}"), reason)
    })?;
    graceful("coordinator.graceful_shutdown", &c.graceful_shutdown)
}

/// An IP address or a DNS host name.
fn host(field: &str, h: &str) -> Result {
    let is_ip = h.parse::<std::net::IpAddr>().is_ok();
    let is_name = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if is_ip || is_name {
        return Ok(());
    }
    Err(ManifestError::invalid(
        field,
        format!("`{h}` is not an IP address or host name"),
    ))
}

fn registry(r: &RegistrySpec) -> Result {
    match r.backend {
        RegistryBackend::Etcd if r.endpoints.is_empty() => {
            return Err(ManifestError::invalid(
                "registry.endpoints",
                "must list at least one endpoint like \"http://127.0.0.1:2379\" when registry.backend is etcd",
            ));
        }
        RegistryBackend::Embedded if !r.endpoints.is_empty() => {
            return Err(ManifestError::invalid(
                "registry.endpoints",
                "is only used with registry.backend etcd; remove it or set backend: etcd",
            ));
        }
        _ => {}
    }
    for (i, e) in r.endpoints.iter().enumerate() {
        endpoint(&format!("registry.endpoints[{i}]"), e)?;
    }
    if !r.prefix.starts_with('/')
        || !r.prefix.ends_with('/')
        || r.prefix.contains(char::is_whitespace)
    {
        return Err(ManifestError::invalid(
            "registry.prefix",
            format!(
                "`{}` must start and end with `/` and contain no spaces",
                r.prefix
            ),
        ));
    }
    range("registry.lease_ttl_ms", r.lease_ttl_ms, 500, 60_000)?;
    if r.backend == RegistryBackend::Etcd && !r.lease_ttl_ms.is_multiple_of(1000) {
        return Err(ManifestError::invalid(
            "registry.lease_ttl_ms",
            format!(
                "{} must be a whole number of seconds (1000, 2000, ...) with backend etcd",
                r.lease_ttl_ms
            ),
        ));
    }
    range(
        "registry.renew_interval_ms",
        r.renew_interval_ms,
        100,
        r.lease_ttl_ms / 2,
    )
}

/// `http://host:port` or `https://host:port`.
fn endpoint(field: &str, e: &str) -> Result {
    let bad = || {
        ManifestError::invalid(
            field,
            format!("`{e}` is not an endpoint like \"http://host:port\""),
        )
    };
    let rest = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
        .ok_or_else(bad)?;
    let (h, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let h = h
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h);
    match port.parse::<u16>() {
        Ok(p) if p != 0 => host(field, h).map_err(|_| bad()),
        _ => Err(bad()),
    }
}

fn routing(r: &RoutingSpec) -> Result {
    range("routing.block_size", r.block_size, 1, 1024)
}

fn kv(k: &KvSpec) -> Result {
    range(
        "kv.transfer_deadline_ms",
        k.transfer_deadline_ms,
        100,
        600_000,
    )
}

fn role_spec(role: Role, s: &RoleSpec) -> Result {
    let f = |name: &str| format!("roles.{role}.{name}");
    range(f("replicas"), s.replicas, 1, 64)?;
    range(f("threads"), s.threads, 1, 256)?;
    if let Some(cpus) = &s.cpus {
        let list = xpyd_engine::compute::parse_cpu_list(cpus)
            .map_err(|e| ManifestError::invalid(f("cpus"), e.to_string()))?;
        let need = s.replicas as usize * s.threads as usize;
        if s.pin == PinScope::Replica && list.len() < need {
            return Err(ManifestError::invalid(
                f("pin"),
                format!(
                    "`replica` gives each of {} replicas {} core(s) of its own: needs {need} cores, `cpus` lists {}",
                    s.replicas,
                    s.threads,
                    list.len()
                ),
            ));
        }
    } else if s.pin == PinScope::Replica {
        return Err(ManifestError::invalid(
            f("pin"),
            "`replica` needs a `cpus` list to divide among the replicas",
        ));
    }
    if let Some(n) = s.max_running {
        range(f("max_running"), n, 1, 1024)?;
    }
    if s.kv_blocks != 0 {
        range(f("kv_blocks"), s.kv_blocks, 16, 10_000_000).map_err(|_| {
            ManifestError::invalid(
                f("kv_blocks"),
                format!("{} is out of range: 0 (auto) or 16..=10000000", s.kv_blocks),
            )
        })?;
    }
    range(f("prefill_chunk"), s.prefill_chunk, 16, 8192)?;
    range(
        f("prefix_cache_blocks"),
        s.prefix_cache_blocks,
        0,
        10_000_000,
    )?;
    for kind in ProbeKind::ALL {
        probe(&f(&format!("probes.{kind}")), s.probes.get(kind))?;
    }
    graceful(&f("graceful_shutdown"), &s.graceful_shutdown)?;
    mock_latency(role, s)
}

/// `^/[a-zA-Z0-9-_/]{0,1024}$`: the probe paths the managed product allows.
fn http_path(field: &str, p: &str) -> Result {
    let ok = p.starts_with('/')
        && p.len() <= 1025
        && p[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'/');
    if ok {
        return Ok(());
    }
    Err(ManifestError::invalid(
        field,
        format!("`{p}` must match ^/[a-zA-Z0-9-_/]{{0,1024}}$ (e.g. /health)"),
    ))
}

/// A command: a non-empty list whose first element (the program) is not empty.
fn command(field: &str, c: &[String]) -> Result {
    let body_empty = c.len() == 3 && c[0] == "sh" && c[1] == "-c" && c[2].trim().is_empty();
    if c.is_empty() || c[0].trim().is_empty() || body_empty {
        return Err(ManifestError::invalid(
            field,
            "must be a non-empty command: a string (run with sh -c) or a list [program, args…]",
        ));
    }
    Ok(())
}

fn probe(field: &str, p: &ProbeSpec) -> Result {
    if p.http_path.is_some() && p.command.is_some() {
        return Err(ManifestError::invalid(
            format!("{field}.command"),
            "give either http_path or command, not both",
        ));
    }
    if let Some(path) = &p.http_path {
        http_path(&format!("{field}.http_path"), path)?;
    }
    if let Some(c) = &p.command {
        command(&format!("{field}.command"), c)?;
    }
    for (name, v) in [
        ("delay_s", p.delay_s),
        ("interval_s", p.interval_s),
        ("timeout_s", p.timeout_s),
        ("failure_threshold", p.failure_threshold),
    ] {
        if let Some(v) = v {
            range(format!("{field}.{name}"), v, 1, PROBE_MAX)?;
        }
    }
    Ok(())
}

fn graceful(field: &str, g: &GracefulShutdown) -> Result {
    range(format!("{field}.timeout_s"), g.timeout_s, 1, 3600)?;
    if let Some(c) = &g.shutdown_command {
        command(&format!("{field}.shutdown_command"), c)?;
    }
    Ok(())
}

fn upgrade(u: &UpgradeSpec) -> Result {
    if u.preset.is_some() && (u.max_surge_percent.is_some() || u.max_unavailable_percent.is_some())
    {
        let f = if u.max_surge_percent.is_some() {
            "upgrade.max_surge_percent"
        } else {
            "upgrade.max_unavailable_percent"
        };
        return Err(ManifestError::invalid(
            f,
            "give either upgrade.preset or the two percentages, not both",
        ));
    }
    let (surge, unavailable) = u.percents();
    range("upgrade.max_surge_percent", surge, 0, 100)?;
    range("upgrade.max_unavailable_percent", unavailable, 0, 100)?;
    if let Some(d) = u.progress_deadline_s {
        range("upgrade.progress_deadline_s", d, 10, 3600)?;
    }
    if surge == 0 && unavailable == 0 {
        return Err(ManifestError::invalid(
            "upgrade.max_surge_percent",
            "and upgrade.max_unavailable_percent are both 0: an upgrade could never make progress",
        ));
    }
    Ok(())
}

fn events(e: &EventsSpec) -> Result {
    range("events.retention_s", e.retention_s, 60, 31_536_000)?;
    range("events.max_events", e.max_events, 100, 1_000_000)
}

fn advisor(a: &AdvisorSpec) -> Result {
    range("advisor.window_s", a.window_s, 5, 3600)?;
    if let Some(b) = a.budget {
        range("advisor.budget", b, 1, 1024)?;
    }
    a.planner_config().validate().map_err(|e| match e {
        xpyd_planner::PlanError::Invalid { field, reason } => ManifestError::Invalid {
            field: format!(
                "advisor.{}",
                match field.as_str() {
                    "slo.ttft_s" => "slo.ttft_ms",
                    "slo.tpot_s" => "slo.tpot_ms",
                    f => f,
                }
            ),
            reason,
        },
        other => ManifestError::Invalid {
            field: "advisor".into(),
            reason: other.to_string(),
        },
    })
}

fn mock_latency(role: Role, s: &RoleSpec) -> Result {
    if s.mock_profile.is_some() {
        if s.engine != EngineKind::Mock {
            return Err(ManifestError::invalid(
                format!("roles.{role}.mock_profile"),
                "is only used with engine: mock",
            ));
        }
        if s.mock_latency.is_some() {
            return Err(ManifestError::invalid(
                format!("roles.{role}.mock_profile"),
                "give either mock_profile or mock_latency, not both",
            ));
        }
    }
    let Some(l) = &s.mock_latency else {
        return Ok(());
    };
    if s.engine != EngineKind::Mock {
        return Err(ManifestError::invalid(
            format!("roles.{role}.mock_latency"),
            format!(
                "is only used with engine: mock (this role has engine: {}); remove it or set engine: mock",
                s.engine.name()
            ),
        ));
    }
    let max = xpyd_engine::mock::MAX_MOCK_LATENCY_US;
    for (name, v) in [
        ("prefill_base_us", l.prefill_base_us),
        ("prefill_per_token_us", l.prefill_per_token_us),
        ("decode_base_us", l.decode_base_us),
        ("decode_per_seq_us", l.decode_per_seq_us),
    ] {
        range(format!("roles.{role}.mock_latency.{name}"), v, 0, max)?;
    }
    Ok(())
}
