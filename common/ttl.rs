//! Human durations for TTLs and intervals: `90s`, `15m`, `1h`, `1h30m`, `2d`, or bare seconds.

use std::time::Duration;

/// Largest accepted duration (one year): anything longer is a typo, not a TTL.
pub const MAX: Duration = Duration::from_secs(366 * 24 * 3600);

/// Shortest X509-SVID TTL accepted (entries and server defaults). Agents renew at half the
/// lifetime, so a shorter TTL only multiplies signing load and leaves no time to ride out a
/// short server outage.
pub const MIN_X509_SVID_TTL: Duration = Duration::from_secs(60);
/// Shortest JWT-SVID TTL accepted (entries and server defaults); agents cache a JWT-SVID for
/// half its lifetime.
pub const MIN_JWT_SVID_TTL: Duration = Duration::from_secs(30);

/// Why a string is not a valid duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    /// Empty input.
    #[error("duration is empty; use e.g. 90s, 15m, 1h or 1h30m")]
    Empty,
    /// Not `<number><unit>` pieces.
    #[error(
        "duration {} is not valid; use numbers with units s, m, h or d (e.g. 90s, 15m, 1h30m)",
        crate::text::quote_for_display(.0)
    )]
    Invalid(String),
    /// Zero duration.
    #[error("duration {} must be greater than zero", crate::text::quote_for_display(.0))]
    Zero(String),
    /// Larger than [`MAX`].
    #[error(
        "duration {} is longer than the maximum of 366 days",
        crate::text::quote_for_display(.0)
    )]
    TooLong(String),
    /// An SVID TTL below its floor ([`MIN_X509_SVID_TTL`], [`MIN_JWT_SVID_TTL`]).
    #[error("{kind} TTL {given} is shorter than the minimum of {min}: SVIDs are renewed at half their lifetime, so shorter TTLs only multiply signing load; use {min} or more")]
    BelowMinimum {
        /// `X509-SVID` or `JWT-SVID`.
        kind: &'static str,
        /// The TTL given, formatted.
        given: String,
        /// The floor, formatted.
        min: String,
    },
}

fn check_floor(kind: &'static str, ttl: Duration, min: Duration) -> Result<(), TtlError> {
    if ttl < min {
        return Err(TtlError::BelowMinimum {
            kind,
            given: format(ttl),
            min: format(min),
        });
    }
    Ok(())
}

/// Refuses an X509-SVID TTL below [`MIN_X509_SVID_TTL`].
pub fn check_x509_svid_ttl(ttl: Duration) -> Result<(), TtlError> {
    check_floor("X509-SVID", ttl, MIN_X509_SVID_TTL)
}

/// Refuses a JWT-SVID TTL below [`MIN_JWT_SVID_TTL`].
pub fn check_jwt_svid_ttl(ttl: Duration) -> Result<(), TtlError> {
    check_floor("JWT-SVID", ttl, MIN_JWT_SVID_TTL)
}

/// Parses a duration. A bare number means seconds (as SPIRE's TTL flags do).
pub fn parse(s: &str) -> Result<Duration, TtlError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(TtlError::Empty);
    }
    let invalid = || TtlError::Invalid(s.to_string());
    let too_long = || TtlError::TooLong(s.to_string());
    let mut total: u64 = 0;
    if s.bytes().all(|b| b.is_ascii_digit()) {
        total = s.parse().map_err(|_| too_long())?;
    } else {
        let mut digits = String::new();
        let mut last_unit = u64::MAX;
        for c in s.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => return Err(invalid()),
            };
            // Units must be given once each, largest first ("1h30m", not "30m1h" or "1m1m").
            if digits.is_empty() || unit >= last_unit {
                return Err(invalid());
            }
            last_unit = unit;
            let n: u64 = digits.parse().map_err(|_| too_long())?;
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(too_long)?;
            digits.clear();
        }
        if !digits.is_empty() {
            return Err(invalid());
        }
    }
    let d = Duration::from_secs(total);
    if d.is_zero() {
        return Err(TtlError::Zero(s.to_string()));
    }
    if d > MAX {
        return Err(too_long());
    }
    Ok(d)
}

/// Formats whole seconds compactly: `1h`, `1h30m`, `90s` becomes `1m30s`.
pub fn format(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, name) in [(86_400, 'd'), (3600, 'h'), (60, 'm'), (1, 's')] {
        if secs >= unit {
            out.push_str(&format!("{}{name}", secs / unit));
            secs %= unit;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() -> Result<(), TtlError> {
        assert_eq!(parse("90s")?, Duration::from_secs(90));
        assert_eq!(parse("15m")?, Duration::from_secs(900));
        assert_eq!(parse("1h")?, Duration::from_secs(3600));
        assert_eq!(parse("1h30m")?, Duration::from_secs(5400));
        assert_eq!(parse("2d")?, Duration::from_secs(172_800));
        assert_eq!(parse("3600")?, Duration::from_secs(3600));
        assert_eq!(parse(" 20s ")?, Duration::from_secs(20));
        Ok(())
    }

    #[test]
    fn rejects_bad_durations() {
        for bad in [
            "", "h", "1x", "1.5h", "-5s", "1h 30m", "30m1h", "1m1m", "s1", "1hh", "1H", "+1s",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(parse("0s"), Err(TtlError::Zero("0s".into())));
        assert_eq!(parse("0"), Err(TtlError::Zero("0".into())));
        assert!(matches!(parse("367d"), Err(TtlError::TooLong(_))));
        assert!(matches!(
            parse("99999999999999999999999s"),
            Err(TtlError::TooLong(_))
        ));
        assert!(matches!(
            parse("99999999999999999999999"),
            Err(TtlError::TooLong(_))
        ));
        assert!(matches!(
            parse("999999999999999999d"),
            Err(TtlError::TooLong(_))
        ));
    }

    #[test]
    fn svid_ttl_floors() {
        assert!(check_x509_svid_ttl(Duration::from_secs(60)).is_ok());
        assert!(check_jwt_svid_ttl(Duration::from_secs(30)).is_ok());
        let err = check_x509_svid_ttl(Duration::from_secs(20)).unwrap_err();
        assert_eq!(
            err,
            TtlError::BelowMinimum {
                kind: "X509-SVID",
                given: "20s".into(),
                min: "1m".into()
            }
        );
        assert!(
            err.to_string().contains("shorter than the minimum of 1m"),
            "{err}"
        );
        assert!(check_jwt_svid_ttl(Duration::from_secs(29)).is_err());
        assert!(check_x509_svid_ttl(Duration::from_secs(59)).is_err());
    }

    #[test]
    fn formats_round_trip() -> Result<(), TtlError> {
        for s in ["1h", "1h30m", "1m30s", "45s", "1d2h3m4s"] {
            assert_eq!(format(parse(s)?), s);
        }
        assert_eq!(format(Duration::from_secs(90)), "1m30s");
        Ok(())
    }
}
