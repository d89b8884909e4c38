//! Tests of the PostgreSQL datastore.
