//! Where TLS sessions are kept so that new upstream connections resume instead of paying a
//! full handshake.
//!
//! rustls' own `ClientSessionMemoryCache` holds 8 TLS 1.3 tickets per server, and each ticket
//! resumes one connection (RFC 8446 4.6.1). Clients that open a connection per request (a
//! PHP-FPM pool, `redis-benchmark -k 0`) have dozens of upstream handshakes in flight at
//! once: the 8 tickets go to the first 8 and every other one does a full handshake, whose
//! signature the upstream (single-threaded Redis) computes on the thread that serves
//! commands. Measured with 50 such clients: 61% of connections were full handshakes.
//!
//! This store keeps up to [`TICKETS_PER_SERVER`] tickets, so as many handshakes as there
//! are tickets in flight can resume (every resumed connection brings a fresh ticket). Each
//! ticket is still used once. The newest is taken first: it is the least likely to have
//! expired, and the oldest fall out when the store is full.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, MutexGuard};

use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;
use rustls::NamedGroup;

/// Tickets kept per server: more than the connections a sidecar opens at once in practice.
/// A ticket holds a copy of the server's certificate chain, a few KiB, so a full store is
/// about 1 MiB. It only fills that far after that many handshakes were in flight at once:
/// a resumed connection takes one ticket and brings one, only full handshakes add more.
const TICKETS_PER_SERVER: usize = 256;

/// Server names remembered. There is one upstream name per configuration; the bound only
/// keeps a misbehaving caller from growing the map.
const SERVERS: usize = 16;

#[derive(Default)]
struct ServerData {
    kx_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    /// Oldest first.
    tls13: VecDeque<Tls13ClientSessionValue>,
}

/// A [`ClientSessionStore`] sized for bursts of new connections (see the module's comment).
#[derive(Default)]
pub struct SessionStore {
    servers: Mutex<HashMap<ServerName<'static>, ServerData>>,
}

impl SessionStore {
    fn lock(&self) -> MutexGuard<'_, HashMap<ServerName<'static>, ServerData>> {
        // The map holds no invariant a panicking holder could break halfway.
        self.servers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on `name`'s entry, making room for it first.
    fn with_server(&self, name: ServerName<'static>, f: impl FnOnce(&mut ServerData)) {
        let mut servers = self.lock();
        if !servers.contains_key(&name) && servers.len() >= SERVERS {
            servers.clear();
        }
        f(servers.entry(name).or_default());
    }
}

/// Says how much is held, never what: tickets carry resumption secrets.
impl fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers = self.lock();
        let tickets: usize = servers.values().map(|s| s.tls13.len()).sum();
        f.debug_struct("SessionStore")
            .field("servers", &servers.len())
            .field("tls13_tickets", &tickets)
            .finish()
    }
}

impl ClientSessionStore for SessionStore {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.with_server(name, |s| s.kx_hint = Some(group));
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.lock().get(name).and_then(|s| s.kx_hint)
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.with_server(name, |s| s.tls12 = Some(value));
    }

    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.lock().get(name).and_then(|s| s.tls12.clone())
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        if let Some(s) = self.lock().get_mut(name) {
            s.tls12 = None;
        }
    }

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.with_server(name, |s| {
            if s.tls13.len() == TICKETS_PER_SERVER {
                s.tls13.pop_front();
            }
            s.tls13.push_back(value);
        });
    }

    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.lock().get_mut(name).and_then(|s| s.tls13.pop_back())
    }
}
