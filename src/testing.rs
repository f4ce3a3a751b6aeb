//! Helpers for unit tests.

use std::time::Instant;

/// An origin for a test's virtual clock. The core never reads the clock:
/// its tests take one reading here and pass `t0 + offsets` in, so every
/// outcome depends only on the offsets.
pub fn epoch() -> Instant {
    crate::clock::now()
}
