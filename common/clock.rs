//! Wall-clock time in the form certificates, tokens and the datastore use: whole Unix seconds.
//!
//! The one place that reads the system clock for those values. Durations and deadlines inside a
//! process use `tokio::time` instead, so tests can pause and advance time.

/// Seconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp().max(0)
}

/// Seconds since the Unix epoch, now, with the fraction (for latency measurements in tools).
pub fn now_unix_f64() -> f64 {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() as f64 / 1e9).max(0.0)
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
}
