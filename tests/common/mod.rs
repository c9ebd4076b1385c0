//! The one test harness: real redis-server processes on ephemeral loopback ports, the
//! ambassador in-process (or as the real binary), and a raw RESP client with deadlines.
//! No fixed ports, no sleeps as synchronisation: everything waits on a condition with a limit.
#![allow(dead_code)]

pub mod pki;

mod ambassador;
mod binary;
mod dns;
mod fake;
mod netns;
mod process;
mod raw;
mod redis;
mod sentinel;

// Each test binary uses part of the harness.
#[allow(unused_imports)]
pub use {
    ambassador::*, binary::*, dns::*, fake::*, netns::*, process::*, raw::*, redis::*, sentinel::*,
};

pub use pki::ServerTls;

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::time::Duration;

pub const DEADLINE: Duration = Duration::from_secs(10);
pub const USER: &str = "app";
pub const PASSWORD: &str = "app-secret-7f3a";
/// Profile lines that keep the periodic probe out of the way (it connects to Redis too,
/// which tests counting Redis's connections must not see), and the same as environment.
pub const NO_PROBES: &str = "[admin]\nprobe_interval = \"1h\"\n";
pub const NO_PROBES_ENV: (&str, &str) = ("AMBASSADOR__ADMIN__PROBE_INTERVAL", "1h");
/// What clients must offer when a test sets `listen.require_password_file`.
pub const CLIENT_PASSWORD: &str = "client-pass-55";

/// Finds a program or fails with a message that says how to install it.
pub fn require(program: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{program} not found on PATH: these tests need a real Redis. \
             Install it with `apt-get install redis-server redis-tools` (Debian/Ubuntu)."
        )
    })
}

/// A port that was free a moment ago. Servers that lose the race are restarted on another.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}
