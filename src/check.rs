//! `--check`: connect and authenticate once, as a session would, and report what was found.

use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;
use crate::handshake;
use crate::upstream;

/// Connects, runs the handshake, then asks the server who we are and what it runs.
pub async fn run(config: &Config) -> Result<String, Box<dyn std::error::Error>> {
    let (mut stream, addr) = upstream::connect(&config.upstream).await?;
    handshake::run(
        &mut stream,
        &config.credentials,
        &config.handshake,
        config.upstream.handshake_timeout,
    )
    .await?;
    stream
        .write_all(b"*2\r\n$3\r\nACL\r\n$6\r\nWHOAMI\r\n*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
        .await?;
    let mut buf = Vec::new();
    let mut replies = Vec::new();
    let deadline = tokio::time::Instant::now() + config.upstream.handshake_timeout;
    while replies.len() < 2 {
        if let Some((frame, used)) = decode(&buf)? {
            buf.drain(..used);
            replies.push(frame);
            continue;
        }
        let n = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await??;
        if n == 0 {
            return Err("upstream closed the connection".into());
        }
    }
    let whoami = match &replies[0] {
        OwnedFrame::BulkString(b) | OwnedFrame::SimpleString(b) => {
            String::from_utf8_lossy(b).into_owned()
        }
        _ => "unknown (ACL WHOAMI refused)".to_owned(),
    };
    let version = match &replies[1] {
        OwnedFrame::BulkString(b) => String::from_utf8_lossy(b)
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:").map(str::to_owned))
            .unwrap_or_else(|| "unknown".into()),
        _ => "unknown".to_owned(),
    };
    let mut report = format!("connected: {addr}\n");
    if let Some(tls) = stream.tls_summary() {
        report.push_str(&tls);
        report.push('\n');
    }
    report.push_str(&format!(
        "authenticated as: {whoami}\nserver version: {version}"
    ));
    Ok(report)
}
