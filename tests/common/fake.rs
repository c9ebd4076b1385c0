//! A scripted stand-in for Redis on a loopback port that records every byte each connection
//! sent it. MONITOR on a real server shows only commands Redis parsed and ran; bytes forwarded
//! in part (half a frame, a header without its value) show only here.

use std::sync::{Arc, Mutex};

use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame as F2;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// One connection's bytes, and whether its peer closed it (then they are final).
type Recorded = (Vec<u8>, bool);

/// Accepts connections until dropped; answers what the ambassador's handshake and a test's
/// few commands need (AUTH, PING, ECHO, ACL WHOAMI) and `-ERR fake` to anything else.
pub struct FakeUpstream {
    pub addr: String,
    received: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// The fake on a listener the test made: e.g. from a socket it bound long before it
    /// listened, so that the port refused connections until now and was never free.
    pub fn serve(listener: TcpListener) -> FakeUpstream {
        let addr = listener.local_addr().unwrap().to_string();
        let received = Arc::new(Mutex::new(Vec::new()));
        let all = Arc::clone(&received);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let index = {
                    let mut all = all.lock().unwrap();
                    all.push((Vec::new(), false));
                    all.len() - 1
                };
                let all = Arc::clone(&all);
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut chunk = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = stream.read(&mut chunk).await {
                        all.lock().unwrap()[index].0.extend_from_slice(&chunk[..n]);
                        pending.extend_from_slice(&chunk[..n]);
                        if stream.write_all(&answer_all(&mut pending)).await.is_err() {
                            break;
                        }
                    }
                    all.lock().unwrap()[index].1 = true;
                });
            }
        });
        FakeUpstream {
            addr,
            received,
            task,
        }
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// How many connections the peer closed (their bytes are final).
    pub fn closed(&self) -> usize {
        self.received.lock().unwrap().iter().filter(|c| c.1).count()
    }

    /// Everything each connection sent so far, in the order they were accepted, but for the
    /// probe's (the ambassador's AUTH, ACL WHOAMI and INFO server, whenever it ran).
    pub fn received(&self) -> Vec<Vec<u8>> {
        let mut probe = ServerAuth::app().auth_command();
        probe.extend(command(&["ACL", "WHOAMI"]));
        probe.extend(command(&["INFO", "server"]));
        let all = self.received.lock().unwrap();
        all.iter()
            .filter(|c| c.0 != probe)
            .map(|c| c.0.clone())
            .collect()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The fake's replies to every whole command at the front of `pending`, which keeps the rest.
pub fn answer_all(pending: &mut Vec<u8>) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some((frame, used))) = decode(pending) {
        pending.drain(..used);
        out.extend(answer(&frame));
    }
    out
}

/// The fake's reply to one command.
fn answer(frame: &F2) -> Vec<u8> {
    let F2::Array(items) = frame else {
        return b"-ERR fake: not a command\r\n".to_vec();
    };
    let args: Vec<String> = items
        .iter()
        .map(|f| match f {
            F2::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        })
        .collect();
    let name = args
        .first()
        .map(|a| a.to_ascii_uppercase())
        .unwrap_or_default();
    match (name.as_str(), args.len()) {
        ("AUTH", _) | ("SELECT", 2) => b"+OK\r\n".to_vec(),
        ("PING", 1) => b"+PONG\r\n".to_vec(),
        ("ECHO", 2) => command_reply_bulk(&args[1]),
        ("ACL", 2) if args[1].eq_ignore_ascii_case("WHOAMI") => command_reply_bulk(USER),
        _ => b"-ERR fake: unknown command\r\n".to_vec(),
    }
}

fn command_reply_bulk(s: &str) -> Vec<u8> {
    format!("${}\r\n{s}\r\n", s.len()).into_bytes()
}
