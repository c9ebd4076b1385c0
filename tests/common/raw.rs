//! A raw RESP connection with a deadline on every read, and shorthands for frames.

use std::time::{Duration, Instant};

use redis_protocol::resp3::decode::complete::decode as decode3;
use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// Encodes a command as a RESP array of bulk strings.
pub fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n{a}\r\n", a.len()).into_bytes());
    }
    out
}

/// A raw RESP connection with deadlines on every read.
pub struct Raw {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: &str) -> Raw {
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// A client on a connection made elsewhere (one that may fail without panicking).
    pub fn from_stream(stream: TcpStream) -> Raw {
        let _ = stream.set_nodelay(true);
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends `bytes`; false if the connection is gone.
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// The next frame within `limit`; `None` if the connection closed, failed or stayed
    /// silent.
    pub async fn try_reply_within(&mut self, limit: Duration) -> Option<OwnedFrame> {
        self.frame_within(limit).await.ok().flatten()
    }

    /// The next frame; `Ok(None)` if the connection closed or failed first, `Err` if `limit`
    /// passed.
    async fn frame_within(
        &mut self,
        limit: Duration,
    ) -> Result<Option<OwnedFrame>, tokio::time::error::Elapsed> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((frame, used)) = decode_any(&self.buf) {
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut chunk = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout(left, self.stream.read(&mut chunk))
                .await?
                .unwrap_or(0);
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    pub async fn cmd(&mut self, args: &[&str]) -> OwnedFrame {
        self.send(&command(args)).await;
        self.reply().await
    }

    /// The next complete frame (RESP2 or RESP3), within the deadline.
    pub async fn reply(&mut self) -> OwnedFrame {
        self.try_reply()
            .await
            .expect("connection closed before a reply")
    }

    /// The next frame, or `None` if the connection closed first.
    pub async fn try_reply(&mut self) -> Option<OwnedFrame> {
        self.frame_within(DEADLINE)
            .await
            .expect("timed out waiting for a reply")
    }

    /// Reads exactly `n` raw bytes.
    pub async fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        while self.buf.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut chunk = vec![0u8; 64 * 1024];
            let got = tokio::time::timeout(left, self.stream.read(&mut chunk))
                .await
                .expect("timed out reading bytes")
                .expect("read");
            assert!(
                got > 0,
                "closed after {} of {n} bytes: {:?}",
                self.buf.len(),
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..got]);
        }
        self.buf.drain(..n).collect()
    }

    /// Waits for the peer to close, returning whatever arrived before.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout(left, self.stream.read(&mut chunk))
                .await
                .expect("timed out waiting for close")
            {
                Ok(0) | Err(_) => return std::mem::take(&mut self.buf),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Decodes one RESP2 or RESP3 frame. redis-protocol's RESP3 decoder reads RESP2's `$-1` and
/// `*-1` nulls as the start of a streamed frame, so RESP2 is tried first and converted.
pub fn decode_any(buf: &[u8]) -> Option<(OwnedFrame, usize)> {
    use redis_protocol::resp2::decode::decode as decode2;
    use redis_protocol::resp2::types::OwnedFrame as F2;
    fn convert(f: F2) -> OwnedFrame {
        match f {
            F2::SimpleString(data) => OwnedFrame::SimpleString {
                data,
                attributes: None,
            },
            F2::Error(data) => OwnedFrame::SimpleError {
                data,
                attributes: None,
            },
            F2::Integer(data) => OwnedFrame::Number {
                data,
                attributes: None,
            },
            F2::BulkString(data) => OwnedFrame::BlobString {
                data,
                attributes: None,
            },
            F2::Array(items) => OwnedFrame::Array {
                data: items.into_iter().map(convert).collect(),
                attributes: None,
            },
            F2::Null => OwnedFrame::Null,
        }
    }
    match decode2(buf) {
        Ok(Some((frame, used))) => Some((convert(frame), used)),
        // Incomplete as RESP2: complete only if it is RESP3 that RESP2 cannot tell yet.
        Ok(None) => decode3(buf).ok().flatten(),
        // A RESP3-only type somewhere in it.
        Err(_) => decode3(buf).expect("valid RESP from the server"),
    }
}

/// Shorthands for expected frames.
pub fn simple(s: &str) -> OwnedFrame {
    OwnedFrame::SimpleString {
        data: s.as_bytes().to_vec(),
        attributes: None,
    }
}

pub fn bulk(s: &[u8]) -> OwnedFrame {
    OwnedFrame::BlobString {
        data: s.to_vec(),
        attributes: None,
    }
}

pub fn int(i: i64) -> OwnedFrame {
    OwnedFrame::Number {
        data: i,
        attributes: None,
    }
}

/// The text of an error frame, panicking on anything else.
pub fn error_text(f: &OwnedFrame) -> String {
    match f {
        OwnedFrame::SimpleError { data, .. } => data.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// MONITOR lines on `monitor` up to and including the first that contains `marker`, within
/// [`DEADLINE`] overall. Each read has its own deadline, but other clients (the probe, a
/// bystander) keep a monitor busy: without an overall one, a lost marker would hang the test.
pub async fn monitor_until(monitor: &mut Raw, marker: &str) -> Vec<String> {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(frame) = tokio::time::timeout(left, monitor.reply()).await else {
            panic!(
                "no MONITOR line with {marker:?} within {DEADLINE:?}; seen:\n{}",
                seen.join("\n")
            );
        };
        let line = match frame {
            OwnedFrame::SimpleString { data, .. } => String::from_utf8_lossy(&data).into_owned(),
            other => panic!("MONITOR sends status lines, got {other:?}"),
        };
        let done = line.contains(marker);
        seen.push(line);
        if done {
            return seen;
        }
    }
}

/// The limit on one [`query`]: a connect, an AUTH and one command.
pub const QUERY_LIMIT: Duration = Duration::from_secs(2);

/// Connects to `addr`, sends `auth` (if any) and `args`, and returns the command's reply;
/// `None` if anything fails or takes longer than [`QUERY_LIMIT`]: for polling, where a
/// server that is down or busy is an answer, not a failure.
pub async fn query(addr: &str, auth: Option<&[u8]>, args: &[&str]) -> Option<OwnedFrame> {
    let ask = async {
        let mut raw = Raw {
            stream: TcpStream::connect(addr).await.ok()?,
            buf: Vec::new(),
        };
        let mut request = auth.map(<[u8]>::to_vec).unwrap_or_default();
        request.extend(command(args));
        raw.stream.write_all(&request).await.ok()?;
        if auth.is_some() && raw.try_reply().await? != simple("OK") {
            return None;
        }
        raw.try_reply().await
    };
    tokio::time::timeout(QUERY_LIMIT, ask).await.ok().flatten()
}

/// A string, bulk string or number as text.
pub fn text(frame: &OwnedFrame) -> Option<String> {
    match frame {
        OwnedFrame::BlobString { data, .. } | OwnedFrame::SimpleString { data, .. } => {
            Some(String::from_utf8_lossy(data).into_owned())
        }
        OwnedFrame::Number { data, .. } => Some(data.to_string()),
        _ => None,
    }
}
