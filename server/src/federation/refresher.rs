//! Keeps every federation relationship's bundle fresh.
