//! Following the ratio advisor: the coordinator records the split an operator (or the
//! advisor in auto mode) applied (`GET /v1/advisor/desired`, one generation per apply);
//! this task polls it and converges the cluster. A split that keeps the number of
//! processes and moves workers between prefill and decode flips them (`flip.rs`: same
//! process, no model reload). Whatever is left goes through the actor's own `scale` —
//! roles that grow first, and only once their new workers are ready do the roles that
//! shrink drain theirs, so capacity never dips below either split and no request in
//! flight is dropped (a drained worker finishes its streams before it stops).

use super::control::Command;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How often the coordinator's desired split is read.
const POLL: Duration = Duration::from_secs(1);
/// How long the grown roles may take to become ready before the shrink goes ahead.
const GROW_TIMEOUT: Duration = Duration::from_secs(300);

/// Starts following the coordinator at `http`.
pub fn spawn(http: String, cmds: mpsc::Sender<Command>, stop: CancellationToken) {
    tokio::spawn(run(http, cmds, stop));
}

async fn get(url: String) -> Option<Value> {
    tokio::task::spawn_blocking(move || {
        let resp = xpyd_bench::http::with_auth(xpyd_bench::http::agent().get(&url))
            .config()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .call()
            .ok()?;
        serde_json::from_str(&resp.into_body().read_to_string().ok()?).ok()
    })
    .await
    .ok()
    .flatten()
}

async fn run(http: String, cmds: mpsc::Sender<Command>, stop: CancellationToken) {
    let mut done = 0u64;
    let mut waiting = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let Some(v) = get(format!("{http}/v1/advisor/desired")).await else {
            continue;
        };
        let generation = v["generation"].as_u64().unwrap_or(0);
        // A restarted coordinator starts again from generation 0.
        if generation < done {
            done = generation;
        }
        if generation == done {
            continue;
        }
        let want: BTreeMap<String, u32> = v["replicas"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, n)| Some((k.clone(), u32::try_from(n.as_u64()?).ok()?)))
                    .collect()
            })
            .unwrap_or_default();
        tokio::select! {
            _ = stop.cancelled() => return,
            r = converge(&cmds, &want) => match r {
                Ok(()) => done = generation,
                Err(Failed::Later(e)) => {
                    // Busy (an upgrade or a stop): try again once it is over.
                    if waiting != Some(generation) {
                        xpyd_runtime::logging::say(xpyd_runtime::logging::Level::WARN, &format!("xpyd up: the advised split (generation {generation}) waits: {e}"));
                        waiting = Some(generation);
                    }
                    tokio::time::sleep(BUSY_RETRY).await;
                }
                Err(Failed::Never(e)) => {
                    xpyd_runtime::logging::say(xpyd_runtime::logging::Level::WARN, &format!("xpyd up: applying the advised split (generation {generation}): {e}"));
                    done = generation;
                }
            },
        }
    }
}

/// Why a split was not applied.
#[derive(Debug)]
enum Failed {
    /// Not now (the supervisor is upgrading or stopping): the same generation is tried
    /// again.
    Later(String),
    /// Not at all (refused as invalid, or the new workers never became ready).
    Never(String),
}

/// Pause before trying a split the supervisor was too busy for.
const BUSY_RETRY: Duration = Duration::from_secs(5);

fn stopped<T>(_: T) -> Failed {
    Failed::Later("the supervisor stopped".into())
}

async fn status(cmds: &mpsc::Sender<Command>) -> Result<Value, Failed> {
    let (tx, rx) = oneshot::channel();
    cmds.send(Command::Status(tx)).await.map_err(stopped)?;
    rx.await.map_err(stopped)
}

async fn scale(cmds: &mpsc::Sender<Command>, role: &str, replicas: u32) -> Result<(), Failed> {
    let (reply, rx) = oneshot::channel();
    cmds.send(Command::Scale {
        role: role.into(),
        replicas,
        reply,
    })
    .await
    .map_err(stopped)?;
    match rx.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            let msg = format!("scale {role} to {replicas}: {}", e.message);
            Err(if e.status == 409 {
                Failed::Later(msg)
            } else {
                Failed::Never(msg)
            })
        }
        Err(e) => Err(stopped(e)),
    }
}

/// Ready workers of `role` in a status document.
fn ready(s: &Value, role: &str) -> usize {
    s["workers"].as_array().map_or(0, |ws| {
        ws.iter()
            .filter(|w| w["role"] == role && w["state"] == "Ready")
            .count()
    })
}

/// `(from, to, n)` when going from the replicas in status `s` to `want` only moves `n`
/// workers from prefill to decode or back (the same total): a flip does it.
fn flip_of(s: &Value, want: &BTreeMap<String, u32>) -> Option<(String, String, u32)> {
    let have = |role: &str| s["roles"][role]["replicas"].as_u64().map(|n| n as u32);
    let mut moved = vec![];
    for (role, n) in want {
        let h = have(role)?;
        if h != *n {
            moved.push((role.as_str(), i64::from(*n) - i64::from(h)));
        }
    }
    match moved[..] {
        [(a, da), (b, db)]
            if da == -db && [a, b].iter().all(|r| *r == "prefill" || *r == "decode") =>
        {
            let (from, to, n) = if da < 0 { (a, b, db) } else { (b, a, da) };
            Some((from.into(), to.into(), u32::try_from(n).ok()?))
        }
        _ => None,
    }
}

/// Flips workers when the split allows (a failed flip is left to `grow_then_shrink`);
/// then grows, waits for the new workers, and shrinks.
async fn converge(
    cmds: &mpsc::Sender<Command>,
    want: &BTreeMap<String, u32>,
) -> Result<(), Failed> {
    let s = status(cmds).await?;
    if let Some((from, to, count)) = flip_of(&s, want) {
        let (reply, rx) = oneshot::channel();
        cmds.send(Command::Flip {
            from: from.clone(),
            to: to.clone(),
            count,
            reply,
        })
        .await
        .map_err(stopped)?;
        match rx.await.map_err(stopped)? {
            Ok(v) => {
                let failed = v["flipped"]
                    .as_array()
                    .map_or(0, |a| a.iter().filter(|r| r["ok"] != true).count());
                if failed > 0 {
                    xpyd_runtime::logging::say(
                        xpyd_runtime::logging::Level::ERROR,
                        &format!(
                            "xpyd up: {failed} of {count} role flips failed; restarting workers instead"
                        ),
                    );
                }
            }
            // Busy: the split waits. Otherwise (not enough ready workers, say) the usual
            // way below.
            Err(e) if e.status == 409 && !e.message.contains("ready to flip") => {
                return Err(Failed::Later(format!(
                    "flip {count} {from} → {to}: {}",
                    e.message
                )));
            }
            Err(e) => xpyd_runtime::logging::say(
                xpyd_runtime::logging::Level::WARN,
                &format!("xpyd up: flipping {count} {from} → {to}: {}", e.message),
            ),
        }
    }
    grow_then_shrink(cmds, want).await
}

/// Grows, waits for the new workers, then shrinks.
async fn grow_then_shrink(
    cmds: &mpsc::Sender<Command>,
    want: &BTreeMap<String, u32>,
) -> Result<(), Failed> {
    let s = status(cmds).await?;
    let have = |role: &str| s["roles"][role]["replicas"].as_u64().unwrap_or(0) as u32;
    let grow: Vec<(&String, u32)> = want
        .iter()
        .filter(|(r, n)| **n > have(r))
        .map(|(r, n)| (r, *n))
        .collect();
    let shrink: Vec<(&String, u32)> = want
        .iter()
        .filter(|(r, n)| **n < have(r))
        .map(|(r, n)| (r, *n))
        .collect();
    for (role, n) in &grow {
        scale(cmds, role, *n).await?;
    }
    let deadline = Instant::now() + GROW_TIMEOUT;
    loop {
        let s = status(cmds).await?;
        if grow.iter().all(|(r, n)| ready(&s, r) >= *n as usize) {
            break;
        }
        if Instant::now() > deadline {
            return Err(Failed::Never(format!(
                "the grown roles were not ready within {GROW_TIMEOUT:?}; nothing was drained"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (role, n) in &shrink {
        scale(cmds, role, *n).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::control::CtlError;
    use serde_json::json;

    #[test]
    fn a_split_with_the_same_total_between_prefill_and_decode_is_a_flip() {
        let s = json!({"roles": {"prefill": {"replicas": 1}, "decode": {"replicas": 3}}});
        let want = |p: u32, d: u32| -> BTreeMap<String, u32> {
            [("prefill".to_string(), p), ("decode".to_string(), d)].into()
        };
        assert_eq!(
            flip_of(&s, &want(3, 1)),
            Some(("decode".into(), "prefill".into(), 2))
        );
        let s2 = json!({"roles": {"prefill": {"replicas": 3}, "decode": {"replicas": 1}}});
        assert_eq!(
            flip_of(&s2, &want(2, 2)),
            Some(("prefill".into(), "decode".into(), 1))
        );
        // More processes, fewer, nothing to do, or a role the cluster does not run.
        assert_eq!(flip_of(&s, &want(2, 3)), None);
        assert_eq!(flip_of(&s, &want(1, 2)), None);
        assert_eq!(flip_of(&s, &want(1, 3)), None);
        let odd: BTreeMap<String, u32> = [("combined".to_string(), 2)].into();
        assert_eq!(flip_of(&s, &odd), None);
    }

    #[test]
    fn ready_counts_only_ready_workers_of_the_role() {
        let s = json!({"workers": [
            {"role": "decode", "state": "Ready"},
            {"role": "decode", "state": "Starting"},
            {"role": "prefill", "state": "Ready"},
            {"role": "decode", "state": "Ready"},
        ]});
        assert_eq!(ready(&s, "decode"), 2);
        assert_eq!(ready(&s, "prefill"), 1);
        assert_eq!(ready(&s, "combined"), 0);
    }

    /// A fake actor: one decode worker (Ready) and one prefill worker; every `scale`
    /// gets `answer`.
    fn actor(answer: Result<Value, CtlError>) -> mpsc::Sender<Command> {
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    Command::Status(reply) => {
                        let _ = reply.send(json!({
                            "roles": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}},
                            "workers": [
                                {"role": "prefill", "state": "Ready"},
                                {"role": "decode", "state": "Ready"},
                            ],
                        }));
                    }
                    Command::Scale { reply, .. } => {
                        let _ = reply.send(answer.clone());
                    }
                    _ => {}
                }
            }
        });
        tx
    }

    #[tokio::test]
    async fn a_busy_supervisor_means_try_again_and_a_refusal_means_give_up() {
        let want: BTreeMap<String, u32> = [("decode".to_string(), 0), ("prefill".into(), 1)].into();
        // An upgrade in progress (409): the split waits and is tried again.
        let busy = actor(Err(CtlError::busy("an upgrade is in progress")));
        match converge(&busy, &want).await {
            Err(Failed::Later(m)) => assert!(m.contains("upgrade"), "{m}"),
            other => panic!("expected Later, got {other:?}"),
        }
        // Bad input (400): tried once, never again.
        let refused = actor(Err(CtlError::invalid("replicas", "must be 1..=64")));
        match converge(&refused, &want).await {
            Err(Failed::Never(m)) => assert!(m.contains("replicas"), "{m}"),
            other => panic!("expected Never, got {other:?}"),
        }
        // A gone supervisor is "later" too: the loop stops on its own token.
        let (gone, rx) = mpsc::channel(1);
        drop(rx);
        assert!(matches!(
            converge(&gone, &want).await,
            Err(Failed::Later(_))
        ));
        // Nothing to do: converged.
        let ok = actor(Ok(json!({})));
        let same: BTreeMap<String, u32> = [("decode".to_string(), 1), ("prefill".into(), 1)].into();
        assert!(converge(&ok, &same).await.is_ok());
    }
}
