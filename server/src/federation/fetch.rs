//! Fetching another trust domain's bundle from its bundle endpoint.

/// Why a bundle could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {}
