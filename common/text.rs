//! Showing untrusted input in messages: long inputs are cut, so an error about a 3,000-byte
//! argument stays one readable line instead of echoing it whole.

use std::borrow::Cow;

/// How many characters of an input a message shows before cutting it.
pub const DISPLAY_MAX_CHARS: usize = 100;

/// `s` as given when it has at most `max_chars` characters; otherwise its first `max_chars`
/// characters followed by `… (N bytes)`, N being the length of the whole input.
pub fn truncate_for_display(s: &str, max_chars: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max_chars) {
        None => Cow::Borrowed(s),
        Some((cut, _)) => Cow::Owned(format!("{}… ({} bytes)", &s[..cut], s.len())),
    }
}

/// `s` quoted and escaped like `{:?}` (control characters visible), cut after
/// [`DISPLAY_MAX_CHARS`] characters as [`truncate_for_display`] does: `"abc…"… (3000 bytes)`.
pub fn quote_for_display(s: &str) -> String {
    match s.char_indices().nth(DISPLAY_MAX_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_inputs_are_unchanged() {
        assert_eq!(truncate_for_display("", 5), "");
        assert_eq!(truncate_for_display("abcde", 5), "abcde");
        assert!(matches!(truncate_for_display("abcde", 5), Cow::Borrowed(_)));
        assert_eq!(quote_for_display("a\"b\n"), "\"a\\\"b\\n\"");
    }

    #[test]
    fn long_inputs_are_cut_with_their_length() {
        assert_eq!(truncate_for_display("abcdef", 5), "abcde… (6 bytes)");
        let long = "a".repeat(3000);
        let q = quote_for_display(&long);
        assert_eq!(
            q,
            format!("\"{}\"… (3000 bytes)", "a".repeat(DISPLAY_MAX_CHARS))
        );
        // Multi-byte characters are never split; the length counts bytes.
        let wide = "é".repeat(200);
        assert_eq!(
            truncate_for_display(&wide, 3),
            format!("{}… (400 bytes)", "é".repeat(3))
        );
    }
}
