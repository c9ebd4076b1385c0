//! Malformed and hostile client input, against a real redis-server through the ambassador.
//! Every hostile client gets Redis's own error or is closed; its upstream connection is closed
//! with it; the ambassador's memory stays bounded (the real binary's /proc/<pid>/status); and a
//! second client doing SET/GET on its own connection is unaffected throughout.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A second client doing SET/GET on its own connection for as long as a test runs; every
/// reply is checked, and a wrong one fails the task (seen by `progresses` and `finish`).
struct Bystander {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Bystander {
    async fn start(addr: &str) -> Bystander {
        let mut c = Raw::connect(addr).await;
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (Arc::clone(&done), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let value = format!("bystander-{i}");
                assert_eq!(c.cmd(&["SET", "bystander", &value]).await, simple("OK"));
                assert_eq!(c.cmd(&["GET", "bystander"]).await, bulk(value.as_bytes()));
                i += 1;
                d.store(i, Ordering::Relaxed);
            }
        });
        let b = Bystander { done, stop, task };
        b.progresses().await;
        b
    }

    /// Waits until a few more SET/GET round trips completed from now.
    async fn progresses(&self) {
        let from = self.done.load(Ordering::Relaxed);
        wait_until("the bystander's SET/GET to go on", DEADLINE, || async {
            assert!(!self.task.is_finished(), "the bystander failed");
            self.done.load(Ordering::Relaxed) >= from + 3
        })
        .await;
    }

    async fn finish(self) {
        self.progresses().await;
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("every bystander reply was correct");
    }
}

/// A direct connection as the app user, for counting Redis's clients and for checking what
/// Redis holds.
struct Observer {
    raw: Raw,
    /// Connections Redis should have when no hostile client is open.
    baseline: usize,
}

impl Observer {
    /// `sessions` is the number of ambassador sessions expected to stay open.
    async fn new(server: &RedisServer, sessions: usize) -> Observer {
        let mut o = Observer {
            raw: server.direct().await,
            baseline: 1 + sessions,
        };
        o.back_to_baseline("only the observer and the steady sessions")
            .await;
        o
    }

    async fn count(&mut self) -> usize {
        client_count(&mut self.raw).await
    }

    /// Waits until the upstream connections of closed clients are gone too.
    async fn back_to_baseline(&mut self, what: &str) {
        wait_for_clients(&mut self.raw, self.baseline, DEADLINE, what).await;
    }
}

/// Prints bytes the way the resp-tests corpus writes them, for failure messages.
fn escape(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}

/// Sends `bytes` straight to Redis (authenticated) and returns everything until it closes;
/// the client half-closes after sending, as a client that is done would.
async fn direct_answer(server: &RedisServer, bytes: &[u8]) -> Vec<u8> {
    let mut d = server.direct().await;
    let _ = d.stream.write_all(bytes).await;
    let _ = d.stream.shutdown().await;
    d.read_to_close().await
}

/// Redis, an in-process ambassador without probes, and a bystander session on it.
async fn with_bystander() -> (RedisServer, Ambassador, Bystander) {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, NO_PROBES).await;
    let bystander = Bystander::start(&amb.addr.to_string()).await;
    (server, amb, bystander)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_lengths_get_redis_errors_and_the_upstream_is_closed() {
    let (server, amb, bystander) = with_bystander().await;
    let mut observer = Observer::new(&server, 1).await;

    let digits = |d: &str, n: usize| d.repeat(n);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"*abc\r\n".to_vec(), "invalid multibulk length"),
        (b"*2147483648\r\n".to_vec(), "invalid multibulk length"),
        (
            b"*-99999999999999999999\r\n".to_vec(),
            "invalid multibulk length",
        ),
        (b"*1\r\n$-5\r\n".to_vec(), "invalid bulk length"),
        (b"*1\r\n$-1\r\n".to_vec(), "invalid bulk length"),
        (b"*1\r\n$536870913\r\n".to_vec(), "invalid bulk length"),
        (
            b"*1\r\n$9223372036854775808\r\n".to_vec(),
            "invalid bulk length",
        ),
        (b"*1\r\n+PING\r\n".to_vec(), "expected '$', got '+'"),
        (
            format!("*{}", digits("1", 70_000)).into_bytes(),
            "too big mbulk count string",
        ),
        (
            format!("*1\r\n${}", digits("9", 70_000)).into_bytes(),
            "too big bulk count string",
        ),
    ];
    for (i, (hostile, what)) in cases.iter().enumerate() {
        let key = format!("hostile:{i}");
        let mut bytes = command(&["SET", &key, "ok"]);
        bytes.extend_from_slice(hostile);
        let expected = format!("+OK\r\n-ERR Protocol error: {what}\r\n");
        let direct = direct_answer(&server, &bytes).await;
        assert_eq!(
            String::from_utf8_lossy(&direct),
            expected,
            "Redis itself, for {}",
            escape(hostile)
        );

        let mut c = amb.connect().await;
        c.send(&bytes).await;
        let got = c.read_bytes(expected.len()).await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            expected,
            "through the ambassador, for {}",
            escape(hostile)
        );
        // Done sending: the ambassador stops draining and closes, with nothing more to say.
        c.stream.shutdown().await.unwrap();
        assert_eq!(c.read_to_close().await, b"", "nothing after the error");
        observer.back_to_baseline(&escape(hostile)).await;
        bystander.progresses().await;
    }
    bystander.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_counts_and_lengths_are_not_allocated() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let bin = binary_for(&server, dir.path(), &[NO_PROBES_ENV]);
    let bystander = Bystander::start(&bin.addr).await;
    let mut observer = Observer::new(&server, 1).await;
    let pid = bin.pid();
    let (rss0, hwm0, vm0) = (
        proc_kib(pid, "VmRSS"),
        proc_kib(pid, "VmHWM"),
        proc_kib(pid, "VmSize"),
    );

    // 2^31-1 arguments declared, then a few trickle in.
    let mut count = Raw::connect(&bin.addr).await;
    count.send(b"*2147483647\r\n").await;
    for piece in [
        &b"$3\r\nSET\r\n"[..],
        b"$4\r\nmany\r\n",
        b"$1\r\nv\r\n",
        b"$2\r\n",
    ] {
        bystander.progresses().await; // pacing: the pieces arrive as separate reads
        count.send(piece).await;
    }
    // A 512 MB value declared, 4 KiB of it sent.
    let mut length = Raw::connect(&bin.addr).await;
    length
        .send(b"*3\r\n$3\r\nSET\r\n$4\r\nhuge\r\n$536870912\r\n")
        .await;
    length.send(&[b'x'; 4096]).await;
    bystander.progresses().await;
    assert_eq!(
        observer.count().await,
        observer.baseline + 2,
        "both are open"
    );

    let (rss, hwm, vm) = (
        proc_kib(pid, "VmRSS"),
        proc_kib(pid, "VmHWM"),
        proc_kib(pid, "VmSize"),
    );
    println!(
        "ambassador with INT_MAX arguments and a 512 MB length declared: \
         VmRSS {rss0} -> {rss} KiB, VmHWM {hwm0} -> {hwm} KiB, VmSize {vm0} -> {vm} KiB"
    );
    assert!(hwm - hwm0 < 8 * 1024, "peak RSS grew by {} KiB", hwm - hwm0);
    // Address space too: an untouched reservation (16 GiB of argument slots, a 512 MB
    // buffer) would not show in RSS. Allowance: malloc arenas and thread stacks.
    assert!(
        vm.saturating_sub(vm0) < 256 * 1024,
        "VmSize grew by {} KiB",
        vm - vm0
    );

    drop(count);
    drop(length);
    observer
        .back_to_baseline("the hostile clients' upstreams closed")
        .await;
    assert_eq!(observer.raw.cmd(&["EXISTS", "many", "huge"]).await, int(0));
    let rss_after = proc_kib(pid, "VmRSS");
    assert!(
        rss_after < rss0 + 8 * 1024,
        "RSS {rss0} KiB before, {rss_after} KiB after"
    );
    bystander.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_mid_frame_gets_no_reply_and_its_upstream_is_closed() {
    let (server, amb, bystander) = with_bystander().await;
    let mut observer = Observer::new(&server, 1).await;

    let frames: [&[u8]; 8] = [
        b"*",
        b"*3",
        b"*3\r\n$3",
        b"*3\r\n$3\r\nSET\r\n$4\r\nha",
        b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n$10\r\nabc",
        b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n$3\r\nabc\r",
        b"SET half inline-without-newline",
        b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n$100000\r\n",
    ];
    for frame in frames {
        for half_close in [true, false] {
            let mut c = amb.connect().await;
            c.send(frame).await;
            bystander.progresses().await;
            if half_close {
                // Still reading: anything the ambassador or Redis answered would show here.
                c.stream.shutdown().await.unwrap();
                assert_eq!(
                    c.read_to_close().await,
                    b"",
                    "no reply to the unterminated {}",
                    escape(frame)
                );
            } else {
                drop(c);
            }
            observer
                .back_to_baseline(&format!("closed after {}", escape(frame)))
                .await;
        }
    }
    assert_eq!(
        observer.raw.cmd(&["EXISTS", "half"]).await,
        int(0),
        "no partial command was executed"
    );
    bystander.finish().await;
}

/// xorshift64*: deterministic garbage, reproducible from the seed in a failure message.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Bytes that look enough like RESP to reach every corner of the parser. No token can make
/// a command the ambassador handles itself (AUTH, HELLO, RESET, QUIT, CLIENT) or one with
/// state, so Redis must answer it exactly as it answers the same bytes sent directly.
fn token_soup(rng: &mut Rng) -> Vec<u8> {
    const TOKENS: &[&[u8]] = &[
        b"*",
        b"$",
        b"0",
        b"1",
        b"2",
        b"3",
        b"-1",
        b"10",
        b"\r\n",
        b"\r\n",
        b"\r",
        b"\n",
        b" ",
        b"\"",
        b"'",
        b"\\",
        b"\\x41",
        b"\0",
        b"\t",
        b"PING",
        b"ping",
        b"ECHO",
        b"x",
        b"+",
        b"*1\r\n$4\r\nPING\r\n",
        b"*2\r\n$4\r\nECHO\r\n",
        b"$3\r\nabc\r\n",
        b"*0\r\n",
    ];
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(40) {
        if rng.below(8) == 0 {
            out.push(rng.next() as u8);
        } else {
            out.extend_from_slice(TOKENS[rng.below(TOKENS.len())]);
        }
    }
    out
}

/// Uniformly random bytes, but never a whole command the ambassador would handle itself.
fn random_bytes(rng: &mut Rng) -> Vec<u8> {
    (0..16 + rng.below(2048))
        .map(|_| rng.next() as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_garbage_gets_exactly_what_redis_answers() {
    let (server, amb, bystander) = with_bystander().await;
    let mut observer = Observer::new(&server, 1).await;

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut mismatches = Vec::new();
    let mut errors = 0;
    for case in 0..400 {
        let seed = rng.next() | 1;
        let mut r = Rng(seed);
        let garbage = if case % 4 == 3 {
            random_bytes(&mut r)
        } else {
            token_soup(&mut r)
        };
        let direct = direct_answer(&server, &garbage).await;
        let mut c = amb.connect().await;
        let _ = c.stream.write_all(&garbage).await; // it may close first, as Redis may
        let _ = c.stream.shutdown().await;
        let through = c.read_to_close().await;
        if through != direct {
            mismatches.push(format!(
                "seed {seed:#x}: sent \"{}\"\n  Redis answered      \"{}\"\n  ambassador answered \"{}\"",
                escape(&garbage),
                escape(&direct),
                escape(&through)
            ));
        }
        errors += usize::from(direct.starts_with(b"-"));
        if case % 50 == 0 {
            bystander.progresses().await;
        }
    }
    assert!(errors > 100, "the garbage mostly draws errors ({errors})");
    assert!(
        mismatches.is_empty(),
        "{} of 400 differ from Redis:\n{}",
        mismatches.len(),
        mismatches
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    observer
        .back_to_baseline("every garbage session closed")
        .await;
    bystander.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_without_a_newline_is_refused_after_64_kib() {
    const GIB: u64 = 1 << 30;
    const REPLY: &[u8] = b"-ERR Protocol error: too big inline request\r\n";
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let bin = binary_for(&server, dir.path(), &[NO_PROBES_ENV]);
    let bystander = Bystander::start(&bin.addr).await;
    let mut observer = Observer::new(&server, 1).await;
    let pid = bin.pid();
    let hwm0 = proc_kib(pid, "VmHWM");

    let mut c = Raw::connect(&bin.addr).await;
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0u64;
    let mut got = Vec::new();
    let started = Instant::now();
    {
        let (mut rd, mut wr) = c.stream.split();
        // Stops sending as soon as the reply (or the close) arrives.
        let writer = async {
            while sent < GIB && wr.write_all(&chunk).await.is_ok() {
                sent += chunk.len() as u64;
            }
        };
        let reader = async {
            let mut buf = [0u8; 4096];
            loop {
                match rd.read(&mut buf).await {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => return,
                }
                if got.ends_with(b"\r\n") {
                    return;
                }
            }
        };
        tokio::pin!(writer, reader);
        tokio::time::timeout(DEADLINE * 3, async {
            tokio::select! {
                _ = &mut reader => {}
                _ = &mut writer => reader.await,
            }
        })
        .await
        .expect("an answer or a close within the deadline");
    }
    println!(
        "too big inline request: answered after {} KiB sent, in {:?}",
        sent / 1024,
        started.elapsed()
    );
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(REPLY)
    );
    // What was sent beyond 64 KiB sat in the two sockets' kernel buffers (4 MiB here).
    assert!(
        sent < 64 * 1024 * 1024,
        "{} KiB went in before the answer",
        sent / 1024
    );
    c.stream.shutdown().await.unwrap();
    assert_eq!(c.read_to_close().await, b"", "closed, nothing more");
    observer.back_to_baseline("its upstream closed").await;

    // The limit itself, to the byte: 64 KiB before the newline, CR included, is a command,
    // as for Redis whatever its reads (one byte more, and Redis's answer depends on where
    // its reads split the line: the ambassador answers as Redis does when it trickles in)...
    let mut line = vec![b'a'; 64 * 1024 - 1];
    line.extend(b"\r\n");
    let want = direct_answer(&server, &line).await;
    assert!(
        want.starts_with(b"-ERR unknown command"),
        "{}",
        escape(&want)
    );
    let mut at = Raw::connect(&bin.addr).await;
    at.send(&line).await;
    at.stream.shutdown().await.unwrap();
    assert_eq!(escape(&at.read_to_close().await), escape(&want));
    // ...and one byte more without a newline is refused at once, with nothing more sent.
    let mut over = Raw::connect(&bin.addr).await;
    over.send(&[b'a'; 64 * 1024 + 1]).await;
    assert_eq!(escape(&over.read_bytes(REPLY.len()).await), escape(REPLY));
    observer.back_to_baseline("their upstreams closed").await;

    let hwm = proc_kib(pid, "VmHWM");
    println!("ambassador peak RSS {hwm0} -> {hwm} KiB");
    assert!(hwm - hwm0 < 4 * 1024, "peak RSS grew by {} KiB", hwm - hwm0);
    bystander.finish().await;
}

/// Writes one byte at a time; the pause lets each byte arrive as its own read.
async fn trickle(c: &mut Raw, bytes: &[u8]) {
    for b in bytes {
        c.send(&[*b]).await;
        tokio::time::sleep(Duration::from_millis(1)).await; // pacing, not synchronisation
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_trickled_one_byte_at_a_time_still_works() {
    let (_server, amb, bystander) = with_bystander().await;
    let mut c = amb.connect().await;

    let value = "two\r\nlines and a \0 byte";
    trickle(&mut c, &command(&["SET", "trickled", value])).await;
    assert_eq!(c.reply().await, simple("OK"));
    bystander.progresses().await;
    trickle(&mut c, &command(&["GET", "trickled"])).await;
    assert_eq!(c.reply().await, bulk(value.as_bytes()));
    trickle(&mut c, b"ECHO \"in line\"\r\n").await;
    assert_eq!(c.reply().await, bulk(b"in line"));
    // Commands the ambassador must see whole, byte by byte too.
    trickle(&mut c, &command(&["AUTH", "someone", "else"])).await;
    assert_eq!(c.reply().await, simple("OK"));
    trickle(&mut c, b"auth someone else\r\n").await;
    assert_eq!(c.reply().await, simple("OK"));
    trickle(&mut c, &command(&["HELLO", "3", "AUTH", "someone", "else"])).await;
    assert!(matches!(c.reply().await, OwnedFrame::Map { .. }));
    trickle(&mut c, &command(&["ACL", "WHOAMI"])).await;
    assert_eq!(c.reply().await, bulk(USER.as_bytes()));
    bystander.finish().await;
}
