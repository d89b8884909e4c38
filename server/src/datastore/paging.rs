//! Paging shared by the datastore backends: page sizes and page tokens.
//!
//! A page token is `<prefix><seq>`: the listing's prefix (`e` for entries, `a` for agents) and the
//! insertion sequence number of the last item returned; the next page starts after it. Every
//! backend keeps such a sequence per listed table, so tokens mean the same whichever backend
//! produced them, and a token for one listing is refused by the other.

use super::{DatastoreError, Page};

/// Page size used when the caller asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 500;
/// Largest page returned, whatever the caller asks for.
pub const MAX_PAGE_SIZE: usize = 10_000;

/// Token prefix of entry listings.
pub(crate) const ENTRY_TOKEN: char = 'e';
/// Token prefix of agent listings.
pub(crate) const AGENT_TOKEN: char = 'a';

/// The page size to use for a requested one: 0 is [`DEFAULT_PAGE_SIZE`], larger than
/// [`MAX_PAGE_SIZE`] is capped.
pub(crate) fn effective_page_size(page_size: usize) -> usize {
    match page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// The sequence number after which the page starts: 0 for an absent or empty token (the first
/// page); tokens are `<prefix><seq>` with seq > 0, anything else is
/// [`DatastoreError::InvalidPageToken`].
pub(crate) fn parse_page_token(token: Option<&str>, prefix: char) -> Result<i64, DatastoreError> {
    let Some(t) = token.filter(|t| !t.is_empty()) else {
        return Ok(0);
    };
    t.strip_prefix(prefix)
        .filter(|d| !d.is_empty() && d.len() <= 19 && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse::<i64>().ok())
        .filter(|seq| *seq > 0)
        .ok_or_else(|| DatastoreError::InvalidPageToken(t.chars().take(64).collect()))
}

fn page_token(prefix: char, seq: i64) -> String {
    format!("{prefix}{seq}")
}

/// Splits `limit + 1` fetched `(seq, item)` rows, in seq order, into a page and the next token.
pub(crate) fn into_page<T>(mut rows: Vec<(i64, T)>, limit: usize, prefix: char) -> Page<T> {
    let next_token = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|(seq, _)| page_token(prefix, *seq))
    } else {
        None
    };
    Page {
        items: rows.into_iter().map(|(_, item)| item).collect(),
        next_token,
    }
}
