//! `upstream.srv`: the targets of a DNS SRV record, looked up at start and again when the
//! answer's TTL runs out (bounded by `srv_ttl_min` and `srv_ttl_max`), ordered for each new
//! connection by priority, then weight (RFC 2782).

use std::time::Duration;

use hickory_resolver::proto::rr::RData;
use tokio_util::sync::CancellationToken;

use super::{fqdn, Candidate, Choice, Discovery, Resolver, Target};
use crate::config::HostPort;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct Srv {
    /// The record's name, such as `_redis._tcp.cache.internal`.
    pub name: String,
    pub ttl_min: Duration,
    pub ttl_max: Duration,
}

impl Srv {
    /// The record's targets, and how long the answer may be used.
    pub async fn lookup(&self, resolver: &Resolver) -> Result<(Vec<Candidate>, Duration), String> {
        let dns = resolver.dns()?;
        let found = dns
            .srv_lookup(fqdn(&self.name).as_str())
            .await
            .map_err(|e| format!("SRV {}: {e}", self.name))?;
        let mut ttl = u32::MAX;
        let mut candidates = Vec::new();
        for record in found.answers() {
            if let RData::SRV(srv) = &record.data {
                ttl = ttl.min(record.ttl);
                let host = srv.target.to_utf8();
                let address = HostPort {
                    host: host.trim_end_matches('.').to_owned(),
                    port: srv.port,
                };
                candidates.push(Candidate::new(
                    Target::named(address),
                    srv.priority,
                    srv.weight,
                ));
            }
        }
        // RFC 2782: a single record with target "." means the service is not available here.
        candidates.retain(|c| !c.target.address.host.is_empty());
        if candidates.is_empty() {
            return Err(format!("SRV {}: no targets", self.name));
        }
        // A stable order, so that the same answer in another order is no change.
        candidates.sort_by(|a, b| {
            (a.priority, &a.target.address.host, a.target.address.port).cmp(&(
                b.priority,
                &b.target.address.host,
                b.target.address.port,
            ))
        });
        let ttl = Duration::from_secs(u64::from(ttl)).clamp(self.ttl_min, self.ttl_max);
        Ok((candidates, ttl))
    }

    /// Looks up again whenever the answer's TTL (bounded) runs out, until `stop`. A failed
    /// lookup keeps the last good answer and is tried again after `ttl_min`.
    pub async fn follow(
        &self,
        discovery: &Discovery,
        resolver: &Resolver,
        metrics: &Metrics,
        stop: &CancellationToken,
    ) {
        loop {
            let wait = match self.lookup(resolver).await {
                Ok((candidates, ttl)) => {
                    discovery.publish(Choice::of(candidates), Some(metrics));
                    ttl
                }
                Err(e) => {
                    discovery.failed(e, Some(metrics));
                    self.ttl_min
                }
            };
            if !discovery.wait(wait, stop).await {
                return;
            }
        }
    }
}

/// RFC 2782's order within one priority: repeatedly pick at random, each remaining target
/// with a chance proportional to its weight (weight 0 has a small chance, and goes first
/// among the zeros, as the RFC's running sum puts it).
pub fn weighted_order(mut group: Vec<Candidate>) -> Vec<Candidate> {
    // Zero weights first, so that the running sum gives them a chance only when all are 0.
    group.sort_by_key(|c| c.weight != 0);
    let mut ordered = Vec::with_capacity(group.len());
    while !group.is_empty() {
        let total: u64 = group.iter().map(|c| u64::from(c.weight)).sum();
        let pick = (crate::probe::random_unit() * (total + 1) as f64) as u64;
        let mut running = 0;
        let index = group
            .iter()
            .position(|c| {
                running += u64::from(c.weight);
                running >= pick
            })
            .unwrap_or(group.len() - 1);
        ordered.push(group.remove(index));
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(host: &str, weight: u16) -> Candidate {
        Candidate::new(
            Target::named(HostPort {
                host: host.into(),
                port: 1,
            }),
            0,
            weight,
        )
    }

    #[test]
    fn weights_share_first_places() {
        let mut first_a = 0;
        for _ in 0..2000 {
            let order = weighted_order(vec![candidate("a", 30), candidate("b", 10)]);
            assert_eq!(order.len(), 2);
            if order[0].target.address.host == "a" {
                first_a += 1;
            }
        }
        // Expected 30/41 of 2000 ≈ 1463; far from both 1000 (no weights) and 2000.
        assert!((1300..1650).contains(&first_a), "{first_a}");
    }

    #[test]
    fn zero_weight_only_when_nothing_else() {
        let mut zero_first = 0;
        for _ in 0..1000 {
            let order = weighted_order(vec![candidate("z", 0), candidate("b", 100)]);
            if order[0].target.address.host == "z" {
                zero_first += 1;
            }
        }
        // Chance 1/101 each time.
        assert!(zero_first < 40, "{zero_first}");
    }
}
