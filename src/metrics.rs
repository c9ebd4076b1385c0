//! What the process counts, in Prometheus/OpenMetrics text through prometheus-client.
//!
//! Every metric is an atomic behind an `Arc`: sessions update them without locks, `/metrics`
//! encodes a consistent-enough snapshot. Labels carry reasons and addresses, never payload.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// The process's metrics and readiness state.
pub struct Metrics {
    registry: Registry,
    pub clients_active: Gauge,
    pub clients_total: Counter,
    pub clients_refused: Family<Labels, Counter>,
    pub connect_failures: Family<Labels, Counter>,
    pub auth_failures: Counter,
    pub handshake_seconds: Histogram,
    pub bytes: Family<Labels, Counter>,
    pub credential_reloads: Family<Labels, Counter>,
    credential_loaded_at: AtomicI64,
    pub credential_age: Gauge<f64, AtomicU64>,
    credential_refreshes: Family<Labels, Counter>,
    /// Seconds until the credentials in use expire, from `credential_expires_at` at every
    /// render; absent while they have no expiry.
    credential_expiry: Family<Labels, Gauge<f64, AtomicU64>>,
    pub upstream_target: Family<Labels, Gauge>,
    pub session_reauth: Family<Labels, Counter>,
    pub tls_handshakes: Family<Labels, Counter>,
    pub dead_peers: Family<Labels, Counter>,
    target_changes: Counter,
    discovery_failures: Counter,
    backend_healthy: Family<Labels, Gauge>,
    sessions_moved: Family<Labels, Counter>,
    pool_ready: Gauge,
    pool_taken: Family<Labels, Counter>,
    pool_returned: Family<Labels, Counter>,
    sessions_closed: Family<Labels, Counter>,
    tls_reloads: Family<Labels, Counter>,
    /// `notAfter` of the TLS certificates in use (seconds since the epoch), by file; the
    /// gauge below is derived from it at every render.
    tls_not_after: Mutex<Vec<(&'static str, i64)>>,
    tls_expiry: Family<Labels, Gauge>,
    /// Tasks that panicked (see [`crate::task`]); anything but 0 is a bug.
    pub task_panics: Counter,
    health: Health,
}

/// What `/readyz` answers from.
struct Health {
    started: Instant,
    /// Milliseconds since `started` of the last upstream handshake that succeeded; 0 = never.
    last_ok_ms: AtomicU64,
    draining: AtomicBool,
    /// Why the upstream is not the one the profile expects, if it is not.
    mismatch: Mutex<Option<String>>,
    /// When the credentials in use expire, if they do.
    credential_expires_at: Mutex<Option<SystemTime>>,
    /// The source of the credentials that expire (`exec`, `aws-iam`), for the label.
    credential_source: Mutex<&'static str>,
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ambassador");
        let m = Metrics {
            clients_active: Gauge::default(),
            clients_total: Counter::default(),
            clients_refused: Family::default(),
            connect_failures: Family::default(),
            auth_failures: Counter::default(),
            // 100 µs .. ~3.3 s
            handshake_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            bytes: Family::default(),
            credential_reloads: Family::default(),
            credential_loaded_at: AtomicI64::new(now_secs()),
            credential_age: Gauge::default(),
            credential_refreshes: Family::default(),
            credential_expiry: Family::default(),
            upstream_target: Family::default(),
            session_reauth: Family::default(),
            tls_handshakes: Family::default(),
            dead_peers: Family::default(),
            target_changes: Counter::default(),
            discovery_failures: Counter::default(),
            backend_healthy: Family::default(),
            sessions_moved: Family::default(),
            pool_ready: Gauge::default(),
            pool_taken: Family::default(),
            pool_returned: Family::default(),
            sessions_closed: Family::default(),
            tls_reloads: Family::default(),
            tls_not_after: Mutex::new(Vec::new()),
            tls_expiry: Family::default(),
            task_panics: Counter::default(),
            health: Health {
                started: Instant::now(),
                last_ok_ms: AtomicU64::new(0),
                draining: AtomicBool::new(false),
                mismatch: Mutex::new(None),
                credential_expires_at: Mutex::new(None),
                credential_source: Mutex::new("exec"),
            },
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "task_panics",
            "Tasks (sessions, probe, reloader, admin) that panicked: a bug",
            m.task_panics.clone(),
        );
        r.register(
            "clients_active",
            "Client connections open now",
            m.clients_active.clone(),
        );
        r.register(
            "clients",
            "Client connections accepted",
            m.clients_total.clone(),
        );
        r.register(
            "clients_refused",
            "Client connections refused, by reason",
            m.clients_refused.clone(),
        );
        r.register(
            "upstream_connect_failures",
            "Upstream connections that failed before the handshake, by reason",
            m.connect_failures.clone(),
        );
        r.register(
            "upstream_auth_failures",
            "Upstream handshakes whose AUTH was refused",
            m.auth_failures.clone(),
        );
        r.register(
            "upstream_handshake_seconds",
            "Time from accepting a client to an authenticated upstream connection",
            m.handshake_seconds.clone(),
        );
        r.register(
            "relayed_bytes",
            "Bytes relayed, by direction",
            m.bytes.clone(),
        );
        r.register(
            "credential_reloads",
            "Credential file reloads, by result",
            m.credential_reloads.clone(),
        );
        r.register(
            "credential_age_seconds",
            "Seconds since the credentials in use were loaded",
            m.credential_age.clone(),
        );
        r.register(
            "credential_refreshes",
            "Runs of the credential source (credentials.source = \"exec\"), by source and result (ok or failed)",
            m.credential_refreshes.clone(),
        );
        r.register(
            "credential_expiry_seconds",
            "Seconds until the credentials in use expire (negative: expired), by source; absent when they do not",
            m.credential_expiry.clone(),
        );
        r.register(
            "upstream_target",
            "The upstream new connections go to (value 1)",
            m.upstream_target.clone(),
        );
        r.register(
            "session_reauth",
            "Open sessions re-authenticated after a credential change, by result",
            m.session_reauth.clone(),
        );
        r.register(
            "upstream_tls_handshakes",
            "TLS handshakes of client sessions' upstream connections, by kind (full or resumed)",
            m.tls_handshakes.clone(),
        );
        r.register(
            "dead_peers",
            "Sessions closed because a peer vanished without a word (keepalive or TCP_USER_TIMEOUT), by side",
            m.dead_peers.clone(),
        );
        r.register(
            "upstream_target_changes",
            "Changes of the upstream target(s) new connections go to (SRV answer, Sentinel failover, backend health)",
            m.target_changes.clone(),
        );
        r.register(
            "discovery_failures",
            "Failed lookups (SRV, Sentinel); the last good answer stays in use",
            m.discovery_failures.clone(),
        );
        r.register(
            "backend_healthy",
            "Whether each backend of upstream.addresses passed its last health check (1) or not (0)",
            m.backend_healthy.clone(),
        );
        r.register(
            "upstream_pool_ready",
            "Upstream connections ready for new clients (upstream.pool_size)",
            m.pool_ready.clone(),
        );
        r.register(
            "upstream_pool_taken",
            "New sessions by where their upstream connection came from: ready (the pool) or none (made for the client)",
            m.pool_taken.clone(),
        );
        r.register(
            "upstream_pool_returned",
            "Sessions ended with upstream.reuse, by what became of their upstream connection: untouched (back in the pool as it was: nothing the client sent changed it), reused (RESET, authenticated again and back in the pool), dirty (not left in a state RESET cleans), failed (the RESET or handshake went wrong), full (no room in the pool)",
            m.pool_returned.clone(),
        );
        r.register(
            "sessions_moved",
            "Open sessions closed because their upstream is no longer the target, by how (idle, grace, failover, readonly)",
            m.sessions_moved.clone(),
        );
        r.register(
            "sessions_closed",
            "Relayed sessions that ended, by the reason of their closing log line",
            m.sessions_closed.clone(),
        );
        r.register(
            "upstream_tls_reloads",
            "Reloads of the TLS files after they changed, by result (applied or invalid)",
            m.tls_reloads.clone(),
        );
        r.register(
            "upstream_tls_certificate_expiry_seconds",
            "Seconds until the earliest notAfter of the certificates in use, by file (ca_file, client_cert_file)",
            m.tls_expiry.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let loaded = self.credential_loaded_at.load(Ordering::Relaxed);
        self.credential_age.set((now_secs() - loaded).max(0) as f64);
        if let Some(at) = self.credential_expires_at() {
            let left = match at.duration_since(SystemTime::now()) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            let source = *self
                .health
                .credential_source
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.credential_expiry
                .get_or_create(&labels(&[("source", source)]))
                .set(left);
        }
        for (file, not_after) in self
            .tls_not_after
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            self.tls_expiry
                .get_or_create(&labels(&[("file", file)]))
                .set(not_after - now_secs());
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    pub fn connect_failed(&self, reason: &str) {
        self.connect_failures
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    pub fn refused(&self, reason: &str) {
        self.clients_refused
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    pub fn relayed(&self, from_client: u64, to_client: u64) {
        self.bytes
            .get_or_create(&labels(&[("direction", "client_to_upstream")]))
            .inc_by(from_client);
        self.bytes
            .get_or_create(&labels(&[("direction", "upstream_to_client")]))
            .inc_by(to_client);
    }

    pub fn reloaded(&self, result: &str) {
        self.credential_reloads
            .get_or_create(&labels(&[("result", result)]))
            .inc();
        if result == "applied" {
            self.credential_loaded_at
                .store(now_secs(), Ordering::Relaxed);
        }
    }

    /// A run of the credential `source` gave credentials now in use (`ok`), or did not.
    pub fn credential_refreshed(&self, source: &str, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.credential_refreshes
            .get_or_create(&labels(&[("source", source), ("result", result)]))
            .inc();
        if ok {
            self.credential_loaded_at
                .store(now_secs(), Ordering::Relaxed);
        }
    }

    /// The credentials now in use, from `source`, expire at `at` (`None`: never).
    pub fn set_credential_expiry(&self, source: &'static str, at: Option<SystemTime>) {
        *self
            .health
            .credential_source
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = source;
        *self
            .health
            .credential_expires_at
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = at;
    }

    fn credential_expires_at(&self) -> Option<SystemTime> {
        *self
            .health
            .credential_expires_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn reauth(&self, result: &str) {
        self.session_reauth
            .get_or_create(&labels(&[("result", result)]))
            .inc();
    }

    pub fn tls_handshake(&self, resumed: bool) {
        let kind = if resumed { "resumed" } else { "full" };
        self.tls_handshakes
            .get_or_create(&labels(&[("kind", kind)]))
            .inc();
    }

    /// A session ended because its `side` ("upstream" or "client") stopped answering.
    pub fn dead_peer(&self, side: &str) {
        self.dead_peers
            .get_or_create(&labels(&[("side", side)]))
            .inc();
    }

    pub fn session_closed(&self, reason: &str) {
        self.sessions_closed
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    pub fn tls_reloaded(&self, result: &str) {
        self.tls_reloads
            .get_or_create(&labels(&[("result", result)]))
            .inc();
    }

    /// The TLS certificates now in use expire at these times (seconds since the epoch).
    pub fn set_tls_expiry(&self, not_after: &[(&'static str, i64)]) {
        *self.tls_not_after.lock().unwrap_or_else(|e| e.into_inner()) = not_after.to_vec();
    }

    /// The targets new connections go to now.
    pub fn set_targets<T: std::fmt::Display>(&self, targets: &[T]) {
        self.upstream_target.clear();
        for target in targets {
            self.upstream_target
                .get_or_create(&labels(&[("address", &target.to_string())]))
                .set(1);
        }
    }

    /// Discovery changed the targets new connections go to.
    pub fn target_changed<T: std::fmt::Display>(&self, targets: &[T]) {
        self.target_changes.inc();
        self.set_targets(targets);
    }

    pub fn discovery_failed(&self) {
        self.discovery_failures.inc();
    }

    pub fn set_backend_health(&self, address: &str, healthy: bool) {
        self.backend_healthy
            .get_or_create(&labels(&[("address", address)]))
            .set(i64::from(healthy));
    }

    /// `ambassador_upstream_pool_ready`, for the pool to set as its count changes.
    pub fn pool_ready(&self) -> Gauge {
        self.pool_ready.clone()
    }

    /// A new session found a ready connection (`"ready"`) or none (`"none"`).
    pub fn pool_taken(&self, from: &str) {
        self.pool_taken
            .get_or_create(&labels(&[("from", from)]))
            .inc();
    }

    /// A session ended with `upstream.reuse`: its connection was `"reused"`, or not
    /// (`"dirty"`, `"failed"`, `"full"`).
    pub fn pool_returned(&self, result: &str) {
        self.pool_returned
            .get_or_create(&labels(&[("result", result)]))
            .inc();
    }

    /// An open session was closed because its upstream is no longer the target.
    pub fn session_moved(&self, how: &str) {
        self.sessions_moved
            .get_or_create(&labels(&[("how", how)]))
            .inc();
    }

    /// An upstream handshake succeeded just now.
    pub fn upstream_ok(&self) {
        let ms = self.health.started.elapsed().as_millis() as u64;
        self.health.last_ok_ms.store(ms.max(1), Ordering::Relaxed);
    }

    pub fn set_draining(&self) {
        self.health.draining.store(true, Ordering::Relaxed);
    }

    pub fn set_mismatch(&self, why: Option<String>) {
        *self
            .health
            .mismatch
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Why the upstream does not match the profile's expectations, if it does not.
    pub fn mismatch(&self) -> Option<String> {
        self.health
            .mismatch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ready: not draining, the upstream matches the profile, the credentials have not
    /// expired, and it was reached and authenticated within `window`. `Err` says why not.
    pub fn ready(&self, window: Duration) -> Result<(), String> {
        if self.health.draining.load(Ordering::Relaxed) {
            return Err("draining".into());
        }
        if let Some(why) = self.mismatch() {
            return Err(why);
        }
        if let Some(at) = self.credential_expires_at() {
            if at <= SystemTime::now() {
                let at = crate::credentials::exec::format_time(at);
                return Err(format!(
                    "credentials expired at {at} and no refresh succeeded"
                ));
            }
        }
        let last = self.health.last_ok_ms.load(Ordering::Relaxed);
        let now = self.health.started.elapsed().as_millis() as u64;
        if last == 0 {
            return Err("upstream not reached yet".into());
        }
        let age = Duration::from_millis(now.saturating_sub(last));
        if age > window {
            return Err(format!("upstream last reached {age:?} ago"));
        }
        Ok(())
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
