//! The `exec` credential source: a command (argv, no shell) whose standard output is the
//! password alone, or JSON `{"username": ..., "password": ..., "expires_at": RFC 3339}`.
//!
//! The command runs with a timeout and its output bounded; its standard output is a secret
//! and is never logged, and its standard error is logged with every line of that output
//! removed from it (a command that echoes its token on stderr does not leak it).

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::Credentials;

/// More standard output than this is an error: a token is a few KiB at most.
pub const MAX_OUTPUT: usize = 64 * 1024;
/// The part of standard error kept for the log.
const MAX_STDERR: usize = 4096;

/// How to run the command; from `[credentials]`.
#[derive(Debug, Clone)]
pub struct ExecSource {
    pub command: Vec<String>,
    pub timeout: Duration,
    /// The username when the output does not name one (`credentials.username`).
    pub default_username: Option<String>,
}

/// A run of the command that gave no credentials. Never carries its standard output.
#[derive(Debug, Error)]
pub enum ExecError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {timeout:?}; killed")]
    Timeout { program: String, timeout: Duration },
    #[error("{program} exited with {status}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
    },
    #[error("{program} printed more than {MAX_OUTPUT} bytes")]
    TooLong { program: String },
    #[error("reading the output of {program}: {source}")]
    Read {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} printed no password")]
    Empty { program: String },
    #[error("{program} printed something that is neither a password nor the JSON form {{\"username\", \"password\", \"expires_at\"}}")]
    Garbage { program: String },
    #[error("{program} printed an expires_at that is not an RFC 3339 time: {value:?}")]
    BadExpiry { program: String, value: String },
    #[error("{program} printed credentials that expired already ({expired_at})")]
    Expired { program: String, expired_at: String },
}

/// What a run gave: the credentials, and what it wrote on standard error (the secret removed).
pub struct Fetched {
    pub credentials: Credentials,
    pub stderr: String,
}

/// The JSON form of the output.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonForm {
    username: Option<String>,
    password: SecretString,
    expires_at: Option<String>,
}

impl ExecSource {
    fn program(&self) -> String {
        self.command.first().cloned().unwrap_or_default()
    }

    /// Runs the command once. On failure, the `String` is its standard error (the secret
    /// removed), for the log line.
    pub async fn fetch(&self) -> Result<Fetched, (ExecError, String)> {
        let program = self.program();
        let mut child = tokio::process::Command::new(&self.command[0])
            .args(&self.command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| {
                let program = program.clone();
                (ExecError::Spawn { program, source }, String::new())
            })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let run = async {
            let (out, err) = tokio::join!(read_bounded(stdout), read_stderr(stderr));
            let status = child.wait().await;
            (out, err, status)
        };
        // On a timeout, `child` is dropped with the future: kill_on_drop kills it.
        let (out, err, status) = match tokio::time::timeout(self.timeout, run).await {
            Ok(done) => done,
            Err(_) => {
                let e = ExecError::Timeout {
                    program,
                    timeout: self.timeout,
                };
                return Err((e, String::new()));
            }
        };
        let out = match out {
            Ok(Some(out)) => out,
            Ok(None) => return Err((ExecError::TooLong { program }, redact(&err, &[]))),
            Err(source) => return Err((ExecError::Read { program, source }, String::new())),
        };
        let stderr = redact(&err, &out);
        match status {
            Ok(s) if s.success() => {}
            Ok(status) => return Err((ExecError::Failed { program, status }, stderr)),
            Err(source) => return Err((ExecError::Read { program, source }, stderr)),
        }
        match self.parse(&out) {
            Ok(credentials) => Ok(Fetched {
                credentials,
                stderr,
            }),
            Err(e) => Err((e, stderr)),
        }
    }

    /// The credentials in `out`: JSON when it starts with `{`, else the password, one
    /// trailing newline dropped. Errors never quote the output.
    fn parse(&self, out: &[u8]) -> Result<Credentials, ExecError> {
        let program = self.program();
        let Ok(text) = std::str::from_utf8(out) else {
            return Err(ExecError::Garbage { program });
        };
        let (username, password, expires_at) = if text.trim_start().starts_with('{') {
            let form: JsonForm = serde_json::from_str(text).map_err(|_| ExecError::Garbage {
                program: program.clone(),
            })?;
            (form.username, form.password, form.expires_at)
        } else {
            let bare = text
                .strip_suffix("\r\n")
                .or_else(|| text.strip_suffix('\n'))
                .unwrap_or(text);
            if bare.contains(['\n', '\r']) {
                return Err(ExecError::Garbage { program });
            }
            (None, SecretString::from(bare.to_owned()), None)
        };
        if password.expose_secret().is_empty() {
            return Err(ExecError::Empty { program });
        }
        let expires_at = match expires_at {
            None => None,
            Some(value) => Some(parse_rfc3339(&value).ok_or(ExecError::BadExpiry {
                program: program.clone(),
                value,
            })?),
        };
        if let Some(at) = expires_at {
            if at <= SystemTime::now() {
                let expired_at = format_time(at);
                return Err(ExecError::Expired {
                    program,
                    expired_at,
                });
            }
        }
        let username = username.or_else(|| self.default_username.clone());
        Ok(Credentials {
            username,
            password,
            expires_at,
        })
    }
}

/// Reads all of `r`, or `None` as soon as it is longer than [`MAX_OUTPUT`].
async fn read_bounded(r: impl AsyncRead + Unpin) -> std::io::Result<Option<Zeroizing<Vec<u8>>>> {
    let mut out = Zeroizing::new(Vec::with_capacity(MAX_OUTPUT + 1));
    r.take(MAX_OUTPUT as u64 + 1).read_to_end(&mut out).await?;
    Ok((out.len() <= MAX_OUTPUT).then_some(out))
}

/// The first [`MAX_STDERR`] bytes of standard error; the rest is read and dropped, so a
/// chatty command is not blocked on a full pipe.
async fn read_stderr(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 1024];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let room = MAX_STDERR.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
    kept
}

/// Standard error as one log-safe line: every line of the standard output (the secret, or
/// the JSON holding it) replaced by `<redacted>`, line breaks shown as ` | `.
fn redact(stderr: &[u8], stdout: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(stderr).into_owned();
    let secret_lines = String::from_utf8_lossy(stdout);
    for line in secret_lines.lines().map(str::trim) {
        // Short lines ("{", "}") hold no secret and would garble the message.
        if line.len() >= 4 {
            text = text.replace(line, "<redacted>");
        }
    }
    text.trim_end().lines().collect::<Vec<_>>().join(" | ")
}

/// An RFC 3339 time, any offset.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// `at` in RFC 3339, UTC, for logs and summaries.
pub fn format_time(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{at:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(script: &str) -> ExecSource {
        ExecSource {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_secs(5),
            default_username: Some("svc".into()),
        }
    }

    #[tokio::test]
    async fn reads_both_output_forms() {
        let bare = source("printf 'tok en\\n'").fetch().await.ok().unwrap();
        assert_eq!(bare.credentials.username(), "svc");
        assert_eq!(
            &bare.credentials.auth_command()[..],
            b"*3\r\n$4\r\nAUTH\r\n$3\r\nsvc\r\n$6\r\ntok en\r\n"
        );
        assert!(bare.credentials.expires_at().is_none());

        let json = source(
            r#"echo '{"username": "app", "password": "p", "expires_at": "2999-01-02T03:04:05+01:00"}'"#,
        )
        .fetch()
        .await
        .ok()
        .unwrap();
        assert_eq!(json.credentials.username(), "app");
        assert_eq!(
            format_time(json.credentials.expires_at().unwrap()),
            "2999-01-02T02:04:05Z"
        );

        // What the README's Entra recipe prints: jq's indented JSON, no username.
        let entra = source(
            r#"printf '{\n  "password": "eyJ0eXAi",\n  "expires_at": "2999-05-08T15:52:21Z"\n}\n'"#,
        )
        .fetch()
        .await
        .ok()
        .unwrap();
        assert_eq!(entra.credentials.username(), "svc");
        assert!(entra.credentials.expires_at().is_some());
    }

    #[tokio::test]
    async fn failures_say_why_and_never_show_the_output() {
        let cases = [
            ("echo hunter2; echo oops hunter2 >&2; exit 3", "exited with"),
            ("printf 'hunter2\\nhunter2\\n'", "neither a password"),
            (
                r#"echo '{"password": "hunter2", "expiresAt": "x"}'"#,
                "neither",
            ),
            (
                r#"echo '{"password": "hunter2", "expires_at": "tomorrow"}'"#,
                "not an RFC 3339",
            ),
            (
                r#"echo '{"password": "hunter2", "expires_at": "2001-01-01T00:00:00Z"}'"#,
                "expired already",
            ),
            ("echo", "no password"),
            ("head -c 100000 /dev/zero | tr '\\0' x", "more than 65536"),
            ("exec sleep 30", "did not finish within"),
        ];
        for (script, why) in cases {
            let mut s = source(script);
            s.timeout = Duration::from_millis(500);
            let Err((e, stderr)) = s.fetch().await else {
                panic!("{script}: accepted");
            };
            let shown = format!("{e} {e:?} {stderr}");
            assert!(shown.contains(why), "{script}: {shown}");
            assert!(!shown.contains("hunter2"), "{script}: {shown}");
        }
        let Err((_, stderr)) = source("echo hunter2; echo oops hunter2 >&2; exit 3")
            .fetch()
            .await
        else {
            panic!("accepted");
        };
        assert_eq!(stderr, "oops <redacted>");
    }
}
