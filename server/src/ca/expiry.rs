//! The active authority's remaining life. The rotation ([`super::rotation`]) activates a new
//! authority at ⅚ of the active one's life; if that does not happen (a failing rotation, an
//! upstream intermediate nobody replaced), an expiring authority takes every SVID with it (each
//! is capped at its NotAfter), so the operator must be told well before.
//!
//! From ⅙ of the active authority's lifetime left the server logs a warning (at most once an
//! hour), and once it has expired an error (as often) and `/ready` and `healthcheck` fail. Its
//! NotAfter is also exported as the metric `sigil_server_ca_expiry_seconds`.

use std::time::Duration;

use tokio::sync::watch;

/// The share of the CA's lifetime left at which warnings start (1 / this).
pub const WARN_FROM_FRACTION: i64 = 6;
/// Least time between two warnings, seconds.
pub const WARN_EVERY: i64 = 3600;
/// Longest sleep of the monitor: it re-reads the clock at least this often (a clock may jump).
const MAX_SLEEP: i64 = 600;

/// Where a CA stands at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaExpiry {
    /// More than ⅙ of its lifetime left.
    Valid,
    /// Less than ⅙ of its lifetime left: `left` seconds.
    Expiring {
        /// Seconds until NotAfter.
        left: i64,
    },
    /// Past NotAfter.
    Expired,
}

/// The CA valid from `not_before` to `not_after` (Unix seconds), at `now`.
pub fn classify(not_before: i64, not_after: i64, now: i64) -> CaExpiry {
    if now >= not_after {
        CaExpiry::Expired
    } else if now >= warn_from(not_before, not_after) {
        CaExpiry::Expiring {
            left: not_after - now,
        }
    } else {
        CaExpiry::Valid
    }
}

/// When warnings start: ⅙ of the lifetime before NotAfter.
fn warn_from(not_before: i64, not_after: i64) -> i64 {
    not_after - (not_after - not_before).max(0) / WARN_FROM_FRACTION
}

/// The CA has expired: the server issues nothing and is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the active CA authority expired at {}: no SVIDs can be issued and workloads' SVIDs no longer verify; see why rotation failed in the log (`sigil-server localauthority x509 show`), or provide a new upstream intermediate", rfc3339(*.not_after))]
pub struct CaExpired {
    /// The CA's NotAfter, Unix seconds.
    pub not_after: i64,
}

/// The CA's expiry as an error, if it has expired at `now`.
pub fn check_not_expired(not_after: i64, now: i64) -> Result<(), CaExpired> {
    if now >= not_after {
        Err(CaExpired { not_after })
    } else {
        Ok(())
    }
}

/// Why the server is not ready because of its CA, if it is not (the message of [`CaExpired`]).
pub fn not_ready_reason(not_after: i64, now: i64) -> Option<String> {
    check_not_expired(not_after, now)
        .err()
        .map(|e| e.to_string())
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Decides when to warn: in the warning window or after expiry, at most every
/// [`WARN_EVERY`] seconds (and at once on entering a worse state).
#[derive(Debug)]
pub struct Warnings {
    not_before: i64,
    not_after: i64,
    /// When the last warning was given and about which state.
    last: Option<(i64, CaExpiry)>,
}

impl Warnings {
    /// For the CA valid from `not_before` to `not_after`.
    pub fn new(not_before: i64, not_after: i64) -> Self {
        Self {
            not_before,
            not_after,
            last: None,
        }
    }

    /// The state to warn about at `now`, if a warning is due.
    pub fn check(&mut self, now: i64) -> Option<CaExpiry> {
        let state = classify(self.not_before, self.not_after, now);
        let due = match (state, self.last) {
            (CaExpiry::Valid, _) => false,
            (_, None) => true,
            // Expiry itself is news, whenever the last warning was.
            (CaExpiry::Expired, Some((_, CaExpiry::Expiring { .. }))) => true,
            (_, Some((at, _))) => now - at >= WARN_EVERY,
        };
        if due {
            self.last = Some((now, state));
        }
        due.then_some(state)
    }

    /// When to look again after `now`: the next state change or the next warning, whichever
    /// comes first, but at most `MAX_SLEEP` away.
    pub fn next_check(&self, now: i64) -> i64 {
        let next_warning = self.last.map(|(at, _)| at + WARN_EVERY);
        let candidates = [
            Some(warn_from(self.not_before, self.not_after)),
            Some(self.not_after),
            next_warning,
        ];
        candidates
            .into_iter()
            .flatten()
            .filter(|&t| t > now)
            .min()
            .unwrap_or(now + MAX_SLEEP)
            .min(now + MAX_SLEEP)
    }
}

use sigil::clock::now_unix;

/// Slack after a state change before the monitor looks: the rotation task, due at the same
/// second (⅚ of the life), activates the next authority first.
const SLACK: i64 = 2;

/// Logs the active authority's expiry warnings until `shutdown` turns true.
pub async fn monitor(ca: std::sync::Arc<super::Ca>, mut shutdown: watch::Receiver<bool>) {
    let mut bounds = (ca.ca_not_before(), ca.ca_not_after());
    let mut warnings = Warnings::new(bounds.0, bounds.1);
    loop {
        let now = now_unix();
        let current = (ca.ca_not_before(), ca.ca_not_after());
        if current != bounds {
            bounds = current;
            warnings = Warnings::new(bounds.0, bounds.1);
        }
        let not_after = bounds.1;
        match warnings.check(now) {
            Some(CaExpiry::Expiring { left }) => tracing::warn!(
                ca_not_after = not_after,
                seconds_left = left,
                "the active CA authority expires at {} (in {}) and no new one was activated; SVIDs are capped at its expiry: see the rotation errors above, `sigil-server localauthority x509 show`, or provide a new upstream intermediate",
                rfc3339(not_after),
                sigil::ttl::format(Duration::from_secs(left.max(0) as u64))
            ),
            Some(CaExpiry::Expired) => tracing::error!(
                ca_not_after = not_after,
                "{}",
                not_ready_reason(not_after, now).unwrap_or_default()
            ),
            Some(CaExpiry::Valid) | None => {}
        }
        let sleep = Duration::from_secs((warnings.next_check(now) - now + SLACK).max(1) as u64);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_over_a_cas_life() {
        // A 600 s CA: warnings from 100 s before its end.
        assert_eq!(classify(1000, 1600, 1000), CaExpiry::Valid);
        assert_eq!(classify(1000, 1600, 1499), CaExpiry::Valid);
        assert_eq!(classify(1000, 1600, 1500), CaExpiry::Expiring { left: 100 });
        assert_eq!(classify(1000, 1600, 1599), CaExpiry::Expiring { left: 1 });
        assert_eq!(classify(1000, 1600, 1600), CaExpiry::Expired);
        assert_eq!(not_ready_reason(1600, 1599), None);
        let why = not_ready_reason(1600, 1600).unwrap_or_default();
        assert!(why.contains("expired at 1970-01-01T00:26:40Z"), "{why}");
    }

    #[test]
    fn warnings_are_rate_limited_and_expiry_is_news() {
        // A one-year CA: the window is the last ~61 days.
        let year = 365 * 24 * 3600;
        let mut w = Warnings::new(0, year);
        let start = year - year / 6;
        assert_eq!(w.check(start - 1), None);
        assert_eq!(
            w.next_check(start - 1),
            start,
            "wakes when the window opens"
        );
        assert_eq!(
            w.next_check(start - 1000),
            start - 1000 + MAX_SLEEP,
            "or re-reads the clock"
        );
        let mut warned = Vec::new();
        // One look a minute for a day of the window: one warning an hour.
        for now in (start..start + 24 * 3600).step_by(60) {
            if w.check(now).is_some() {
                warned.push(now);
            }
        }
        assert_eq!(warned.len(), 24, "{warned:?}");
        assert!(warned.windows(2).all(|p| p[1] - p[0] >= WARN_EVERY));

        // A short CA: the expiry is reported the moment it happens, then hourly.
        let mut w = Warnings::new(1000, 1090);
        assert_eq!(w.check(1000), None);
        assert_eq!(w.next_check(1000), 1075, "wakes when the window opens");
        assert_eq!(w.check(1075), Some(CaExpiry::Expiring { left: 15 }));
        assert_eq!(w.next_check(1075), 1090, "wakes at expiry");
        assert_eq!(w.check(1080), None);
        assert_eq!(w.check(1090), Some(CaExpiry::Expired));
        assert_eq!(w.check(1091), None);
        assert_eq!(w.next_check(1091), 1091 + MAX_SLEEP);
        assert_eq!(w.check(1090 + WARN_EVERY), Some(CaExpiry::Expired));
    }

    #[tokio::test]
    async fn the_monitor_stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let td = sigil::TrustDomain::new("example.org").unwrap();
        let ca =
            super::super::Ca::load_or_create(&super::super::CaConfig::new(td, dir.path())).unwrap();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(monitor(std::sync::Arc::new(ca), rx));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished());
        let _ = stop.send(true);
        assert!(task.await.is_ok());
    }
}
