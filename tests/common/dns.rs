//! A real DNS server for the tests: dnsmasq on an ephemeral loopback port, answering only
//! from a hosts file of the test's own, which the test rewrites and makes it re-read (SIGHUP).

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::*;

pub struct Dns {
    pub addr: SocketAddr,
    hosts: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Dns {
    /// dnsmasq serving `records` (`(ip, name)` pairs), nothing else: no upstream servers, no
    /// /etc/hosts, TTL 0.
    pub fn start(records: &[(&str, &str)]) -> Dns {
        let binary = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!("dnsmasq not found: install it with `apt-get install dnsmasq-base`")
            });
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        write_hosts(&hosts, records);
        let port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("ephemeral UDP port")
            .port();
        let child = Command::new(binary)
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--local-ttl=0",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dnsmasq");
        Dns {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            hosts,
            child,
            _dir: dir,
        }
    }

    /// Replaces every record and makes dnsmasq read them again.
    pub fn set(&self, records: &[(&str, &str)]) {
        write_hosts(&self.hosts, records);
        send_signal(self.child.id(), "HUP");
    }

    /// Waits until `name` resolves to `ip` through this server.
    pub async fn wait_answer(&self, name: &str, ip: &str) {
        let resolver = redis_ambassador::discovery::Resolver::server(self.addr).unwrap();
        let target = redis_ambassador::config::HostPort {
            host: name.to_owned(),
            port: 1,
        };
        let want: std::net::IpAddr = ip.parse().unwrap();
        wait_until(&format!("dnsmasq answers {name} -> {ip}"), DEADLINE, || {
            let resolver = resolver.clone();
            let target = target.clone();
            async move {
                matches!(resolver.resolve(&target).await, Ok(found) if found.iter().any(|a| a.ip() == want))
            }
        })
        .await;
    }
}

fn write_hosts(path: &std::path::Path, records: &[(&str, &str)]) {
    let text: String = records
        .iter()
        .map(|(ip, name)| format!("{ip} {name}\n"))
        .collect();
    std::fs::write(path, text).unwrap();
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
