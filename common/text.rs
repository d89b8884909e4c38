//! Bounding untrusted text before it is echoed into a log line or an error message.
//!
//! A value a caller sent (an entry field, a trust domain name, an id) may be megabytes long.
//! Echoing it whole would let one request write a megabyte into the audit log or send it back in
//! an error. [`truncate`] keeps the start, which is what a reader needs to recognise the value,
//! and says how long the original was.

use std::borrow::Cow;

/// Characters of an untrusted value echoed by [`echo`].
pub const MAX_ECHO_CHARS: usize = 256;

/// `s` itself when it has at most `max_chars` characters; otherwise its first `max_chars`
/// characters followed by a marker with the original length, e.g.
/// `spiffe://example.org/aaaa…[truncated: 3000 chars in all]`.
pub fn truncate(s: &str, max_chars: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max_chars) {
        None => Cow::Borrowed(s),
        Some((cut, _)) => {
            let total = max_chars + s[cut..].chars().count();
            Cow::Owned(format!("{}…[truncated: {total} chars in all]", &s[..cut]))
        }
    }
}

/// [`truncate`] to [`MAX_ECHO_CHARS`]: how audit events and error messages echo a value they
/// were given.
pub fn echo(s: &str) -> Cow<'_, str> {
    truncate(s, MAX_ECHO_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_kept_whole() {
        assert!(matches!(echo(""), Cow::Borrowed("")));
        let exact = "a".repeat(MAX_ECHO_CHARS);
        assert!(matches!(echo(&exact), Cow::Borrowed(_)));
        assert_eq!(echo(&exact), exact);
    }

    #[test]
    fn long_values_keep_their_start_and_say_how_long_they_were() {
        let long = "x".repeat(3000);
        let out = echo(&long);
        assert_eq!(
            out,
            format!("{}…[truncated: 3000 chars in all]", "x".repeat(256))
        );
        assert_eq!(
            truncate("abcdef", 3),
            "abc…[truncated: 6 chars in all]".to_string()
        );
        // Characters, not bytes: a multi-byte value is never cut inside a character.
        let wide = "é".repeat(10);
        assert_eq!(
            truncate(&wide, 4),
            format!("{}…[truncated: 10 chars in all]", "é".repeat(4))
        );
        assert_eq!(truncate("abc", 0), "…[truncated: 3 chars in all]");
    }
}
