//! The cluster's TLS as `xpyd up` sets it up from the manifest's `tls:` section: the
//! private CA (kept across runs), a certificate per process issued at every start, and
//! the flags that hand each child its files.

use crate::manifest::Manifest;
use crate::roles::TlsArgs;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use xpyd_runtime::tls::Authority;

/// What `xpyd up` hands its children.
pub struct TlsPlan {
    /// The cluster's CA, when the internal plane (or the public one without files) runs
    /// TLS.
    ca: Option<Authority>,
    /// Names every issued certificate carries.
    hosts: Vec<String>,
    /// The public APIs' files: the manifest's, or issued for the coordinator.
    public_files: Option<(PathBuf, PathBuf)>,
    /// The internal plane runs TLS.
    internal: bool,
    /// Serve the public APIs with the coordinator's issued certificate.
    public_issued: bool,
}

/// The directory of a cluster's CA and issued certificates.
pub fn tls_dir(cluster: &str) -> PathBuf {
    xpyd_coordinator::keys::state_dir()
        .join("tls")
        .join(cluster)
}

impl TlsPlan {
    /// The plan of manifest `m` (read from `file`), `None` when it asks for no TLS.
    ///
    /// # Errors
    /// When the CA cannot be made or read.
    pub fn new(m: &Manifest, file: &Path) -> Result<Option<Self>> {
        let t = &m.tls;
        if !t.public && !t.internal {
            return Ok(None);
        }
        let base = file.parent().unwrap_or(Path::new("."));
        let public_files = match (&t.cert, &t.key) {
            (Some(c), Some(k)) => Some((base.join(c), base.join(k))),
            _ => None,
        };
        let public_issued = t.public && public_files.is_none();
        let ca = if t.internal || public_issued {
            let dir = tls_dir(&m.name);
            Some(
                Authority::open_or_create(&dir, &m.name)
                    .with_context(|| format!("the cluster's CA in {}", dir.display()))?,
            )
        } else {
            None
        };
        let mut hosts = vec![
            m.coordinator.host.clone(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ];
        hosts.extend(t.hosts.iter().cloned());
        Ok(Some(TlsPlan {
            ca,
            hosts,
            public_files,
            internal: t.internal,
            public_issued,
        }))
    }

    /// The CA certificate clients trust (`None` with the operator's public files only).
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.ca.as_ref().map(Authority::ca_file)
    }

    /// Issues `name`'s certificate (replacing the one of an earlier start).
    fn issue(&self, name: &str) -> Result<(PathBuf, PathBuf)> {
        let ca = self.ca.as_ref().context("no CA")?;
        ca.issue(name, &self.hosts)
            .with_context(|| format!("issuing {name}'s certificate"))
    }

    /// The coordinator's flags (issuing its certificate).
    ///
    /// # Errors
    /// When the certificate cannot be written.
    pub fn coordinator(&self) -> Result<TlsArgs> {
        let issued = if self.internal || self.public_issued {
            Some(self.issue("coordinator")?)
        } else {
            None
        };
        let mut a = TlsArgs::default();
        if self.internal {
            a.tls_ca = self.ca_file();
            a.tls_cert = issued.as_ref().map(|i| i.0.clone());
            a.tls_key = issued.as_ref().map(|i| i.1.clone());
        }
        let public = if self.public_issued {
            issued
        } else {
            self.public_files.clone()
        };
        if let Some((c, k)) = public {
            a.public_tls_cert = Some(c);
            a.public_tls_key = Some(k);
        }
        Ok(a)
    }

    /// A worker's flags (issuing its certificate when the internal plane runs TLS).
    ///
    /// # Errors
    /// When the certificate cannot be written.
    pub fn worker(&self, name: &str) -> Result<TlsArgs> {
        if !self.internal {
            return Ok(TlsArgs::default());
        }
        let (c, k) = self.issue(name)?;
        Ok(TlsArgs {
            tls_ca: self.ca_file(),
            tls_cert: Some(c),
            tls_key: Some(k),
            ..TlsArgs::default()
        })
    }
}
