//! The change feed: what the servers sharing one datastore write, announced as it commits.
//!
//! A backend several servers can share (PostgreSQL) hands out a [`ChangeFeed`] from
//! [`super::Datastore::change_feed`]; each server forwards what it yields to its own agents'
//! sync streams, exactly as its admin API does after a local write. A [`Change`] only names
//! *what kind* of data changed: readers fetch the data itself from the datastore, so a feed
//! that coalesces or duplicates loses nothing. When a feed may have missed changes (its
//! connection was lost) it yields [`Change::Resync`] once it is back.
//!
//! On the wire (PostgreSQL `NOTIFY` payloads) a change is one short text, [`Change::payload`]:
//! `entries`, `agent:<spiffe id>`, `join_tokens`, `bundle:<trust domain>`, `federated`,
//! `federation`.
//! [`Change::parse`] reads it back; a payload it does not know (from a newer server) is a
//! `Resync`, which is always safe.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Registration entries were created, updated or deleted.
    Entries,
    /// The agent with this SPIFFE ID was banned, unbanned, evicted, or its node selectors
    /// changed.
    Agent(String),
    /// Join tokens were created or used.
    JoinTokens,
    /// The trust bundle of this trust domain (by name) changed.
    Bundle(String),
    /// A federated bundle was set or deleted.
    Federated,
    /// A federation relationship was created, updated or deleted.
    Federation,
    /// Changes may have been missed: everything may have changed.
    Resync,
}

impl Change {
    /// The `NOTIFY` payload of this change (`Resync` is never sent, only inferred).
    pub fn payload(&self) -> String {
        match self {
            Change::Entries => "entries".into(),
            Change::Agent(id) => format!("agent:{id}"),
            Change::JoinTokens => "join_tokens".into(),
            Change::Bundle(td) => format!("bundle:{td}"),
            Change::Federated => "federated".into(),
            Change::Federation => "federation".into(),
            Change::Resync => "resync".into(),
        }
    }

    /// Reads a `NOTIFY` payload; anything unknown is [`Change::Resync`].
    pub fn parse(payload: &str) -> Change {
        match payload.split_once(':') {
            Some(("agent", id)) => Change::Agent(id.to_string()),
            Some(("bundle", td)) => Change::Bundle(td.to_string()),
            _ => match payload {
                "entries" => Change::Entries,
                "join_tokens" => Change::JoinTokens,
                "federated" => Change::Federated,
                "federation" => Change::Federation,
                _ => Change::Resync,
            },
        }
    }
}

/// A stream of [`Change`]s, fed by a background task that stops when the feed is dropped.
#[derive(Debug)]
pub struct ChangeFeed {
    rx: mpsc::Receiver<Change>,
    task: JoinHandle<()>,
}

impl ChangeFeed {
    /// A feed reading `rx`, which `task` (aborted when the feed is dropped) fills.
    pub fn new(rx: mpsc::Receiver<Change>, task: JoinHandle<()>) -> Self {
        Self { rx, task }
    }

    /// The next change; `None` once the task has stopped for good.
    pub async fn next(&mut self) -> Option<Change> {
        self.rx.recv().await
    }
}

impl Drop for ChangeFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_unknown_ones_mean_resync() {
        for c in [
            Change::Entries,
            Change::Agent("spiffe://example.org/sigil/agent/join_token/a:b".into()),
            Change::JoinTokens,
            Change::Bundle("example.org".into()),
            Change::Federated,
            Change::Federation,
            Change::Resync,
        ] {
            assert_eq!(Change::parse(&c.payload()), c);
        }
        assert_eq!(Change::parse("entries_v2"), Change::Resync);
        assert_eq!(Change::parse(""), Change::Resync);
        assert_eq!(Change::parse("widget:1"), Change::Resync);
    }
}
