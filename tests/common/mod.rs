//! The one test harness: real redis-server processes on ephemeral loopback ports, the
//! ambassador in-process (or as the real binary), and a raw RESP client with deadlines.
//! No fixed ports, no sleeps as synchronisation: everything waits on a condition with a limit.
#![allow(dead_code)]

pub mod pki;

pub use pki::ServerTls;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis_ambassador::config::{Config, ConfigErrors, LoadOptions};
use redis_ambassador::Listener;
use redis_protocol::resp3::decode::complete::decode as decode3;
use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub const DEADLINE: Duration = Duration::from_secs(10);
pub const USER: &str = "app";
pub const PASSWORD: &str = "app-secret-7f3a";

/// Finds a program or fails with a message that says how to install it.
pub fn require(program: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{program} not found on PATH: these tests need a real Redis. \
             Install it with `apt-get install redis-server redis-tools` (Debian/Ubuntu)."
        )
    })
}

/// A port that was free a moment ago. Servers that lose the race are restarted on another.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// How a test server authenticates its clients.
#[derive(Debug, Clone)]
pub enum ServerAuth {
    /// The default user is off; `user` with `password` may do everything.
    AclUser { user: String, password: String },
    /// Legacy `requirepass`: `AUTH <password>` only.
    RequirePass(String),
}

impl ServerAuth {
    pub fn app() -> Self {
        ServerAuth::AclUser {
            user: USER.into(),
            password: PASSWORD.into(),
        }
    }

    /// The AUTH command a direct client sends.
    pub fn auth_command(&self) -> Vec<u8> {
        match self {
            ServerAuth::AclUser { user, password } => command(&["AUTH", user, password]),
            ServerAuth::RequirePass(p) => command(&["AUTH", p]),
        }
    }

    /// A credential file body for the ambassador.
    pub fn credential_file(&self) -> String {
        match self {
            ServerAuth::AclUser { user, password } => {
                format!("username = \"{user}\"\npassword = \"{password}\"\n")
            }
            ServerAuth::RequirePass(p) => format!("{p}\n"),
        }
    }
}

/// A real redis-server in a temp dir, killed on drop.
pub struct RedisServer {
    /// The plain port: readiness and direct connections.
    pub port: u16,
    /// The TLS port, when started with [`RedisServer::start_tls`].
    pub tls_port: Option<u16>,
    pub auth: ServerAuth,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl RedisServer {
    pub fn start(auth: ServerAuth) -> RedisServer {
        Self::start_with(auth, &[])
    }

    pub fn start_with(auth: ServerAuth, extra: &[&str]) -> RedisServer {
        Self::launch(auth, extra, false)
    }

    /// A server that also listens with TLS on `tls_port`, presenting `tls.cert`. Readiness
    /// is still checked on the plain port: redis-server opens every listener before it
    /// answers, and exits if one fails.
    pub fn start_tls(auth: ServerAuth, tls: &ServerTls) -> RedisServer {
        Self::start_tls_with(auth, tls, &[])
    }

    /// [`start_tls`](Self::start_tls) with more server arguments.
    pub fn start_tls_with(auth: ServerAuth, tls: &ServerTls, extra: &[&str]) -> RedisServer {
        let mut args: Vec<String> = vec![
            "--tls-cert-file".into(),
            tls.cert.display().to_string(),
            "--tls-key-file".into(),
            tls.key.display().to_string(),
            "--tls-ca-cert-file".into(),
            tls.ca.display().to_string(),
            "--tls-auth-clients".into(),
            (if tls.require_client_cert { "yes" } else { "no" }).into(),
            "--tls-protocols".into(),
            tls.protocols.into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::launch(auth, &args, true)
    }

    fn launch(auth: ServerAuth, extra: &[&str], tls: bool) -> RedisServer {
        let binary = require("redis-server");
        let mut dir = tempfile::tempdir().expect("temp dir");
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            let tls_port = tls.then(free_port);
            let mut args: Vec<String> = vec![
                "--port".into(),
                port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--save".into(),
                "".into(),
                "--appendonly".into(),
                "no".into(),
                "--dir".into(),
                dir.path().display().to_string(),
                "--logfile".into(),
                "redis.log".into(),
            ];
            match &auth {
                ServerAuth::AclUser { user, password } => {
                    let acl = dir.path().join("users.acl");
                    std::fs::write(
                        &acl,
                        format!("user default off\nuser {user} on >{password} ~* &* +@all\n"),
                    )
                    .unwrap();
                    args.extend(["--aclfile".into(), acl.display().to_string()]);
                }
                ServerAuth::RequirePass(p) => args.extend(["--requirepass".into(), p.clone()]),
            }
            if let Some(p) = tls_port {
                args.extend(["--tls-port".into(), p.to_string()]);
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            let child = Command::new(&binary)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let mut server = RedisServer {
                port,
                tls_port,
                auth: auth.clone(),
                dir,
                child,
            };
            if server.wait_ready() {
                return server;
            }
            last_log =
                std::fs::read_to_string(server.dir.path().join("redis.log")).unwrap_or_default();
            let _ = server.child.kill();
            let _ = server.child.wait();
            dir = server.take_dir();
        }
        panic!("redis-server did not start; last log:\n{last_log}");
    }

    fn take_dir(&mut self) -> tempfile::TempDir {
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Ready when an authenticated PING answers PONG.
    fn wait_ready(&mut self) -> bool {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut req = self.auth.auth_command();
                req.extend(command(&["PING"]));
                if s.write_all(&req).is_ok() {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                        if got.ends_with(b"+PONG\r\n") {
                            return true;
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20)); // polling interval, not synchronisation
        }
        false
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `host:port` of the TLS listener.
    pub fn tls_addr(&self, host: &str) -> String {
        format!("{host}:{}", self.tls_port.expect("started with TLS"))
    }

    /// A direct, authenticated raw connection.
    pub async fn direct(&self) -> Raw {
        let mut raw = Raw::connect(&self.addr()).await;
        raw.send(&self.auth.auth_command()).await;
        assert_eq!(
            raw.reply().await,
            OwnedFrame::SimpleString {
                data: b"OK".to_vec(),
                attributes: None
            }
        );
        raw
    }

    /// Writes the credential file for this server into `dir`.
    pub fn credential_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("redis-credentials");
        std::fs::write(&path, self.auth.credential_file()).unwrap();
        path
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `[section]` TOML for a profile pointing at `server`, plus `extra` lines appended.
pub fn profile_for(server: &RedisServer, dir: &Path, extra: &str) -> String {
    let creds = server.credential_file(dir);
    format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n\n[upstream]\naddress = \"{}\"\n\n[credentials]\nfile = \"{}\"\n{extra}",
        server.addr(),
        creds.display()
    )
}

/// Loads a config from profile text, as data (no process environment).
pub fn load_config(dir: &Path, profile_text: &str) -> Config {
    try_load_config(dir, profile_text).unwrap_or_else(|e| panic!("{e}"))
}

/// Loads a config from profile text, returning the errors if it is invalid.
pub fn try_load_config(dir: &Path, profile_text: &str) -> Result<Config, ConfigErrors> {
    std::fs::write(dir.join("test.toml"), profile_text).unwrap();
    Config::load(&LoadOptions {
        profile: Some("test".into()),
        config_dir: dir.to_owned(),
        ..Default::default()
    })
}

/// The ambassador running in-process on an ephemeral port; stopped on drop.
pub struct Ambassador {
    pub addr: SocketAddr,
    /// The admin endpoint (`/healthz`, `/readyz`, `/metrics`).
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub dir: tempfile::TempDir,
}

impl Ambassador {
    /// An ambassador for `server` with extra profile lines.
    pub async fn start(server: &RedisServer, extra: &str) -> Ambassador {
        let dir = tempfile::tempdir().unwrap();
        let config = load_config(dir.path(), &profile_for(server, dir.path(), extra));
        Self::with_config(config, dir).await
    }

    pub async fn with_config(config: Config, dir: tempfile::TempDir) -> Ambassador {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(redis_ambassador::run(
            config,
            Listener::Tcp(listener),
            Some(admin),
            async {
                let _ = rx.await;
            },
        ));
        Ambassador {
            addr,
            admin: admin_addr,
            stop: Some(tx),
            task: Some(task),
            dir,
        }
    }

    pub async fn connect(&self) -> Raw {
        Raw::connect(&self.addr.to_string()).await
    }

    /// `GET path` on the admin endpoint: the status code and the body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(&self.admin.to_string(), path).await
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Stops accepting and waits for the drain to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(DEADLINE * 4, task).await;
        }
    }
}

impl Drop for Ambassador {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A minimal HTTP/1.0 GET, enough for the admin endpoint: the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
        .await
        .expect("admin connect timed out")
        .expect("admin connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut reply))
        .await
        .expect("admin reply timed out")
        .unwrap();
    let text = String::from_utf8_lossy(&reply).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Encodes a command as a RESP array of bulk strings.
pub fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n{a}\r\n", a.len()).into_bytes());
    }
    out
}

/// A raw RESP connection with deadlines on every read.
pub struct Raw {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: &str) -> Raw {
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    pub async fn cmd(&mut self, args: &[&str]) -> OwnedFrame {
        self.send(&command(args)).await;
        self.reply().await
    }

    /// The next complete frame (RESP2 or RESP3), within the deadline.
    pub async fn reply(&mut self) -> OwnedFrame {
        self.try_reply()
            .await
            .expect("connection closed before a reply")
    }

    /// The next frame, or `None` if the connection closed first.
    pub async fn try_reply(&mut self) -> Option<OwnedFrame> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some((frame, used)) = decode_any(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut chunk = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout(left, self.stream.read(&mut chunk))
                .await
                .expect("timed out waiting for a reply")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads exactly `n` raw bytes.
    pub async fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        while self.buf.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut chunk = vec![0u8; 64 * 1024];
            let got = tokio::time::timeout(left, self.stream.read(&mut chunk))
                .await
                .expect("timed out reading bytes")
                .expect("read");
            assert!(
                got > 0,
                "closed after {} of {n} bytes: {:?}",
                self.buf.len(),
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..got]);
        }
        self.buf.drain(..n).collect()
    }

    /// Waits for the peer to close, returning whatever arrived before.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout(left, self.stream.read(&mut chunk))
                .await
                .expect("timed out waiting for close")
            {
                Ok(0) | Err(_) => return std::mem::take(&mut self.buf),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Decodes one RESP2 or RESP3 frame. redis-protocol's RESP3 decoder reads RESP2's `$-1` and
/// `*-1` nulls as the start of a streamed frame, so RESP2 is tried first and converted.
pub fn decode_any(buf: &[u8]) -> Option<(OwnedFrame, usize)> {
    use redis_protocol::resp2::decode::decode as decode2;
    use redis_protocol::resp2::types::OwnedFrame as F2;
    fn convert(f: F2) -> OwnedFrame {
        match f {
            F2::SimpleString(data) => OwnedFrame::SimpleString {
                data,
                attributes: None,
            },
            F2::Error(data) => OwnedFrame::SimpleError {
                data,
                attributes: None,
            },
            F2::Integer(data) => OwnedFrame::Number {
                data,
                attributes: None,
            },
            F2::BulkString(data) => OwnedFrame::BlobString {
                data,
                attributes: None,
            },
            F2::Array(items) => OwnedFrame::Array {
                data: items.into_iter().map(convert).collect(),
                attributes: None,
            },
            F2::Null => OwnedFrame::Null,
        }
    }
    match decode2(buf) {
        Ok(Some((frame, used))) => Some((convert(frame), used)),
        // Incomplete as RESP2: complete only if it is RESP3 that RESP2 cannot tell yet.
        Ok(None) => decode3(buf).ok().flatten(),
        // A RESP3-only type somewhere in it.
        Err(_) => decode3(buf).expect("valid RESP from the server"),
    }
}

/// Shorthands for expected frames.
pub fn simple(s: &str) -> OwnedFrame {
    OwnedFrame::SimpleString {
        data: s.as_bytes().to_vec(),
        attributes: None,
    }
}

pub fn bulk(s: &[u8]) -> OwnedFrame {
    OwnedFrame::BlobString {
        data: s.to_vec(),
        attributes: None,
    }
}

pub fn int(i: i64) -> OwnedFrame {
    OwnedFrame::Number {
        data: i,
        attributes: None,
    }
}

/// The text of an error frame, panicking on anything else.
pub fn error_text(f: &OwnedFrame) -> String {
    match f {
        OwnedFrame::SimpleError { data, .. } => data.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// The real binary, started with `args` and `env`; its stderr is scanned for the listening
/// address. Killed on drop.
pub struct Binary {
    pub child: Child,
    pub addr: String,
    /// The admin endpoint's address, or "off".
    pub admin: String,
    /// The stderr lines before the 'listening' line.
    pub startup_lines: Vec<String>,
    pub stderr_lines: std::sync::mpsc::Receiver<String>,
}

impl Binary {
    pub fn start(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_redis-ambassador"))
            .current_dir(cwd)
            .args(args)
            .env_remove("AMBASSADOR_PROFILE")
            .env_remove("AMBASSADOR_CONFIG_DIR")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn redis-ambassador");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Owned from here on, so a failed wait below still kills the process on drop.
        let mut bin = Binary {
            child,
            addr: String::new(),
            admin: String::new(),
            startup_lines: Vec::new(),
            stderr_lines: rx,
        };
        let deadline = Instant::now() + DEADLINE;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = bin.stderr_lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!("no 'listening' line; stderr so far:\n{}", seen.join("\n"))
            });
            if let Some(rest) = line.split("listening address=").nth(1) {
                bin.addr = rest.split_whitespace().next().unwrap().to_owned();
                let admin = line
                    .split(" admin=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next());
                bin.admin = admin.unwrap_or("off").to_owned();
                bin.startup_lines = seen;
                return bin;
            }
            if line.contains(r#""message":"listening""#) {
                let field = |name: &str| {
                    let key = format!(r#""{name}":""#);
                    line.split(&key)
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .map(str::to_owned)
                };
                bin.addr = field("address").expect("address in the JSON listening line");
                bin.admin = field("admin").unwrap_or_else(|| "off".into());
                bin.startup_lines = seen;
                return bin;
            }
            seen.push(line);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the process (which this test started).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, within the deadline.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the process did not exit");
            std::thread::sleep(Duration::from_millis(20)); // polling interval
        }
    }

    /// Everything the process wrote to stderr after the listening line, up to its end: call
    /// after it exited (the reader stops at end of file).
    pub fn stderr_to_end(&self) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return lines.join("\n"),
                Err(e) => panic!("stderr did not end: {e}"),
            }
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// Observation helpers for the hostile-input, fault and load tests: what a process holds, what
// Redis sees, and a poll with a limit.

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

/// The connections Redis has open, from `CLIENT LIST` on `observer` (which counts itself).
pub async fn client_count(observer: &mut Raw) -> usize {
    match observer.cmd(&["CLIENT", "LIST"]).await {
        OwnedFrame::BlobString { data, .. } | OwnedFrame::VerbatimString { data, .. } => {
            String::from_utf8_lossy(&data).lines().count()
        }
        other => panic!("CLIENT LIST answered {other:?}"),
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

/// Polls `CLIENT LIST` on `observer` until Redis has `want` connections (the observer
/// included), failing after the deadline with `what`.
pub async fn wait_for_clients(observer: &mut Raw, want: usize, what: &str) {
    let deadline = Instant::now() + DEADLINE;
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
