//! The PostgreSQL datastore: one database that several `sigil-server`s share.
//!
//! Layout: `mod.rs` connects (pool, first connection with a clear error, migrations) and
//! implements [`Datastore`] by calling one module per resource: `entries.rs` (writes, filters,
//! changes since a revision), `agents.rs`, `join_tokens.rs`, `bundles.rs`, `federation.rs`
//! (federation relationships); `migrations.rs` holds
//! the schema (with the triggers that announce every write), `feed.rs` the change feed that
//! listens to them, `error.rs` the [`PostgresError`] classification.
//!
//! Semantics are those of the SQLite datastore, made to hold across servers:
//! - Durable on return: every write commits before the call returns, and each connection turns
//!   `synchronous_commit` back on if the server or role has it off.
//! - One global entry revision: a single row (`revision`) that each entry write locks first
//!   (`SELECT ... FOR UPDATE`) and updates in the same transaction. Entry writers are thus
//!   serialised across servers, so revisions (and the `seq` listing order) follow commit order:
//!   a reader that saw revision R has seen every change up to R, which a sequence could not
//!   promise (values are taken before commit, in any order). Deletes leave tombstones.
//! - Join tokens are taken with one `DELETE ... RETURNING`: of two servers racing, exactly one
//!   gets the row.
//! - Agent SVID renewal and promotion are conditional `UPDATE`s (compare-and-swap on the
//!   serial), which PostgreSQL re-checks on the current row after waiting for a concurrent
//!   writer.
//!
//! TLS to the database is not offered yet: `sslmode=require` (or stricter) is refused at start;
//! use a Unix socket or a trusted network.

mod agents;
mod bundles;
mod entries;
mod error;
mod federation;
mod feed;
mod join_tokens;
mod migrations;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use sigil::entry::RegistrationEntry;
use sigil::{SelectorSet, SpiffeId, TrustDomain};
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;

pub use error::{PostgresError, Target};

use super::paging::{effective_page_size, into_page, parse_page_token};
use super::{
    AttestedAgent, AuthorizedRead, BundleSwap, ChangeFeed, Datastore, DatastoreError, EntryChanges,
    EntryFilter, EntryHistory, FederationRelationship, JoinToken, NewAgentSvid, Page, StoredBundle,
};
use error::{connect_hint, map_pg, map_pool};

/// Connections per server, unless configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;
/// How long connecting may take when the connection string sets no `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call waits for a free pooled connection (or a new one) before failing as
/// unavailable.
const POOL_TIMEOUT: Duration = Duration::from_secs(15);

type Result<T, E = DatastoreError> = std::result::Result<T, E>;

/// How to reach the database.
#[derive(Clone)]
pub struct PostgresOptions {
    /// The parsed connection string (URL or `key=value` form).
    pub config: tokio_postgres::Config,
    /// Pool size.
    pub max_connections: usize,
}

impl PostgresOptions {
    /// Parses a libpq connection string (`postgresql://user:pw@host:5432/db` or
    /// `host=... user=... dbname=...`). Errors never repeat the string (it may hold a
    /// password); TLS modes this server cannot honour are refused.
    pub fn parse(connection_string: &str) -> Result<Self, PostgresError> {
        let mut config = tokio_postgres::Config::from_str(connection_string)
            .map_err(PostgresError::ConnectionString)?;
        if !matches!(config.get_ssl_mode(), SslMode::Disable | SslMode::Prefer) {
            return Err(PostgresError::Unsupported(
                "sslmode=require is set, but this sigil-server does not connect to PostgreSQL \
                 over TLS yet: use sslmode=prefer or disable over a Unix socket or a trusted \
                 network",
            ));
        }
        // `prefer` falls back to plain text, which is all NoTls does; say so in the config.
        config.ssl_mode(SslMode::Disable);
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            return Err(PostgresError::Unsupported(
                "no host: set host (a name, an IP address, or the directory of the server's Unix \
                 socket, e.g. host=/var/run/postgresql)",
            ));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("sigil-server");
        }
        Ok(Self {
            config,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        })
    }

    /// Where these options connect, without the password.
    pub fn target(&self) -> Target {
        Target::of(&self.config)
    }
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("target", &self.target())
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// The PostgreSQL implementation of [`Datastore`]. Cheap to share behind an `Arc`; the pool
/// inside is shared by clones.
#[derive(Clone)]
pub struct PostgresDatastore {
    pool: Pool,
    target: Target,
    /// For the change feed's own connection.
    config: tokio_postgres::Config,
}

impl fmt::Debug for PostgresDatastore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresDatastore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl PostgresDatastore {
    /// Parses `connection_string` and [`PostgresDatastore::open_with`] it.
    pub async fn open(connection_string: &str) -> Result<Self> {
        Self::open_with(PostgresOptions::parse(connection_string)?).await
    }

    /// Connects (failing with what to check when the server cannot be reached or refuses the
    /// login) and brings the schema up to date. Several servers may do this at once: the
    /// migrations run under an advisory lock.
    pub async fn open_with(options: PostgresOptions) -> Result<Self> {
        let target = options.target();
        // The first connection outside the pool, so its error is the driver's own, with the
        // SQLSTATE that says what to check.
        let (mut client, connection) =
            options
                .config
                .connect(NoTls)
                .await
                .map_err(|source| PostgresError::Connect {
                    target: target.clone(),
                    hint: connect_hint(&source),
                    source,
                })?;
        let conn_task = tokio::spawn(connection);
        let migrated = migrations::migrate(&mut client, &target, migrations::MIGRATIONS).await;
        drop(client);
        // The connection task ends once the client is gone.
        let _ = conn_task.await;
        migrated?;

        let manager = Manager::from_config(
            options.config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .post_create(Hook::async_fn(|client, _| {
                Box::pin(async move {
                    // Acknowledged writes must survive a crash of the database server: a role or
                    // server default of `off` is overridden for our sessions (`local`,
                    // `remote_write`, `remote_apply` are kept).
                    client
                        .simple_query(
                            "SELECT set_config('synchronous_commit', 'on', false) \
                             WHERE current_setting('synchronous_commit') = 'off'",
                        )
                        .await
                        .map_err(HookError::Backend)?;
                    Ok(())
                })
            }))
            .build()
            .map_err(PostgresError::Pool)?;
        tracing::info!(target = %target, "PostgreSQL datastore ready");
        Ok(Self {
            pool,
            target,
            config: options.config,
        })
    }

    /// Where this datastore connects (no password).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A pooled connection.
    async fn conn(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(map_pool)
    }
}

impl From<tokio_postgres::Error> for DatastoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        map_pg(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the resource modules

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A column of `row`, a value of the wrong type or NULL where none may be is `Corrupt`,
/// naming `what` (the row) and the column.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    idx: usize,
    what: &dyn Fn() -> String,
) -> Result<T> {
    row.try_get(idx).map_err(|e| {
        let name = row
            .columns()
            .get(idx)
            .map_or("?", tokio_postgres::Column::name);
        DatastoreError::Corrupt(format!(
            "{}: column {name}: {}",
            what(),
            error::describe(&e)
        ))
    })
}

/// Saturating conversion of a count or size.
fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// The trait

#[async_trait]
impl Datastore for PostgresDatastore {
    async fn create_entries(
        &self,
        entries: Vec<RegistrationEntry>,
    ) -> Result<Vec<Result<RegistrationEntry>>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        entries::create(&mut conn, entries, unix_now()).await
    }

    async fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>> {
        let conn = self.conn().await?;
        Ok(entries::get(&conn, id).await?.map(|(_, e)| e))
    }

    async fn list_entries(
        &self,
        filter: &EntryFilter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<RegistrationEntry>> {
        let after = parse_page_token(page_token, 'e')?;
        let conn = self.conn().await?;
        entries::list(&conn, filter, page_size, after).await
    }

    async fn count_entries(&self, filter: &EntryFilter) -> Result<u64> {
        let conn = self.conn().await?;
        entries::count(&conn, filter).await
    }

    async fn update_entry(&self, entry: RegistrationEntry) -> Result<RegistrationEntry> {
        let mut conn = self.conn().await?;
        entries::update(&mut conn, entry, unix_now()).await
    }

    async fn delete_entry(&self, id: &str) -> Result<RegistrationEntry> {
        let mut conn = self.conn().await?;
        entries::delete(&mut conn, id, unix_now()).await
    }

    async fn entry_changes_since(&self, revision: i64) -> Result<EntryChanges> {
        let mut conn = self.conn().await?;
        entries::changes_since(&mut conn, revision).await
    }

    /// As the SQLite datastore: `updated_at` is now, `created_at` the stored one on replace,
    /// and a banned agent stays banned.
    async fn upsert_agent(&self, agent: AttestedAgent) -> Result<()> {
        let conn = self.conn().await?;
        agents::upsert(&conn, agent, unix_now()).await
    }

    async fn set_agent_new_svid(
        &self,
        id: &SpiffeId,
        current_serial: &str,
        new: NewAgentSvid,
    ) -> Result<bool> {
        let conn = self.conn().await?;
        agents::set_new_svid(&conn, id, current_serial, new, unix_now()).await
    }

    async fn promote_agent_svid(&self, id: &SpiffeId, serial: &str) -> Result<bool> {
        let conn = self.conn().await?;
        agents::promote_svid(&conn, id, serial, unix_now()).await
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>> {
        let conn = self.conn().await?;
        agents::get(&conn, id).await
    }

    async fn list_agents(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<AttestedAgent>> {
        let after = parse_page_token(page_token, 'a')?;
        let conn = self.conn().await?;
        agents::list(&conn, page_size, after).await
    }

    async fn count_agents(&self) -> Result<u64> {
        let conn = self.conn().await?;
        agents::count(&conn).await
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<()> {
        let conn = self.conn().await?;
        agents::delete(&conn, id).await
    }

    async fn set_agent_banned(&self, id: &SpiffeId, banned: bool) -> Result<()> {
        let conn = self.conn().await?;
        agents::set_banned(&conn, id, banned, unix_now()).await
    }

    async fn create_join_token(&self, token: JoinToken) -> Result<()> {
        let conn = self.conn().await?;
        join_tokens::create(&conn, token, unix_now()).await
    }

    async fn consume_join_token(&self, token: &str, now: i64) -> Result<JoinToken> {
        let conn = self.conn().await?;
        join_tokens::consume(&conn, token, now).await
    }

    async fn prune_join_tokens(&self, now: i64) -> Result<u64> {
        let conn = self.conn().await?;
        join_tokens::prune(&conn, now).await
    }

    async fn get_bundle(&self, td: &TrustDomain) -> Result<Option<StoredBundle>> {
        let conn = self.conn().await?;
        bundles::get(&conn, bundles::Table::Own, td).await
    }

    async fn set_bundle(&self, bundle: StoredBundle) -> Result<StoredBundle> {
        let mut conn = self.conn().await?;
        bundles::set(&mut conn, bundles::Table::Own, bundle, unix_now()).await
    }

    async fn set_federated_bundle(&self, bundle: StoredBundle) -> Result<StoredBundle> {
        let mut conn = self.conn().await?;
        bundles::set(&mut conn, bundles::Table::Federated, bundle, unix_now()).await
    }

    async fn get_federated_bundle(&self, td: &TrustDomain) -> Result<Option<StoredBundle>> {
        let conn = self.conn().await?;
        bundles::get(&conn, bundles::Table::Federated, td).await
    }

    async fn list_federated_bundles(&self) -> Result<Vec<StoredBundle>> {
        let conn = self.conn().await?;
        bundles::list_federated(&conn).await
    }

    async fn delete_federated_bundle(&self, td: &TrustDomain) -> Result<StoredBundle> {
        let conn = self.conn().await?;
        bundles::delete_federated(&conn, td).await
    }

    async fn create_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<FederationRelationship> {
        let conn = self.conn().await?;
        federation::create(&conn, relationship, unix_now()).await
    }

    async fn update_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<FederationRelationship> {
        let conn = self.conn().await?;
        federation::update(&conn, relationship, unix_now()).await
    }

    async fn get_federation_relationship(
        &self,
        td: &TrustDomain,
    ) -> Result<Option<FederationRelationship>> {
        let conn = self.conn().await?;
        federation::get(&conn, td).await
    }

    async fn list_federation_relationships(&self) -> Result<Vec<FederationRelationship>> {
        let conn = self.conn().await?;
        federation::list(&conn).await
    }

    async fn delete_federation_relationship(
        &self,
        td: &TrustDomain,
    ) -> Result<FederationRelationship> {
        let conn = self.conn().await?;
        federation::delete(&conn, td).await
    }

    async fn compare_and_set_bundle(
        &self,
        bundle: StoredBundle,
        expected_sequence: u64,
    ) -> Result<BundleSwap> {
        let mut conn = self.conn().await?;
        bundles::compare_and_set(&mut conn, bundle, expected_sequence, unix_now()).await
    }

    /// `LISTEN` on a connection of its own (see `feed.rs`).
    fn change_feed(&self) -> Option<ChangeFeed> {
        Some(feed::start(self.config.clone(), self.target.clone()))
    }

    async fn read_authorized(
        &self,
        agent_id: &SpiffeId,
        selectors: &SelectorSet,
        server_id: &SpiffeId,
    ) -> Result<AuthorizedRead> {
        let mut conn = self.conn().await?;
        entries::read_authorized(&mut conn, agent_id, selectors, server_id).await
    }

    async fn entry_history_since(&self, revision: i64) -> Result<Option<EntryHistory>> {
        let mut conn = self.conn().await?;
        entries::history_since(&mut conn, revision).await
    }

    async fn prune_entry_history(&self, before: i64) -> Result<u64> {
        let mut conn = self.conn().await?;
        entries::prune_history(&mut conn, before).await
    }

    async fn get_entries(&self, ids: &[String]) -> Result<Vec<Option<RegistrationEntry>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.conn().await?;
        entries::get_many(&conn, ids).await
    }
}
