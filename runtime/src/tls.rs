//! TLS for the cluster's listeners and clients, with rustls on the `ring` provider.
//!
//! Two planes, each optional:
//! - the **public** plane (the coordinator's HTTP and gRPC APIs) serves a certificate the
//!   operator names in the manifest (`tls.cert`, `tls.key`), or one `xpyd up` issues from
//!   the cluster's private CA;
//! - the **internal** plane (workers' gRPC, the coordinator's internal gRPC, KV transfer
//!   over tcp) serves a certificate per process issued from the cluster's private CA, and
//!   every member dials with that CA as its only root.
//!
//! Certificates only authenticate servers and encrypt: who may call is still decided by
//! the cluster credential (`plane`), which TLS now keeps off the wire.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Why TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// A file holds no usable PEM of the kind needed.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the material (a key that does not match its certificate, …).
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate could not be made.
    #[error("certificate: {0}")]
    Issue(#[from] rcgen::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// `ring`, as tonic's `tls-ring` uses: it builds with a C compiler alone (aws-lc-rs wants
/// cmake), and the internal plane's peers are all xpyd (no post-quantum key exchange
/// needed to meet them).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, as PEM.
#[derive(Clone)]
pub struct Identity {
    /// The chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// The private key.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity(…)")
    }
}

impl Identity {
    /// Reads a certificate chain and its key.
    ///
    /// # Errors
    /// Unreadable files, or files without a certificate or a key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let id = Identity {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        };
        id.certs().map_err(|reason| TlsError::Pem {
            path: cert.display().to_string(),
            reason,
        })?;
        id.key().map_err(|reason| TlsError::Pem {
            path: key.display().to_string(),
            reason,
        })?;
        Ok(id)
    }

    fn certs(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
        if certs.is_empty() {
            return Err("no CERTIFICATE block".into());
        }
        Ok(certs)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, String> {
        PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| format!("no PEM private key: {e}"))
    }

    /// A rustls server configuration serving this identity, offering `alpn`.
    ///
    /// # Errors
    /// When the key does not match the certificate or is of a kind rustls does not take.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let pem = |reason| TlsError::Pem {
            path: "identity".into(),
            reason,
        };
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.certs().map_err(pem)?, self.key().map_err(pem)?)?;
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // No session tickets after the handshake: a server that speaks first would look,
        // to a KV sender peeking at its socket, like a receiver that failed the transfer.
        c.send_tls13_tickets = 0;
        Ok(Arc::new(c))
    }

    /// The identity for tonic's server.
    pub fn tonic(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}

/// The roots a client trusts: the cluster's CA (or the operator's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roots {
    /// PEM of the trusted certificates.
    pub pem: Vec<u8>,
}

impl Roots {
    /// Reads a PEM bundle of trusted certificates.
    ///
    /// # Errors
    /// Unreadable, or no certificate in it.
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let r = Roots { pem: read(path)? };
        r.store().map_err(|reason| TlsError::Pem {
            path: path.display().to_string(),
            reason,
        })?;
        Ok(r)
    }

    fn store(&self) -> Result<rustls::RootCertStore, String> {
        let mut store = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&self.pem) {
            let c = c.map_err(|e| format!("not a PEM certificate: {e}"))?;
            store
                .add(c)
                .map_err(|e| format!("not a usable CA certificate: {e}"))?;
        }
        if store.is_empty() {
            return Err("no CERTIFICATE block".into());
        }
        Ok(store)
    }

    /// A rustls client configuration trusting only these roots, offering `alpn`.
    ///
    /// # Errors
    /// When the bundle holds no usable certificate.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let store = self.store().map_err(|reason| TlsError::Pem {
            path: "roots".into(),
            reason,
        })?;
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(store)
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(c))
    }

    /// tonic's client TLS settings trusting only these roots.
    pub fn tonic(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.pem))
    }
}

/// What TLS one process speaks, on each plane.
#[derive(Clone, Debug, Default)]
pub struct Tls {
    /// The identity the public listeners serve (coordinator only).
    pub public: Option<Identity>,
    /// The identity this process's internal listeners serve.
    pub internal: Option<Identity>,
    /// The roots this process trusts when it dials a member (set when the internal plane
    /// runs TLS).
    pub roots: Option<Roots>,
}

/// `http` or `https`: the scheme of a URL to a listener that does or does not serve TLS.
pub fn scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

/// A gRPC endpoint for `url`, over TLS trusting `roots` when the URL is `https://`.
///
/// # Errors
/// A malformed URL.
pub fn endpoint(
    url: &str,
    roots: Option<&Roots>,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let e = tonic::transport::Endpoint::from_shared(url.to_string())?;
    match roots {
        Some(r) if url.starts_with("https://") => e.tls_config(r.tonic()),
        _ => Ok(e),
    }
}

/// etcd connection options trusting `roots` for `https://` endpoints.
pub fn etcd_options(roots: Option<&Roots>) -> etcd_client::ConnectOptions {
    let o = etcd_client::ConnectOptions::new();
    match roots {
        Some(r) => o.with_tls(r.tonic()),
        None => o,
    }
}

/// A gRPC server builder, serving `identity` over TLS when given.
///
/// # Errors
/// When tonic refuses the identity.
pub fn grpc_server(
    identity: Option<&Identity>,
) -> Result<tonic::transport::Server, tonic::transport::Error> {
    let s = tonic::transport::Server::builder();
    match identity {
        Some(id) => s.tls_config(tonic::transport::ServerTlsConfig::new().identity(id.tonic())),
        None => Ok(s),
    }
}

// ---------------------------------------------------------------------------------------
// The cluster's private CA.

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";

/// A private CA kept in a directory (`ca.pem`, and `ca.key` of mode 0600).
pub struct Authority {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn write_file(path: &Path, data: &[u8], private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| TlsError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The subject alternative names a certificate for `hosts` carries (duplicates dropped).
fn names(hosts: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for h in hosts {
        let h = h.trim_start_matches('[').trim_end_matches(']').to_string();
        if !h.is_empty() && !out.contains(&h) {
            out.push(h);
        }
    }
    out
}

impl Authority {
    /// The CA in `dir`, made there first when there is none yet (it is kept across runs,
    /// so clients given `ca.pem` once keep trusting the cluster).
    ///
    /// # Errors
    /// When the directory cannot be written or holds a CA that cannot be read.
    pub fn open_or_create(dir: &Path, cluster: &str) -> Result<Self, TlsError> {
        std::fs::create_dir_all(dir).map_err(|e| TlsError::Io {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if cert.exists() && key.exists() {
            let key_pem = String::from_utf8_lossy(&read(&key)?).into_owned();
            let pem = |reason: String| TlsError::Pem {
                path: key.display().to_string(),
                reason,
            };
            let kp = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| pem(e.to_string()))?;
            // The certificate itself is what clients hold; issuing needs only its name
            // and key, which are this CA's by construction.
            Roots::load(&cert)?;
            return Ok(Authority {
                dir: dir.to_path_buf(),
                issuer: rcgen::Issuer::new(Self::params(cluster)?, kp),
            });
        }
        let params = Self::params(cluster)?;
        let kp = rcgen::KeyPair::generate()?;
        let made = params.self_signed(&kp)?;
        write_file(&key, kp.serialize_pem().as_bytes(), true)?;
        write_file(&cert, made.pem().as_bytes(), false)?;
        Ok(Authority {
            dir: dir.to_path_buf(),
            issuer: rcgen::Issuer::new(params, kp),
        })
    }

    /// The CA certificate's parameters (its name is what issued certificates point to).
    fn params(cluster: &str) -> Result<rcgen::CertificateParams, TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("xpyd cluster {cluster} CA"),
        );
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        Ok(params)
    }

    /// The CA certificate's file: what clients trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    /// Issues a server certificate named `name` for `hosts` (DNS names or IP addresses),
    /// written as `<name>.pem` and `<name>.key` (0600) in the CA's directory; returns the
    /// two paths.
    ///
    /// # Errors
    /// When a host is not a valid name or the files cannot be written.
    pub fn issue(&self, name: &str, hosts: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
        let mut params = rcgen::CertificateParams::new(names(hosts))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let kp = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&kp, &self.issuer)?;
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        write_file(&k, kp.serialize_pem().as_bytes(), true)?;
        write_file(&c, cert.pem().as_bytes(), false)?;
        Ok((c, k))
    }
}

// ---------------------------------------------------------------------------------------
// A TLS listener for axum: handshakes run in their own tasks, never on the accept loop.

/// How long a new connection has to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted, handshaken connections of a TCP listener, as an `axum::serve` listener.
pub struct TlsListener {
    ready: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TlsListener {
    /// Serves `config` on `listener`; every accepted connection gets `TCP_NODELAY` and
    /// [`HANDSHAKE_TIMEOUT`] to finish its handshake, in a task of its own.
    ///
    /// # Errors
    /// When the listener has no local address.
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (tx, ready) = mpsc::channel(64);
        let accept = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "tls handshake failed"),
                        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            local,
            accept,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task is gone only when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_certificates_its_roots_verify_and_survives_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let ca = Authority::open_or_create(d.path(), "t").unwrap();
        let (c, k) = ca
            .issue("decode-0", &["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let roots = Roots::load(&ca.ca_file()).unwrap();
        let id = Identity::load(&c, &k).unwrap();
        id.server_config(&[]).unwrap();
        roots.client_config(&[]).unwrap();
        let first = std::fs::read(ca.ca_file()).unwrap();
        let again = Authority::open_or_create(d.path(), "t").unwrap();
        assert_eq!(std::fs::read(again.ca_file()).unwrap(), first);
        again.issue("decode-1", &["127.0.0.1".into()]).unwrap();
    }

    #[tokio::test]
    async fn a_handshake_succeeds_with_the_ca_and_fails_without_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let d = tempfile::tempdir().unwrap();
        let ca = Authority::open_or_create(d.path(), "t").unwrap();
        let (c, k) = ca.issue("srv", &["127.0.0.1".into()]).unwrap();
        let server = Identity::load(&c, &k).unwrap().server_config(&[]).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut tl = TlsListener::new(l, server).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = axum::serve::Listener::accept(&mut tl).await;
                tokio::spawn(async move {
                    let mut b = [0u8; 4];
                    if s.read_exact(&mut b).await.is_ok() {
                        let _ = s.write_all(&b).await;
                        let _ = s.flush().await;
                    }
                });
            }
        });
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        // A client with the CA talks.
        let roots = Roots::load(&ca.ca_file()).unwrap();
        let conn = tokio_rustls::TlsConnector::from(roots.client_config(&[]).unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut s = conn.connect(name.clone(), tcp).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        // A client trusting another CA refuses the server.
        let d2 = tempfile::tempdir().unwrap();
        let other = Authority::open_or_create(d2.path(), "u").unwrap();
        let roots = Roots::load(&other.ca_file()).unwrap();
        let conn = tokio_rustls::TlsConnector::from(roots.client_config(&[]).unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        assert!(conn.connect(name, tcp).await.is_err());
        // A plaintext client gets nothing back and does not stop the listener.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
        assert!(!buf.windows(4).any(|w| w == b"HTTP"), "{buf:?}");
    }
}
