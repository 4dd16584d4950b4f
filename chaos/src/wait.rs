//! Bounded polling for tests: wait for a condition, fail with what was awaited when the
//! bound runs out.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often the helpers poll.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Polls `f` until it returns `Some`, at most `within`; the error names `what`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        // Each attempt is bounded too, so a hung poll cannot stretch the wait.
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(v)) = tokio::time::timeout(left.max(POLL_EVERY), f()).await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "timed out after {} ms waiting for {what}",
                within.as_millis()
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls `f` until it returns true, at most `within`; the error names `what`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, within, || {
        let fut = f();
        async move { fut.await.then_some(()) }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_until_times_out_with_the_reason() {
        let started = Instant::now();
        let e = wait_until("the impossible", Duration::from_millis(200), || async {
            false
        })
        .await
        .unwrap_err();
        assert!(e.to_string().contains("the impossible"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn wait_for_returns_the_value() {
        let mut n = 0;
        let v = wait_for("third try", Duration::from_secs(5), || {
            n += 1;
            let n = n;
            async move { (n >= 3).then_some(n) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
    }
}
