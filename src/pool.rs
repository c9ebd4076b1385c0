//! Ready upstream connections (`upstream.pool_size`): connected, TLS done and authenticated
//! with the current credentials before a client asks, so that a new client pays no connect,
//! TLS or AUTH round trip. Made through [`upstream::open`], the one seam, and refilled in the
//! background as they are taken, at most `size` at a time. A ready connection is used only
//! while it is still good: made with the credentials in use, to a target discovery still
//! prefers, made less than [`MAX_READY_AGE`] ago (given back or not), and with no close or
//! stray byte waiting on its socket. The newest goes first (the warmest, and the least
//! likely to have been closed by the server), unless new connections go to several targets
//! in turn: then the oldest, so that those the filler made in rotation serve clients in
//! rotation too (newest first, with reuse, every client would get the connection the last
//! one gave back, always to the same backend). Off (0) by default: every ready connection
//! is an idle client of the server, on every pod.
//!
//! With `upstream.reuse`, a connection a client left clean comes back ([`Pool::give_back`]:
//! as it is when the client changed nothing on it, else after the session RESET it and
//! authenticated it again), within the same bound and under the same checks. New
//! connections are then made only when the pool runs dry (or at the periodic look): a take
//! that refilled at once would fill the room the client's connection comes back to, and
//! every client would still cost a connect.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Handshake, Upstream};
use crate::credentials::{CredentialStore, Credentials};
use crate::upstream::{self, Connected, Stream};

/// A connection made longer ago than this is not handed out, however often it was given back:
/// servers close idle clients (`timeout`), and what it was made to may have moved since (a
/// host name resolving elsewhere, a master demoted behind Sentinel's back). New clients
/// follow such a change within it.
const MAX_READY_AGE: Duration = Duration::from_secs(60);

/// No connection is handed to a client longer than this after the server last checked its
/// credentials (its handshake, or the AUTH after a RESET): a password revoked on the server
/// stops serving new clients within it. A connection a client left untouched goes back with
/// no new AUTH only within the first half of it, so that it has time left to wait.
pub const MAX_UNCHECKED: Duration = MAX_READY_AGE;

/// A ready connection to Sentinel's master is handed out only this long after `ROLE`
/// confirmed it (at the handshake, or after the RESET that readied it again): a master
/// demoted behind Sentinel's back serves no new client of the pool for longer. Without a
/// pool every new connection is confirmed.
const MAX_UNCONFIRMED: Duration = Duration::from_secs(5);

/// After a failed attempt, the pool waits this long before trying again, so an unreachable
/// upstream is not hammered; clients still connect on their own meanwhile.
const RETRY: Duration = Duration::from_secs(1);

struct Ready {
    connected: Connected,
    /// The credentials it authenticated with: compared by identity with the ones in use.
    credentials: Arc<Credentials>,
}

/// The ready connections; empty and idle when `size` is 0.
pub struct Pool {
    size: usize,
    /// `upstream.reuse`: connections come back, so a take does not refill at once.
    reuse: bool,
    ready: Mutex<VecDeque<Ready>>,
    /// `ambassador_upstream_pool_ready`, set wherever the count changes.
    gauge: Gauge,
    /// Woken when the filler has something to do: a connection was taken (with reuse: the
    /// last one) or found stale.
    wanted: Notify,
}

impl Pool {
    pub fn new(size: usize, reuse: bool, gauge: Gauge) -> Pool {
        Pool {
            size,
            reuse,
            ready: Mutex::new(VecDeque::with_capacity(size)),
            gauge,
            wanted: Notify::new(),
        }
    }

    /// Whether a connection given back now would be kept.
    pub fn has_room(&self) -> bool {
        self.lock().len() < self.size
    }

    /// Keeps `connected`, authenticated with `credentials` (made just now by the filler, RESET
    /// just now, or left untouched by its client), for the next client, if there is room;
    /// returns whether it was kept (else the caller closes it). Given-back connections may
    /// have filled the room while the filler was making one. The filler is not woken: it has
    /// nothing to do for this one.
    pub fn give_back(&self, connected: Connected, credentials: Arc<Credentials>) -> bool {
        let mut ready = self.lock();
        let room = ready.len() < self.size;
        if room {
            ready.push_back(Ready {
                connected,
                credentials,
            });
            self.gauge.set(ready.len() as i64);
        }
        room
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Ready>> {
        // Pushing or popping cannot leave the queue half-changed.
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ready connection made with `credentials` to a target `upstream`'s discovery still
    /// prefers; `None` (the caller connects itself) when there is none.
    pub fn take(&self, upstream: &Upstream, credentials: &Arc<Credentials>) -> Option<Connected> {
        if self.size == 0 {
            return None;
        }
        let preferred = upstream.discovery.preferred();
        let (found, wanted) = {
            let mut ready = self.lock();
            let before = ready.len();
            let mut found = None;
            // See the module's doc.
            let spread = upstream.discovery.spreads();
            while let Some(r) = if spread {
                ready.pop_front()
            } else {
                ready.pop_back()
            } {
                let good = Arc::ptr_eq(&r.credentials, credentials)
                    && preferred.contains(&r.connected.target)
                    && usable(&r)
                    && open(&r.connected.stream);
                if good {
                    found = Some(r.connected);
                    break;
                }
            }
            self.gauge.set(ready.len() as i64);
            // With reuse the pool refills only once dry: until then, nothing to wake for.
            let stale = before - ready.len() > usize::from(found.is_some());
            (found, !self.reuse || ready.is_empty() || stale)
        };
        if wanted {
            self.wanted.notify_one();
        }
        found
    }

    /// Keeps `size` connections ready until `stop`.
    pub async fn fill(
        &self,
        upstream: Upstream,
        credentials: CredentialStore,
        handshake: Handshake,
        stop: CancellationToken,
    ) {
        if self.size == 0 {
            return;
        }
        let mut making: JoinSet<(Arc<Credentials>, Result<Connected, String>)> = JoinSet::new();
        let mut rotated = credentials.subscribe();
        let mut moved = upstream.discovery.subscribe();
        let mut refill = true;
        loop {
            self.prune(&credentials.current());
            // With reuse, a pool run dry refills whatever woke it (a take, an age-out).
            let ready = self.lock().len();
            let missing = if refill || ready == 0 {
                self.size.saturating_sub(ready + making.len())
            } else {
                0
            };
            for _ in 0..missing {
                let (upstream, handshake) = (upstream.clone(), handshake.clone());
                let current = credentials.current();
                making.spawn(async move {
                    let made = upstream::open(&upstream, &current, &handshake)
                        .await
                        .map_err(|e| e.to_string());
                    (current, made)
                });
            }
            refill = tokio::select! {
                _ = stop.cancelled() => return,
                Some(done) = making.join_next() => match done {
                    Ok((made_with, Ok(connected))) => {
                        self.give_back(connected, made_with);
                        !self.reuse
                    }
                    Ok((_, Err(e))) => {
                        tracing::debug!(error = %e, "could not make a ready upstream connection");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(RETRY) => {}
                        }
                        true
                    }
                    Err(_) => true, // a panic, counted by the runtime's hook; try again
                },
                _ = self.wanted.notified() => !self.reuse,
                Ok(()) = rotated.changed() => true,
                Ok(()) = moved.changed() => true,
                _ = tokio::time::sleep(MAX_READY_AGE / 2) => true,
            };
        }
    }

    /// Drops what could no longer be used.
    fn prune(&self, current: &Arc<Credentials>) {
        let mut ready = self.lock();
        ready.retain(|r| Arc::ptr_eq(&r.credentials, current) && usable(r));
        self.gauge.set(ready.len() as i64);
    }
}

/// Not made too long ago, nor authenticated (and, for Sentinel's master, confirmed: `ROLE`
/// goes with every handshake and RESET) too long ago.
fn usable(r: &Ready) -> bool {
    let c = &r.connected;
    let checked = c.authenticated.elapsed();
    c.born.elapsed() < MAX_READY_AGE
        && checked < MAX_UNCHECKED
        && (!c.target.confirm_master || checked < MAX_UNCONFIRMED)
}

/// No close and no stray byte waiting: a peek that would block.
fn open(stream: &Stream) -> bool {
    let tcp = match stream {
        Stream::Plain(s) => s,
        Stream::Tls(s) => s.get_ref().0,
    };
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    matches!(
        socket2::SockRef::from(tcp).peek(&mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    /// A ready connection made `born` ago, authenticated `checked` ago.
    async fn ready(born: Duration, checked: Duration) -> Ready {
        ready_to(born, checked, false).await
    }

    /// The same, to Sentinel's master with `confirm_master`.
    async fn ready_to(born: Duration, checked: Duration, confirm_master: bool) -> Ready {
        let password = SecretString::from("p".to_owned());
        Ready {
            connected: Connected::on_loopback(born, checked, confirm_master).await,
            credentials: Arc::new(Credentials::new(None, password)),
        }
    }

    #[tokio::test]
    async fn no_connection_is_handed_out_a_minute_after_its_credentials_were_checked() {
        let second = Duration::from_secs(1);
        assert!(usable(&ready(second, second).await));
        let recently_back = ready(second, MAX_UNCHECKED + second).await;
        assert!(
            !usable(&recently_back),
            "given back lately, checked long ago"
        );
        assert!(
            !usable(&ready(MAX_READY_AGE + second, second).await),
            "made long ago, checked lately (RESET when given back)"
        );
    }

    #[tokio::test]
    async fn a_sentinel_master_is_handed_out_only_shortly_after_role_confirmed_it() {
        let second = Duration::from_secs(1);
        assert!(usable(&ready_to(second, second, true).await));
        let unconfirmed = ready_to(second, MAX_UNCONFIRMED + second, true).await;
        assert!(!usable(&unconfirmed));
        assert!(usable(&ready(second, MAX_UNCONFIRMED + second).await));
    }
}
