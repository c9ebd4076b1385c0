//! The ambassador's own commands on a new upstream connection: AUTH, then CLIENT SETNAME and
//! SELECT when the profile asks, pipelined in one write and checked within a time limit. The
//! same commands re-authenticate a session after the client's RESET, and ready a connection
//! a client left for the next one after the ambassador's own RESET ([`reset`]).

use std::time::Duration;

use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::Handshake;
use crate::credentials::{Arg, Credentials, SecretBytes};
use crate::resp;
use crate::tls::{self, TlsFailure};

#[derive(Debug, Error)]
pub enum HandshakeError {
    /// The upstream refused the profile's credentials. `reason` is the server's error code
    /// (WRONGPASS, NOPERM, ...); the server never echoes a password.
    #[error("upstream rejected the credentials of user {user:?} ({reason})")]
    AuthRejected { user: String, reason: String },
    #[error("upstream rejected {command}: {reason}")]
    Rejected {
        command: &'static str,
        reason: String,
    },
    #[error("upstream handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("upstream closed the connection during the handshake")]
    Closed,
    #[error("upstream handshake I/O: {0}")]
    Io(std::io::Error),
    /// The TLS layer refused the connection after its own handshake: with TLS 1.3 a server
    /// that requires a client certificate says so on the first read.
    #[error("TLS: {0}")]
    Tls(TlsFailure),
    #[error("upstream sent a malformed reply during the handshake")]
    Malformed,
    /// Sentinel announced a master that `ROLE` says is not one (a failover under way, or an
    /// old master restarted before it was reconfigured).
    #[error("the announced master is a {role}")]
    NotMaster { role: String },
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        match tls::classify(&e) {
            Some(failure) => HandshakeError::Tls(failure),
            None => HandshakeError::Io(e),
        }
    }
}

/// The handshake commands, in the order they are sent, and what each is called in errors.
pub struct Commands {
    pub bytes: SecretBytes,
    pub names: Vec<&'static str>,
}

/// AUTH, then SETNAME and SELECT as configured, in one buffer sized once.
pub fn commands(credentials: &Credentials, settings: &Handshake) -> Commands {
    let setname = settings
        .client_name
        .as_ref()
        .map(|name| [&b"CLIENT"[..], b"SETNAME", name.as_bytes()].map(Arg::Bytes));
    let database = settings.database.map(|db| db.to_string());
    let select = database
        .as_ref()
        .map(|db| [&b"SELECT"[..], db.as_bytes()].map(Arg::Bytes));
    let mut commands: Vec<&[Arg<'_>]> = vec![credentials.auth_args()];
    let mut names = vec!["AUTH"];
    if let Some(setname) = &setname {
        commands.push(setname);
        names.push("CLIENT SETNAME");
    }
    if let Some(select) = &select {
        commands.push(select);
        names.push("SELECT");
    }
    Commands {
        bytes: credentials.encode(&commands),
        names,
    }
}

/// Checks the reply to handshake command `index` of `cmds`.
pub fn check_reply(
    cmds: &Commands,
    index: usize,
    user: &str,
    reply: Result<(), String>,
) -> Result<(), HandshakeError> {
    reply.map_err(|reason| {
        if index == 0 {
            HandshakeError::AuthRejected {
                user: user.to_owned(),
                reason: reason.split_whitespace().next().unwrap_or("ERR").to_owned(),
            }
        } else {
            HandshakeError::Rejected {
                command: cmds.names[index],
                reason,
            }
        }
    })
}

/// Reads and checks the reply to each of `cmds`. With `only_ok`, a reply other than `+OK` or
/// an error is malformed: a connection readied for reuse must answer exactly that.
async fn read_replies<S>(
    stream: &mut S,
    cmds: &Commands,
    user: &str,
    buf: &mut Vec<u8>,
    only_ok: bool,
) -> Result<(), HandshakeError>
where
    S: AsyncRead + Unpin,
{
    for index in 0..cmds.names.len() {
        let reply = match read_frame(stream, buf).await? {
            OwnedFrame::Error(e) => Err(e),
            OwnedFrame::SimpleString(s) if s == b"OK" => Ok(()),
            _ if only_ok => return Err(HandshakeError::Malformed),
            _ => Ok(()),
        };
        check_reply(cmds, index, user, reply)?;
    }
    Ok(())
}

/// Runs the handshake on a fresh upstream connection; with `confirm_master`, `ROLE` is
/// pipelined after it and must answer `master`.
pub async fn run<S>(
    stream: &mut S,
    credentials: &Credentials,
    settings: &Handshake,
    confirm_master: bool,
    limit: Duration,
) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cmds = commands(credentials, settings);
    let exchange = async {
        stream.write_all(&cmds.bytes).await?;
        if confirm_master {
            stream.write_all(ROLE).await?;
        }
        let mut buf = Vec::with_capacity(256);
        read_replies(stream, &cmds, credentials.username(), &mut buf, false).await?;
        if confirm_master {
            check_role(read_frame(stream, &mut buf).await?)?;
        }
        Ok(())
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(limit))?
}

/// Readies a connection a client left (`upstream.reuse`) for the next one: `RESET`, then
/// the handshake a new connection gets (with `confirm_master`, `ROLE` too, which must answer
/// `master`), then `PING` with a random word, pipelined, within `limit`. Every reply must be
/// what a healthy server answers a clean connection (`+RESET`, `+OK` each, the word) and
/// nothing may follow them; anything else means the connection is not what the ambassador
/// thinks, and it is not used again. The word is what no reply the client was still owed
/// can imitate (its own pipelined `RESET` answers `+RESET`, too).
pub async fn reset<S>(
    stream: &mut S,
    credentials: &Credentials,
    settings: &Handshake,
    confirm_master: bool,
    limit: Duration,
) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cmds = commands(credentials, settings);
    let exchange = async {
        let word = nonce()?;
        // Three writes rather than a copy of the password; pipelined all the same.
        stream.write_all(RESET).await?;
        stream.write_all(&cmds.bytes).await?;
        if confirm_master {
            stream.write_all(ROLE).await?;
        }
        stream.write_all(&ping(&word)).await?;
        let mut buf = Vec::with_capacity(256);
        match read_frame(stream, &mut buf).await? {
            OwnedFrame::SimpleString(s) if s == b"RESET" => {}
            OwnedFrame::Error(reason) => {
                return Err(HandshakeError::Rejected {
                    command: "RESET",
                    reason,
                })
            }
            _ => return Err(HandshakeError::Malformed),
        }
        read_replies(stream, &cmds, credentials.username(), &mut buf, true).await?;
        if confirm_master {
            check_role(read_frame(stream, &mut buf).await?)?;
        }
        match read_frame(stream, &mut buf).await? {
            OwnedFrame::BulkString(echoed) if echoed == word => {}
            _ => return Err(HandshakeError::Malformed),
        }
        if !buf.is_empty() {
            return Err(HandshakeError::Malformed);
        }
        Ok(())
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(limit))?
}

const RESET: &[u8] = b"*1\r\n$5\r\nRESET\r\n";
const ROLE: &[u8] = b"*1\r\n$4\r\nROLE\r\n";

/// 32 random hex digits.
fn nonce() -> Result<Vec<u8>, HandshakeError> {
    use ring::rand::SecureRandom;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| {
            HandshakeError::Io(std::io::Error::other("no random bytes for RESET's check"))
        })?;
    Ok(bytes
        .iter()
        .flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]])
        .collect())
}

/// `PING word`.
fn ping(word: &[u8]) -> Vec<u8> {
    let mut cmd = Vec::with_capacity(word.len() + 24);
    resp::write_array(&mut cmd, 2);
    resp::write_bulk(&mut cmd, b"PING");
    resp::write_bulk(&mut cmd, word);
    cmd
}

/// `ROLE`'s first element must be `master`. A user not allowed `ROLE` cannot confirm, and
/// is taken at Sentinel's word.
fn check_role(reply: OwnedFrame) -> Result<(), HandshakeError> {
    match reply {
        OwnedFrame::Array(parts) => match parts.first() {
            Some(OwnedFrame::BulkString(role)) if role == b"master" => Ok(()),
            Some(OwnedFrame::BulkString(role)) => Err(HandshakeError::NotMaster {
                role: String::from_utf8_lossy(role).into_owned(),
            }),
            _ => Err(HandshakeError::Malformed),
        },
        OwnedFrame::Error(e) if e.starts_with("NOPERM") => Ok(()),
        _ => Err(HandshakeError::Malformed),
    }
}

/// Reads one RESP2 reply, keeping what follows it in `buf`.
pub async fn read_frame<S>(stream: &mut S, buf: &mut Vec<u8>) -> Result<OwnedFrame, HandshakeError>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some((frame, used)) = decode(buf).map_err(|_| HandshakeError::Malformed)? {
            buf.drain(..used);
            return Ok(frame);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;
    use tokio::io::duplex;

    /// [`reset`] against a server that reads the whole request, then answers `replies` and,
    /// with `echo`, the word of the request's closing PING (else another word).
    async fn reset_against(replies: &'static [u8], echo: bool) -> Result<(), HandshakeError> {
        reset_against_confirming(replies, echo, false).await
    }

    /// The same; with `confirm_master`, the request has a ROLE before the PING.
    async fn reset_against_confirming(
        replies: &'static [u8],
        echo: bool,
        confirm_master: bool,
    ) -> Result<(), HandshakeError> {
        let credentials = Credentials::new(Some("app".into()), SecretString::from("pw"));
        let settings = Handshake {
            client_name: Some("n".into()),
            database: Some(2),
        };
        let word_len = 32;
        let role: &[u8] = if confirm_master { ROLE } else { b"" };
        let sent = RESET.len()
            + commands(&credentials, &settings).bytes.len()
            + role.len()
            + ping(&[b'x'; 32]).len();
        let (mut ours, mut theirs) = duplex(4096);
        let server = tokio::spawn(async move {
            let mut got = vec![0; sent];
            theirs.read_exact(&mut got).await.unwrap();
            let word = got[sent - 2 - word_len..sent - 2].to_vec();
            theirs.write_all(replies).await.unwrap();
            let answer = if echo {
                word.clone()
            } else {
                vec![b'0'; word_len]
            };
            let mut echoed = Vec::new();
            crate::resp::write_bulk(&mut echoed, &answer);
            theirs.write_all(&echoed).await.unwrap();
            // Kept open until the test is done with it: a close is another case.
            (got, word, theirs)
        });
        let limit = Duration::from_secs(5);
        let result = reset(&mut ours, &credentials, &settings, confirm_master, limit).await;
        let (got, word, _open) = server.await.unwrap();
        assert!(got.starts_with(RESET), "RESET goes first");
        let select = b"*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n";
        assert!(
            got.ends_with(&[&select[..], role, &ping(&word)].concat()),
            "then the handshake, then the PING"
        );
        assert!(word.iter().all(u8::is_ascii_hexdigit));
        result
    }

    #[tokio::test]
    async fn a_clean_reset_answers_reset_then_ok_for_each() {
        assert!(reset_against(b"+RESET\r\n+OK\r\n+OK\r\n+OK\r\n", true)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        assert!(matches!(
            reset_against(b"+OK\r\n+OK\r\n+OK\r\n+OK\r\n", true).await,
            Err(HandshakeError::Malformed)
        ));
        assert!(matches!(
            reset_against(b"-ERR can only reset normal client connections\r\n", true).await,
            Err(HandshakeError::Rejected {
                command: "RESET",
                ..
            })
        ));
        assert!(matches!(
            reset_against(
                b"+RESET\r\n-WRONGPASS invalid username-password pair\r\n",
                true
            )
            .await,
            Err(HandshakeError::AuthRejected { .. })
        ));
        assert!(matches!(
            reset_against(b"+RESET\r\n+OK\r\n:1\r\n+OK\r\n", true).await,
            Err(HandshakeError::Malformed)
        ));
        // A message of a subscription RESET did not end, or any byte after the replies.
        assert!(matches!(
            reset_against(b"+RESET\r\n+OK\r\n+OK\r\n+OK\r\n+PONG\r\n", true).await,
            Err(HandshakeError::Malformed)
        ));
    }

    #[tokio::test]
    async fn replies_owed_to_the_last_client_are_told_from_the_resets_own() {
        // The client's own pipelined RESET and the ambassador's AUTH after it answer just
        // what a clean RESET + handshake would; the word they cannot.
        assert!(matches!(
            reset_against(b"+RESET\r\n+OK\r\n+OK\r\n+OK\r\n", false).await,
            Err(HandshakeError::Malformed)
        ));
    }

    #[tokio::test]
    async fn a_sentinel_master_is_confirmed_again_by_role() {
        let master = b"+RESET\r\n+OK\r\n+OK\r\n+OK\r\n*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n";
        assert!(reset_against_confirming(master, true, true).await.is_ok());
        // Demoted behind Sentinel's back since the connection was made.
        let replica = b"+RESET\r\n+OK\r\n+OK\r\n+OK\r\n*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:0\r\n";
        assert!(matches!(
            reset_against_confirming(replica, true, true).await,
            Err(HandshakeError::NotMaster { .. })
        ));
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let credentials = Credentials::new(None, SecretString::from("pw"));
        let (mut ours, _theirs) = duplex(4096);
        let limit = Duration::from_millis(50);
        let result = reset(&mut ours, &credentials, &Handshake::default(), false, limit).await;
        assert!(matches!(result, Err(HandshakeError::Timeout(_))));
    }
}
