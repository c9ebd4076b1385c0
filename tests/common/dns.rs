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
    dir: tempfile::TempDir,
}

/// One SRV record: `name` -> `target:port` with a priority and a weight.
#[derive(Debug, Clone)]
pub struct SrvRecord {
    pub name: String,
    pub target: String,
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
}

impl SrvRecord {
    pub fn new(name: &str, target: &str, port: u16, priority: u16, weight: u16) -> SrvRecord {
        SrvRecord {
            name: name.into(),
            target: target.into(),
            port,
            priority,
            weight,
        }
    }
}

impl Dns {
    /// dnsmasq serving `records` (`(ip, name)` pairs), nothing else: no upstream servers, no
    /// /etc/hosts, TTL 0.
    pub fn start(records: &[(&str, &str)]) -> Dns {
        Self::start_srv(records, &[])
    }

    /// [`start`](Self::start) with SRV records too.
    pub fn start_srv(records: &[(&str, &str)], srv: &[SrvRecord]) -> Dns {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        write_hosts(&hosts, records);
        // A port that was free may be taken by the time dnsmasq binds it (its TCP side
        // too): then it exits, and another port is tried.
        let (addr, child) = (0..10)
            .find_map(|_| {
                let port = UdpSocket::bind("127.0.0.1:0")
                    .and_then(|s| s.local_addr())
                    .expect("ephemeral UDP port")
                    .port();
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                spawn_answering(addr, &hosts, dir.path(), srv).map(|child| (addr, child))
            })
            .expect("dnsmasq did not start on any of 10 ports");
        Dns {
            addr,
            hosts,
            child,
            dir,
        }
    }

    /// Replaces the SRV records: dnsmasq reads them only at start, so it is restarted on the
    /// same port (the hosts file stays).
    pub fn set_srv(&mut self, srv: &[SrvRecord]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = (0..10)
            .find_map(|_| spawn_answering(self.addr, &self.hosts, self.dir.path(), srv))
            .expect("dnsmasq did not start again on its port");
    }

    /// Waits until `name`'s SRV answer names `target:port` through this server.
    pub async fn wait_srv(&self, name: &str, target: &str, port: u16) {
        let resolver = hickory_resolver_for(self.addr);
        let want = format!("{target}.:{port}");
        wait_until(
            &format!("dnsmasq answers SRV {name} -> {want}"),
            DEADLINE,
            || {
                let resolver = resolver.clone();
                let want = want.clone();
                let name = format!("{name}.");
                async move {
                    match resolver.srv_lookup(name.as_str()).await {
                        Ok(found) => found.answers().iter().any(|r| match &r.data {
                            hickory_resolver::proto::rr::RData::SRV(s) => {
                                format!("{}:{}", s.target, s.port) == want
                            }
                            _ => false,
                        }),
                        Err(_) => false,
                    }
                }
            },
        )
        .await;
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

/// dnsmasq on `addr`, once it answers; `None` if it exited (its port was taken).
fn spawn_answering(
    addr: SocketAddr,
    hosts: &std::path::Path,
    dir: &std::path::Path,
    srv: &[SrvRecord],
) -> Option<Child> {
    let mut child = spawn(addr, hosts, dir, srv);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(50)))
        .unwrap();
    // A query for `ready.` (type A), id 0x1234: any answer means dnsmasq is serving.
    let query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ready\x00\x00\x01\x00\x01";
    let deadline = std::time::Instant::now() + DEADLINE;
    while std::time::Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return None;
        }
        let _ = socket.send_to(query, addr);
        let mut answer = [0u8; 512];
        if socket.recv_from(&mut answer).is_ok() {
            return Some(child);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// dnsmasq on `addr`, answering from `hosts` and `srv` only.
fn spawn(
    addr: SocketAddr,
    hosts: &std::path::Path,
    dir: &std::path::Path,
    srv: &[SrvRecord],
) -> Child {
    let binary = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("dnsmasq not found: install it with `apt-get install dnsmasq-base`")
        });
    Command::new(binary)
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
        .arg(format!("--port={}", addr.port()))
        .arg(format!("--addn-hosts={}", hosts.display()))
        .arg(format!("--pid-file={}", dir.join("pid").display()))
        .args(srv.iter().map(|r| {
            format!(
                "--srv-host={},{},{},{},{}",
                r.name, r.target, r.port, r.priority, r.weight
            )
        }))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dnsmasq")
}

/// A hickory resolver that asks only `server` and caches nothing.
fn hickory_resolver_for(server: SocketAddr) -> hickory_resolver::TokioResolver {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig};
    let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
    for connection in &mut name_server.connections {
        connection.port = server.port();
    }
    let mut builder = hickory_resolver::TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![name_server]),
        hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    );
    builder.options_mut().cache_size = 0;
    builder.build().unwrap()
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
