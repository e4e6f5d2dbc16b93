//! Polling with a deadline: the only way tests wait. Never a bare sleep.

use std::{future::Future, time::Duration};

/// Calls `check` every `interval` until it returns `Ok(true)`, fails with `Err`, or
/// `timeout` passes. The error says which.
pub async fn poll_until<F, Fut>(timeout: Duration, interval: Duration, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("condition not met within {timeout:?}"));
        }
        tokio::time::sleep(interval).await;
    }
}

/// Polls `probe` until it returns `Some(value)` or `timeout` passes; panics with
/// `what` and the last observation on timeout. For tests.
pub async fn eventually<T, D, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    D: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, D>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => {
                if tokio::time::Instant::now() >= deadline {
                    let mut last = format!("{last:?}");
                    if last.len() > 4000 {
                        last.truncate(4000);
                        last.push_str("…(cut)");
                    }
                    panic!("timed out after {timeout:?} waiting for {what}; last observation: {last}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
