//! X.509 helpers (filled in below).
