//! Deadline-bounded waits.

use std::{future::Future, time::Duration};

/// Default deadline for a condition in an integration test.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, or fails after `deadline` with the
/// last thing `check` saw. For state only reachable by asking (the admin API);
/// agents' own state has push-based waits in [`crate::agent`].
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let until = tokio::time::Instant::now() + deadline;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if tokio::time::Instant::now() >= until {
            anyhow::bail!(
                "timed out after {deadline:?} waiting for {what}{}",
                last_error.map(|e| format!(" (last error: {e:#})")).unwrap_or_default()
            );
        }
        // Poll interval of the check, not a synchronisation sleep: the
        // deadline above bounds the wait.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
