//! The process's long-lived tasks (sessions, probe, reloader, admin) run through [`catching`]:
//! a panic in one is a bug, and a spawned task's panic would otherwise vanish with its
//! `JoinHandle`, which nothing awaits. Caught, it is logged, counted in
//! `ambassador_task_panics_total`, and the task ends as if it had finished: a session's
//! client sees its connection close, the gauges it holds go back down, the rest carries on.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::Poll;

use crate::metrics::Metrics;

/// Runs `task`, catching a panic in it; `what` names the task in the log line. The task is
/// polled where it lies (so `Unpin`: a boxed future), and this is an async block rather than
/// an async fn, which would keep room for its arguments twice: every idle session's task
/// holds this future.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub fn catching<'a, F>(
    what: &'static str,
    metrics: &'a Metrics,
    mut task: F,
) -> impl Future<Output = ()> + 'a
where
    F: Future<Output = ()> + Unpin + 'a,
{
    async move {
        // Unwind safety: after a panic the future is dropped unpolled, and what it shared
        // (the metrics, the credential store) holds no invariant a half-done poll could break.
        let outcome = std::future::poll_fn(|cx| {
            match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(&mut task).poll(cx))) {
                Ok(Poll::Pending) => Poll::Pending,
                Ok(Poll::Ready(())) => Poll::Ready(true),
                Err(_) => Poll::Ready(false),
            }
        })
        .await;
        if !outcome {
            tracing::error!(
                task = what,
                "task panicked: this is a bug in redis-ambassador"
            );
            metrics.task_panics.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_counted_and_the_caller_goes_on() {
        let metrics = Metrics::new();
        catching("ok", &metrics, Box::pin(async {})).await;
        assert_eq!(metrics.task_panics.get(), 0);
        catching(
            "bad",
            &metrics,
            Box::pin(async {
                tokio::task::yield_now().await;
                panic!("on purpose");
            }),
        )
        .await;
        assert_eq!(metrics.task_panics.get(), 1);
    }
}
