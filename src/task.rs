//! The process's long-lived tasks (sessions, probe, reloader, admin) run through [`catching`]:
//! a panic in one is a bug, and a spawned task's panic would otherwise vanish with its
//! `JoinHandle`, which nothing awaits. Caught, it is logged, counted in
//! `ambassador_task_panics_total`, and the task ends as if it had finished: a session's
//! client sees its connection close, the gauges it holds go back down, the rest carries on.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::task::Poll;

use crate::metrics::Metrics;

/// Runs `task`, catching a panic in it; `what` names the task in the log line.
pub async fn catching(what: &'static str, metrics: &Metrics, task: impl Future<Output = ()>) {
    let mut task = std::pin::pin!(task);
    // Unwind safety: after a panic the future is dropped unpolled, and what it shared (the
    // metrics, the credential store) holds no invariant a half-done poll could break.
    let outcome = std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| task.as_mut().poll(cx))) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_counted_and_the_caller_goes_on() {
        let metrics = Metrics::new();
        catching("ok", &metrics, async {}).await;
        assert_eq!(metrics.task_panics.get(), 0);
        catching("bad", &metrics, async {
            tokio::task::yield_now().await;
            panic!("on purpose");
        })
        .await;
        assert_eq!(metrics.task_panics.get(), 1);
    }
}
