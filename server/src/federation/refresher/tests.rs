//! Refresher tests on paused time.
