//! A private etcd (Debian `etcd-server`) on free ports, with short heartbeat/election
//! settings so leases expire on time, serving plain HTTP or TLS; killed on drop.

use super::cluster::eventually;
use std::path::Path;
use std::time::Duration;

/// A running etcd.
pub struct Etcd {
    child: std::process::Child,
    /// Its client URL (`http://` or `https://`).
    pub url: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    /// A plain etcd; `None` (skip) locally when etcd is not installed, a failure in CI.
    pub fn start() -> Option<Etcd> {
        Etcd::launch(None)
    }

    /// An etcd serving its clients TLS with `cert`/`key`, which chain to `roots`.
    pub fn start_tls(cert: &Path, key: &Path, roots: &xpyd_runtime::tls::Roots) -> Option<Etcd> {
        Etcd::launch(Some((cert, key, roots)))
    }

    fn launch(tls: Option<(&Path, &Path, &xpyd_runtime::tls::Roots)>) -> Option<Etcd> {
        if std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var("CI").is_err(),
                "etcd is missing; ./scripts/test.sh installs etcd-server"
            );
            eprintln!("SKIPPED: etcd not installed");
            return None;
        }
        let (client, peer) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = std::process::Command::new("etcd");
        cmd.args(["--name", "test", "--data-dir"])
            .arg(dir.path())
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "300"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some((cert, key, _)) = tls {
            cmd.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
        }
        let e = Etcd {
            child: cmd.spawn().unwrap(),
            url,
            _dir: dir,
        };
        let roots = tls.map(|t| t.2.clone());
        eventually(Duration::from_secs(20), "etcd serving", || {
            e.status(roots.as_ref()).is_ok()
        });
        Some(e)
    }

    /// Asks `url`'s status trusting `roots` (over TLS for an `https://` URL).
    pub fn status_of(
        url: &str,
        roots: Option<&xpyd_runtime::tls::Roots>,
    ) -> Result<(), etcd_client::Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let opts = xpyd_runtime::tls::etcd_options(roots)
                .with_connect_timeout(Duration::from_secs(2))
                .with_timeout(Duration::from_secs(2));
            let mut c = etcd_client::Client::connect([url], Some(opts)).await?;
            c.status().await.map(|_| ())
        })
    }

    /// Its status (see [`Etcd::status_of`]).
    pub fn status(
        &self,
        roots: Option<&xpyd_runtime::tls::Roots>,
    ) -> Result<(), etcd_client::Error> {
        Etcd::status_of(&self.url, roots)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
