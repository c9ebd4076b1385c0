//! What the ambassador does with each client command: pure decisions, no I/O.
//!
//! Everything not named here is forwarded byte for byte. The commands that touch credentials
//! (AUTH, HELLO ... AUTH) are rewritten so the client's arguments never reach the upstream;
//! the ones that change the shape of the reply stream (RESET, QUIT, SYNC, pub/sub, MONITOR,
//! CLIENT REPLY) are forwarded and flagged so the relay can keep replies in order.

use crate::resp::Command;

pub const OK: &[u8] = b"+OK\r\n";
pub const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
pub const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
pub const AUTH_ARITY: &[u8] = b"-ERR wrong number of arguments for 'auth' command\r\n";
pub const HELLO_NOAUTH: &[u8] = b"-NOAUTH HELLO must be called with the client already \
authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to \
authenticate the client and select the RESP protocol version at the same time\r\n";
pub const RESET: &[u8] = b"+RESET\r\n";
/// The filter keeps the leading arguments only; no real HELLO repeats its options this often.
pub const HELLO_TOO_LONG: &[u8] = b"-ERR ambassador: HELLO with more than 16 arguments\r\n";

/// How a forwarded command affects the count of replies the relay expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replies {
    /// Exactly one reply (errors and `+QUEUED` included).
    One,
    /// No reply: `CLIENT REPLY OFF` is in force, or `CLIENT REPLY SKIP` preceded it.
    None,
    /// An unknown number from now on, until a RESET: `CLIENT REPLY` queued inside MULTI.
    Untracked,
    /// A pub/sub (un)subscription: confirmed by out-of-band frames named `confirms`
    /// (`subscribe\r\n`, ...), one per channel named (`channels`; an unsubscription from
    /// all names none, and gets one per channel it had), or refused with one error reply;
    /// `replied` is false when CLIENT REPLY silences that error.
    Subscribe {
        confirms: &'static [u8],
        channels: u64,
        replied: bool,
    },
    /// MONITOR: one reply, then the feed's lines arrive between replies.
    Monitor { replied: bool },
    /// EXEC of a MULTI that queued a subscription: one reply (unless silenced), after which
    /// the connection may be subscribed.
    ThenSubscribed { replied: bool },
}

/// The pub/sub commands, and the name of the frames that confirm each.
pub const SUBSCRIPTIONS: [(&str, &[u8]); 6] = [
    ("subscribe", b"subscribe\r\n"),
    ("psubscribe", b"psubscribe\r\n"),
    ("ssubscribe", b"ssubscribe\r\n"),
    ("unsubscribe", b"unsubscribe\r\n"),
    ("punsubscribe", b"punsubscribe\r\n"),
    ("sunsubscribe", b"sunsubscribe\r\n"),
];

/// The pieces of a HELLO rewritten with the profile's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloPart<'a> {
    /// A client argument kept as it is.
    Keep(&'a [u8]),
    /// `AUTH <profile user> <profile password>` goes here.
    ProfileAuth,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<'a> {
    /// Send the client's bytes upstream unchanged.
    Forward(Replies),
    /// Send the profile's `AUTH` instead; its reply (`+OK`) arrives in order.
    Auth(Replies),
    /// Send `HELLO` made of these parts instead.
    Hello(Vec<HelloPart<'a>>, Replies),
    /// Forward, then re-authenticate before anything else; only `+RESET` reaches the client.
    /// `replied` is false when a `CLIENT REPLY SKIP` swallows RESET's own reply.
    Reset { replied: bool },
    /// Forward; the upstream replies and closes, and so does the client connection.
    Quit,
    /// Forward; from then on both directions are opaque bytes (replication stream).
    Replication,
    /// Reply locally, in order, and forward nothing.
    Answer(&'static [u8]),
    /// Reply locally, then close the client connection.
    AnswerAndClose(&'static [u8]),
    /// Forward nothing and reply nothing (a local reply that `CLIENT REPLY` suppresses).
    Drop,
}

/// Commands that must be held whole, because their arguments decide what is sent upstream or
/// how the reply stream changes. All others stream as soon as their name is known.
pub fn needs_whole(name: &[u8]) -> bool {
    ["auth", "hello", "client", "reset", "quit", "sync", "psync"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

/// The `CLIENT` subcommands whose effect RESET undoes, or that change nothing on the
/// connection itself. Any other (NO-EVICT, which Redis 7.0's RESET keeps; NO-TOUCH; SETINFO,
/// whose library name and version RESET keeps on purpose; TRACKING and CACHING, whose
/// invalidations may still be on their way; a subcommand newer than this list) rules reuse
/// out, and so do `ID`, `INFO` and `LIST`, which tell the client its connection's ID: another
/// connection may name it (`CLIENT TRACKING ON REDIRECT`, `CLIENT UNBLOCK`, `CLIENT KILL ID`),
/// and a direct client's close would end that at once, where a reused connection would carry
/// it, invalidations and all, to the next client. `REPLY` is allowed only as `ON` (see
/// [`leaves_no_trace`]).
const CLIENT_CLEARED: [&str; 9] = [
    "getname",
    "setname",
    "getredir",
    "trackinginfo",
    "kill",
    "unblock",
    "pause",
    "unpause",
    "help",
];

/// The `CLIENT` subcommands that only read, and tell nothing the next client should not
/// share: after them the connection is as it was.
const CLIENT_READS: [&str; 4] = ["getname", "getredir", "trackinginfo", "help"];

/// The commands that leave their own connection as the handshake made it: every command of
/// Redis 7.0 (`COMMAND LIST`) but those that change the connection (the database, the user,
/// the name, the protocol, MULTI, watched keys, the cluster flags `READONLY` and `ASKING`,
/// `CLIENT` settings, judged on their own) and those [`leaves_no_trace`] refuses (pub/sub,
/// MONITOR, replication, DEBUG), and the data commands of 7.2 to 8.0. Data commands and
/// scripts (a script's `SELECT` stays in the script) are here. A name that is not (a command
/// renamed with `rename-command`, a module's, one newer than this list) may have changed
/// anything: the connection goes through RESET before another client gets it. Sorted, for
/// a binary search.
const LEAVE_CONNECTION: [&str; N_LEAVE] = [
    "acl",
    "append",
    "bgrewriteaof",
    "bgsave",
    "bitcount",
    "bitfield",
    "bitfield_ro",
    "bitop",
    "bitpos",
    "blmove",
    "blmpop",
    "blpop",
    "brpop",
    "brpoplpush",
    "bzmpop",
    "bzpopmax",
    "bzpopmin",
    "cluster",
    "command",
    "config",
    "copy",
    "dbsize",
    "decr",
    "decrby",
    "del",
    "discard",
    "dump",
    "echo",
    "eval",
    "eval_ro",
    "evalsha",
    "evalsha_ro",
    "exec",
    "exists",
    "expire",
    "expireat",
    "expiretime",
    "failover",
    "fcall",
    "fcall_ro",
    "flushall",
    "flushdb",
    "function",
    "geoadd",
    "geodist",
    "geohash",
    "geopos",
    "georadius",
    "georadius_ro",
    "georadiusbymember",
    "georadiusbymember_ro",
    "geosearch",
    "geosearchstore",
    "get",
    "getbit",
    "getdel",
    "getex",
    "getrange",
    "getset",
    "hdel",
    "hexists",
    "hexpire",
    "hexpireat",
    "hexpiretime",
    "hget",
    "hgetall",
    "hgetdel",
    "hgetex",
    "hincrby",
    "hincrbyfloat",
    "hkeys",
    "hlen",
    "hmget",
    "hmset",
    "hpersist",
    "hpexpire",
    "hpexpireat",
    "hpexpiretime",
    "hpttl",
    "hrandfield",
    "hscan",
    "hset",
    "hsetex",
    "hsetnx",
    "hstrlen",
    "httl",
    "hvals",
    "incr",
    "incrby",
    "incrbyfloat",
    "info",
    "keys",
    "lastsave",
    "latency",
    "lcs",
    "lindex",
    "linsert",
    "llen",
    "lmove",
    "lmpop",
    "lolwut",
    "lpop",
    "lpos",
    "lpush",
    "lpushx",
    "lrange",
    "lrem",
    "lset",
    "ltrim",
    "memory",
    "mget",
    "migrate",
    "module",
    "move",
    "mset",
    "msetnx",
    "object",
    "persist",
    "pexpire",
    "pexpireat",
    "pexpiretime",
    "pfadd",
    "pfcount",
    "pfdebug",
    "pfmerge",
    "pfselftest",
    "ping",
    "psetex",
    "pttl",
    "publish",
    "pubsub",
    "quit",
    "randomkey",
    "rename",
    "renamenx",
    "replicaof",
    "restore",
    "restore-asking",
    "role",
    "rpop",
    "rpoplpush",
    "rpush",
    "rpushx",
    "sadd",
    "save",
    "scan",
    "scard",
    "script",
    "sdiff",
    "sdiffstore",
    "set",
    "setbit",
    "setex",
    "setnx",
    "setrange",
    "shutdown",
    "sinter",
    "sintercard",
    "sinterstore",
    "sismember",
    "slaveof",
    "slowlog",
    "smembers",
    "smismember",
    "smove",
    "sort",
    "sort_ro",
    "spop",
    "spublish",
    "srandmember",
    "srem",
    "sscan",
    "strlen",
    "substr",
    "sunion",
    "sunionstore",
    "swapdb",
    "time",
    "touch",
    "ttl",
    "type",
    "unlink",
    "unwatch",
    "wait",
    "waitaof",
    "xack",
    "xadd",
    "xautoclaim",
    "xclaim",
    "xdel",
    "xgroup",
    "xinfo",
    "xlen",
    "xpending",
    "xrange",
    "xread",
    "xreadgroup",
    "xrevrange",
    "xsetid",
    "xtrim",
    "zadd",
    "zcard",
    "zcount",
    "zdiff",
    "zdiffstore",
    "zincrby",
    "zinter",
    "zintercard",
    "zinterstore",
    "zlexcount",
    "zmpop",
    "zmscore",
    "zpopmax",
    "zpopmin",
    "zrandmember",
    "zrange",
    "zrangebylex",
    "zrangebyscore",
    "zrangestore",
    "zrank",
    "zrem",
    "zremrangebylex",
    "zremrangebyrank",
    "zremrangebyscore",
    "zrevrange",
    "zrevrangebylex",
    "zrevrangebyscore",
    "zrevrank",
    "zscan",
    "zscore",
    "zunion",
    "zunionstore",
];
const N_LEAVE: usize = 232;

/// Whether `cmd` may have changed its own connection's state on the server: a name not in
/// [`LEAVE_CONNECTION`], or a `CLIENT` subcommand other than [`CLIENT_READS`]. What
/// [`leaves_no_trace`] refuses is judged there. Runs on every command of a clean session:
/// a binary search on the name, lowercased on the stack.
fn changes_connection(cmd: &Command<'_>) -> bool {
    let name = cmd.arg(0).unwrap_or_default();
    if name.eq_ignore_ascii_case(b"client") {
        let sub = cmd.arg(1).unwrap_or_default();
        return !CLIENT_READS
            .iter()
            .any(|n| sub.eq_ignore_ascii_case(n.as_bytes()));
    }
    let mut lower = [0u8; 24];
    let Some(lower) = lower.get_mut(..name.len()) else {
        return true;
    };
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    LEAVE_CONNECTION
        .binary_search_by(|n| n.as_bytes().cmp(lower))
        .is_err()
}

/// The commands after which the upstream sends more than replies, for good: MONITOR's feed,
/// replication.
const FEEDS: [&str; 4] = ["monitor", "sync", "psync", "replconf"];

/// Whether a RESET undoes whatever `cmd` does to its connection, and the relay can still
/// count replies after it: RESET (`clearClientConnectionState` in Redis's networking.c)
/// selects db 0, logs out, clears the name, MULTI, WATCH, subscriptions, MONITOR, tracking,
/// CLIENT REPLY and the RESP version. A session that subscribed or monitored is not reused
/// even after its own RESET (the feed's last frames could still be in flight), nor one that
/// turned CLIENT REPLY off or to SKIP (its replies were not all countable), nor replication.
fn leaves_no_trace(cmd: &Command<'_>) -> bool {
    let name = cmd.arg(0).unwrap_or_default();
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    if SUBSCRIPTIONS.iter().any(|(n, _)| is(n)) {
        return false;
    }
    if FEEDS.iter().any(|n| is(n)) {
        return false;
    }
    // SCRIPT DEBUG sets CLIENT_LUA_DEBUG, which RESET keeps: the next client's EVAL would
    // start the debugger. DEBUG is an operator's tool, left out whole.
    if is("debug") || (is("script") && cmd.is(1, "debug")) {
        return false;
    }
    if !is("client") {
        return true;
    }
    let sub = cmd.arg(1).unwrap_or_default();
    if sub.eq_ignore_ascii_case(b"reply") {
        return cmd.argc == 3 && cmd.is(2, "on");
    }
    CLIENT_CLEARED
        .iter()
        .any(|n| sub.eq_ignore_ascii_case(n.as_bytes()))
}

/// The client side of authentication. Without a downstream password the client counts as
/// authenticated from the start; with one, it must `AUTH` (or `HELLO ... AUTH`) first, and a
/// `RESET` makes it authenticate again, as with Redis's `requirepass`.
#[derive(Debug, Clone)]
pub struct Filter {
    password_required: bool,
    pub authenticated: bool,
    /// A MULTI is open: commands are queued, not run, until EXEC or DISCARD.
    pub in_multi: bool,
    /// `CLIENT REPLY OFF` is in force: no command gets a reply until `CLIENT REPLY ON`.
    reply_off: bool,
    /// `CLIENT REPLY SKIP` was sent: the next command gets no reply.
    skip_next: bool,
    /// The open MULTI queued a subscription: after EXEC the connection may be subscribed.
    multi_subscribes: bool,
    /// Nothing this session sent can have left state on the upstream connection that a
    /// RESET does not clear, or a reply stream the relay cannot count: the connection may
    /// serve another client once RESET ([`leaves_no_trace`]). Once false, false for good.
    pub reset_clears: bool,
    /// ... and nothing changed the connection's state at all ([`changes_connection`]): it
    /// can serve another client as it is, with no RESET. Implies `reset_clears`.
    pub untouched: bool,
}

impl Filter {
    /// Without `upstream.reuse` no command is judged for it: `reset_clears` and `untouched`
    /// start false.
    pub fn judging_reuse(mut self, reuse: bool) -> Self {
        self.reset_clears = reuse;
        self.untouched = reuse;
        self
    }

    pub fn new(password_required: bool) -> Self {
        Filter {
            password_required,
            authenticated: !password_required,
            in_multi: false,
            reply_off: false,
            skip_next: false,
            multi_subscribes: false,
            reset_clears: true,
            untouched: true,
        }
    }

    /// Whether the next command's reply will come: CLIENT REPLY is neither OFF nor has a SKIP
    /// armed. Only then can the ambassador's own command be told from the client's by
    /// position, since it will get the next reply.
    pub fn replies_on(&self) -> bool {
        !self.reply_off && !self.skip_next
    }

    /// Redis read a line it ignores (an empty one, `*0`, `*-1`): it resets the client as
    /// after a command (`resetClient`), which uses up a pending `CLIENT REPLY SKIP`, and the
    /// command after it is answered.
    pub fn ignored(&mut self) {
        self.skip_next = false;
    }

    /// Decides what to do with `cmd`. `password_ok` checks a password a client offers
    /// against the downstream password.
    pub fn decide<'a>(
        &mut self,
        cmd: &Command<'a>,
        password_ok: impl Fn(&[u8]) -> bool,
    ) -> Action<'a> {
        let name = cmd.arg(0).unwrap_or_default();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        // Judged by name alone, queued in MULTI, refused or not: a miss costs one reuse.
        // Once false (or without reuse) nothing is judged again, on a path every command takes.
        if self.reset_clears {
            self.reset_clears = leaves_no_trace(cmd);
            self.untouched &= self.reset_clears && !changes_connection(cmd);
        }
        if is("auth") {
            return self.auth(cmd, password_ok);
        }
        if is("hello") {
            return self.hello(cmd, password_ok);
        }
        if is("quit") {
            return if self.authenticated {
                Action::Quit
            } else {
                Action::AnswerAndClose(OK)
            };
        }
        if is("reset") && cmd.argc == 1 {
            if !self.authenticated {
                return self.local(RESET);
            }
            // RESET turns CLIENT REPLY back on, but a SKIP before it still eats its reply.
            let replied = !std::mem::take(&mut self.skip_next);
            self.reply_off = false;
            self.authenticated = !self.password_required;
            self.in_multi = false;
            self.multi_subscribes = false;
            return Action::Reset { replied };
        }
        if !self.authenticated {
            return self.local(NOAUTH);
        }
        if is("sync") || is("psync") {
            return Action::Replication;
        }
        if is("client") && cmd.is(1, "reply") {
            return Action::Forward(self.client_reply(cmd));
        }
        let subscription = SUBSCRIPTIONS.iter().find(|(n, _)| is(n));
        let replies = self.next_replies();
        let replied = replies == Replies::One;
        if self.in_multi {
            // Queued: `+QUEUED` now, the effect at EXEC.
            self.multi_subscribes |= subscription.is_some();
            // A DISCARD Redis refuses (`DISCARD x`: arity) leaves the MULTI open; an EXEC it
            // refuses ends it (EXECABORT, Redis 6.2 and later).
            if is("exec") || (is("discard") && cmd.argc == 1) {
                self.in_multi = false;
                let subscribes = std::mem::take(&mut self.multi_subscribes);
                if subscribes && is("exec") {
                    return Action::Forward(Replies::ThenSubscribed { replied });
                }
            }
            return Action::Forward(replies);
        }
        if let Some(&(_, confirms)) = subscription {
            let channels = cmd.argc.saturating_sub(1);
            return Action::Forward(Replies::Subscribe {
                confirms,
                channels,
                replied,
            });
        }
        if is("monitor") {
            return Action::Forward(Replies::Monitor { replied });
        }
        if is("multi") {
            self.in_multi = true;
        }
        Action::Forward(replies)
    }

    /// Whether the next command gets a reply, under CLIENT REPLY.
    fn next_replies(&mut self) -> Replies {
        if std::mem::take(&mut self.skip_next) || self.reply_off {
            Replies::None
        } else {
            Replies::One
        }
    }

    /// A reply of the ambassador's own, unless CLIENT REPLY suppresses it, as Redis would.
    fn local(&mut self, reply: &'static [u8]) -> Action<'static> {
        match self.next_replies() {
            Replies::None => Action::Drop,
            _ => Action::Answer(reply),
        }
    }

    /// `CLIENT REPLY ON|OFF|SKIP`, modelled as Redis runs it: ON always answers `+OK`; OFF and
    /// SKIP answer nothing; SKIP silences the command after it. Inside MULTI it would only run
    /// at EXEC, so the count is given up until the next RESET.
    fn client_reply(&mut self, cmd: &Command<'_>) -> Replies {
        if self.in_multi {
            self.reset_clears = false;
            self.untouched = false;
            return Replies::Untracked;
        }
        if cmd.argc != 3 {
            return self.next_replies();
        }
        if cmd.is(2, "on") {
            self.reply_off = false;
            self.skip_next = false;
            Replies::One
        } else if cmd.is(2, "off") {
            self.reply_off = true;
            self.skip_next = false;
            Replies::None
        } else if cmd.is(2, "skip") {
            // SKIP is itself the command a pending SKIP silences; then it arms its own.
            self.skip_next = true;
            Replies::None
        } else {
            self.next_replies()
        }
    }

    fn auth<'a>(&mut self, cmd: &Command<'a>, password_ok: impl Fn(&[u8]) -> bool) -> Action<'a> {
        if !self.password_required {
            return Action::Auth(self.next_replies());
        }
        let password = match cmd.argc {
            2 => cmd.arg(1),
            3 => cmd.arg(2),
            _ => return self.local(AUTH_ARITY),
        };
        match password {
            Some(p) if password_ok(p) => {
                let was = std::mem::replace(&mut self.authenticated, true);
                // Before the client authenticated, nothing is in flight: answer at once.
                if was {
                    Action::Auth(self.next_replies())
                } else {
                    self.local(OK)
                }
            }
            _ => self.local(WRONGPASS),
        }
    }

    fn hello<'a>(&mut self, cmd: &Command<'a>, password_ok: impl Fn(&[u8]) -> bool) -> Action<'a> {
        let Some(args) = cmd.all() else {
            return self.local(HELLO_TOO_LONG);
        };
        let mut parts: Vec<HelloPart> = args.iter().take(2).map(|a| HelloPart::Keep(a)).collect();
        let mut offered = None;
        let mut j = 2;
        // The same walk as Redis's helloCommand, so the server reports the same syntax errors.
        while j < args.len() {
            let more = args.len() - 1 - j;
            if args[j].eq_ignore_ascii_case(b"auth") && more >= 2 {
                offered = Some(args[j + 2]);
                parts.push(HelloPart::ProfileAuth);
                j += 3;
            } else if args[j].eq_ignore_ascii_case(b"setname") && more >= 1 {
                parts.extend([HelloPart::Keep(args[j]), HelloPart::Keep(args[j + 1])]);
                j += 2;
            } else {
                // A malformed option: the server rejects it by name. What follows an AUTH
                // may be a password, so it stays here.
                parts.push(HelloPart::Keep(args[j]));
                if args[j].eq_ignore_ascii_case(b"auth") {
                    break;
                }
                j += 1;
            }
        }
        if self.password_required {
            match offered {
                Some(p) if password_ok(p) => self.authenticated = true,
                Some(_) => return self.local(WRONGPASS),
                None if !self.authenticated => return self.local(HELLO_NOAUTH),
                None => {}
            }
        }
        let replies = self.next_replies();
        if offered.is_none() && parts.len() == args.len() {
            return Action::Forward(replies);
        }
        Action::Hello(parts, replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd<'a>(args: &'a [&'a str]) -> Command<'a> {
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        Command::new(&bytes)
    }

    fn never(_: &[u8]) -> bool {
        false
    }

    #[test]
    fn client_auth_is_always_replaced_without_a_downstream_password() {
        let mut f = Filter::new(false);
        let auth = Action::Auth(Replies::One);
        assert_eq!(f.decide(&cmd(&["AUTH", "x"]), never), auth);
        assert_eq!(f.decide(&cmd(&["auth", "u", "x"]), never), auth);
        assert_eq!(f.decide(&cmd(&["AUTH"]), never), auth);
    }

    #[test]
    fn hello_auth_is_replaced_and_setname_kept() {
        let mut f = Filter::new(false);
        let a = f.decide(
            &cmd(&["HELLO", "3", "AUTH", "u", "p", "SETNAME", "n"]),
            never,
        );
        assert_eq!(
            a,
            Action::Hello(
                vec![
                    HelloPart::Keep(b"HELLO"),
                    HelloPart::Keep(b"3"),
                    HelloPart::ProfileAuth,
                    HelloPart::Keep(b"SETNAME"),
                    HelloPart::Keep(b"n"),
                ],
                Replies::One
            )
        );
        assert_eq!(
            f.decide(&cmd(&["HELLO", "3"]), never),
            Action::Forward(Replies::One)
        );
        // A malformed AUTH keeps the server's error but drops what follows it.
        assert_eq!(
            f.decide(&cmd(&["HELLO", "3", "AUTH", "secret"]), never),
            Action::Hello(
                vec![
                    HelloPart::Keep(b"HELLO"),
                    HelloPart::Keep(b"3"),
                    HelloPart::Keep(b"AUTH")
                ],
                Replies::One
            )
        );
    }

    #[test]
    fn downstream_password_gates_everything() {
        let mut f = Filter::new(true);
        let ok = |p: &[u8]| p == b"right";
        assert_eq!(f.decide(&cmd(&["GET", "k"]), ok), Action::Answer(NOAUTH));
        assert_eq!(
            f.decide(&cmd(&["HELLO", "3"]), ok),
            Action::Answer(HELLO_NOAUTH)
        );
        assert_eq!(
            f.decide(&cmd(&["AUTH", "wrong"]), ok),
            Action::Answer(WRONGPASS)
        );
        assert_eq!(f.decide(&cmd(&["AUTH", "right"]), ok), Action::Answer(OK));
        assert_eq!(
            f.decide(&cmd(&["GET", "k"]), ok),
            Action::Forward(Replies::One)
        );
        assert_eq!(
            f.decide(&cmd(&["AUTH", "wrong"]), ok),
            Action::Answer(WRONGPASS)
        );
        assert_eq!(
            f.decide(&cmd(&["AUTH", "any", "right"]), ok),
            Action::Auth(Replies::One)
        );
        assert_eq!(
            f.decide(&cmd(&["RESET"]), ok),
            Action::Reset { replied: true }
        );
        assert_eq!(f.decide(&cmd(&["GET", "k"]), ok), Action::Answer(NOAUTH));
    }

    #[test]
    fn stream_changing_commands_are_flagged() {
        let mut f = Filter::new(false);
        assert_eq!(
            f.decide(&cmd(&["SUBSCRIBE", "c"]), never),
            Action::Forward(Replies::Subscribe {
                confirms: b"subscribe\r\n",
                channels: 1,
                replied: true
            })
        );
        assert_eq!(
            f.decide(&cmd(&["monitor"]), never),
            Action::Forward(Replies::Monitor { replied: true })
        );
        assert_eq!(
            f.decide(&cmd(&["CLIENT", "ID"]), never),
            Action::Forward(Replies::One)
        );
        assert_eq!(
            f.decide(&cmd(&["RESET", "x"]), never),
            Action::Forward(Replies::One)
        );
        assert_eq!(
            f.decide(&cmd(&["psync", "?", "-1"]), never),
            Action::Replication
        );
    }

    #[test]
    fn client_reply_is_modelled_as_redis_runs_it() {
        let mut f = Filter::new(false);
        let none = Action::Forward(Replies::None);
        let one = Action::Forward(Replies::One);
        assert_eq!(f.decide(&cmd(&["client", "reply", "off"]), never), none);
        assert_eq!(f.decide(&cmd(&["PING"]), never), none);
        assert_eq!(f.decide(&cmd(&["CLIENT", "REPLY", "ON"]), never), one);
        assert_eq!(f.decide(&cmd(&["CLIENT", "REPLY", "SKIP"]), never), none);
        assert_eq!(f.decide(&cmd(&["CLIENT", "REPLY", "SKIP"]), never), none);
        assert_eq!(
            f.decide(&cmd(&["PING"]), never),
            none,
            "the second SKIP silences it"
        );
        assert_eq!(f.decide(&cmd(&["PING"]), never), one);
        assert_eq!(
            f.decide(&cmd(&["CLIENT", "REPLY", "FOO"]), never),
            one,
            "a syntax error"
        );
        assert_eq!(f.decide(&cmd(&["CLIENT", "REPLY", "SKIP"]), never), none);
        assert_eq!(
            f.decide(&cmd(&["RESET"]), never),
            Action::Reset { replied: false }
        );
        assert_eq!(f.decide(&cmd(&["PING"]), never), one);
        assert_eq!(f.decide(&cmd(&["MULTI"]), never), one);
        assert_eq!(
            f.decide(&cmd(&["CLIENT", "REPLY", "OFF"]), never),
            Action::Forward(Replies::Untracked),
            "queued inside MULTI: not modelled"
        );
    }

    /// A filter that has decided `cmds`, in order.
    fn decided(cmds: &[&[&str]]) -> Filter {
        let mut f = Filter::new(false);
        for c in cmds {
            f.decide(&cmd(c), never);
        }
        f
    }

    #[test]
    fn only_what_reset_undoes_keeps_a_connection_reusable() {
        let after = |cmds: &[&[&str]]| decided(cmds).reset_clears;
        assert!(after(&[
            &["SET", "k", "v"],
            &["GET", "k"],
            &["SELECT", "3"]
        ]));
        assert!(after(&[
            &["client", "setname", "x"],
            &["CLIENT", "GETNAME"]
        ]));
        assert!(after(&[
            &["CLIENT", "REPLY", "ON"],
            &["HELLO", "3"],
            &["WATCH", "k"]
        ]));
        assert!(after(&[&["MULTI"], &["INCR", "k"], &["EXEC"], &["RESET"]]));
        for dirty in [
            &["SUBSCRIBE", "c"][..],
            &["punsubscribe"],
            &["MONITOR"],
            &["PSYNC", "?", "-1"],
            &["REPLCONF", "listening-port", "1"],
            &["CLIENT", "REPLY", "OFF"],
            &["CLIENT", "REPLY", "SKIP"],
            &["CLIENT", "NO-EVICT", "ON"],
            &["client", "no-touch", "on"],
            &["CLIENT", "SETINFO", "LIB-NAME", "x"],
            &["CLIENT", "TRACKING", "ON"],
            &["CLIENT", "CACHING", "YES"],
            &["CLIENT", "SOMETHING-NEW"],
            &["SCRIPT", "DEBUG", "YES"],
            &["DEBUG", "SLEEP", "0"],
            &["CLIENT"],
            &["CLIENT", "ID"],
            &["client", "info"],
            &["CLIENT", "LIST"],
        ] {
            assert!(!after(&[dirty, &["RESET"], &["PING"]]), "{dirty:?}");
        }
        assert!(
            !after(&[&["MULTI"], &["CLIENT", "REPLY", "ON"], &["EXEC"]]),
            "CLIENT REPLY queued in MULTI"
        );
    }

    #[test]
    fn only_commands_that_change_nothing_on_the_connection_leave_it_as_it_is() {
        let after = |cmds: &[&[&str]]| {
            let f = decided(cmds);
            (f.untouched, f.reset_clears)
        };
        assert_eq!(after(&[]), (true, true));
        assert_eq!(
            after(&[
                &["SET", "k", "v"],
                &["get", "k"],
                &["EVAL", "redis.call('select', 3)", "0"],
                &["client", "getname"],
                &["GeoRadiusByMember_RO", "k", "m", "1", "km"],
                &["HEXPIRE", "k", "1", "FIELDS", "1", "f"],
                &["PING"],
            ]),
            (true, true)
        );
        for touches in [
            &["SELECT", "3"][..],
            &["client", "setname", "x"],
            &["CLIENT", "REPLY", "ON"],
            &["HELLO", "3"],
            &["AUTH", "p"],
            &["WATCH", "k"],
            &["READONLY"],
            &["readwrite"],
            &["ASKING"],
            &["RESET"],
            // A refused DISCARD (ACL) would leave it open: RESET closes it.
            &["MULTI"],
            // Renamed (SELECT, say), a module's, or newer than the list: unknown, so RESET.
            &["mysel", "5"],
            &["MODULE.CMD"],
            &["a-name-longer-than-any-command-redis-has"],
        ] {
            assert_eq!(after(&[touches, &["PING"]]), (false, true), "{touches:?}");
            let queued = after(&[&["MULTI"], touches, &["EXEC"]]);
            assert!(!queued.0, "{touches:?} queued in MULTI");
        }
        assert_eq!(after(&[&["SUBSCRIBE", "c"]]), (false, false));
        let in_multi = |cmds: &[&[&str]]| decided(cmds).in_multi;
        assert!(!in_multi(&[&["MULTI"], &["DISCARD"]]));
        assert!(
            in_multi(&[&["MULTI"], &["DISCARD", "x"]]),
            "refused: MULTI goes on"
        );
        assert!(
            !in_multi(&[&["MULTI"], &["EXEC", "x"]]),
            "refused: EXECABORT"
        );
        assert_eq!(after(&[&["CLIENT", "NO-EVICT", "ON"]]), (false, false));
        let mut off = Filter::new(false).judging_reuse(false);
        off.decide(&cmd(&["GET", "k"]), never);
        assert!(!off.untouched, "judged only with reuse");
    }

    #[test]
    fn subscriptions_are_modelled_where_they_take_effect() {
        let mut f = Filter::new(false);
        let one = Action::Forward(Replies::One);
        assert_eq!(
            f.decide(&cmd(&["CLIENT", "REPLY", "SKIP"]), never),
            Action::Forward(Replies::None)
        );
        assert_eq!(
            f.decide(&cmd(&["PUNSUBSCRIBE"]), never),
            Action::Forward(Replies::Subscribe {
                confirms: b"punsubscribe\r\n",
                channels: 0,
                replied: false
            }),
            "a skipped subscription's error is silenced, its confirmations are not"
        );
        assert_eq!(f.decide(&cmd(&["MULTI"]), never), one);
        assert_eq!(f.decide(&cmd(&["SSUBSCRIBE", "s"]), never), one, "queued");
        assert_eq!(f.decide(&cmd(&["MONITOR"]), never), one, "queued");
        assert_eq!(
            f.decide(&cmd(&["EXEC"]), never),
            Action::Forward(Replies::ThenSubscribed { replied: true })
        );
        assert_eq!(f.decide(&cmd(&["MULTI"]), never), one);
        assert_eq!(f.decide(&cmd(&["SUBSCRIBE", "s"]), never), one);
        assert_eq!(f.decide(&cmd(&["DISCARD"]), never), one);
        assert_eq!(
            f.decide(&cmd(&["EXEC"]), never),
            one,
            "nothing queued any more"
        );
    }

    #[test]
    fn the_commands_that_leave_the_connection_are_sorted_lowercase_and_fit_the_buffer() {
        assert!(LEAVE_CONNECTION.windows(2).all(|w| w[0] < w[1]));
        for n in LEAVE_CONNECTION {
            assert!(
                n.len() <= 24 && n.bytes().all(|b| !b.is_ascii_uppercase()),
                "{n}"
            );
        }
    }
}
