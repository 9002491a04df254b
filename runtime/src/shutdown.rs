//! Shutdown: a cancellation token tree (root per process, children per subsystem) and the
//! OS signals that trip it.

pub use tokio_util::sync::CancellationToken;

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Exit status after a second signal: 128 + SIGINT, as shells report an interrupt.
pub const SECOND_SIGNAL_EXIT: i32 = 130;

/// A token cancelled on the first signal (a graceful stop begins); a second signal ends
/// the process at once with [`SECOND_SIGNAL_EXIT`].
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        signal().await;
        t.cancel();
        signal().await;
        eprintln!("second signal: exiting now");
        std::process::exit(SECOND_SIGNAL_EXIT);
    });
    token
}
