//! The serde side of the configuration: every key optional, so that a missing one is
//! reported by validation along with everything else, and unknown keys refused. A failure to
//! deserialize names a key; that key is recorded and removed, and deserialization tried again,
//! so every unknown or mistyped key is reported in one run.

use std::path::PathBuf;
use std::time::Duration;

use config::{Value, ValueKind};
use serde::Deserialize;

use super::{ConfigErrors, UpstreamExpect};
use crate::tls::TlsOptions;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Raw {
    pub(super) listen: RawListen,
    pub(super) upstream: RawUpstream,
    pub(super) credentials: RawCredentials,
    pub(super) handshake: RawHandshake,
    pub(super) admin: RawAdmin,
    pub(super) shutdown: RawShutdown,
    pub(super) log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawListen {
    pub(super) address: Option<String>,
    pub(super) protocol: Option<String>,
    pub(super) max_clients: Option<i64>,
    pub(super) require_password_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub(super) idle_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub(super) keepalive: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    pub(super) address: Option<String>,
    pub(super) srv: Option<String>,
    #[serde(with = "humantime_serde")]
    pub(super) srv_ttl_min: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub(super) srv_ttl_max: Option<Duration>,
    pub(super) sentinel: Option<RawSentinel>,
    pub(super) addresses: Option<Vec<String>>,
    pub(super) strategy: Option<String>,
    #[serde(with = "humantime_serde")]
    pub(super) health_interval: Option<Duration>,
    pub(super) move_open_sessions: Option<String>,
    #[serde(with = "humantime_serde")]
    pub(super) move_grace: Option<Duration>,
    pub(super) dns_server: Option<String>,
    pub(super) pool_size: Option<i64>,
    pub(super) reuse: Option<bool>,
    #[serde(with = "humantime_serde")]
    pub(super) connect_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub(super) handshake_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub(super) dead_peer_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub(super) keepalive: Option<Duration>,
    pub(super) tls: Option<RawTls>,
    pub(super) expect: Option<UpstreamExpect>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSentinel {
    pub(super) addresses: Vec<String>,
    pub(super) master: Option<String>,
    pub(super) credentials_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub(super) poll_interval: Option<Duration>,
    pub(super) tls: Option<RawTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTls {
    pub(super) enabled: Option<bool>,
    pub(super) server_name: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) client_cert_file: Option<PathBuf>,
    pub(super) client_key_file: Option<PathBuf>,
    pub(super) insecure_skip_verify: Option<bool>,
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
pub(super) struct RawCredentials {
    pub(super) source: Option<String>,
    pub(super) file: Option<PathBuf>,
    pub(super) command: Option<Vec<String>>,
    #[serde(with = "humantime_serde")]
    pub(super) command_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub(super) refresh_margin: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub(super) refresh_interval: Option<Duration>,
    pub(super) username: Option<String>,
    pub(super) reauth_open_sessions: Option<bool>,
    #[serde(with = "humantime_serde")]
    pub(super) max_session_age: Option<Duration>,
    pub(super) aws_iam: Option<RawAwsIam>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAwsIam {
    pub(super) cache_name: Option<String>,
    pub(super) region: Option<String>,
    pub(super) service: Option<String>,
    pub(super) serverless: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHandshake {
    pub(super) client_name: Option<String>,
    pub(super) database: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub(super) address: Option<String>,
    #[serde(with = "humantime_serde")]
    pub(super) probe_interval: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub(super) ready_within: Option<Duration>,
    pub(super) allow_quit: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawShutdown {
    #[serde(with = "humantime_serde")]
    pub(super) drain_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub(super) min_delay: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) format: Option<String>,
}

/// Deserializes the tree; each failure names a key, which is recorded and removed before
/// trying again, so every unknown or mistyped key is reported in one run.
pub(super) fn deserialize_reporting_all(mut tree: Value, errors: &mut ConfigErrors) -> Raw {
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
