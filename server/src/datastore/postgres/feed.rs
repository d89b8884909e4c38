//! The change feed of the PostgreSQL datastore (see [`crate::datastore::feed`]).
//!
//! One connection outside the pool (a pooled one would be recycled, and its `LISTEN` with it)
//! runs `LISTEN sigil_changes`; the triggers of schema version 2 `NOTIFY` there from inside
//! every writing transaction. A driver task polls the connection and turns each notification
//! into a [`Change`]; the feed task pings the connection every [`PING_EVERY`] so that a dead
//! network is noticed even when nothing is written. When the connection is lost (the backend
//! terminated, the database restarted, a ping unanswered) the feed reconnects with exponential
//! back-off and jitter, and once listening again yields [`Change::Resync`]: whatever was
//! written meanwhile was not announced. It logs once per state change (lost, back), not per
//! attempt.

use std::time::Duration;

use futures::StreamExt;
use rand::Rng as _;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use super::error::{describe, Target};
use super::migrations::CHANGES_CHANNEL;
use crate::datastore::feed::{Change, ChangeFeed};

/// The listener connection's `application_name` (it shows in `pg_stat_activity`).
pub(super) const APPLICATION_NAME: &str = "sigil-server change feed";
/// Changes buffered for a slow reader; beyond, the connection waits (and PostgreSQL queues).
const BUFFER: usize = 1024;
/// First reconnection delay.
const RECONNECT_START: Duration = Duration::from_millis(100);
/// Longest reconnection delay.
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often the idle connection is checked.
const PING_EVERY: Duration = Duration::from_secs(10);
/// How long a check may take before the connection counts as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the feed on a connection of its own made with `config`.
pub(super) fn start(mut config: tokio_postgres::Config, target: Target) -> ChangeFeed {
    config.application_name(APPLICATION_NAME);
    let (tx, rx) = mpsc::channel(BUFFER);
    let task = tokio::spawn(run(config, target, tx));
    ChangeFeed::new(rx, task)
}

/// Why listening stopped.
enum Stop {
    /// The feed was dropped: stop for good.
    Gone,
    /// The connection was lost or could not be made: reconnect.
    Lost(String),
}

async fn run(config: tokio_postgres::Config, target: Target, tx: mpsc::Sender<Change>) {
    let mut delay = RECONNECT_START;
    // Down since the last state change was logged; starts up (the datastore just connected).
    let mut down = false;
    loop {
        // `listen` clears `down` once it listens again; a loss after that starts the back-off over.
        match listen(&config, &tx, &mut down, &target).await {
            Stop::Gone => return,
            Stop::Lost(why) if !down => {
                tracing::warn!(target = %target, error = %why, "PostgreSQL change feed lost; reconnecting (changes other servers make reach this server's agents again once it is back)");
                down = true;
                delay = RECONNECT_START;
            }
            Stop::Lost(why) => {
                tracing::debug!(target = %target, error = %why, "PostgreSQL change feed still down");
            }
        }
        let half = delay / 2;
        let jittered = half + half.mul_f64(rand::rng().random_range(0.0..=1.0));
        tokio::select! {
            _ = tokio::time::sleep(jittered) => {}
            _ = tx.closed() => return,
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

/// Connects, listens and forwards until the connection is lost or the feed dropped. Sends
/// [`Change::Resync`] once listening (nothing before it was announced to this connection).
async fn listen(
    config: &tokio_postgres::Config,
    tx: &mpsc::Sender<Change>,
    down: &mut bool,
    target: &Target,
) -> Stop {
    let (client, mut connection) = match config.connect(NoTls).await {
        Ok(c) => c,
        Err(e) => return Stop::Lost(describe(&e)),
    };
    let driver_tx = tx.clone();
    // Polls the connection: notifications out, query results to `client`. Ends with the
    // connection (its error) or when the feed is gone.
    let mut driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if driver_tx.send(Change::parse(n.payload())).await.is_err() {
                        return Stop::Gone;
                    }
                }
                Ok(_) => {}
                Err(e) => return Stop::Lost(describe(&e)),
            }
        }
        Stop::Lost("the server closed the connection".into())
    });
    let listening = tokio::time::timeout(
        PING_TIMEOUT,
        client.batch_execute(&format!("LISTEN {CHANGES_CHANNEL}")),
    )
    .await;
    match listening {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            driver.abort();
            return Stop::Lost(describe(&e));
        }
        Err(_) => {
            driver.abort();
            return Stop::Lost("LISTEN did not complete in time".into());
        }
    }
    if std::mem::take(down) {
        tracing::info!(target = %target, "PostgreSQL change feed back; resynchronising");
    }
    if tx.send(Change::Resync).await.is_err() {
        driver.abort();
        return Stop::Gone;
    }
    let stop = loop {
        tokio::select! {
            ended = &mut driver => {
                break ended.unwrap_or_else(|e| Stop::Lost(format!("the listener task failed: {e}")));
            }
            _ = tokio::time::sleep(PING_EVERY) => {
                match tokio::time::timeout(PING_TIMEOUT, client.batch_execute("SELECT 1")).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Stop::Lost(describe(&e)),
                    Err(_) => break Stop::Lost(format!("no answer to a check within {} s", PING_TIMEOUT.as_secs())),
                }
            }
            _ = tx.closed() => break Stop::Gone,
        }
    };
    driver.abort();
    stop
}
