//! Trust bundles (being written).
