//! The one conflict-retry loop: agent and rollout records are written with
//! compare-and-set, and a writer that loses the race to another coordinator
//! replica re-reads and redoes its change. Every such loop goes through
//! [`retry_conflicts`], so the bound is written once.

use std::future::Future;

use crate::store::StoreError;

/// How often a change is redone after losing a write race before giving up
/// (the agent's next report, or the next rollout tick, heals it).
pub const MAX_CONFLICT_RETRIES: usize = 8;

/// Errors that may mean "another writer got there first".
pub trait Conflict {
    /// Whether redoing the change from a fresh read can succeed.
    fn is_conflict(&self) -> bool;
}

impl Conflict for StoreError {
    fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }
}

/// Runs `attempt` (a read, a change and a compare-and-set write) until it
/// does not lose a write race, at most `1 + MAX_CONFLICT_RETRIES` times; the
/// last outcome is returned whatever it is.
pub async fn retry_conflicts<T, E, F, Fut>(mut attempt: F) -> Result<T, E>
where
    E: Conflict,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut retries = 0;
    loop {
        match attempt().await {
            Err(e) if e.is_conflict() && retries < MAX_CONFLICT_RETRIES => retries += 1,
            outcome => return outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conflicts_are_redone_a_bounded_number_of_times() {
        let mut calls = 0;
        let result: Result<(), StoreError> = retry_conflicts(|| {
            calls += 1;
            async { Err(StoreError::Conflict("r".into())) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 1 + MAX_CONFLICT_RETRIES);

        let mut calls = 0;
        let result: Result<u32, StoreError> = retry_conflicts(|| {
            calls += 1;
            let outcome = if calls < 3 {
                Err(StoreError::Conflict("r".into()))
            } else {
                Ok(7)
            };
            async move { outcome }
        })
        .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(calls, 3);

        let mut calls = 0;
        let result: Result<(), StoreError> = retry_conflicts(|| {
            calls += 1;
            async { Err(StoreError::Closed) }
        })
        .await;
        assert!(matches!(result, Err(StoreError::Closed)));
        assert_eq!(calls, 1, "other errors are not retried");
    }
}
