//! Real redis-server processes: ACL users or requirepass, optionally TLS, on ephemeral
//! loopback ports, ready when an authenticated PING answers, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis_protocol::resp3::types::OwnedFrame;

use super::*;

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
    /// The address it listens on: loopback, or a test namespace's.
    pub host: String,
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
        Self::launch(auth, extra, false, None)
    }

    /// A server on a given loopback address and port (two servers on one port and different
    /// addresses stand for a host name whose DNS answer moves).
    pub fn start_at(auth: ServerAuth, host: &str, port: u16) -> RedisServer {
        Self::launch_at(auth, &[], false, None, Some((host, port)))
    }

    /// A server inside `ns`, listening on the namespace's address only.
    pub fn start_in(ns: &Netns, auth: ServerAuth) -> RedisServer {
        Self::launch(auth, &[], false, Some(ns))
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
        Self::launch(auth, &args, true, None)
    }

    fn launch(auth: ServerAuth, extra: &[&str], tls: bool, ns: Option<&Netns>) -> RedisServer {
        Self::launch_at(auth, extra, tls, ns, None)
    }

    fn launch_at(
        auth: ServerAuth,
        extra: &[&str],
        tls: bool,
        ns: Option<&Netns>,
        at: Option<(&str, u16)>,
    ) -> RedisServer {
        let host = match at {
            Some((host, _)) => host.to_owned(),
            None => ns.map_or_else(|| "127.0.0.1".to_owned(), |ns| ns.inner_addr.to_string()),
        };
        let binary = require("redis-server");
        let mut dir = tempfile::tempdir().expect("temp dir");
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = at.map_or_else(free_port, |(_, port)| port);
            let tls_port = tls.then(free_port);
            let mut args: Vec<String> = vec![
                "--port".into(),
                port.to_string(),
                "--bind".into(),
                host.clone(),
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
            let mut command = match ns {
                Some(ns) => ns.command(&binary.display().to_string()),
                None => Command::new(&binary),
            };
            let child = command
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let mut server = RedisServer {
                host: host.clone(),
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
            if let Ok(mut s) = std::net::TcpStream::connect((self.host.as_str(), self.port)) {
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
        format!("{}:{}", self.host, self.port)
    }

    /// `host:port` of the TLS listener.
    pub fn tls_addr(&self, host: &str) -> String {
        format!("{host}:{}", self.tls_port.expect("started with TLS"))
    }

    /// A direct, authenticated raw connection.
    /// Adds an ACL user with every right, for a rotation to switch to.
    pub async fn add_user(&self, user: &str, password: &str) {
        let mut admin = self.direct().await;
        let password = format!(">{password}");
        let added = admin
            .cmd(&["ACL", "SETUSER", user, "on", &password, "~*", "&*", "+@all"])
            .await;
        assert_eq!(added, simple("OK"));
    }

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

/// Waits until `addr` answers ROLE as a replica of `master` whose link is up, failing at
/// `deadline`.
pub async fn wait_replica_link(auth: &ServerAuth, addr: &str, master: &str, deadline: Instant) {
    let (host, port) = master.rsplit_once(':').expect("host:port");
    let want = ["slave", host, port, "connected"];
    loop {
        let role = role(auth, addr).await;
        if role.len() >= 4 && role[..4] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} never became a connected replica of {master}: ROLE {role:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling interval
    }
}

/// What ROLE answers on `addr`, as text (empty if it cannot be asked).
pub async fn role(auth: &ServerAuth, addr: &str) -> Vec<String> {
    match query(addr, Some(&auth.auth_command()), &["ROLE"]).await {
        Some(OwnedFrame::Array { data, .. }) => data.iter().filter_map(text).collect(),
        _ => Vec::new(),
    }
}
