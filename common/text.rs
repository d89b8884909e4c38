//! Showing untrusted input in messages and logs: long inputs are cut, so an error about a
//! 3,000-byte argument stays one readable line instead of echoing it whole, and one request
//! cannot write a megabyte into the audit log. The start is kept (what a reader needs to
//! recognise the value) with the length of the whole.

use std::borrow::Cow;

/// How many characters of an input a message shows before cutting it.
pub const DISPLAY_MAX_CHARS: usize = 100;
/// Characters of an untrusted value the server echoes in audit events and API errors
/// ([`echo`]).
pub const MAX_ECHO_CHARS: usize = 256;

/// `s` as given when it has at most `max_chars` characters; otherwise its first `max_chars`
/// characters followed by `… (N bytes)`, N being the length of the whole input.
pub fn truncate_for_display(s: &str, max_chars: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max_chars) {
        None => Cow::Borrowed(s),
        Some((cut, _)) => Cow::Owned(format!("{}… ({} bytes)", &s[..cut], s.len())),
    }
}

/// [`truncate_for_display`] to [`MAX_ECHO_CHARS`]: how audit events and admin API errors echo a
/// value they were given.
pub fn echo(s: &str) -> Cow<'_, str> {
    truncate_for_display(s, MAX_ECHO_CHARS)
}

/// `s` quoted and escaped like `{:?}` (control characters visible), cut after
/// [`DISPLAY_MAX_CHARS`] characters as [`truncate_for_display`] does: `"abc…"… (3000 bytes)`.
pub fn quote_for_display(s: &str) -> String {
    match s.char_indices().nth(DISPLAY_MAX_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

/// An error and its causes on one line, `outer: cause: root cause`, as `{:#}` prints an
/// `anyhow::Error`, except that a cause already shown is not repeated: many errors print their
/// source in their own message and also return it as `source()`, which would otherwise give
/// `Is a directory (os error 21): Is a directory (os error 21)`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error whose message includes its source, and that returns it as `source()` too.
    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}: {source}")]
    struct Reading {
        path: &'static str,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("loading the agent state")]
    struct Loading(#[source] Reading);

    #[test]
    fn causes_are_shown_once() {
        let io = std::io::Error::from_raw_os_error(21);
        let shown = io.to_string();
        let e = Loading(Reading {
            path: "/x/agent_svid.pem",
            source: io,
        });
        let line = error_chain(&e);
        assert_eq!(
            line,
            format!("loading the agent state: reading /x/agent_svid.pem: {shown}")
        );
        assert_eq!(line.matches("os error").count(), 1, "{line}");
        // A cause not in the message is kept.
        let plain = Loading(Reading {
            path: "/y",
            source: std::io::Error::other("disk on fire"),
        });
        assert_eq!(
            error_chain(&plain),
            "loading the agent state: reading /y: disk on fire"
        );
    }

    #[test]
    fn short_inputs_are_unchanged() {
        assert_eq!(truncate_for_display("", 5), "");
        assert_eq!(truncate_for_display("abcde", 5), "abcde");
        assert!(matches!(truncate_for_display("abcde", 5), Cow::Borrowed(_)));
        assert_eq!(quote_for_display("a\"b\n"), "\"a\\\"b\\n\"");
    }

    #[test]
    fn echo_keeps_256_characters() {
        let exact = "a".repeat(MAX_ECHO_CHARS);
        assert!(matches!(echo(&exact), Cow::Borrowed(_)));
        let long = "x".repeat(3000);
        assert_eq!(echo(&long), format!("{}… (3000 bytes)", "x".repeat(256)));
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
