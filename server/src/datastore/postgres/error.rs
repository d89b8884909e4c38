//! PostgreSQL failures as [`PostgresError`], and how a driver or pool error becomes one.
//!
//! Messages never contain the connection string's password: they name the server by
//! [`Target`], which is built from the parsed configuration without it.

use std::fmt;

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

use crate::datastore::DatastoreError;

/// Where the datastore connects, for messages: host(s), port(s), user and database of the
/// connection string, never its password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target(String);

impl Target {
    /// Describes `config` as libpq `key=value` pairs, without the password.
    pub fn of(config: &tokio_postgres::Config) -> Self {
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
        let mut parts = Vec::new();
        if !hosts.is_empty() {
            parts.push(format!("host={}", hosts.join(",")));
        }
        if !ports.is_empty() {
            parts.push(format!("port={}", ports.join(",")));
        }
        if let Some(user) = config.get_user() {
            parts.push(format!("user={user}"));
        }
        if let Some(db) = config.get_dbname() {
            parts.push(format!("dbname={db}"));
        }
        Target(parts.join(" "))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// PostgreSQL datastore failures; [`DatastoreError::Postgres`] carries them.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The connection string does not parse. It is not echoed: it may hold a password.
    #[error("the PostgreSQL connection string does not parse: {}", cause_text(.0))]
    ConnectionString(#[source] tokio_postgres::Error),
    /// The connection string asks for something this server cannot do (TLS), or lacks a host.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The first connection, at start, failed; `hint` says what to check.
    #[error("cannot connect to PostgreSQL ({target}): {}; {hint}", describe(.source))]
    Connect {
        /// Where it tried to connect.
        target: Target,
        /// What to check.
        hint: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The server cannot be reached now, the connection broke, no pooled connection came free
    /// in time, or a transaction lost a conflict with another one (serialization failure,
    /// deadlock): trying again later may succeed.
    #[error("the PostgreSQL database is unavailable: {what}; try again")]
    Unavailable {
        /// What happened.
        what: String,
        /// The driver's error, when there is one (a pool timeout has none).
        #[source]
        source: Option<tokio_postgres::Error>,
    },
    /// A statement failed (constraint, permission, full disk on the server, ...).
    #[error("PostgreSQL error: {}", describe(.0))]
    Statement(#[source] tokio_postgres::Error),
    /// The database has tables but no Sigil schema version: it belongs to something else.
    #[error(
        "PostgreSQL database ({target}) is not a Sigil database: its schema {schema:?} has {tables} \
         tables but no sigil_schema table; give sigil-server a database (or schema) of its own"
    )]
    ForeignDatabase {
        /// The database.
        target: Target,
        /// The schema looked at (the first of the search path).
        schema: String,
        /// How many tables it has.
        tables: i64,
    },
    /// The connection's search path names no existing schema to create the tables in.
    #[error(
        "PostgreSQL database ({target}): the connection's search_path names no existing schema: \
         create one the user may CREATE in (or grant it CREATE on public) and put it first in \
         search_path"
    )]
    NoSchema {
        /// The database.
        target: Target,
    },
    /// The database's schema is newer than this code knows.
    #[error(
        "PostgreSQL database ({target}) has schema version {found}, but this sigil-server only \
         knows versions up to {known}: it was written by a newer sigil-server; upgrade this one"
    )]
    NewerSchema {
        /// The database.
        target: Target,
        /// Its schema version.
        found: i32,
        /// The newest version this code knows.
        known: usize,
    },
    /// A schema migration failed (its transaction was rolled back).
    #[error("PostgreSQL database ({target}): schema migration {version} failed: {}", describe(.source))]
    Migration {
        /// The database.
        target: Target,
        /// The version the migration leads to.
        version: usize,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The connection pool could not be built.
    #[error("building the PostgreSQL connection pool: {0}")]
    Pool(#[source] deadpool_postgres::BuildError),
}

impl PostgresError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, PostgresError::Unavailable { .. })
    }
}

impl From<PostgresError> for DatastoreError {
    fn from(e: PostgresError) -> Self {
        DatastoreError::Postgres(e)
    }
}

/// The driver's error with the server's message, SQLSTATE and detail (the driver's own
/// `Display` says only "db error"), or its cause for I/O errors.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            s.push_str(" (");
            s.push_str(detail);
            s.push(')');
        }
        return s;
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// The cause of a driver error without the driver's own summary ("invalid connection string").
fn cause_text(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => cause.to_string(),
        None => e.to_string(),
    }
}

/// SQLSTATEs after which the same call may succeed later.
fn is_transient_state(code: &SqlState) -> bool {
    let c = code.code();
    // Class 08: connection exceptions; 57P0x: server shutting down or starting.
    c.starts_with("08")
        || matches!(
            *code,
            SqlState::T_R_SERIALIZATION_FAILURE
                | SqlState::T_R_DEADLOCK_DETECTED
                | SqlState::LOCK_NOT_AVAILABLE
                | SqlState::TOO_MANY_CONNECTIONS
                | SqlState::ADMIN_SHUTDOWN
                | SqlState::CRASH_SHUTDOWN
                | SqlState::CANNOT_CONNECT_NOW
                | SqlState::QUERY_CANCELED
        )
}

/// Classifies a driver error met while serving a call: lost connections and conflicts are
/// transient, anything else is a failed statement.
pub(crate) fn map_pg(e: tokio_postgres::Error) -> DatastoreError {
    let transient = match e.code() {
        Some(code) => is_transient_state(code),
        // No server error: I/O, a closed connection, a timeout.
        None => {
            e.is_closed() || std::error::Error::source(&e).is_some_and(|c| c.is::<std::io::Error>())
        }
    };
    if transient {
        PostgresError::Unavailable {
            what: describe(&e),
            source: Some(e),
        }
        .into()
    } else {
        PostgresError::Statement(e).into()
    }
}

/// A pool checkout that failed: no connection free in time, or a new one could not be made.
pub(crate) fn map_pool(e: PoolError) -> DatastoreError {
    match e {
        PoolError::Backend(e) => match e.code() {
            Some(code) if !is_transient_state(code) => PostgresError::Statement(e).into(),
            _ => PostgresError::Unavailable {
                what: format!("connecting: {}", describe(&e)),
                source: Some(e),
            }
            .into(),
        },
        PoolError::PostCreateHook(deadpool_postgres::HookError::Backend(e)) => map_pg(e),
        other => PostgresError::Unavailable {
            what: other.to_string(),
            source: None,
        }
        .into(),
    }
}

/// What to check when the first connection fails, by the error.
pub(crate) fn connect_hint(e: &tokio_postgres::Error) -> &'static str {
    match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            "check the user and password in datastore.connection_string (or \
             SIGIL_DATASTORE_CONNECTION_STRING) and the server's pg_hba.conf"
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => {
            "the database does not exist: create it (CREATE DATABASE <name> OWNER <user>) or fix \
             dbname in datastore.connection_string"
        }
        Some(c) if *c == SqlState::TOO_MANY_CONNECTIONS => {
            "the server has no free connection slot: raise its max_connections or lower the \
             other clients' pools"
        }
        Some(c) if c.code().starts_with("57P") => {
            "the server is starting up or shutting down: try again when it is up"
        }
        Some(_) => "check datastore.connection_string and the server's log",
        None => {
            "check that the PostgreSQL server is running and reachable at that host and port \
             (datastore.connection_string), and that no firewall is in the way"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_never_shows_the_password() {
        let config: tokio_postgres::Config =
            "postgresql://sigil:s3cret-pw@db.example:6432/ids?connect_timeout=3"
                .parse()
                .expect("valid connection string");
        let target = Target::of(&config);
        assert_eq!(
            target.to_string(),
            "host=db.example port=6432 user=sigil dbname=ids"
        );
        let unix: tokio_postgres::Config = "host=/run/postgresql user=sigil password=s3cret-pw"
            .parse()
            .expect("valid connection string");
        assert_eq!(
            Target::of(&unix).to_string(),
            "host=/run/postgresql user=sigil"
        );
    }

    #[test]
    fn a_connection_string_that_does_not_parse_is_not_echoed() {
        let err = "postgresql://sigil:s3cret-pw@db.example:notaport/ids"
            .parse::<tokio_postgres::Config>()
            .expect_err("bad port");
        let msg = PostgresError::ConnectionString(err).to_string();
        assert_eq!(
            msg,
            "the PostgreSQL connection string does not parse: invalid value for option `port`"
        );
    }
}
