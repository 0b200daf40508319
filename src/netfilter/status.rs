//! The hand-off between a split DaemonSet's two containers: the privileged one keeps the capture in
//! place (`imds-broker iptables reconcile`) and vouches for it in a small file on a shared volume; the
//! unprivileged server's readiness follows that file (`--capture-status-file`), so it is ready only
//! while the capture is known to be in place, without holding any privilege to look itself.
//!
//! The file says until when the vouching holds: `fresh-until <unix seconds>`, renewed after every
//! successful reconcile pass for three reconcile intervals. A capture container that stops, hangs or
//! fails its passes lets it lapse, and the server stops being ready. Written atomically (a temporary
//! file renamed over it), so a reader never sees half a line.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the server reads the file.
pub const READ_INTERVAL: Duration = Duration::from_secs(1);

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Writes that the capture holds until `fresh_until` (unix seconds); 0 withdraws it.
pub fn write(path: &Path, fresh_until: u64) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, format!("fresh-until {fresh_until}\n"))?;
    std::fs::rename(&temporary, path)
}

/// Whether the file vouches for the capture at unix time `now`.
pub fn holds(contents: &str, now: u64) -> bool {
    contents
        .trim()
        .strip_prefix("fresh-until ")
        .and_then(|t| t.parse::<u64>().ok())
        .is_some_and(|until| now < until)
}

/// The whole unix second a vouch made at `now` (truncated to its second) stays good until: `valid_for`
/// rounded up, plus the second `now` was truncated by, so a sub-second `valid_for` never lapses before
/// it has passed.
fn fresh_until(now: u64, valid_for: Duration) -> u64 {
    let whole = valid_for.as_secs() + u64::from(valid_for.subsec_nanos() > 0);
    now + whole.max(1) + 1
}

/// The capture side: renews the file for `valid_for` after every pass that left the rules in place
/// (`installed` true), withdraws it after a failed pass and on `shutdown`.
pub async fn vouch(
    mut installed: watch::Receiver<bool>,
    path: PathBuf,
    valid_for: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = installed.changed() => if changed.is_err() { break },
        }
        let until = if *installed.borrow_and_update() {
            fresh_until(unix_now(), valid_for)
        } else {
            0
        };
        if let Err(error) = write(&path, until) {
            tracing::error!(path = %path.display(), %error, "cannot write the capture status file");
        }
    }
    if let Err(error) = write(&path, 0) {
        tracing::warn!(path = %path.display(), %error, "cannot withdraw the capture status file");
    }
}

/// The server side: `ready` follows the file, read every [`READ_INTERVAL`], until `shutdown`.
pub async fn follow(path: PathBuf, ready: watch::Sender<bool>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(READ_INTERVAL);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now_holds = std::fs::read_to_string(&path).is_ok_and(|c| holds(&c, unix_now()));
        ready.send_if_modified(|r| std::mem::replace(r, now_holds) != now_holds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vouch_lasts_at_least_its_validity_whatever_the_fraction_of_the_second() {
        // Written at 5.99 s (truncated to 5) for 0.6 s: still good at 6.59 s (second 6).
        let until = fresh_until(5, Duration::from_millis(600));
        assert!(holds(&format!("fresh-until {until}"), 6));
        // 30 s from second 100 (written anywhere in it): good through second 130, gone by 132.
        let until = fresh_until(100, Duration::from_secs(30));
        assert!(holds(&format!("fresh-until {until}"), 130));
        assert!(!holds(&format!("fresh-until {until}"), 132));
    }

    #[test]
    fn the_file_holds_until_its_time_and_not_when_garbled() {
        assert!(holds("fresh-until 100\n", 99));
        assert!(!holds("fresh-until 100\n", 100));
        assert!(!holds("fresh-until 0\n", 1));
        for garbled in ["", "fresh-until", "fresh-until x", "100", "fresh-until -1"] {
            assert!(!holds(garbled, 0), "{garbled:?}");
        }
    }

    #[tokio::test]
    async fn the_server_follows_what_the_capture_side_vouches_for() {
        let path = std::env::temp_dir().join(format!("imds-broker-status-{}", std::process::id()));
        let (installed_tx, installed) = watch::channel(false);
        let (ready_tx, mut ready) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let capture = tokio::spawn(vouch(
            installed,
            path.clone(),
            Duration::from_secs(90),
            shutdown.clone(),
        ));
        let server = tokio::spawn(follow(path.clone(), ready_tx, shutdown.clone()));
        installed_tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r))
            .await
            .unwrap()
            .unwrap();
        // A failed pass withdraws it.
        installed_tx.send_replace(false);
        tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| !*r))
            .await
            .unwrap()
            .unwrap();
        installed_tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r))
            .await
            .unwrap()
            .unwrap();
        // The capture side stopping withdraws it too.
        shutdown.cancel();
        capture.await.unwrap();
        assert!(!holds(&std::fs::read_to_string(&path).unwrap(), unix_now()));
        server.await.unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
