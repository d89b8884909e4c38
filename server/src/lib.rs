//! sigil-server: the identity server of one trust domain.
//!
//! - [`ca`]: the certificate authority (self-signed or upstream), X509-SVID and JWT-SVID issuing.
//! - [`datastore`]: registration entries, agents, join tokens, bundles (SQLite by default).

pub mod ca;
pub mod datastore;
