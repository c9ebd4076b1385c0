//! Real Redis Sentinel: a master, one replica and three sentinels (quorum 2) on ephemeral
//! loopback ports, every process killed on drop by PID. Everything waits on what the
//! sentinels and servers answer, within a deadline; nothing sleeps to let them settle.
//!
//! Sentinel's own clocks set the pace (sentinel.c, Redis 7.0): hello messages every 2 s (how
//! sentinels find each other), INFO to each instance every 10 s (1 s during a failover). A
//! former master still reporting itself master is made a replica once it has done so for 8 s
//! (`SENTINEL_PUBLISH_PERIOD * 4`), which the next INFO notices: about 10 s after a failover.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis_protocol::resp3::types::OwnedFrame;

use super::*;

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "mymaster";
/// The limit on the set settling at start, and on a failover completing.
pub const SENTINEL_DEADLINE: Duration = Duration::from_secs(20);
/// An instance silent this long is subjectively down. 2 s, not 1: parallel debug-build tests
/// can starve a process for a second, and a spurious failover would break an unrelated test.
const DOWN_AFTER_MS: u32 = 2000;
/// Also how long a sentinel waits before retrying a failover it lost (twice this).
const FAILOVER_TIMEOUT_MS: u32 = 5000;
/// The interval between two polls of a condition; not synchronisation.
const POLL: Duration = Duration::from_millis(50);

/// A master, its replica and three sentinels monitoring them as [`MASTER_NAME`].
pub struct SentinelSet {
    // Declared first so they drop first: no sentinel reconfigures a server being stopped.
    sentinels: Vec<Sentinel>,
    /// The data servers; `None` once killed.
    servers: Vec<Option<RedisServer>>,
    auth: ServerAuth,
    sentinel_password: Option<String>,
    master_addr: String,
    replica_addr: String,
}

impl SentinelSet {
    /// Starts the set, ready for a failover: the replica in sync, and every sentinel seeing the
    /// master, a healthy replica and the two other sentinels. `sentinel_password` is the
    /// sentinels' `requirepass` (they also use it with each other); the data servers take
    /// `auth`, and the replica and a demoted master replicate with it too.
    pub async fn start(auth: ServerAuth, sentinel_password: Option<&str>) -> SentinelSet {
        let replication = replication_args(&auth);
        let mut master_args: Vec<&str> = replication.iter().map(String::as_str).collect();
        let master = RedisServer::start_with(auth.clone(), &master_args);
        let port = master.port.to_string();
        master_args.extend(["--replicaof", "127.0.0.1", &port]);
        let replica = RedisServer::start_with(auth.clone(), &master_args);
        let (master_addr, replica_addr) = (master.addr(), replica.addr());
        // A sentinel reads a replica's link state from INFO every 10 s only: start them once
        // the link is up, or the first reading may say "down" for 10 s.
        let deadline = Instant::now() + SENTINEL_DEADLINE;
        wait_replica_link(&auth, &replica_addr, &master_addr, deadline).await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(Sentinel::start(master.port, &auth, sentinel_password).await);
        }
        let set = SentinelSet {
            sentinels,
            servers: vec![Some(master), Some(replica)],
            auth,
            sentinel_password: sentinel_password.map(str::to_owned),
            master_addr,
            replica_addr,
        };
        set.wait_settled(deadline).await;
        set
    }

    /// `127.0.0.1:port` of each sentinel.
    pub fn sentinel_addresses(&self) -> Vec<String> {
        self.sentinels.iter().map(Sentinel::addr).collect()
    }

    pub fn master_name(&self) -> &str {
        MASTER_NAME
    }

    /// The sentinels' `requirepass`, if any.
    pub fn sentinel_password(&self) -> Option<&str> {
        self.sentinel_password.as_deref()
    }

    /// How the data servers authenticate clients.
    pub fn auth(&self) -> &ServerAuth {
        &self.auth
    }

    /// The server started as master (whatever it is now).
    pub fn master_addr(&self) -> &str {
        &self.master_addr
    }

    /// The server started as replica (whatever it is now).
    pub fn replica_addr(&self) -> &str {
        &self.replica_addr
    }

    /// The data server at `addr`, unless it was killed.
    pub fn server(&self, addr: &str) -> Option<&RedisServer> {
        self.servers.iter().flatten().find(|s| s.addr() == addr)
    }

    /// The master's address as the first sentinel gives it.
    pub async fn current_master(&self) -> String {
        let sentinel = &self.sentinels[0];
        self.master_seen_by(sentinel)
            .await
            .unwrap_or_else(|| panic!("sentinel {} names no master", sentinel.addr()))
    }

    /// An authenticated raw connection to sentinel `i`.
    pub async fn sentinel(&self, i: usize) -> Raw {
        let mut raw = Raw::connect(&self.sentinels[i].addr()).await;
        if let Some(auth) = self.sentinel_auth() {
            raw.send(&auth).await;
            assert_eq!(raw.reply().await, simple("OK"), "AUTH to a sentinel");
        }
        raw
    }

    /// Makes a sentinel fail the master over to the other server, and waits until every
    /// sentinel names that one and it answers ROLE as master. Returns its address. The old
    /// master is demoted later (see the module comment): [`wait_replica_of`](Self::wait_replica_of)
    /// waits for it.
    pub async fn failover(&self) -> String {
        let deadline = Instant::now() + SENTINEL_DEADLINE;
        let old = self.current_master().await;
        let new = self.other_server(&old);
        // Right after a previous failover the sentinel may know no replica fit to promote
        // yet (-NOGOODSLAVE) until it has read the demoted master's INFO: ask again.
        let auth = self.sentinel_auth();
        let sentinel = self.sentinels[0].addr();
        let mut last = None;
        loop {
            let reply = query(
                &sentinel,
                auth.as_deref(),
                &["SENTINEL", "FAILOVER", MASTER_NAME],
            );
            last = reply.await.or(last);
            if last == Some(simple("OK")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "SENTINEL FAILOVER never accepted; last reply {last:?}"
            );
            tokio::time::sleep(POLL).await;
        }
        self.wait_master(&new, deadline).await;
        new
    }

    /// Kills the current master (SIGKILL, by PID) for sentinels to notice; returns its
    /// address. [`wait_master`](Self::wait_master) with the other server waits for the
    /// failover that follows.
    pub async fn kill_master(&mut self) -> String {
        let master = self.current_master().await;
        let slot = self
            .servers
            .iter_mut()
            .find(|s| s.as_ref().is_some_and(|s| s.addr() == master))
            .unwrap_or_else(|| panic!("the master {master} is not running"));
        drop(slot.take()); // RedisServer's Drop kills its child and reaps it.
        master
    }

    /// Waits until every sentinel names `addr` as the master and `addr` answers ROLE as
    /// master, failing at `deadline`.
    pub async fn wait_master(&self, addr: &str, deadline: Instant) {
        loop {
            let mut seen = Vec::new();
            for sentinel in &self.sentinels {
                seen.push(self.master_seen_by(sentinel).await);
            }
            let role = role(&self.auth, addr).await;
            let agreed = seen.iter().all(|s| s.as_deref() == Some(addr));
            if agreed && role.first().map(String::as_str) == Some("master") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{addr} never became master: sentinels name {seen:?}, it answers ROLE {role:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `addr` is a replica of `master` with its link up.
    pub async fn wait_replica_of(&self, addr: &str, master: &str, deadline: Instant) {
        wait_replica_link(&self.auth, addr, master, deadline).await;
    }

    /// Until every sentinel names the master, sees the replica healthy and in sync, and sees
    /// the two other sentinels healthy: what a failover needs.
    async fn wait_settled(&self, deadline: Instant) {
        for sentinel in &self.sentinels {
            let addr = sentinel.addr();
            loop {
                let problem = self.unsettled(&addr).await;
                let Some(problem) = problem else { break };
                if Instant::now() >= deadline {
                    panic!(
                        "sentinel {addr} did not settle: {problem}\n{}",
                        sentinel.log()
                    );
                }
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// What sentinel `addr` still lacks to be ready, if anything.
    async fn unsettled(&self, addr: &str) -> Option<String> {
        let auth = self.sentinel_auth();
        let ask = |args: &'static [&'static str]| query(addr, auth.as_deref(), args);
        let master = ask(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]).await;
        if master.as_ref().and_then(host_port) != Some(self.master_addr.clone()) {
            return Some(format!("names master {master:?}"));
        }
        let replicas = entries(ask(&["SENTINEL", "REPLICAS", MASTER_NAME]).await);
        let healthy = replicas.iter().any(|r| {
            r.get("name") == Some(&self.replica_addr)
                && r.get("flags").map(String::as_str) == Some("slave")
                && r.get("master-link-status").map(String::as_str) == Some("ok")
        });
        if !healthy {
            return Some(format!("replicas {replicas:?}"));
        }
        let sentinels = entries(ask(&["SENTINEL", "SENTINELS", MASTER_NAME]).await);
        let others = sentinels
            .iter()
            .filter(|s| s.get("flags").map(String::as_str) == Some("sentinel"));
        if others.count() != 2 {
            return Some(format!("other sentinels {sentinels:?}"));
        }
        None
    }

    async fn master_seen_by(&self, sentinel: &Sentinel) -> Option<String> {
        let auth = self.sentinel_auth();
        let args = ["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME];
        query(&sentinel.addr(), auth.as_deref(), &args)
            .await
            .as_ref()
            .and_then(host_port)
    }

    fn other_server(&self, addr: &str) -> String {
        [&self.master_addr, &self.replica_addr]
            .into_iter()
            .find(|a| *a != addr)
            .unwrap_or_else(|| panic!("{addr} is neither server"))
            .clone()
    }

    fn sentinel_auth(&self) -> Option<Vec<u8>> {
        self.sentinel_password
            .as_deref()
            .map(|p| command(&["AUTH", p]))
    }
}

/// The arguments that let a server replicate from another with `auth`: the replica at start,
/// and either server once Sentinel makes it a replica.
fn replication_args(auth: &ServerAuth) -> Vec<String> {
    let mut args = vec!["--repl-diskless-sync-delay".to_owned(), "0".to_owned()];
    match auth {
        ServerAuth::AclUser { user, password } => {
            args.extend(["--masteruser".into(), user.clone()]);
            args.extend(["--masterauth".into(), password.clone()]);
        }
        ServerAuth::RequirePass(p) => args.extend(["--masterauth".into(), p.clone()]),
    }
    args
}

/// One redis-server in sentinel mode, with its writable config file in a temp dir of its own.
struct Sentinel {
    port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Sentinel {
    /// Starts a sentinel monitoring the master on `master_port`, retrying on another port if
    /// the one it was given was taken meanwhile.
    async fn start(master_port: u16, auth: &ServerAuth, password: Option<&str>) -> Sentinel {
        let binary = require("redis-server");
        let auth_line = password.map(|p| command(&["AUTH", p]));
        let mut last_log = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir");
            let port = free_port();
            let config = dir.path().join("sentinel.conf");
            std::fs::write(
                &config,
                config_text(dir.path(), port, master_port, auth, password),
            )
            .unwrap();
            let child = Command::new(&binary)
                .arg(&config)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server --sentinel");
            let mut sentinel = Sentinel { port, child, dir };
            if sentinel.wait_ready(auth_line.as_deref()).await {
                return sentinel;
            }
            last_log = sentinel.log();
        }
        panic!("redis-server --sentinel did not start; last log:\n{last_log}");
    }

    /// Ready when an (authenticated) PING answers PONG; false if it exited or never did.
    async fn wait_ready(&mut self, auth: Option<&[u8]>) -> bool {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if query(&self.addr(), auth, &["PING"]).await == Some(simple("PONG")) {
                return true;
            }
            tokio::time::sleep(POLL).await;
        }
        false
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sentinel's config file: it rewrites it as it learns (its id, replicas, other sentinels).
fn config_text(
    dir: &Path,
    port: u16,
    master_port: u16,
    auth: &ServerAuth,
    password: Option<&str>,
) -> String {
    let mut text = format!(
        "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir \"{dir}\"\nlogfile \"{log}\"\n\
         sentinel resolve-hostnames no\n\
         sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
         sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
         sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n\
         sentinel parallel-syncs {MASTER_NAME} 1\n",
        dir = dir.display(),
        log = dir.join("sentinel.log").display(),
    );
    match auth {
        ServerAuth::AclUser { user, password } => text.push_str(&format!(
            "sentinel auth-user {MASTER_NAME} {user}\nsentinel auth-pass {MASTER_NAME} {password}\n"
        )),
        ServerAuth::RequirePass(p) => {
            text.push_str(&format!("sentinel auth-pass {MASTER_NAME} {p}\n"))
        }
    }
    // Without sentinel-user/sentinel-pass, a sentinel also AUTHs to the others with it.
    if let Some(p) = password {
        text.push_str(&format!("requirepass {p}\n"));
    }
    text
}

/// `host:port` from GET-MASTER-ADDR-BY-NAME's `[host, port]`.
fn host_port(frame: &OwnedFrame) -> Option<String> {
    let OwnedFrame::Array { data, .. } = frame else {
        return None;
    };
    match &data[..] {
        [host, port] => Some(format!("{}:{}", text(host)?, text(port)?)),
        _ => None,
    }
}

/// SENTINEL REPLICAS / SENTINELS: one flat `[field, value, ...]` array per instance.
fn entries(frame: Option<OwnedFrame>) -> Vec<HashMap<String, String>> {
    let Some(OwnedFrame::Array { data, .. }) = frame else {
        return Vec::new();
    };
    let fields = |f: &OwnedFrame| -> HashMap<String, String> {
        let OwnedFrame::Array { data, .. } = f else {
            return HashMap::new();
        };
        data.chunks(2)
            .filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?)))
            .collect()
    };
    data.iter().map(fields).collect()
}
