//! KV transfer over TLS with the cluster CA's certificates: it round-trips and reuses its
//! connections, the bytes on the wire are not the payload (a recording proxy sees the
//! plaintext when TLS is off, and not when it is on), and a sender without TLS or
//! trusting another CA is refused without hurting the receiver.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use xpyd_kv_transfer::{
    Backend, Event, Incoming, Receiver, ReceiverConfig, ReserveSpec, Sender, TransferTarget,
};
use xpyd_runtime::tls::{Authority, Identity, Roots};

const FP: &str = "model-a";

struct Pki {
    _dir: tempfile::TempDir,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn pki(cluster: &str) -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::open_or_create(dir.path(), cluster).unwrap();
    let (c, k) = ca.issue("decode-0", &["127.0.0.1".into()]).unwrap();
    Pki {
        server: Identity::load(&c, &k).unwrap().server_config(&[]).unwrap(),
        client: Roots::load(&ca.ca_file())
            .unwrap()
            .client_config(&[])
            .unwrap(),
        _dir: dir,
    }
}

async fn receiver(tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = ReceiverConfig::new(FP);
    cfg.tls = tls;
    cfg.open_timeout = Duration::from_secs(2);
    Receiver::start(cfg, l).unwrap()
}

fn reserve(r: &Receiver, id: u64) -> (TransferTarget, Incoming) {
    r.reserve(ReserveSpec {
        transfer_id: id,
        backend: Backend::Tcp,
        bytes: 1 << 20,
        deadline: Duration::from_secs(10),
        placement: None,
    })
    .unwrap()
}

/// A payload that cannot appear on the wire by chance.
fn payload(id: u64) -> Vec<u8> {
    format!("xpyd-secret-kv-row-{id}-").into_bytes().repeat(200)
}

async fn send_one(
    sender: &Sender,
    target: &TransferTarget,
    inc: Incoming,
    id: u64,
) -> Result<Vec<u8>, String> {
    let send = async {
        let mut t = sender.open(target).await?;
        t.send(0, id, &payload(id)).await?;
        t.commit().await
    };
    let recv = async {
        let mut inc = inc;
        let mut got = Vec::new();
        while let Some(ev) = inc.next().await {
            match ev.map_err(|e| e.to_string())? {
                Event::Chunk { data, .. } => got.extend(data.to_vec().map_err(|e| e.to_string())?),
                Event::Meta(_) => {}
                Event::Complete(_) => return Ok(got),
            }
        }
        Err("ended without completion".to_string())
    };
    let (s, r) = tokio::join!(send, recv);
    s.map_err(|e| e.to_string())?;
    r
}

/// Forwards one connection at a time to `to`, recording what the sender wrote.
async fn recording_proxy(to: std::net::SocketAddr) -> (String, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            let mut b = TcpStream::connect(to).await.unwrap();
            let rec = rec.clone();
            tokio::spawn(async move {
                let (mut ar, mut aw) = a.split();
                let (mut br, mut bw) = b.split();
                let up = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = ar.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            let _ = bw.shutdown().await;
                            break;
                        }
                        rec.lock().unwrap().extend_from_slice(&buf[..n]);
                        if bw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = tokio::io::copy(&mut br, &mut aw);
                let _ = tokio::join!(up, down);
            });
        }
    });
    (addr, seen)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_transfers_round_trip_reuse_connections_and_hide_the_payload() {
    let needle = b"xpyd-secret-kv-row-";
    for tls in [false, true] {
        let p = pki("t");
        let r = receiver(tls.then(|| p.server.clone())).await;
        let (proxy, seen) = recording_proxy(r.local_addr()).await;
        let sender = if tls {
            Sender::new(FP).with_tls(p.client.clone())
        } else {
            Sender::new(FP)
        };
        for id in 1..=3 {
            let (mut target, inc) = reserve(&r, id);
            target.addr = proxy.clone();
            let got = send_one(&sender, &target, inc, id).await.unwrap();
            assert_eq!(got, payload(id));
        }
        assert_eq!(r.connections(), 1, "one connection served all three");
        let wire = seen.lock().unwrap().clone();
        assert!(
            wire.len() > 3 * payload(1).len(),
            "the proxy saw the transfers"
        );
        assert_eq!(
            contains(&wire, needle),
            !tls,
            "plaintext on the wire exactly when TLS is off (tls: {tls})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_without_tls_or_the_ca_are_refused_and_the_receiver_keeps_serving() {
    let p = pki("t");
    let r = receiver(Some(p.server.clone())).await;
    // Plain tcp into a TLS receiver: the open fails, within the deadline.
    let (target, _inc) = reserve(&r, 1);
    let t0 = std::time::Instant::now();
    let plain = Sender::new(FP).open(&target).await;
    assert!(plain.is_err(), "a plaintext sender got through");
    assert!(t0.elapsed() < Duration::from_secs(10));
    // A sender trusting another cluster's CA refuses this receiver.
    let other = pki("u");
    let (target, _inc2) = reserve(&r, 2);
    let e = Sender::new(FP)
        .with_tls(other.client.clone())
        .open(&target)
        .await
        .err()
        .expect("a sender trusting another CA got through");
    assert!(e.to_string().contains("tls"), "{e}");
    // The receiver still serves a member.
    let (target, inc) = reserve(&r, 3);
    let got = send_one(&Sender::new(FP).with_tls(p.client.clone()), &target, inc, 3)
        .await
        .unwrap();
    assert_eq!(got, payload(3));
}
