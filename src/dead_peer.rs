//! Noticing a peer that vanished without a word (failover, a replaced node, a partition): no
//! FIN, no RST, so a socket with nothing to send waits forever, and one with a reply pending
//! retransmits for about 15 minutes (`tcp_retries2`).
//!
//! Two kernel mechanisms, set per socket:
//! - TCP keepalive: a connection quiet for `keepalive` is probed, then every `keepalive`.
//! - `TCP_USER_TIMEOUT` (upstream only): data unacknowledged for that long closes the
//!   connection; and with keepalive on, so does hearing nothing for that long once a probe went
//!   unanswered. Linux then ignores the probe count.
//!
//! Neither cuts a healthy connection that is merely quiet (a `BLPOP ... 0`): its request was
//! acknowledged, so nothing is outstanding, and the peer's kernel answers the probes. Clients
//! get no user timeout: one that reads slowly (its window closed) must not be cut.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// Unanswered probes that close a connection without a user timeout (`TCP_KEEPCNT`).
pub const KEEPALIVE_PROBES: u32 = 3;

/// How one side's sockets notice a vanished peer. `None` leaves the system default (off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeadPeer {
    /// `TCP_USER_TIMEOUT`.
    pub user_timeout: Option<Duration>,
    /// Probe a quiet connection after this long, then this often. Whole seconds: that is the
    /// kernel's unit (validation refuses fractions).
    pub keepalive: Option<Duration>,
}

impl DeadPeer {
    /// The upstream's settings (zero is off for both). Keepalive defaults to a third of the
    /// dead-peer timeout in whole seconds (at least 1 s), so that an idle connection is probed
    /// twice before the timeout and found dead within it plus one interval. Without a timeout,
    /// probes still run (every 5 s by default) and [`KEEPALIVE_PROBES`] unanswered ones close
    /// the connection.
    pub fn upstream(dead_peer_timeout: Duration, keepalive: Option<Duration>) -> DeadPeer {
        let user_timeout = nonzero(dead_peer_timeout);
        let derived = user_timeout.map_or(Duration::from_secs(5), |d| {
            Duration::from_secs((d.as_secs() / 3).max(1))
        });
        DeadPeer {
            user_timeout,
            keepalive: nonzero(keepalive.unwrap_or(derived)),
        }
    }

    /// The clients' settings: keepalive only.
    pub fn client(keepalive: Duration) -> DeadPeer {
        DeadPeer {
            user_timeout: None,
            keepalive: nonzero(keepalive),
        }
    }

    /// Sets the options on a connected TCP socket.
    pub fn apply<'s>(&self, socket: impl Into<SockRef<'s>>) -> io::Result<()> {
        let socket = socket.into();
        if let Some(every) = self.keepalive {
            socket.set_tcp_keepalive(
                &TcpKeepalive::new()
                    .with_time(every)
                    .with_interval(every)
                    .with_retries(KEEPALIVE_PROBES),
            )?;
        }
        // TCP_USER_TIMEOUT is Linux's (the sidecar's platform); elsewhere keepalive alone.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if self.user_timeout.is_some() {
            socket.set_tcp_user_timeout(self.user_timeout)?;
        }
        Ok(())
    }
}

/// Zero means off.
fn nonzero(d: Duration) -> Option<Duration> {
    Some(d).filter(|d| !d.is_zero())
}

/// Whether an error on an established connection means the kernel gave up on a silent peer:
/// `ETIMEDOUT`, or the ICMP unreachable it heard while retrying. A reset is the peer speaking,
/// not vanishing.
pub fn vanished(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn upstream_keepalive_follows_the_timeout_unless_set() {
        let default = DeadPeer::upstream(S(15), None);
        assert_eq!(default.user_timeout, Some(S(15)));
        assert_eq!(default.keepalive, Some(S(5)));
        assert_eq!(DeadPeer::upstream(S(2), None).keepalive, Some(S(1)));
        assert_eq!(DeadPeer::upstream(S(10), None).keepalive, Some(S(3)));
        assert_eq!(DeadPeer::upstream(S(15), Some(S(2))).keepalive, Some(S(2)));
        assert_eq!(DeadPeer::upstream(S(15), Some(S(0))).keepalive, None);
    }

    #[test]
    fn a_zero_timeout_is_off_and_keepalive_still_runs() {
        let off = DeadPeer::upstream(S(0), None);
        assert_eq!(off.user_timeout, None);
        assert_eq!(off.keepalive, Some(S(5)));
        assert_eq!(DeadPeer::upstream(S(0), Some(S(0))), DeadPeer::default());
    }

    #[test]
    fn only_a_silent_peer_counts_as_vanished() {
        assert!(vanished(&io::Error::from_raw_os_error(110))); // ETIMEDOUT
        assert!(vanished(&io::Error::from_raw_os_error(113))); // EHOSTUNREACH
        assert!(!vanished(&io::Error::from(io::ErrorKind::ConnectionReset)));
        assert!(!vanished(&io::Error::from(io::ErrorKind::BrokenPipe)));
    }
}
