//! Waiting on a condition with a deadline instead of sleeping for a fixed time.

use std::time::{Duration, Instant};

/// Polls `condition` every `every` until it returns `Some`, or fails after `timeout`.
///
/// Blocking (for code that runs before or outside an async runtime, such as starting a
/// broker process); `what` names the condition in the error.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut condition: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}
