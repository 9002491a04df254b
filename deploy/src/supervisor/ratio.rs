//! Following the ratio advisor: the coordinator records the split an operator (or the
//! advisor in auto mode) applied (`GET /v1/advisor/desired`, one generation per apply);
//! this task polls it and converges the cluster through the actor's own `scale` —
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
        let resp = ureq::get(&url)
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
            r = converge(&cmds, &want) => if let Err(e) = r {
                eprintln!("xpyd up: applying the advised split (generation {generation}): {e}");
            },
        }
        done = generation;
    }
}

async fn status(cmds: &mpsc::Sender<Command>) -> Result<Value, String> {
    let (tx, rx) = oneshot::channel();
    cmds.send(Command::Status(tx))
        .await
        .map_err(|_| "the supervisor stopped")?;
    rx.await.map_err(|_| "the supervisor stopped".into())
}

async fn scale(cmds: &mpsc::Sender<Command>, role: &str, replicas: u32) -> Result<(), String> {
    let (reply, rx) = oneshot::channel();
    cmds.send(Command::Scale {
        role: role.into(),
        replicas,
        reply,
    })
    .await
    .map_err(|_| "the supervisor stopped")?;
    match rx.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("scale {role} to {replicas}: {}", e.message)),
        Err(_) => Err("the supervisor stopped".into()),
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

/// Grows, waits for the new workers, then shrinks.
async fn converge(
    cmds: &mpsc::Sender<Command>,
    want: &BTreeMap<String, u32>,
) -> Result<(), String> {
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
            return Err(format!(
                "the grown roles were not ready within {GROW_TIMEOUT:?}; nothing was drained"
            ));
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
    use serde_json::json;

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
}
