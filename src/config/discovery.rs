//! The `[upstream]` keys that say where the upstream is (one of `address`, `srv`,
//! `sentinel`, `addresses`) and what happens to open sessions when it moves.

use std::time::Duration;

use super::raw::RawUpstream;
use super::{ConfigErrors, HostPort};
use crate::credentials::Credentials;
use crate::dead_peer::DeadPeer;
use crate::discovery::backends::{Backends, Strategy};
use crate::discovery::sentinel::Sentinel;
use crate::discovery::srv::Srv;
use crate::discovery::{MovePolicy, Resolver, Source};
use crate::tls::Tls;

/// The one kind of discovery the profile gives (the caller checked there is exactly one).
/// `reach`: the upstream's resolver, connect timeout and dead-peer settings, which the
/// sentinels' connections share.
pub(super) fn source(
    raw: &mut RawUpstream,
    address: Option<HostPort>,
    reach: (Resolver, Duration, DeadPeer),
    errors: &mut ConfigErrors,
) -> Option<Source> {
    if raw.address.is_some() {
        return address.map(Source::Address);
    }
    if let Some(name) = &raw.srv {
        return srv(name, raw, errors).map(Source::Srv);
    }
    if raw.sentinel.is_some() {
        return sentinel(raw, reach, errors).map(|s| Source::Sentinel(Box::new(s)));
    }
    backends(raw, errors).map(Source::Backends)
}

fn srv(name: &str, raw: &RawUpstream, errors: &mut ConfigErrors) -> Option<Srv> {
    let ttl_min = raw.srv_ttl_min.unwrap_or(Duration::from_secs(5));
    let ttl_max = raw.srv_ttl_max.unwrap_or(Duration::from_secs(300));
    if ttl_min.is_zero() {
        errors.add("upstream.srv_ttl_min", "must be longer than 0s");
    }
    if ttl_max < ttl_min {
        errors.add(
            "upstream.srv_ttl_max",
            format!("must be at least upstream.srv_ttl_min ({ttl_min:?})"),
        );
    }
    if name.trim().is_empty() || name.contains(char::is_whitespace) {
        errors.add(
            "upstream.srv",
            "expected a DNS name such as _redis._tcp.cache.internal",
        );
        return None;
    }
    Some(Srv {
        name: name.to_owned(),
        ttl_min,
        ttl_max,
    })
}

fn sentinel(
    raw: &mut RawUpstream,
    (resolver, timeout, dead_peer): (Resolver, Duration, DeadPeer),
    errors: &mut ConfigErrors,
) -> Option<Sentinel> {
    let s = raw.sentinel.take()?;
    let master = s.master.filter(|m| !m.is_empty());
    if master.is_none() {
        errors.add("upstream.sentinel.master", "missing");
    }
    let addresses = host_ports("upstream.sentinel.addresses", &s.addresses, errors);
    let credentials = s.credentials_file.and_then(|path| {
        Credentials::load(&path, None)
            .map_err(|e| errors.add("upstream.sentinel.credentials_file", e.to_string()))
            .ok()
    });
    let tls = s.tls.filter(|t| t.enabled.unwrap_or(true)).and_then(|t| {
        Tls::build(&t.into(), None)
            .map_err(|problems| {
                for p in problems {
                    let key = p.key().replacen("upstream.tls", "upstream.sentinel.tls", 1);
                    errors.add(key, p.to_string());
                }
            })
            .ok()
    });
    let poll_interval = s.poll_interval.unwrap_or(Duration::from_secs(5));
    if poll_interval.is_zero() {
        errors.add("upstream.sentinel.poll_interval", "must be longer than 0s");
    }
    Some(Sentinel {
        master: master?,
        addresses: addresses?,
        credentials,
        tls,
        poll_interval,
        resolver,
        timeout,
        dead_peer,
    })
}

fn backends(raw: &RawUpstream, errors: &mut ConfigErrors) -> Option<Backends> {
    let listed = raw.addresses.as_deref().unwrap_or_default();
    let addresses = host_ports("upstream.addresses", listed, errors);
    let strategy = match raw.strategy.as_deref() {
        None | Some("failover") => Strategy::Failover,
        Some("round-robin") => Strategy::RoundRobin,
        Some(other) => {
            errors.add(
                "upstream.strategy",
                format!("expected \"failover\" or \"round-robin\", got {other:?}"),
            );
            Strategy::Failover
        }
    };
    let health_interval = raw.health_interval.unwrap_or(Duration::from_secs(5));
    if health_interval.is_zero() {
        errors.add("upstream.health_interval", "must be longer than 0s");
    }
    Some(Backends {
        addresses: addresses?,
        strategy,
        health_interval,
    })
}

/// A non-empty list of `host:port`, each problem reported by the list's key.
fn host_ports(key: &str, listed: &[String], errors: &mut ConfigErrors) -> Option<Vec<HostPort>> {
    if listed.is_empty() {
        errors.add(key, "must list at least one host:port");
        return None;
    }
    let parsed: Vec<Result<HostPort, String>> = listed.iter().map(|a| a.parse()).collect();
    let mut ok = Vec::with_capacity(parsed.len());
    for p in parsed {
        match p {
            Ok(a) => ok.push(a),
            Err(e) => errors.add(key, e),
        }
    }
    (ok.len() == listed.len()).then_some(ok)
}

/// `move_open_sessions` and `move_grace`.
pub(super) fn policy(raw: &RawUpstream, errors: &mut ConfigErrors) -> MovePolicy {
    let grace = raw.move_grace.unwrap_or(Duration::from_secs(180));
    match raw.move_open_sessions.as_deref() {
        None | Some("at-idle") => MovePolicy::AtIdle { grace },
        Some("never") => {
            if raw.move_grace.is_some() {
                errors.add(
                    "upstream.move_grace",
                    "only with upstream.move_open_sessions = \"at-idle\"",
                );
            }
            MovePolicy::Never
        }
        Some(other) => {
            errors.add(
                "upstream.move_open_sessions",
                format!("expected \"at-idle\" or \"never\", got {other:?}"),
            );
            MovePolicy::AtIdle { grace }
        }
    }
}
