//! Configuration: config-crate layers -> serde structs (unknown keys refused, [`raw`]) ->
//! validation ([`validate`]) -> a typed [`Config`].
//!
//! Layers, later wins: built-in defaults, `<dir>/default.toml` (optional), `<dir>/<profile>.toml`,
//! `AMBASSADOR__SECTION__KEY` variables, then command-line overrides. Every problem is
//! collected and reported at once, each by its key; no secret is ever part of a message.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use config::{Environment, File, FileFormat, Value};
use serde::Deserialize;

use crate::credentials::exec::format_time;
use crate::credentials::{Credentials, DownstreamPassword};
use crate::dead_peer::DeadPeer;
use crate::discovery::{Discovery, Resolver};
use crate::refresh::Fetcher;
use crate::refresh::Schedule;
use crate::tls::Tls;
use crate::upstream::Reach;

/// What `main` gathered from the process: the only inputs of [`Config::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `--profile` or `AMBASSADOR_PROFILE`; `None` means "dev", and then no profile file is
    /// needed when `--upstream` is given (one-shot mode).
    pub profile: Option<String>,
    pub config_dir: PathBuf,
    /// The process environment, as data (only `AMBASSADOR__*` keys are read).
    pub env: HashMap<String, String>,
    /// Command-line flags, as `section.key` -> value; they override every other layer.
    pub overrides: Vec<(String, String)>,
    /// Check the `exec` keys without running the command (`--healthcheck`, which needs only
    /// the admin address, must not fetch a token every time it runs).
    pub skip_credentials_command: bool,
}

pub const DEFAULT_PROFILE: &str = "dev";

/// The validated configuration of one ambassador process.
#[derive(Debug)]
pub struct Config {
    pub profile: String,
    pub listen: Listen,
    pub upstream: Upstream,
    pub credentials_source: CredentialSource,
    /// The credentials read (or fetched) at start.
    pub credentials: Credentials,
    /// The username from the profile, for reloads of a file that holds only a password.
    pub credentials_username: Option<String>,
    /// Re-authenticate open sessions when the credentials change.
    pub reauth_open_sessions: bool,
    /// Open sessions re-authenticate every this long from their start, even when the
    /// credentials did not change; `None`: only when they change.
    pub max_session_age: Option<Duration>,
    pub handshake: Handshake,
    pub admin: Admin,
    pub shutdown: Shutdown,
    pub log_format: LogFormat,
}

/// Where the upstream credentials come from (`credentials.source`).
#[derive(Debug, Clone)]
pub enum CredentialSource {
    /// None needed: `listen.protocol = "tcp"` authenticates nothing.
    None,
    /// This file, read again when it changes.
    File(PathBuf),
    /// What a command prints or an AWS IAM token, fetched again before it expires.
    Refreshed { source: Fetcher, schedule: Schedule },
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub address: Option<SocketAddr>,
    /// How often the ambassador probes the upstream on a connection of its own.
    pub probe_interval: Duration,
    /// `/readyz` fails when the upstream was last reached longer ago than this.
    pub ready_within: Duration,
    /// `POST /quitquitquit` (from a loopback peer) drains and exits, as a signal does.
    pub allow_quit: bool,
}

/// What happens after SIGTERM / SIGINT (or `POST /quitquitquit`).
#[derive(Debug, Clone, Copy)]
pub struct Shutdown {
    /// After a signal, keep accepting and serving new clients this long before draining: the
    /// application beside the ambassador is told to stop at the same moment and may still
    /// need Redis for its own shutdown. `/readyz` turns false at once regardless.
    pub min_delay: Duration,
    /// How long open sessions may finish once the listener is closed.
    pub drain_timeout: Duration,
}

#[derive(Debug)]
pub struct Listen {
    pub address: ListenAddress,
    pub protocol: Protocol,
    pub max_clients: usize,
    pub password: Option<DownstreamPassword>,
    /// Close a session idle (no byte either way) this long; off by default, because a
    /// blocking pop may rightly wait forever.
    pub idle_timeout: Option<Duration>,
    /// Keepalive on accepted TCP connections, so a vanished client releases its upstream one.
    pub dead_peer: DeadPeer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddress::Tcp(a) => write!(f, "{a}"),
            ListenAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    /// Where the upstream is: the targets new connections go to, kept current.
    pub discovery: Arc<Discovery>,
    /// `listen.protocol`: Redis (AUTH, parsing) or plain TCP.
    pub protocol: Protocol,
    /// The system resolver, or `upstream.dns_server`.
    pub resolver: Resolver,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// `TCP_USER_TIMEOUT` and keepalive on every upstream connection.
    pub dead_peer: DeadPeer,
    pub expect: UpstreamExpect,
    /// Upstream connections kept ready for new clients (`upstream.pool_size`).
    pub pool_size: usize,
    /// Connections clients leave clean are RESET, authenticated again and put back in the
    /// pool (`upstream.reuse`; on by default with a pool, impossible without one).
    pub reuse: bool,
    /// `[upstream.tls]`, its client config already built: `None` is plain TCP.
    pub tls: Option<Tls>,
}

impl Upstream {
    /// How to reach a target: this resolver, TLS and timeout.
    pub fn reach(&self) -> Reach<'_> {
        Reach {
            resolver: &self.resolver,
            tls: self.tls.as_ref(),
            timeout: self.connect_timeout,
            dead_peer: &self.dead_peer,
        }
    }
}

/// `listen.protocol`: what the ambassador speaks with its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// Redis: the ambassador authenticates, and parses both directions.
    #[default]
    Redis,
    /// A plain TCP forwarder (the pattern's `api` ambassador): no AUTH, no parsing.
    Tcp,
}

/// What the profile expects of its upstream, so a pod with the wrong environment's secret or
/// address fails loudly instead of writing to the wrong Redis.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamExpect {
    /// The user `ACL WHOAMI` must answer.
    pub user: Option<String>,
    /// Fields of `INFO server` and the values they must have.
    pub info: std::collections::BTreeMap<String, String>,
}

impl UpstreamExpect {
    /// Nothing is expected: no need to ask the upstream who it is.
    pub fn is_empty(&self) -> bool {
        self.user.is_none() && self.info.is_empty()
    }
}

/// `host:port`, the host resolved again for every new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("expected host:port, got {s:?}"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(format!("expected host:port, got {s:?}"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("invalid port in {s:?}"))?;
        Ok(HostPort {
            host: host.to_owned(),
            port,
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct Handshake {
    pub client_name: Option<String>,
    pub database: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Everything wrong with a configuration, each by key.
#[derive(Debug, Default)]
pub struct ConfigErrors {
    pub profile: String,
    pub problems: Vec<(String, String)>,
}

impl ConfigErrors {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push((key.into(), message.into()));
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration (profile {:?}):", self.profile)?;
        let mut problems: Vec<_> = self.problems.iter().collect();
        problems.sort();
        for (key, message) in problems {
            write!(f, "\n  {key}: {message}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

mod discovery;
mod raw;
mod validate;

impl Config {
    /// Builds the layered configuration and validates all of it, loading the credential files.
    pub fn load(opts: &LoadOptions) -> Result<Config, ConfigErrors> {
        let profile = opts
            .profile
            .clone()
            .unwrap_or_else(|| DEFAULT_PROFILE.to_owned());
        let mut errors = ConfigErrors {
            profile: profile.clone(),
            ..Default::default()
        };
        let one_shot =
            opts.profile.is_none() && opts.overrides.iter().any(|(k, _)| k == "upstream.address");
        let profile_file = opts.config_dir.join(format!("{profile}.toml"));
        if !one_shot && !profile_file.is_file() {
            errors.add(
                "profile",
                format!("no profile file {}", profile_file.display()),
            );
            return Err(errors);
        }
        let mut builder = config::Config::builder().add_source(
            File::from(opts.config_dir.join("default.toml"))
                .format(FileFormat::Toml)
                .required(false),
        );
        if !one_shot {
            builder = builder.add_source(File::from(profile_file).format(FileFormat::Toml));
        }
        builder = builder.add_source(
            Environment::with_prefix("AMBASSADOR")
                .prefix_separator("__")
                .separator("__")
                .source(Some(opts.env.clone().into_iter().collect())),
        );
        for (key, value) in &opts.overrides {
            builder = builder
                .set_override(key.as_str(), value.as_str())
                .expect("override keys are fixed section.key names");
        }
        let tree = match builder.build() {
            Ok(c) => match c.try_deserialize::<Value>() {
                Ok(tree) => tree,
                Err(e) => {
                    errors.add("profile", e.to_string());
                    return Err(errors);
                }
            },
            Err(e) => {
                errors.add("profile", e.to_string());
                return Err(errors);
            }
        };
        let raw = raw::deserialize_reporting_all(tree, &mut errors);
        validate::validate(raw, profile, opts.skip_credentials_command, errors)
    }
}

impl Config {
    /// A summary safe to print: addresses, names and file paths, never a secret.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "profile: {}\nlisten: {} (max_clients {})\nupstream: {} via {:?} (connect_timeout {:?}, handshake_timeout {:?})\ncredentials: user {:?} from {} (password redacted)",
            self.profile,
            self.listen.address,
            self.listen.max_clients,
            self.upstream.discovery,
            self.upstream.resolver,
            self.upstream.connect_timeout,
            self.upstream.handshake_timeout,
            self.credentials.username(),
            match &self.credentials_source {
                CredentialSource::None => "nowhere (TCP mode)".to_owned(),
                CredentialSource::File(path) => format!("file {}", path.display()),
                CredentialSource::Refreshed { source, .. } => source.describe(),
            },
        );
        if let CredentialSource::Refreshed { .. } = &self.credentials_source {
            let expires = self.credentials.expires_at().map(format_time);
            s.push_str(&format!(
                "\ncredentials expire: {}",
                expires.as_deref().unwrap_or("never (no expires_at)")
            ));
        }
        if self.listen.protocol == Protocol::Tcp {
            s.push_str("\nprotocol: tcp (no AUTH, no parsing)");
        }
        if let Some(tls) = &self.upstream.tls {
            s.push_str(&format!("\n{}", tls.summary()));
        }
        if self.listen.password.is_some() {
            s.push_str("\nclients must authenticate: yes (password redacted)");
        }
        if let Some(name) = &self.handshake.client_name {
            s.push_str(&format!("\nclient name: {name}"));
        }
        if let Some(db) = self.handshake.database {
            s.push_str(&format!("\ndatabase: {db}"));
        }
        s
    }
}
