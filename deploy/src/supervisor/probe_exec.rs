//! Running one probe (I/O): an HTTP GET on the worker's HTTP port (a plain HTTP/1.0
//! request on a fresh connection, so a stuck worker cannot wedge a pooled one, over TLS
//! trusting the cluster's CA when the port serves it; status 200–399 passes) or a command (exit status 0 passes; killed at its timeout). Either
//! way the result is `Ok` or a one-line reason for the event.

use super::process::{Vars, substitute};
use crate::manifest::ProbeAction;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Runs `action` within `timeout`, with `vars` for a command's placeholders and
/// `vars.http` as the HTTP base URL.
pub async fn run(action: &ProbeAction, timeout: Duration, vars: &Vars) -> Result<(), String> {
    match action {
        ProbeAction::HttpGet(path) => {
            if vars.http.is_empty() {
                return Err("the worker has not reported its HTTP address yet".into());
            }
            http_get(&vars.http, path, timeout).await
        }
        ProbeAction::Command(argv) => command(&substitute(argv, vars), timeout).await,
    }
}

/// `(host, port, tls)` of `http://host:port` or `https://host:port`.
fn host_port(base: &str) -> Option<(String, u16, bool)> {
    let (rest, tls) = match base.strip_prefix("https://") {
        Some(r) => (r, true),
        None => (base.strip_prefix("http://")?, false),
    };
    let authority = rest.split('/').next()?;
    let (h, p) = authority.rsplit_once(':')?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    Some((h.to_string(), p.parse().ok()?, tls))
}

/// What `https://` probes trust: the cluster's CA (`xpyd up` sets it once).
static TRUST: std::sync::OnceLock<std::sync::Arc<rustls::ClientConfig>> =
    std::sync::OnceLock::new();

/// Makes `https://` probes trust `roots`.
///
/// # Errors
/// When the roots hold no usable certificate.
pub fn trust(roots: &xpyd_runtime::tls::Roots) -> Result<(), xpyd_runtime::tls::TlsError> {
    let _ = TRUST.set(roots.client_config(&[b"http/1.1"])?);
    Ok(())
}

/// The probe's connection: plain, or TLS to `host`.
async fn connect(host: &str, port: u16, tls: bool) -> Result<Box<dyn AsyncReadWrite>, String> {
    let s = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if !tls {
        return Ok(Box::new(s));
    }
    let cfg = TRUST
        .get()
        .ok_or("an https:// worker, but this supervisor has no CA to check it with")?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("tls name {host}: {e}"))?;
    let s = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, s)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    Ok(Box::new(s))
}

/// A byte stream a probe talks over.
trait AsyncReadWrite: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

/// The status code of an HTTP status line (`HTTP/1.1 200 OK`).
fn status_of(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

/// GET `base` + `path`; passes on 200..=399.
pub async fn http_get(base: &str, path: &str, timeout: Duration) -> Result<(), String> {
    let (host, port, tls) =
        host_port(base).ok_or_else(|| format!("`{base}` is not an http URL"))?;
    let call = async {
        let mut s = connect(&host, port, tls)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let req =
            format!("GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: xpyd-probe\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        s.flush().await.map_err(|e| format!("GET {path}: {e}"))?;
        let mut line = String::new();
        BufReader::new(s.take(1024))
            .read_line(&mut line)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        match status_of(&line) {
            Some(code) if (200..400).contains(&code) => Ok(()),
            Some(code) => Err(format!("GET {path}: HTTP {code}")),
            None => Err(format!(
                "GET {path}: not an HTTP answer: {:?}",
                line.trim_end()
            )),
        }
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(format!("GET {path}: no answer within {timeout:?}")))
}

/// How much of a probe command's stdout and stderr is kept for the event; the rest is
/// read and dropped, so a chatty probe neither blocks on a full pipe nor grows memory.
const OUTPUT_KEPT: usize = 4096;

/// Reads `r` to its end, keeping the first [`OUTPUT_KEPT`] bytes.
async fn read_bounded(r: Option<impl tokio::io::AsyncRead + Unpin>) -> std::io::Result<Vec<u8>> {
    let Some(mut r) = r else {
        return Ok(Vec::new());
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(kept);
        }
        let room = OUTPUT_KEPT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

/// Runs `argv`; passes on exit status 0. Killed when it outlasts `timeout`.
pub async fn command(argv: &[String], timeout: Duration) -> Result<(), String> {
    let Some((prog, args)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let mut child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{prog}: {e}"))?;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (out, err) = tokio::try_join!(read_bounded(stdout), read_bounded(stderr))?;
        Ok::<_, std::io::Error>((child.wait().await?, out, err))
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Err(format!(
            "`{}` did not finish within {timeout:?}",
            argv.join(" ")
        )),
        Ok(Err(e)) => Err(format!("{prog}: {e}")),
        Ok(Ok((status, _, _))) if status.success() => Ok(()),
        Ok(Ok((status, out, err))) => {
            let text = String::from_utf8_lossy(if err.is_empty() { &out } else { &err });
            let text: String = text.trim().chars().take(200).collect();
            Err(format!(
                "`{}` exited with {status}{}{text}",
                argv.join(" "),
                if text.is_empty() { "" } else { ": " }
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    #[test]
    fn urls_and_status_lines_parse() {
        assert_eq!(
            host_port("http://127.0.0.1:8080"),
            Some(("127.0.0.1".into(), 8080, false))
        );
        assert_eq!(
            host_port("http://[::1]:9/x"),
            Some(("::1".into(), 9, false))
        );
        assert_eq!(host_port("https://h:1"), Some(("h".into(), 1, true)));
        assert_eq!(host_port("ftp://h:1"), None);
        assert_eq!(status_of("HTTP/1.1 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(status_of("SSH-2.0"), None);
    }

    /// A one-shot server answering `status` (or never, with `None`).
    async fn server(status: Option<u16>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            match status {
                Some(code) => {
                    let r = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n");
                    let _ = s.write_all(r.as_bytes()).await;
                }
                None => tokio::time::sleep(Duration::from_secs(30)).await,
            }
        });
        url
    }

    #[tokio::test]
    async fn http_probes_pass_on_2xx_and_3xx_only_and_time_out() {
        let t = Duration::from_secs(5);
        assert!(
            http_get(&server(Some(200)).await, "/health", t)
                .await
                .is_ok()
        );
        assert!(
            http_get(&server(Some(302)).await, "/health", t)
                .await
                .is_ok()
        );
        let e = http_get(&server(Some(503)).await, "/health", t)
            .await
            .unwrap_err();
        assert!(e.contains("HTTP 503"), "{e}");
        let e = http_get(&server(None).await, "/health", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(e.contains("no answer within"), "{e}");
        // Bound but not listening: connections are refused, and the port stays ours
        // (a dropped listener's port can be taken by a test running beside this one).
        let closed = tokio::net::TcpSocket::new_v4().unwrap();
        closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        let e = http_get(&url, "/health", t).await.unwrap_err();
        assert!(e.contains("connect"), "{e}");
        drop(closed);
    }

    #[tokio::test]
    async fn command_probes_pass_on_exit_0_and_are_killed_at_their_timeout() {
        let sh = |c: &str| vec!["sh".to_string(), "-c".to_string(), c.to_string()];
        let t = Duration::from_secs(5);
        assert!(command(&sh("exit 0"), t).await.is_ok());
        let e = command(&sh("echo nope >&2; exit 3"), t).await.unwrap_err();
        assert!(e.contains("exit status: 3") && e.contains("nope"), "{e}");
        let t0 = std::time::Instant::now();
        let e = command(&sh("sleep 20"), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(command(&["/nonexistent/x".to_string()], t).await.is_err());
        // A chatty probe (8 MiB on each stream, more than any pipe holds) finishes,
        // and only the start of its output reaches the reason.
        let chatty = "head -c 8388608 /dev/zero | tr '\\0' x; head -c 8388608 /dev/zero | tr '\\0' y >&2; exit 4";
        let e = command(&sh(chatty), Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(e.contains("exit status: 4") && e.contains("yyy"), "{e}");
        assert!(e.len() < 400, "{} bytes of reason", e.len());
        let vars = Vars {
            worker_id: "decode-0".into(),
            ..Default::default()
        };
        let a = ProbeAction::Command(sh("test {worker_id} = decode-0"));
        assert!(run(&a, t, &vars).await.is_ok());
        let h = ProbeAction::HttpGet("/health".into());
        assert!(
            run(&h, t, &vars)
                .await
                .unwrap_err()
                .contains("not reported")
        );
    }
}
