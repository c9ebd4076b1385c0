//! Configuration: config-crate layers -> serde structs (unknown keys refused) -> validate() ->
//! a typed [`Config`].
//!
//! Layers, later wins: built-in defaults, `<dir>/default.toml` (optional), `<dir>/<profile>.toml`,
//! `AMBASSADOR__SECTION__KEY` variables, then command-line overrides. Every problem is
//! collected and reported at once, each by its key; no secret is ever part of a message.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use config::{Environment, File, FileFormat, Value, ValueKind};
use serde::Deserialize;

use crate::credentials::{Credentials, DownstreamPassword};
use crate::tls::{Tls, TlsOptions};

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
}

pub const DEFAULT_PROFILE: &str = "dev";

/// The validated configuration of one ambassador process.
#[derive(Debug)]
pub struct Config {
    pub profile: String,
    pub listen: Listen,
    pub upstream: Upstream,
    pub credentials_file: PathBuf,
    pub credentials: Credentials,
    /// The username from the profile, for reloads of a file that holds only a password.
    pub credentials_username: Option<String>,
    /// Re-authenticate open sessions when the credentials change.
    pub reauth_open_sessions: bool,
    pub handshake: Handshake,
    pub admin: Admin,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub address: Option<SocketAddr>,
    /// How often the ambassador probes the upstream on a connection of its own.
    pub probe_interval: Duration,
    /// `/readyz` fails when the upstream was last reached longer ago than this.
    pub ready_within: Duration,
}

#[derive(Debug)]
pub struct Listen {
    pub address: ListenAddress,
    pub max_clients: usize,
    pub password: Option<DownstreamPassword>,
    /// Close a session idle (no byte either way) this long; off by default, because a
    /// blocking pop may rightly wait forever.
    pub idle_timeout: Option<Duration>,
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
    pub address: HostPort,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub expect: UpstreamExpect,
    /// `[upstream.tls]`, its client config already built: `None` is plain TCP.
    pub tls: Option<Tls>,
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

// The serde side: every key optional, so that a missing one is reported by validate() along
// with everything else, rather than stopping deserialization.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    listen: RawListen,
    upstream: RawUpstream,
    credentials: RawCredentials,
    handshake: RawHandshake,
    admin: RawAdmin,
    shutdown: RawShutdown,
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawListen {
    address: Option<String>,
    max_clients: Option<i64>,
    require_password_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    idle_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    address: Option<String>,
    srv: Option<String>,
    sentinel: Option<RawSentinel>,
    dns_server: Option<String>,
    #[serde(with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    handshake_timeout: Option<Duration>,
    tls: Option<RawTls>,
    expect: Option<UpstreamExpect>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSentinel {
    addresses: Vec<String>,
    master: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    enabled: Option<bool>,
    server_name: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    insecure_skip_verify: Option<bool>,
}

impl From<RawTls> for TlsOptions {
    fn from(raw: RawTls) -> Self {
        TlsOptions {
            server_name: raw.server_name,
            ca_file: raw.ca_file,
            client_cert_file: raw.client_cert_file,
            client_key_file: raw.client_key_file,
            insecure_skip_verify: raw.insecure_skip_verify.unwrap_or(false),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCredentials {
    file: Option<PathBuf>,
    username: Option<String>,
    reauth_open_sessions: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHandshake {
    client_name: Option<String>,
    database: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    address: Option<String>,
    #[serde(with = "humantime_serde")]
    probe_interval: Option<Duration>,
    #[serde(with = "humantime_serde")]
    ready_within: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawShutdown {
    #[serde(with = "humantime_serde")]
    drain_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: Option<String>,
}

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
        let raw = deserialize_reporting_all(tree, &mut errors);
        validate(raw, profile, errors)
    }
}

/// Deserializes the tree; each failure names a key, which is recorded and removed before
/// trying again, so every unknown or mistyped key is reported in one run.
fn deserialize_reporting_all(mut tree: Value, errors: &mut ConfigErrors) -> Raw {
    // Each round removes one key, so this ends; the bound is only a backstop.
    for _ in 0..256 {
        match tree.clone().try_deserialize::<Raw>() {
            Ok(raw) => return raw,
            Err(e) => {
                let (key, message) = describe(&e);
                errors.add(key.clone(), message);
                if !remove_key(&mut tree, &key) {
                    break;
                }
            }
        }
    }
    Raw::default()
}

/// The key a config-crate error is about, and what is wrong with it.
fn describe(e: &config::ConfigError) -> (String, String) {
    use config::ConfigError as E;
    let (key, inner) = match e {
        E::At { error, key, .. } => (key.clone().unwrap_or_default(), error.to_string()),
        E::Type {
            key,
            unexpected,
            expected,
            ..
        } => (
            key.clone().unwrap_or_default(),
            format!("expected {expected}, found {unexpected}"),
        ),
        other => (String::new(), other.to_string()),
    };
    // serde words an unknown key as "unknown field `x`, expected one of ...".
    if let Some(rest) = inner.strip_prefix("unknown field `") {
        if let Some((field, _)) = rest.split_once('`') {
            let full = if key.is_empty() {
                field.to_owned()
            } else {
                format!("{key}.{field}")
            };
            return (full, "unknown key".to_owned());
        }
    }
    (key, inner)
}

fn remove_key(tree: &mut Value, key: &str) -> bool {
    let mut node = tree;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let ValueKind::Table(table) = &mut node.kind else {
            return false;
        };
        if parts.peek().is_none() {
            return table.remove(part).is_some();
        }
        match table.get_mut(part) {
            Some(next) => node = next,
            None => return false,
        }
    }
    false
}

fn validate(raw: Raw, profile: String, mut errors: ConfigErrors) -> Result<Config, ConfigErrors> {
    let listen_address = match raw.listen.address.as_deref().unwrap_or("127.0.0.1:6379") {
        a if a.starts_with("unix:") => Some(ListenAddress::Unix(PathBuf::from(&a[5..]))),
        a => match a.parse() {
            Ok(addr) => Some(ListenAddress::Tcp(addr)),
            Err(_) => {
                errors.add(
                    "listen.address",
                    format!("expected ip:port or unix:/path, got {a:?}"),
                );
                None
            }
        },
    };
    let max_clients = match raw.listen.max_clients.unwrap_or(10_000) {
        n if n >= 1 => n as usize,
        n => {
            errors.add("listen.max_clients", format!("must be at least 1, got {n}"));
            1
        }
    };
    let password =
        raw.listen
            .require_password_file
            .and_then(|path| match DownstreamPassword::load(&path) {
                Ok(p) => Some(p),
                Err(e) => {
                    errors.add("listen.require_password_file", e.to_string());
                    None
                }
            });

    let upstream_address = match raw.upstream.address.as_deref() {
        Some(a) => a
            .parse::<HostPort>()
            .map_err(|e| errors.add("upstream.address", e))
            .ok(),
        None => {
            errors.add("upstream.address", "missing");
            None
        }
    };
    let not_yet = "not supported by this version; use upstream.address";
    if raw.upstream.srv.is_some() {
        errors.add("upstream.srv", not_yet);
    }
    if raw.upstream.sentinel.is_some() {
        errors.add("upstream.sentinel", not_yet);
    }
    if raw.upstream.dns_server.is_some() {
        errors.add("upstream.dns_server", "not supported by this version");
    }
    let tls = raw
        .upstream
        .tls
        .filter(|t| t.enabled.unwrap_or(true))
        .and_then(|t| {
            let host = upstream_address.as_ref().map(|a| a.host.as_str());
            Tls::build(&t.into(), host)
                .map_err(|problems| {
                    for p in problems {
                        errors.add(p.key(), p.to_string());
                    }
                })
                .ok()
        });
    let connect_timeout = positive(
        &mut errors,
        "upstream.connect_timeout",
        raw.upstream.connect_timeout,
        3,
    );
    let handshake_timeout = positive(
        &mut errors,
        "upstream.handshake_timeout",
        raw.upstream.handshake_timeout,
        3,
    );
    let probe_interval = positive(
        &mut errors,
        "admin.probe_interval",
        raw.admin.probe_interval,
        5,
    );
    let ready_within = raw.admin.ready_within.unwrap_or(probe_interval * 3);
    if ready_within < probe_interval {
        errors.add(
            "admin.ready_within",
            "must be at least admin.probe_interval",
        );
    }
    let idle_timeout = match raw.listen.idle_timeout {
        Some(d) if d.is_zero() => None,
        other => other,
    };
    let drain_timeout = raw
        .shutdown
        .drain_timeout
        .unwrap_or(Duration::from_secs(30));

    let credentials_username = raw.credentials.username.clone();
    let credentials = match raw.credentials.file.as_deref() {
        Some(path) => Credentials::load(path, raw.credentials.username.as_deref())
            .map_err(|e| errors.add("credentials.file", e.to_string()))
            .ok()
            .map(|c| (path.to_owned(), c)),
        None => {
            errors.add("credentials.file", "missing");
            None
        }
    };

    let database = match raw.handshake.database {
        Some(n) if !(0..=i64::from(u32::MAX)).contains(&n) => {
            errors.add(
                "handshake.database",
                format!("must be a database number, got {n}"),
            );
            None
        }
        other => other.map(|n| n as u32),
    };
    if let Some(name) = &raw.handshake.client_name {
        if name.is_empty() || name.bytes().any(|b| !(b'!'..=b'~').contains(&b)) {
            errors.add(
                "handshake.client_name",
                "must be printable ASCII without spaces",
            );
        }
    }
    let admin_address = raw.admin.address.as_deref().and_then(|a| {
        a.parse()
            .map_err(|_| errors.add("admin.address", format!("expected ip:port, got {a:?}")))
            .ok()
    });
    let log_format = match raw.log.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            errors.add(
                "log.format",
                format!("expected \"text\" or \"json\", got {other:?}"),
            );
            LogFormat::Text
        }
    };

    match (listen_address, upstream_address, credentials) {
        (Some(address), Some(upstream), Some((credentials_file, credentials)))
            if errors.problems.is_empty() =>
        {
            Ok(Config {
                profile,
                listen: Listen {
                    address,
                    max_clients,
                    password,
                    idle_timeout,
                },
                upstream: Upstream {
                    address: upstream,
                    connect_timeout,
                    handshake_timeout,
                    expect: raw.upstream.expect.unwrap_or_default(),
                    tls,
                },
                credentials_file,
                credentials,
                credentials_username,
                reauth_open_sessions: raw.credentials.reauth_open_sessions.unwrap_or(true),
                handshake: Handshake {
                    client_name: raw.handshake.client_name,
                    database,
                },
                admin: Admin {
                    address: admin_address,
                    probe_interval,
                    ready_within,
                },
                drain_timeout,
                log_format,
            })
        }
        _ => Err(errors),
    }
}

fn positive(
    errors: &mut ConfigErrors,
    key: &str,
    value: Option<Duration>,
    default_secs: u64,
) -> Duration {
    let default = Duration::from_secs(default_secs);
    match value {
        None => default,
        Some(d) if d.is_zero() => {
            errors.add(key, "must be longer than 0s");
            default
        }
        Some(d) => d,
    }
}

impl Config {
    /// A summary safe to print: addresses, names and file paths, never a secret.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "profile: {}\nlisten: {} (max_clients {})\nupstream: {} (connect_timeout {:?}, handshake_timeout {:?})\ncredentials: user {:?} from {} (password redacted)",
            self.profile,
            self.listen.address,
            self.listen.max_clients,
            self.upstream.address,
            self.upstream.connect_timeout,
            self.upstream.handshake_timeout,
            self.credentials.username(),
            self.credentials_file.display(),
        );
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
