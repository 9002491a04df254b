//! The ratio advisor's default profile: when the manifest turns the advisor on without
//! naming a profile and none of the current layout has been measured for this model on
//! this machine, `xpyd up` measures one once the cluster is ready — `xpyd bench
//! profile` at low priority with the first role's threads and no KV backend — and
//! writes it atomically to the cache (`roles::cached_profile`), where the coordinator's
//! advisor picks it up at its next window. A mock cluster has nothing real to measure
//! and is left alone.

use crate::manifest::{EngineKind, Manifest, Role};
use crate::roles::cached_profile;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// Where to write and with how many threads, when a profile should be measured.
pub fn needed(m: &Manifest) -> Option<(PathBuf, u32)> {
    let a = &m.advisor;
    if !a.enabled || a.profile.is_some() {
        return None;
    }
    let first = Role::ALL.into_iter().find_map(|r| m.roles.get(r))?;
    if first.engine != EngineKind::Real {
        return None;
    }
    let path = cached_profile(&m.model);
    (!current(&path)).then_some((path, first.threads.max(1)))
}

/// Whether `path` holds a profile of the layout this xpyd reads: one of an older version
/// (decode points measured another way) is measured again, not kept.
fn current(path: &Path) -> bool {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| xpyd_planner::profile::check_layout(&v).is_ok())
}

/// Measures the profile in the background (killed when `stop` fires).
pub fn spawn(exe: PathBuf, model: PathBuf, out: PathBuf, threads: u32, stop: CancellationToken) {
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            r = measure(&exe, &model, &out, threads) => match r {
                Ok(()) => xpyd_runtime::logging::say(xpyd_runtime::logging::Level::INFO, &format!("xpyd up: measured the advisor's profile: {}", out.display())),
                Err(e) => xpyd_runtime::logging::say(xpyd_runtime::logging::Level::ERROR, &format!("xpyd up: measuring the advisor's profile failed: {e}")),
            },
        }
    });
}

async fn measure(exe: &Path, model: &Path, out: &Path, threads: u32) -> Result<(), String> {
    let dir = out.parent().ok_or("the profile path has no directory")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
    xpyd_runtime::logging::say(
        xpyd_runtime::logging::Level::INFO,
        &format!(
            "xpyd up: measuring the advisor's default profile ({} threads, low priority) → {}",
            threads,
            out.display()
        ),
    );
    let status = tokio::process::Command::new("nice")
        .args(["-n", "10"])
        .arg(exe)
        .args(["bench", "profile", "--kv-backend", "none", "--threads"])
        .arg(threads.to_string())
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(&tmp)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| format!("starting `xpyd bench profile`: {e}"))?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("`xpyd bench profile` exited with {status}"));
    }
    std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_enabled_advisor_without_a_profile_on_real_workers_measures() {
        let m = |extra: &str, engine: &str| {
            Manifest::from_yaml(&format!(
                "name: p\nmode: single\nmodel: /nonexistent/m-{}.gguf\n{extra}roles:\n  combined: {{ replicas: 1, engine: {engine} }}\n",
                std::process::id()
            ))
            .unwrap()
        };
        assert!(needed(&m("", "real")).is_none(), "advisor off");
        let (path, threads) = needed(&m("advisor: { enabled: true }\n", "real")).unwrap();
        assert!(path.ends_with(format!("profiles/m-{}.json", std::process::id())));
        assert_eq!(threads, 1);
        assert!(needed(&m("advisor: { enabled: true, profile: p.json }\n", "real")).is_none());
        assert!(needed(&m("advisor: { enabled: true }\n", "mock")).is_none());
    }

    #[test]
    fn a_cached_profile_of_an_older_version_is_measured_again() {
        let dir = std::env::temp_dir().join(format!("xpyd-first-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.json");
        assert!(!current(&path), "missing");
        std::fs::write(&path, "not json").unwrap();
        assert!(!current(&path), "unreadable");
        let v = xpyd_planner::profile::PROFILE_VERSION;
        std::fs::write(
            &path,
            serde_json::json!({"kind": "xpyd-performance-profile", "version": v - 1}).to_string(),
        )
        .unwrap();
        assert!(!current(&path), "older version");
        std::fs::write(
            &path,
            serde_json::json!({"kind": "xpyd-performance-profile", "version": v}).to_string(),
        )
        .unwrap();
        assert!(current(&path), "current version");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
