//! Wall-clock time as the records and envelopes carry it: milliseconds since
//! the Unix epoch. Written once here; timers and timeouts use tokio's
//! monotonic clock instead.

/// Milliseconds since the Unix epoch (0 if the system clock is before it).
///
/// ```
/// assert!(fleetplane_proto::clock::unix_ms() > 1_700_000_000_000);
/// ```
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
