//! A network namespace of the test's own, joined to the root namespace by a veth pair, so a
//! peer can vanish without a word: taking the inner end down makes the outer end lose its
//! carrier, and what is sent there is dropped (no RST, no ICMP from the peer), as when a node
//! dies or the network partitions. Addresses are link-local /30s that exist only on these
//! veths. Deleted on drop, with the veth pair.

use std::net::Ipv4Addr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Namespaces made by this process so far: with the pid, a unique name per test.
static MADE: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    pub name: String,
    /// The veth end inside the namespace, and its address.
    inner: String,
    pub inner_addr: Ipv4Addr,
    /// The veth end in the root namespace (where the test and the ambassador run).
    outer: String,
    pub outer_addr: Ipv4Addr,
}

impl Netns {
    /// A fresh namespace, or `None` with a message where this machine forbids them (not
    /// root, no `ip`, a sandbox). In CI (`CI=true`) that is a failure, not a skip.
    pub fn create_or_skip(test: &str) -> Option<Netns> {
        match Netns::create() {
            Ok(ns) => Some(ns),
            Err(why) if in_ci() => panic!("{test}: network namespaces are required in CI: {why}"),
            Err(why) => {
                eprintln!("SKIPPED {test}: cannot create a network namespace here ({why})");
                None
            }
        }
    }

    fn create() -> Result<Netns, String> {
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("ra-test-{pid}-{n}");
        // Interface names have at most 15 bytes: "ra" + 7 pid digits + "x" + n + 1.
        let stem = format!("ra{pid}x{n}");
        let (inner_addr, outer_addr) = free_subnet(pid, n)?;
        ip(&["netns", "add", &name])?;
        // From here on Drop deletes the namespace, and with it the veth pair.
        let ns = Netns {
            name,
            inner: format!("{stem}i"),
            inner_addr,
            outer: format!("{stem}o"),
            outer_addr,
        };
        ip(&[
            "link", "add", &ns.outer, "type", "veth", "peer", "name", &ns.inner, "netns", &ns.name,
        ])?;
        ip(&["addr", "add", &format!("{outer_addr}/30"), "dev", &ns.outer])?;
        ip(&["link", "set", &ns.outer, "up"])?;
        ns.ip(&["addr", "add", &format!("{inner_addr}/30"), "dev", &ns.inner])?;
        ns.ip(&["link", "set", &ns.inner, "up"])?;
        Ok(ns)
    }

    /// `program` run inside the namespace (`ip netns exec` execs it: the child's pid is the
    /// program's own).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Takes the inner end down: from now on the namespace's peers vanish without a word.
    pub fn cut(&self) {
        self.ip(&["link", "set", &self.inner, "down"])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn ip(&self, args: &[&str]) -> Result<Output, String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        // Normally gone with its peer; but a namespace outlives `netns del` while a process
        // is still in it, and its veth must not go on routing the /30.
        let _ = Command::new("ip")
            .args(["link", "del", &self.outer])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A 169.254.x.y/30 that no interface of the root namespace uses (another test's veth): the
/// inner and outer host addresses. 169.254.169.0/24 (cloud metadata) is never used.
fn free_subnet(pid: u32, n: u32) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let used = String::from_utf8_lossy(&ip(&["-o", "-4", "addr", "show"])?.stdout).into_owned();
    // 253 usable third octets x 64 /30s each.
    let slots = 253 * 64;
    let start = (pid.wrapping_mul(64) + n) % slots;
    for i in 0..256 {
        let slot = (start + i) % slots;
        let third = (slot / 64 + 1) as u8; // 1..=253
        if third == 169 {
            continue;
        }
        let base = (slot % 64 * 4) as u8;
        let inner = Ipv4Addr::new(169, 254, third, base + 2);
        let outer = Ipv4Addr::new(169, 254, third, base + 1);
        let prefix = format!("169.254.{third}.");
        let taken = used.split_whitespace().any(|w| {
            w.strip_prefix(&prefix)
                .and_then(|rest| rest.split('/').next()?.parse::<u8>().ok())
                .is_some_and(|last| last / 4 == base / 4)
        });
        if !taken {
            return Ok((inner, outer));
        }
    }
    Err("no free 169.254.x.y/30 for a veth pair".into())
}
