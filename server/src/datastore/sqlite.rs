//! SQLite datastore (being written).
