//! Federation relationships: with which trust domains this one federates, and how.
