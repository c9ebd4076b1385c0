//! Moving an open session when discovery changes the target: the session ends at a point
//! where closing costs the client nothing (no reply pending, not inside MULTI, not
//! subscribed or monitoring, no command half-sent, no value half-relayed), so the client
//! sees an ordinary closed connection and reconnects to the new target. A session still busy
//! at the end of `move_grace` is closed anyway. After a Sentinel failover there is no grace:
//! the client is no longer read at the next command boundary, the replies it is owed are
//! relayed, then the session ends.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{Close, Expectations, RelayError, Reuse};
use crate::discovery::{Choice, Discovery, MovePolicy, Target};
use crate::metrics::Metrics;

/// How often a session with a move pending looks for its idle point. Only sessions whose
/// target changed look at all; they end within this much of becoming idle.
const LOOK: Duration = Duration::from_millis(5);

/// How long the replies owed to a client may take after a failover stopped its requests
/// (a blocked command on the demoted master is unblocked by Redis itself).
const FAILOVER_REPLIES: Duration = Duration::from_secs(10);

/// Discovery's view of one session's upstream.
pub struct Moves {
    pub discovery: Arc<Discovery>,
    pub choice: watch::Receiver<Choice>,
    /// The target this session's upstream connection was made to.
    pub target: Target,
}

impl Moves {
    /// Watches `choice` (subscribed before the connection was made) for `target` leaving
    /// the preferred targets.
    pub fn new(
        discovery: Arc<Discovery>,
        choice: watch::Receiver<Choice>,
        target: Target,
    ) -> Moves {
        Moves {
            discovery,
            choice,
            target,
        }
    }

    /// A session on Sentinel's master catches `-READONLY`.
    pub fn guards_master(&self) -> bool {
        self.target.confirm_master
    }

    /// The master answered `-READONLY`: look again at once.
    pub fn demoted(&self) {
        tracing::info!(upstream = %self.target, "master answered -READONLY: closing the session and asking the sentinels again");
        self.discovery.recheck();
    }

    /// Counts a session that ended because of a move.
    pub fn closed(&self, close: Close, metrics: &Metrics) {
        let how = match close {
            Close::Moved => "idle",
            Close::MovedBusy => "grace",
            Close::FailedOver => "failover",
            Close::ReadOnly => "readonly",
            _ => return,
        };
        metrics.session_moved(how);
    }
}

/// Where each side of the session stands, written between two reads and read by the mover.
#[derive(Default)]
pub(super) struct Rest {
    /// The client side holds no partial command and streams none.
    whole: AtomicBool,
    /// ... and is not inside MULTI, and the connection is in plain request-reply mode.
    requests_idle: AtomicBool,
    /// The reply side owes nothing: every expectation settled, at a reply boundary.
    replies_owed_none: AtomicBool,
    /// ... and nothing arrives unasked: not subscribed or monitoring.
    replies_quiet: AtomicBool,
    /// The client left at an idle point: nothing owed either way, the session ends at once.
    left_idle: AtomicBool,
    /// ... and what the upstream connection can do next (`upstream.reuse`): a [`Reuse`]
    /// as its `u8`.
    left_for: AtomicU8,
}

impl Rest {
    pub(super) fn requests(&self, whole: bool, idle: bool) {
        self.whole.store(whole, Ordering::Relaxed);
        self.requests_idle.store(idle, Ordering::Relaxed);
    }

    pub(super) fn replies(&self, owed_none: bool, quiet: bool) {
        self.replies_owed_none.store(owed_none, Ordering::Relaxed);
        self.replies_quiet.store(quiet, Ordering::Relaxed);
    }

    pub(super) fn leave_idle(&self, next: Reuse) {
        self.left_idle.store(true, Ordering::Relaxed);
        self.left_for.store(next as u8, Ordering::Relaxed);
    }

    pub(super) fn left_idle(&self) -> bool {
        self.left_idle.load(Ordering::Relaxed)
    }

    pub(super) fn left_for(&self) -> Reuse {
        match self.left_for.load(Ordering::Relaxed) {
            n if n == Reuse::AsItIs as u8 => Reuse::AsItIs,
            n if n == Reuse::AfterReset as u8 => Reuse::AfterReset,
            _ => Reuse::No,
        }
    }
}

impl Expectations {
    /// Every reply owed was relayed: what the client side pushed was taken and answered.
    fn replies_done(&self) -> bool {
        self.rest.replies_owed_none.load(Ordering::Relaxed) && self.lock().is_empty()
    }

    /// Nothing pending either way, nothing half-done, nothing arriving unasked.
    pub(super) fn idle(&self) -> bool {
        self.rest.requests_idle.load(Ordering::Relaxed)
            && self.rest.replies_quiet.load(Ordering::Relaxed)
            && self.replies_done()
    }
}

/// What the mover decided.
pub(super) enum Moved {
    /// End the session now, for this reason.
    Now(Close),
    /// Failover: stop reading the client; end once its replies are relayed.
    Halt,
}

/// Completes when the session must end because its target moved; never without `moves`.
pub(super) async fn moved(moves: &Moves, expectations: &Expectations) -> Moved {
    let policy = moves.discovery.policy;
    let mut choice = moves.choice.clone();
    let failover = loop {
        if choice.changed().await.is_err() {
            // Discovery is gone: the process is stopping; the drain decides.
            return std::future::pending().await;
        }
        let current = choice.borrow_and_update();
        let left = !current.preferred().contains(&&moves.target);
        if left && (current.failover || policy != MovePolicy::Never) {
            break current.failover;
        }
    };
    tracing::debug!(upstream = %moves.target, failover, "target moved: closing the session at an idle point");
    let grace = match policy {
        MovePolicy::AtIdle { grace } if !failover => grace,
        _ => Duration::ZERO,
    };
    let deadline = Instant::now() + grace;
    loop {
        if expectations.idle() {
            return Moved::Now(if failover {
                Close::FailedOver
            } else {
                Close::Moved
            });
        }
        if failover && expectations.rest.whole.load(Ordering::Relaxed) {
            return Moved::Halt;
        }
        if !failover && Instant::now() >= deadline {
            return Moved::Now(Close::MovedBusy);
        }
        tokio::time::sleep(LOOK).await;
    }
}

/// After a failover halted the client side: relays the replies still owed, within a limit.
pub(super) async fn finish<F>(
    replies: &mut F,
    expectations: &Expectations,
) -> Result<Close, RelayError>
where
    F: Future<Output = Result<Close, RelayError>> + Unpin,
{
    let owed = async {
        while !expectations.replies_done() {
            tokio::time::sleep(LOOK).await;
        }
    };
    tokio::select! {
        biased;
        r = replies => r,
        _ = owed => Ok(Close::FailedOver),
        _ = tokio::time::sleep(FAILOVER_REPLIES) => Ok(Close::FailedOver),
    }
}
