//! `[upstream.sentinel]`: the master the sentinels announce. Asked at start, again every
//! `poll_interval`, and at once when a sentinel publishes `+switch-master` (a subscription on
//! every sentinel) or a session finds the master read-only. A change after the first answer
//! is a failover: sessions on the old master stop forwarding at once.

use std::time::Duration;

use redis_protocol::resp2::types::OwnedFrame;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::{Candidate, Choice, Discovery, Resolver, Target};
use crate::config::HostPort;
use crate::credentials::Credentials;
use crate::dead_peer::DeadPeer;
use crate::handshake;
use crate::metrics::Metrics;
use crate::tls::Tls;
use crate::upstream::{self, Reach, Stream};

#[derive(Debug)]
pub struct Sentinel {
    /// The monitored master's name (`sentinel monitor <name> ...`).
    pub master: String,
    pub addresses: Vec<HostPort>,
    /// `upstream.sentinel.credentials_file`: the sentinels' own password (and user).
    pub credentials: Option<Credentials>,
    pub tls: Option<Tls>,
    pub poll_interval: Duration,
    pub resolver: Resolver,
    pub timeout: Duration,
    pub dead_peer: DeadPeer,
}

impl Sentinel {
    fn reach(&self) -> Reach<'_> {
        Reach {
            resolver: &self.resolver,
            tls: self.tls.as_ref(),
            timeout: self.timeout,
            dead_peer: &self.dead_peer,
        }
    }

    /// A connection to one sentinel, authenticated when the profile gives credentials.
    async fn connect(&self, address: &HostPort) -> Result<Stream, String> {
        let target = Target::named(address.clone());
        let (mut stream, _) = upstream::connect(&self.reach(), &target)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(credentials) = &self.credentials {
            let reply = self
                .exchange(&mut stream, &credentials.auth_command())
                .await?;
            if let OwnedFrame::Error(e) = reply {
                let code = e.split_whitespace().next().unwrap_or("ERR").to_owned();
                return Err(format!("sentinel {address} refused AUTH ({code})"));
            }
        }
        Ok(stream)
    }

    async fn exchange(&self, stream: &mut Stream, command: &[u8]) -> Result<OwnedFrame, String> {
        let limit = self.timeout;
        let exchange = async {
            stream.write_all(command).await?;
            handshake::read_frame(stream, &mut Vec::new()).await
        };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| format!("no answer within {limit:?}"))?
            .map_err(|e| e.to_string())
    }

    /// Asks each sentinel in turn for the master; the first answer wins.
    pub async fn ask_master(&self) -> Result<Target, String> {
        let command = command(&["SENTINEL", "get-master-addr-by-name", &self.master]);
        let mut failures = Vec::new();
        for address in &self.addresses {
            let answer = async {
                let mut stream = self.connect(address).await?;
                let reply = self.exchange(&mut stream, &command).await?;
                master_address(reply, &self.master)
            };
            match answer.await {
                Ok(master) => {
                    return Ok(Target {
                        confirm_master: true,
                        ..Target::named(master)
                    })
                }
                Err(e) => failures.push(format!("{address}: {e}")),
            }
        }
        Err(format!("no sentinel answered: {}", failures.join("; ")))
    }

    /// Keeps the master current until `stop`.
    pub async fn follow(&self, discovery: &Discovery, metrics: &Metrics, stop: &CancellationToken) {
        let watching = futures_util::future::join_all(
            self.addresses
                .iter()
                .map(|a| self.watch_switches(a, discovery, stop)),
        );
        let polling = async {
            loop {
                match self.ask_master().await {
                    Ok(master) => {
                        let before = discovery.choice.borrow().candidates.first().cloned();
                        let failover = before.is_some_and(|b| b.target != master);
                        discovery.publish(
                            Choice {
                                candidates: vec![Candidate::new(master, 0, 0)],
                                failover,
                                error: None,
                            },
                            Some(metrics),
                        );
                    }
                    Err(e) => discovery.failed(e, Some(metrics)),
                }
                if !discovery.wait(self.poll_interval, stop).await {
                    return;
                }
            }
        };
        tokio::join!(watching, polling);
    }

    /// Subscribes to `+switch-master` on one sentinel and asks for a recheck at every
    /// message; reconnects after `poll_interval` when the connection fails.
    async fn watch_switches(
        &self,
        address: &HostPort,
        discovery: &Discovery,
        stop: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                e = self.switches(address, discovery) => {
                    tracing::debug!(sentinel = %address, error = %e, "sentinel subscription ended");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.poll_interval) => {}
            }
        }
    }

    /// One subscription to `+switch-master`, until its connection fails: returns why.
    async fn switches(&self, address: &HostPort, discovery: &Discovery) -> String {
        let mut stream = match self.connect(address).await {
            Ok(stream) => stream,
            Err(e) => return e,
        };
        let subscribe = command(&["SUBSCRIBE", "+switch-master"]);
        if let Err(e) = self.exchange(&mut stream, &subscribe).await {
            return e;
        }
        let mut buf = Vec::new();
        loop {
            if let Err(e) = handshake::read_frame(&mut stream, &mut buf).await {
                return e.to_string();
            }
            tracing::info!(sentinel = %address, "sentinel announced +switch-master");
            discovery.recheck();
        }
    }
}

/// A command as a RESP array of bulk strings.
fn command(parts: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        out.extend_from_slice(format!("${}\r\n{part}\r\n", part.len()).as_bytes());
    }
    out
}

/// `SENTINEL get-master-addr-by-name`'s answer: `[ip, port]`, or nil for an unknown name.
fn master_address(reply: OwnedFrame, master: &str) -> Result<HostPort, String> {
    match reply {
        OwnedFrame::Array(parts) if parts.len() == 2 => {
            let text = |f: &OwnedFrame| match f {
                OwnedFrame::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            };
            let host = text(&parts[0]).ok_or("malformed answer")?;
            let port = text(&parts[1])
                .and_then(|p| p.parse::<u16>().ok())
                .ok_or("malformed answer")?;
            Ok(HostPort { host, port })
        }
        OwnedFrame::Null => Err(format!("no master named {master:?}")),
        OwnedFrame::Error(e) => Err(format!("refused: {e}")),
        _ => Err("malformed answer".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let reply = OwnedFrame::Array(vec![
            OwnedFrame::BulkString(b"10.0.0.5".to_vec()),
            OwnedFrame::BulkString(b"6380".to_vec()),
        ]);
        assert_eq!(
            master_address(reply, "m").unwrap(),
            HostPort {
                host: "10.0.0.5".into(),
                port: 6380
            }
        );
        assert_eq!(
            master_address(OwnedFrame::Null, "m").unwrap_err(),
            "no master named \"m\""
        );
    }
}
