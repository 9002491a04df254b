//! Blocking HTTP calls each bounded by a timeout, so a stuck peer cannot hang a
//! benchmark or a CLI command: the drivers' few calls (the coordinator's `/v1/cluster`
//! and `/metrics`, llama-server) and the CLI's `status` and readiness polls.

use anyhow::{Context, Result};
use serde_json::Value;
use std::time::Duration;

/// Bound of a quick local call (`/v1/cluster`, `/metrics`, a health probe).
pub(crate) const QUICK: Duration = Duration::from_secs(30);

/// The credential this process's calls to a coordinator carry: the cluster token
/// `xpyd up` set for its own calls, else `$XPYD_API_KEY`.
static BEARER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes every later call of this process carry `token` (`xpyd up`'s cluster token).
pub fn set_bearer(token: String) {
    let _ = BEARER.set(token);
}

/// The `Authorization` value calls carry, if any.
pub fn authorization() -> Option<String> {
    BEARER
        .get()
        .cloned()
        .or_else(|| {
            std::env::var(xpyd_runtime::env::API_KEY)
                .ok()
                .filter(|k| !k.is_empty())
        })
        .map(|k| format!("Bearer {k}"))
}

/// The agent every call of this process goes through: it trusts the roots `xpyd up` set
/// (the cluster's CA), else the PEM bundle `$XPYD_TLS_CA` names, else Mozilla's roots.
static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();

fn agent_trusting(pem: Option<&[u8]>) -> Result<ureq::Agent> {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(pem) = pem {
        let certs = ureq::tls::parse_pem(pem)
            .filter_map(|i| match i {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()
            .context("not a PEM certificate bundle")?;
        anyhow::ensure!(!certs.is_empty(), "no CERTIFICATE block in the bundle");
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    Ok(ureq::Agent::config_builder()
        .tls_config(tls.build())
        .build()
        .into())
}

/// Makes every later call of this process trust only the certificates of `pem` (`xpyd
/// up`'s cluster CA). Set once, before the first call.
///
/// # Errors
/// When `pem` holds no certificate.
pub fn set_roots(pem: &[u8]) -> Result<()> {
    let _ = AGENT.set(agent_trusting(Some(pem))?);
    let _ = ROOTS.set(Some(xpyd_runtime::tls::Roots { pem: pem.to_vec() }));
    Ok(())
}

/// The roots of [`set_roots`], else of `$XPYD_TLS_CA`.
static ROOTS: std::sync::OnceLock<Option<xpyd_runtime::tls::Roots>> = std::sync::OnceLock::new();

/// The roots this process's gRPC calls to `https://` URLs trust (see [`agent`]); `None`:
/// tonic's default (no TLS roots: such calls fail, naming TLS).
pub fn grpc_roots() -> Option<&'static xpyd_runtime::tls::Roots> {
    ROOTS
        .get_or_init(|| {
            let f = std::env::var_os(xpyd_runtime::env::TLS_CA)?;
            xpyd_runtime::tls::Roots::load(std::path::Path::new(&f)).ok()
        })
        .as_ref()
}

/// The process's agent (see [`set_roots`] and `$XPYD_TLS_CA`).
pub fn agent() -> &'static ureq::Agent {
    AGENT.get_or_init(|| {
        let pem = std::env::var_os(xpyd_runtime::env::TLS_CA).and_then(|f| std::fs::read(f).ok());
        agent_trusting(pem.as_deref()).unwrap_or_else(|e| {
            xpyd_runtime::logging::say(
                xpyd_runtime::logging::Level::WARN,
                &format!(
                    "${}: {e:#}; trusting the default roots",
                    xpyd_runtime::env::TLS_CA
                ),
            );
            ureq::Agent::new_with_defaults()
        })
    })
}

/// `req` with the process's credential, if it has one.
pub fn with_auth<B>(req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
    match authorization() {
        Some(a) => req.header("Authorization", a),
        None => req,
    }
}

/// `GET url` as text, all of it within `timeout`.
pub fn get_text(url: &str, timeout: Duration) -> Result<String> {
    with_auth(agent().get(url))
        .config()
        .timeout_global(Some(timeout))
        .build()
        .call()
        .with_context(|| format!("GET {url}"))?
        .into_body()
        .read_to_string()
        .with_context(|| format!("GET {url}"))
}

/// `GET url` as JSON, all of it within `timeout`.
pub fn get_json(url: &str, timeout: Duration) -> Result<Value> {
    let body = get_text(url, timeout)?;
    serde_json::from_str(&body).with_context(|| format!("GET {url}: not JSON"))
}

/// `POST url` with a JSON body, the JSON answer, all of it within `timeout`.
pub(crate) fn post_json(url: &str, body: &Value, timeout: Duration) -> Result<Value> {
    post_json_with(url, body, timeout, None)
}

/// [`post_json`] with one more header.
pub(crate) fn post_json_with(
    url: &str,
    body: &Value,
    timeout: Duration,
    header: Option<(&str, &str)>,
) -> Result<Value> {
    let req = with_auth(agent().post(url));
    let req = match header {
        Some((k, v)) => req.header(k, v),
        None => req,
    };
    let text = req
        .header("Content-Type", "application/json")
        .config()
        .timeout_global(Some(timeout))
        .build()
        .send(body.to_string())
        .with_context(|| format!("POST {url}"))?
        .into_body()
        .read_to_string()
        .with_context(|| format!("POST {url}"))?;
    serde_json::from_str(&text).with_context(|| format!("POST {url}: not JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Instant;

    #[test]
    fn a_peer_that_never_answers_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/cluster", l.local_addr().unwrap());
        // Accept and hold the connection without answering.
        let held = std::thread::spawn(move || l.accept().map(|(s, _)| s));
        let t0 = Instant::now();
        assert!(get_json(&url, Duration::from_millis(300)).is_err());
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        drop(held.join());
    }
}
