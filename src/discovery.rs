//! Where the upstream is: discovery publishes a [`Choice`] of [`Target`]s (an address plus
//! the name TLS verifies), and [`crate::upstream::establish`] turns a target and the current
//! credentials into an authenticated connection, for sessions, the probe and `--check` alike.
//!
//! The kinds ([`Source`]): the static `upstream.address`, whose host is resolved again for
//! every new connection; a DNS SRV record ([`srv`]); the master Sentinel announces
//! ([`sentinel`]); several backends under active health checks ([`backends`]). The kinds
//! that change run a task ([`Discovery::run`]) that publishes each new choice on a `watch`;
//! sessions pick from the current one, and an open session whose target left it is moved
//! (closed at an idle point, [`crate::relay`]).

pub mod backends;
pub mod sentinel;
pub mod srv;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{Handshake, HostPort, Upstream};
use crate::credentials::CredentialStore;
use crate::metrics::Metrics;

/// One upstream to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// A host name (resolved for every connection) or an IP address, and a port.
    pub address: HostPort,
    /// The name TLS verifies when `upstream.tls.server_name` does not say: the target's own
    /// host name (an SRV or Sentinel target's). `None`: the name derived at start from
    /// `upstream.address`.
    pub tls_name: Option<String>,
    /// Sentinel's master: `ROLE` must confirm it after the handshake (a restarted old master
    /// can briefly call itself master).
    pub confirm_master: bool,
}

impl Target {
    /// `upstream.address`: TLS verifies the name derived from it at start, so nothing is
    /// parsed again per connection.
    pub fn at(address: HostPort) -> Target {
        Target {
            address,
            tls_name: None,
            confirm_master: false,
        }
    }

    /// A target found by discovery, which names itself for TLS.
    pub fn named(address: HostPort) -> Target {
        let tls_name = address.host.trim_end_matches('.').to_owned();
        Target {
            address,
            tls_name: Some(tls_name),
            confirm_master: false,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.address.fmt(f)
    }
}

/// One target of a choice and how it ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub target: Target,
    /// Lower is preferred (SRV priority; a backend's place in the failover order).
    pub priority: u16,
    /// Within one priority, the share of connections (SRV weight).
    pub weight: u16,
    /// The last health check passed (always, for kinds without health checks).
    pub healthy: bool,
}

impl Candidate {
    pub fn new(target: Target, priority: u16, weight: u16) -> Candidate {
        Candidate {
            target,
            priority,
            weight,
            healthy: true,
        }
    }
}

/// What discovery found last.
#[derive(Debug, Clone, Default)]
pub struct Choice {
    pub candidates: Vec<Candidate>,
    /// The last change was a failover: sessions elsewhere stop forwarding at once.
    pub failover: bool,
    /// Why there is no answer, while none was ever had.
    pub error: Option<String>,
}

impl Choice {
    fn of(candidates: Vec<Candidate>) -> Choice {
        Choice {
            candidates,
            ..Choice::default()
        }
    }

    /// The targets new connections prefer: the best priority among the healthy ones (among
    /// all, when none is healthy).
    pub fn preferred(&self) -> Vec<&Target> {
        let healthy = self.candidates.iter().any(|c| c.healthy);
        let usable = || {
            self.candidates
                .iter()
                .filter(move |c| c.healthy || !healthy)
        };
        let best = usable().map(|c| c.priority).min();
        usable()
            .filter(|c| Some(c.priority) == best)
            .map(|c| &c.target)
            .collect()
    }

    fn describe(&self) -> String {
        let preferred: Vec<String> = self.preferred().iter().map(|t| t.to_string()).collect();
        preferred.join(",")
    }
}

/// How candidates of one priority are ordered for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// As listed (`strategy = "failover"`, one target kinds).
    Listed,
    /// Each connection starts one further (`strategy = "round-robin"`).
    Rotate,
    /// RFC 2782's weighted random order (SRV).
    Weighted,
}

/// Where the upstream is, as the profile says.
#[derive(Debug)]
pub enum Source {
    Address(HostPort),
    Srv(srv::Srv),
    /// Boxed: the largest kind, and one profile in many uses it.
    Sentinel(Box<sentinel::Sentinel>),
    Backends(backends::Backends),
}

/// What `upstream.move_open_sessions` says about open sessions when the target changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MovePolicy {
    /// Closed at the next idle point, or at the end of `grace`.
    AtIdle { grace: Duration },
    /// Left where they are (a failover still moves them).
    Never,
}

/// The current choice of targets, and the task that keeps it current.
pub struct Discovery {
    pub source: Source,
    pub policy: MovePolicy,
    choice: watch::Sender<Choice>,
    /// Woken to look again at once (a `-READONLY` from the master, a vanished upstream).
    recheck: Notify,
    rotation: AtomicUsize,
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("source", &self.source)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::Address(a) => a.fmt(f),
            Source::Srv(s) => write!(f, "SRV {}", s.name),
            Source::Sentinel(s) => write!(f, "Sentinel master {:?}", s.master),
            Source::Backends(b) => {
                let all: Vec<String> = b.addresses.iter().map(|a| a.to_string()).collect();
                write!(f, "{} ({})", all.join(","), b.strategy)
            }
        }
    }
}

impl Discovery {
    pub fn new(source: Source, policy: MovePolicy) -> Discovery {
        let initial = match &source {
            Source::Address(a) => Choice::of(vec![Candidate::new(Target::at(a.clone()), 0, 0)]),
            Source::Backends(b) => b.initial(),
            Source::Srv(_) | Source::Sentinel(_) => Choice::default(),
        };
        Discovery {
            source,
            policy,
            choice: watch::Sender::new(initial),
            recheck: Notify::new(),
            rotation: AtomicUsize::new(0),
        }
    }

    /// The static kind: one address, never moving.
    pub fn fixed(address: HostPort) -> Discovery {
        Discovery::new(Source::Address(address), MovePolicy::Never)
    }

    pub fn is_sentinel(&self) -> bool {
        matches!(self.source, Source::Sentinel(_))
    }

    /// Whether the target can change while a session is open (not for a static address).
    pub fn moves(&self) -> bool {
        !matches!(self.source, Source::Address(_))
    }

    /// The current choice, marked seen: a session's watch for moves.
    pub fn subscribe(&self) -> watch::Receiver<Choice> {
        let mut choice = self.choice.subscribe();
        choice.mark_unchanged();
        choice
    }

    /// The targets new connections prefer now.
    pub fn preferred(&self) -> Vec<Target> {
        self.choice
            .borrow()
            .preferred()
            .into_iter()
            .cloned()
            .collect()
    }

    /// Whether new connections go to several targets in turn (round-robin backends, SRV's
    /// weights) rather than to the first that answers.
    pub fn spreads(&self) -> bool {
        match &self.source {
            Source::Srv(_) => true,
            Source::Backends(b) => b.strategy.order() == Order::Rotate,
            _ => false,
        }
    }

    /// Look again now, not at the next TTL or poll.
    pub fn recheck(&self) {
        self.recheck.notify_one();
    }

    /// The targets to try for a new connection, best first. Before any answer (at start,
    /// `--check`) discovery looks once itself.
    pub async fn candidates(&self, resolver: &Resolver) -> Result<Vec<Target>, String> {
        if self.choice.borrow().candidates.is_empty() {
            self.look(resolver).await;
        }
        let choice = self.choice.borrow().clone();
        if choice.candidates.is_empty() {
            return Err(choice
                .error
                .unwrap_or_else(|| "discovery found no target".to_owned()));
        }
        Ok(self.order(choice))
    }

    fn order(&self, choice: Choice) -> Vec<Target> {
        let any_healthy = choice.candidates.iter().any(|c| c.healthy);
        let mut usable: Vec<Candidate> = choice
            .candidates
            .into_iter()
            .filter(|c| c.healthy || !any_healthy)
            .collect();
        usable.sort_by_key(|c| c.priority);
        let order = match &self.source {
            Source::Srv(_) => Order::Weighted,
            Source::Backends(b) => b.strategy.order(),
            _ => Order::Listed,
        };
        let mut ordered = Vec::with_capacity(usable.len());
        for group in usable.chunk_by(|a, b| a.priority == b.priority) {
            let mut group = group.to_vec();
            match order {
                Order::Listed => {}
                Order::Rotate => {
                    let turn = self.rotation.fetch_add(1, Ordering::Relaxed);
                    let len = group.len();
                    group.rotate_left(turn % len);
                }
                Order::Weighted => group = srv::weighted_order(group),
            }
            ordered.extend(group.into_iter().map(|c| c.target));
        }
        ordered
    }

    /// One lookup, published. For the kinds that never change, nothing to do.
    async fn look(&self, resolver: &Resolver) {
        let found = match &self.source {
            Source::Srv(s) => s.lookup(resolver).await.map(|(c, _)| Choice::of(c)),
            Source::Sentinel(s) => s.ask_master().await.map(|t| Choice {
                candidates: vec![Candidate::new(t, 0, 0)],
                failover: false,
                error: None,
            }),
            Source::Address(_) | Source::Backends(_) => return,
        };
        match found {
            Ok(choice) => self.publish(choice, None),
            Err(e) => self.failed(e, None),
        }
    }

    /// Keeps the choice current until `stop`: SRV by its TTL, Sentinel by `+switch-master`
    /// and polling, backends by health checks.
    pub async fn run(
        self: Arc<Self>,
        upstream: Upstream,
        credentials: CredentialStore,
        handshake: Handshake,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        metrics.set_targets(&self.choice.borrow().preferred());
        match &self.source {
            Source::Address(_) => {}
            Source::Srv(s) => s.follow(&self, &upstream.resolver, &metrics, &stop).await,
            Source::Sentinel(s) => s.follow(&self, &metrics, &stop).await,
            Source::Backends(b) => {
                b.check(&self, &upstream, &credentials, &handshake, &metrics, &stop)
                    .await
            }
        }
    }

    /// Waits for a recheck request, `limit`, or `stop`; false on `stop`.
    async fn wait(&self, limit: Duration, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = self.recheck.notified() => true,
            _ = tokio::time::sleep(limit) => true,
        }
    }

    /// Publishes what a lookup found; a change of the preferred targets is logged and counted.
    fn publish(&self, choice: Choice, metrics: Option<&Metrics>) {
        let before = self.choice.borrow().describe();
        let after = choice.describe();
        let changed = before != after;
        let candidates_changed = self.choice.borrow().candidates != choice.candidates;
        if changed {
            tracing::info!(from = %before, to = %after, failover = choice.failover, "upstream target changed");
            if let Some(m) = metrics {
                m.target_changed(&choice.preferred());
            }
        }
        if changed || candidates_changed {
            // Sessions wake on every send and decide by the preferred targets themselves.
            self.choice.send_replace(choice);
        }
    }

    /// A lookup failed: the last good answer stays; with none, the error is what clients get.
    fn failed(&self, error: String, metrics: Option<&Metrics>) {
        let had = !self.choice.borrow().candidates.is_empty();
        if let Some(m) = metrics {
            m.discovery_failed();
        }
        if had {
            tracing::warn!(error = %error, "discovery failed; keeping the last good answer");
        } else {
            tracing::warn!(error = %error, "discovery failed; no upstream known yet");
            self.choice.send_modify(|c| c.error = Some(error));
        }
    }
}

/// Resolves host names: the system's resolver, or the DNS server the profile names.
#[derive(Clone, Default)]
pub enum Resolver {
    #[default]
    System,
    Server {
        address: SocketAddr,
        /// Boxed: the resolver is large and most profiles use the system's.
        resolver: Box<TokioResolver>,
    },
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resolver::System => f.write_str("system"),
            Resolver::Server { address, .. } => write!(f, "dns server {address}"),
        }
    }
}

impl Resolver {
    /// A resolver that asks only `server` (UDP, then TCP for truncated answers).
    pub fn server(server: SocketAddr) -> io::Result<Resolver> {
        let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
        for connection in &mut name_server.connections {
            connection.port = server.port();
        }
        let config = ResolverConfig::from_name_servers(vec![name_server]);
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .build()
            .map_err(io::Error::other)?;
        Ok(Resolver::Server {
            address: server,
            resolver: Box::new(resolver),
        })
    }

    /// The hickory resolver for record types the system's `getaddrinfo` cannot ask (SRV):
    /// the profile's server, or one configured from `/etc/resolv.conf`.
    fn dns(&self) -> Result<TokioResolver, String> {
        match self {
            Resolver::Server { resolver, .. } => Ok((**resolver).clone()),
            Resolver::System => TokioResolver::builder_tokio()
                .and_then(|b| b.build())
                .map_err(|e| format!("system DNS configuration: {e}")),
        }
    }

    /// The addresses of `target`, in the resolver's order. An IP address is its own answer.
    pub async fn resolve(&self, target: &HostPort) -> Result<Vec<SocketAddr>, String> {
        if let Ok(ip) = target.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, target.port)]);
        }
        match self {
            Resolver::System => tokio::net::lookup_host((target.host.as_str(), target.port))
                .await
                .map(Iterator::collect)
                .map_err(|e| system_reason(&e)),
            Resolver::Server { resolver, .. } => resolver
                .lookup_ip(fqdn(&target.host).as_str())
                .await
                .map(|found| {
                    found
                        .iter()
                        .map(|ip| SocketAddr::new(ip, target.port))
                        .collect()
                })
                .map_err(|e| e.to_string()),
        }
    }
}

/// A trailing dot: the name as written, never completed by a search domain.
fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

/// The system resolver's own words ("Name or service not known").
fn system_reason(e: &io::Error) -> String {
    let text = e.to_string();
    text.strip_prefix("failed to lookup address information: ")
        .unwrap_or(&text)
        .to_owned()
}
