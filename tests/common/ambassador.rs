//! The ambassador in-process on an ephemeral port, configured from profile text as data,
//! and a minimal HTTP client for its admin endpoint.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use prometheus_parse::{Scrape, Value};
use redis_ambassador::config::{Config, ConfigErrors, LoadOptions};
use redis_ambassador::metrics::Metrics;
use redis_ambassador::Listener;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::*;

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

/// The ambassador running in-process on an ephemeral port; stopped on drop, which fails the
/// test if the ambassador or any of its tasks (a session, the probe) panicked: tokio keeps a
/// spawned task's panic in its `JoinHandle`, and the sessions' handles are never awaited.
pub struct Ambassador {
    pub addr: SocketAddr,
    /// The admin endpoint (`/healthz`, `/readyz`, `/metrics`).
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The ambassador's own metrics: `task_panics` counts its tasks' caught panics.
    metrics: Arc<Metrics>,
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
        Self::listening_on(config, dir, "127.0.0.1").await
    }

    /// [`with_config`](Self::with_config) with clients accepted on `ip` (a test namespace's
    /// outer address), on an ephemeral port.
    pub async fn listening_on(config: Config, dir: tempfile::TempDir, ip: &str) -> Ambassador {
        Self::spawn(config, dir, ip, true).await
    }

    /// With `admin` false there is no admin endpoint, and so no periodic probe: the upstream
    /// sees the sessions' connections only.
    async fn spawn(config: Config, dir: tempfile::TempDir, ip: &str, admin: bool) -> Ambassador {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = match admin {
            true => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let admin_addr = admin
            .as_ref()
            .map_or(([127, 0, 0, 1], 0).into(), |a| a.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        let metrics = Arc::new(Metrics::new());
        let task = tokio::spawn(redis_ambassador::run_with(
            config,
            Listener::Tcp(listener),
            admin,
            async {
                let _ = rx.await;
            },
            Arc::clone(&metrics),
        ));
        Ambassador {
            addr,
            admin: admin_addr,
            stop: Some(tx),
            task: Some(task),
            metrics,
            dir,
        }
    }

    /// An ambassador for `server` whose clients must first `AUTH` with [`CLIENT_PASSWORD`].
    pub async fn with_client_password(server: &RedisServer) -> Ambassador {
        let dir = tempfile::tempdir().unwrap();
        let profile = profile_for(server, dir.path(), "");
        let config = Self::requiring_client_password(profile, &dir);
        Self::with_config(config, dir).await
    }

    /// Like [`with_client_password`](Self::with_client_password), in front of any `upstream`
    /// address (a [`FakeUpstream`]) with the app user's credentials, and without the admin
    /// endpoint, so without the probe.
    pub async fn with_client_password_at(upstream: &str) -> Ambassador {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("redis-credentials");
        std::fs::write(&creds, ServerAuth::app().credential_file()).unwrap();
        let profile = format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n\n[upstream]\naddress = \"{upstream}\"\n\n\
             [credentials]\nfile = \"{}\"\n",
            creds.display()
        );
        let config = Self::requiring_client_password(profile, &dir);
        Self::spawn(config, dir, "127.0.0.1", false).await
    }

    fn requiring_client_password(profile: String, dir: &tempfile::TempDir) -> Config {
        let pw = dir.path().join("client-password");
        std::fs::write(&pw, format!("{CLIENT_PASSWORD}\n")).unwrap();
        let profile = profile.replace(
            "[upstream]",
            &format!("require_password_file = \"{}\"\n\n[upstream]", pw.display()),
        );
        load_config(dir.path(), &profile)
    }

    pub async fn connect(&self) -> Raw {
        Raw::connect(&self.addr.to_string()).await
    }

    /// `GET path` on the admin endpoint: the status code and the body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(&self.admin.to_string(), path).await
    }

    /// `/metrics`, parsed with a real Prometheus text-format parser.
    pub async fn scrape(&self) -> Scrape {
        let (status, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200);
        Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition text")
    }

    /// The value of `name` with `label`=`value` (or the only sample when `label` is empty).
    pub async fn metric(&self, name: &str, label: (&str, &str)) -> Option<f64> {
        let scrape = self.scrape().await;
        scrape.samples.iter().find_map(|s| {
            let matches =
                s.metric == name && (label.0.is_empty() || s.labels.get(label.0) == Some(label.1));
            match (&s.value, matches) {
                (Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v), true) => Some(*v),
                _ => None,
            }
        })
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Rotates the credential file at `path` to `user` and `password` (a new file renamed over
    /// it, as an editor or a secret mount does) and waits until the ambassador has applied
    /// `applied` reloads in all.
    pub async fn rotate_credentials(&self, path: &Path, user: &str, password: &str, applied: f64) {
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            format!("username = \"{user}\"\npassword = \"{password}\"\n"),
        )
        .unwrap();
        std::fs::rename(&tmp, path).unwrap();
        wait_until("the new credentials are applied", DEADLINE, || async {
            self.metric("ambassador_credential_reloads_total", ("result", "applied"))
                .await
                == Some(applied)
        })
        .await;
    }

    /// Stops accepting and waits for the drain to finish; fails if anything panicked.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(DEADLINE * 4, task).await {
                Ok(Err(e)) if e.is_panic() => panic!("the ambassador panicked"),
                Ok(_) => {}
                Err(_) => panic!("the ambassador did not stop within {:?}", DEADLINE * 4),
            }
        }
        // Drop checks the tasks' panics.
    }
}

impl Drop for Ambassador {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        // Drop cannot await: the run task is polled once to learn whether it already ended
        // in a panic, then aborted.
        let mut ended_in_panic = false;
        if let Some(mut task) = self.task.take() {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if let std::task::Poll::Ready(Err(e)) = std::pin::Pin::new(&mut task).poll(&mut cx) {
                ended_in_panic = e.is_panic();
            }
            task.abort();
        }
        if std::thread::panicking() {
            return; // the test failed already; a second panic would abort the process
        }
        assert!(!ended_in_panic, "the ambassador panicked");
        let panics = self.metrics.task_panics.get();
        assert_eq!(
            panics, 0,
            "{panics} of the ambassador's tasks panicked (the panic message is above)"
        );
    }
}

/// A minimal HTTP/1.0 GET, enough for the admin endpoint: the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

/// A minimal HTTP/1.0 request with an empty body: the status code and the body.
pub async fn http_request(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
        .await
        .expect("admin connect timed out")
        .expect("admin connect");
    let head = format!("{method} {path} HTTP/1.0\r\nHost: test\r\nContent-Length: 0\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
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

/// Polls `GET path` on the admin endpoint `admin` until it answers `want`, within the
/// deadline.
pub async fn wait_status(admin: &str, path: &str, want: u16) {
    let what = format!("{path} answering {want}");
    wait_until(&what, DEADLINE, || async {
        http_get(admin, path).await.0 == want
    })
    .await;
}
