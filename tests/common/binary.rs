//! The real binary as a child process, its listening address read from its log.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// The real binary, started with `args` and `env`; its stderr is scanned for the listening
/// address. Killed on drop.
pub struct Binary {
    pub child: Child,
    pub addr: String,
    /// The admin endpoint's address, or "off".
    pub admin: String,
    /// The stderr lines up to the 'listening' line, that one included.
    pub startup_lines: Vec<String>,
    pub stderr_lines: std::sync::mpsc::Receiver<String>,
    /// Everything the process writes to stdout, read to its end by a thread of its own.
    stdout: Option<std::thread::JoinHandle<String>>,
}

/// The binary with `args`, run in `cwd`, with no profile chosen from the test's own
/// environment and `RUST_LOG=info`.
pub fn ambassador_command(cwd: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_redis-ambassador"));
    command
        .current_dir(cwd)
        .args(args)
        .env_remove("AMBASSADOR_PROFILE")
        .env_remove("AMBASSADOR_CONFIG_DIR")
        .env("RUST_LOG", "info");
    command
}

impl Binary {
    pub fn start(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Binary {
        let mut command = ambassador_command(cwd, args);
        command.envs(env.iter().copied());
        Self::spawn(command)
    }

    /// [`start`](Self::start) with nothing of the test's own environment but `env` (and
    /// `RUST_LOG`): for the AWS SDK's credential chain, which must see only what the test
    /// gives it.
    pub fn start_isolated(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Binary {
        let mut command = ambassador_command(cwd, args);
        command
            .env_clear()
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        Self::spawn(command)
    }

    fn spawn(mut command: Command) -> Binary {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn redis-ambassador");
        let mut stdout = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
            text
        });
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Owned from here on, so a failed wait below still kills the process on drop.
        let mut bin = Binary {
            child,
            addr: String::new(),
            admin: String::new(),
            startup_lines: Vec::new(),
            stderr_lines: rx,
            stdout: Some(stdout),
        };
        let deadline = Instant::now() + DEADLINE;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = bin.stderr_lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!("no 'listening' line; stderr so far:\n{}", seen.join("\n"))
            });
            if let Some(rest) = line.split("listening address=").nth(1) {
                bin.addr = rest.split_whitespace().next().unwrap().to_owned();
                let admin = line
                    .split(" admin=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next());
                bin.admin = admin.unwrap_or("off").to_owned();
                seen.push(line);
                bin.startup_lines = seen;
                return bin;
            }
            if line.contains(r#""message":"listening""#) {
                let field = |name: &str| {
                    let key = format!(r#""{name}":""#);
                    line.split(&key)
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .map(str::to_owned)
                };
                bin.addr = field("address").expect("address in the JSON listening line");
                bin.admin = field("admin").unwrap_or_else(|| "off".into());
                seen.push(line);
                bin.startup_lines = seen;
                return bin;
            }
            seen.push(line);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the process (which this test started).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, within the deadline.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the process did not exit");
            std::thread::sleep(Duration::from_millis(20)); // polling interval
        }
    }

    /// Everything the process wrote to stderr after the listening line, up to its end: call
    /// after it exited (the reader stops at end of file).
    pub fn stderr_to_end(&self) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return lines.join("\n"),
                Err(e) => panic!("stderr did not end: {e}"),
            }
        }
    }

    /// Everything the process wrote to stdout: call after it exited, once.
    pub fn stdout_to_end(&mut self) -> String {
        let reader = self.stdout.take().expect("stdout read once");
        let deadline = Instant::now() + DEADLINE;
        while !reader.is_finished() {
            assert!(Instant::now() < deadline, "stdout did not end");
            std::thread::sleep(Duration::from_millis(10)); // polling interval
        }
        reader.join().expect("the stdout reader")
    }

    /// Everything the process printed on both streams, the lines before 'listening' included:
    /// call after it exited, once.
    pub fn output_to_end(&mut self) -> String {
        let mut all = self.startup_lines.join("\n");
        all.push('\n');
        all.push_str(&self.stderr_to_end());
        all.push('\n');
        all.push_str(&self.stdout_to_end());
        all
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// Observation helpers for the hostile-input, fault and load tests: what a process holds, what
// Redis sees, and a poll with a limit.

/// Writes the profile `test` into `dir/profiles`: listening on an ephemeral port, in front of
/// `server` with the credential file `creds`, and `sections` (further TOML) after that.
pub fn write_test_profile(dir: &Path, server: &RedisServer, creds: &Path, sections: &str) {
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::write(
        dir.join("profiles/test.toml"),
        format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n\
             [credentials]\nfile = \"{}\"\n{sections}",
            server.addr(),
            creds.display()
        ),
    )
    .unwrap();
}
