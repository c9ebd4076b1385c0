//! What tests read about processes they started: memory, fds, signals; and polling helpers.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use redis_protocol::resp3::types::OwnedFrame;

use super::*;

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// How many file descriptors a process has open.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second: u64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100);
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Polls `f` until it holds, failing after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval, not synchronisation
    }
}

/// A numeric field of `INFO <section>`, asked on `observer`.
pub async fn info_number(observer: &mut Raw, section: &str, field: &str) -> u64 {
    let (OwnedFrame::BlobString { data, .. } | OwnedFrame::VerbatimString { data, .. }) =
        observer.cmd(&["INFO", section]).await
    else {
        panic!("INFO answers a bulk string");
    };
    let prefix = format!("{field}:");
    String::from_utf8_lossy(&data)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in INFO {section}"))
}

/// The clients Redis has connected, `observer` included, from `INFO clients`: cheap even
/// with thousands of connections, where `CLIENT LIST` would be megabytes per poll.
pub async fn client_count(observer: &mut Raw) -> usize {
    info_number(observer, "clients", "connected_clients").await as usize
}

/// Every connection Redis has accepted since it started (`total_connections_received`),
/// closed ones included: what a short-lived probe connection leaves behind.
pub async fn connections_received(observer: &mut Raw) -> u64 {
    info_number(observer, "stats", "total_connections_received").await
}

/// A number from Redis's `INFO clients` (`connected_clients`, `blocked_clients`).
pub async fn info_clients(observer: &mut Raw, field: &str) -> usize {
    info_number(observer, "clients", field).await as usize
}

/// Waits until `n` of `server`'s clients are blocked (BLPOP, XREAD BLOCK, WAIT).
pub async fn wait_blocked_clients(server: &RedisServer, n: usize) {
    let mut direct = server.direct().await;
    let start = Instant::now();
    loop {
        let now = info_clients(&mut direct, "blocked_clients").await;
        if now == n {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "Redis has {now} blocked clients, never {n}"
        );
        // Polling interval while waiting on the condition above, not synchronisation.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends a signal to a process the test started (a redis-server, the binary), by PID.
pub fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// The real binary in one-shot mode in front of `server`, with `env` layered on top
/// (`AMBASSADOR__SECTION__KEY`, given to the child only).
pub fn binary_for(server: &RedisServer, dir: &Path, env: &[(&str, &str)]) -> Binary {
    let creds = server.credential_file(dir);
    let addr = server.addr();
    Binary::start(
        dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &addr,
            "--credentials-file",
            creds.to_str().unwrap(),
        ],
        env,
    )
}

/// Polls [`client_count`] on `observer` until Redis has `want` connections (the observer
/// included), failing after `limit` with `what`.
pub async fn wait_for_clients(observer: &mut Raw, want: usize, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    loop {
        let now = client_count(observer).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Redis has {now} connections, not {want}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
    }
}

/// Connections to local `port` that wait with unread bytes (established, receive queue not
/// empty), from `/proc/net/tcp`: e.g. TLS ClientHellos sent to a stopped server.
pub fn waiting_connections(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let queued = fields.get(4).and_then(|q| q.split(':').nth(1));
            fields.get(1).is_some_and(|a| a.ends_with(&local))
                && fields.get(3) == Some(&"01")
                && queued.is_some_and(|rx| rx != "00000000")
        })
        .count()
}
