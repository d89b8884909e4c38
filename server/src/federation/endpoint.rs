//! The bundle endpoint: this server's trust bundle as a SPIFFE bundle over HTTPS.
