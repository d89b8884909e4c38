//! Wall-clock time in the form certificates, tokens and the datastore use: whole Unix seconds.
//!
//! The one place that reads the system clock for those values. Durations and deadlines inside a
//! process use `tokio::time` instead, so tests can pause and advance time. Code whose decisions
//! follow Unix times (renewal at half an SVID's life, back-off until a retry time) takes a
//! [`Clock`]: the system's in production, one that moves with tokio's (paused) clock in tests.

/// Seconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp().max(0)
}

/// Seconds since the Unix epoch, now, with the fraction (for latency measurements in tools).
pub fn now_unix_f64() -> f64 {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() as f64 / 1e9).max(0.0)
}

/// Where Unix time is read.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system clock ([`now_unix`]).
    System,
    /// A clock that reads `unix_at_start` at `start` and advances with tokio's clock: in a
    /// paused-time test, sleeps, `tokio::time::advance` and auto-advance move it.
    Tokio {
        /// Unix seconds at `start`.
        unix_at_start: i64,
        /// The tokio instant that stands for `unix_at_start`.
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Clock::System
    }

    /// A clock at `unix_at_start` now, advancing with tokio's clock.
    pub fn following_tokio(unix_at_start: i64) -> Self {
        Clock::Tokio {
            unix_at_start,
            start: tokio::time::Instant::now(),
        }
    }

    /// Seconds since the Unix epoch, now.
    pub fn now_unix(&self) -> i64 {
        match self {
            Clock::System => now_unix(),
            Clock::Tokio {
                unix_at_start,
                start,
            } => unix_at_start + start.elapsed().as_secs() as i64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_2020_and_agrees_with_the_fractional_form() {
        let whole = now_unix();
        let frac = now_unix_f64();
        assert!(whole > 1_577_836_800, "{whole}");
        assert!((frac - whole as f64).abs() < 2.0, "{frac} vs {whole}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_with_paused_time_only() {
        let c = Clock::following_tokio(1_000);
        assert_eq!(c.now_unix(), 1_000);
        tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
        assert_eq!(c.now_unix(), 1_001);
        tokio::time::advance(std::time::Duration::from_secs(3_600)).await;
        assert_eq!(c.now_unix(), 4_601);
        assert!(Clock::system().now_unix() > 1_577_836_800);
    }
}
