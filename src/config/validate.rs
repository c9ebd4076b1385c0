//! From the raw, all-optional form to a typed [`Config`], one section at a time; every
//! problem is recorded by its key and checking goes on, so all are reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{Raw, RawAdmin, RawCredentials, RawHandshake, RawListen, RawUpstream};
use super::{
    Admin, Config, ConfigErrors, CredentialSource, Handshake, HostPort, Listen, ListenAddress,
    LogFormat, Protocol, Shutdown, Upstream,
};
use crate::credentials::aws_iam::{self, AwsIamSource};
use crate::credentials::exec::ExecSource;
use crate::credentials::{Credentials, DownstreamPassword};
use crate::dead_peer::DeadPeer;
use crate::discovery::{Discovery, Resolver};
use crate::refresh::{Fetcher, Schedule};
use crate::tls::Tls;
use std::sync::Arc;

pub(super) fn validate(
    raw: Raw,
    profile: String,
    skip_command: bool,
    mut errors: ConfigErrors,
) -> Result<Config, ConfigErrors> {
    let e = &mut errors;
    let listen = listen(raw.listen, e);
    let reuse_asked = raw.upstream.reuse == Some(true);
    let mut upstream = upstream(raw.upstream, e);
    let protocol = listen.as_ref().map(|l| l.protocol).unwrap_or_default();
    if let Some(u) = upstream.as_mut() {
        u.protocol = protocol;
    }
    if protocol == Protocol::Tcp {
        // A TCP ambassador neither parses nor authenticates: these would silently do nothing.
        let tcp_mode = "not with listen.protocol = \"tcp\"";
        if listen.as_ref().is_some_and(|l| l.password.is_some()) {
            e.add("listen.require_password_file", tcp_mode);
        }
        if upstream.as_ref().is_some_and(|u| !u.expect.is_empty()) {
            e.add("upstream.expect", tcp_mode);
        }
        if raw.handshake.client_name.is_some() || raw.handshake.database.is_some() {
            e.add("handshake", tcp_mode);
        }
        if reuse_asked {
            e.add("upstream.reuse", tcp_mode);
        }
        // Nothing to RESET on a connection that is not Redis: pooled ones are used once.
        if let Some(u) = upstream.as_mut() {
            u.reuse = false;
        }
    }
    let no_credentials = raw.credentials.source.is_none() && raw.credentials.file.is_none();
    let credentials = if protocol == Protocol::Tcp && no_credentials {
        // A TCP ambassador authenticates nothing: no credentials needed.
        Some((CredentialSource::None, Credentials::none()))
    } else {
        credentials(&raw.credentials, skip_command, e)
    };
    let handshake = handshake(raw.handshake, e);
    let max_session_age = match raw.credentials.max_session_age {
        Some(d) if d < Duration::from_secs(1) => {
            e.add("credentials.max_session_age", "must be at least 1s");
            None
        }
        // An IAM-authenticated connection is closed by the server after 12 hours unless it
        // authenticates again: 11 hours leaves room.
        None if raw.credentials.source.as_deref() == Some("aws-iam")
            && raw.credentials.reauth_open_sessions != Some(false) =>
        {
            Some(Duration::from_secs(11 * 3600))
        }
        other => other,
    };
    if raw.credentials.max_session_age.is_some()
        && raw.credentials.reauth_open_sessions == Some(false)
    {
        e.add(
            "credentials.max_session_age",
            "not with credentials.reauth_open_sessions = false",
        );
    }
    let admin = admin(raw.admin, e);
    let shutdown = Shutdown {
        min_delay: raw.shutdown.min_delay.unwrap_or(Duration::ZERO),
        drain_timeout: raw
            .shutdown
            .drain_timeout
            .unwrap_or(Duration::from_secs(30)),
    };
    let log_format = match raw.log.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            e.add(
                "log.format",
                format!("expected \"text\" or \"json\", got {other:?}"),
            );
            LogFormat::Text
        }
    };
    match (listen, upstream, credentials) {
        (Some(listen), Some(upstream), Some((credentials_source, credentials)))
            if errors.problems.is_empty() =>
        {
            Ok(Config {
                profile,
                listen,
                upstream,
                credentials_source,
                credentials,
                credentials_username: raw.credentials.username,
                reauth_open_sessions: raw.credentials.reauth_open_sessions.unwrap_or(true),
                max_session_age,
                handshake,
                admin,
                shutdown,
                log_format,
            })
        }
        _ => Err(errors),
    }
}

fn listen(raw: RawListen, errors: &mut ConfigErrors) -> Option<Listen> {
    let address = match raw.address.as_deref().unwrap_or("127.0.0.1:6379") {
        a if a.starts_with("unix:") => Some(ListenAddress::Unix(PathBuf::from(&a[5..]))),
        a => a
            .parse()
            .map(ListenAddress::Tcp)
            .map_err(|_| {
                errors.add(
                    "listen.address",
                    format!("expected ip:port or unix:/path, got {a:?}"),
                )
            })
            .ok(),
    };
    let protocol = match raw.protocol.as_deref() {
        None | Some("redis") => Protocol::Redis,
        Some("tcp") => Protocol::Tcp,
        Some(other) => {
            errors.add(
                "listen.protocol",
                format!("expected \"redis\" or \"tcp\", got {other:?}"),
            );
            Protocol::Redis
        }
    };
    let max_clients = match raw.max_clients.unwrap_or(10_000) {
        n if n >= 1 => n as usize,
        n => {
            errors.add("listen.max_clients", format!("must be at least 1, got {n}"));
            1
        }
    };
    let password = raw.require_password_file.and_then(|path| {
        DownstreamPassword::load(&path)
            .map_err(|e| errors.add("listen.require_password_file", e.to_string()))
            .ok()
    });
    // Zero means off, like leaving it out: a blocking pop may rightly wait forever.
    let idle_timeout = raw.idle_timeout.filter(|d| !d.is_zero());
    let keepalive = keepalive(errors, "listen.keepalive", raw.keepalive);
    Some(Listen {
        address: address?,
        protocol,
        max_clients,
        password,
        idle_timeout,
        dead_peer: DeadPeer::client(keepalive.unwrap_or(Duration::from_secs(15))),
    })
}

fn upstream(mut raw: RawUpstream, errors: &mut ConfigErrors) -> Option<Upstream> {
    let address = raw.address.as_deref().and_then(|a| {
        a.parse::<HostPort>()
            .map_err(|e| errors.add("upstream.address", e))
            .ok()
    });
    let resolver = match raw.dns_server.as_deref().map(str::parse::<SocketAddr>) {
        None => Some(Resolver::System),
        Some(Ok(server)) => Resolver::server(server)
            .map_err(|e| errors.add("upstream.dns_server", e.to_string()))
            .ok(),
        Some(Err(_)) => {
            errors.add(
                "upstream.dns_server",
                "expected ip:port, such as 10.0.0.2:53",
            );
            None
        }
    };
    let tls = raw
        .tls
        .take()
        .filter(|t| t.enabled.unwrap_or(true))
        .and_then(|t| {
            let host = address.as_ref().map(|a| a.host.as_str());
            Tls::build(&t.into(), host)
                .map_err(|problems| {
                    for p in problems {
                        errors.add(p.key(), p.to_string());
                    }
                })
                .ok()
        });
    let connect_timeout = positive(errors, "upstream.connect_timeout", raw.connect_timeout, 3);
    let handshake_timeout = positive(
        errors,
        "upstream.handshake_timeout",
        raw.handshake_timeout,
        3,
    );
    let dead_peer = DeadPeer::upstream(
        raw.dead_peer_timeout.unwrap_or(Duration::from_secs(15)),
        keepalive(errors, "upstream.keepalive", raw.keepalive),
    );
    let kinds = [
        raw.address.is_some(),
        raw.srv.is_some(),
        raw.sentinel.is_some(),
        raw.addresses.is_some(),
    ];
    let source = match kinds.iter().filter(|k| **k).count() {
        0 => {
            errors.add(
                "upstream.address",
                "missing (or one of upstream.srv, upstream.sentinel, upstream.addresses)",
            );
            None
        }
        1 => {
            let reach = (resolver.clone()?, connect_timeout, dead_peer);
            super::discovery::source(&mut raw, address, reach, errors)
        }
        _ => {
            errors.add(
                "upstream",
                "give only one of address, srv, sentinel, addresses",
            );
            None
        }
    };
    let policy = super::discovery::policy(&raw, errors);
    let pool_size = match raw.pool_size.unwrap_or(0) {
        n @ 0..=1000 => n as usize,
        n => {
            errors.add(
                "upstream.pool_size",
                format!("must be from 0 to 1000, got {n}"),
            );
            0
        }
    };
    // A returned connection waits in the pool like a ready one, within the same bound and
    // under the same checks: without a pool there is nowhere to keep it.
    let reuse = match raw.reuse {
        Some(true) if pool_size == 0 => {
            errors.add(
                "upstream.reuse",
                "needs upstream.pool_size above 0 (returned connections wait in the pool)",
            );
            false
        }
        reuse => reuse.unwrap_or(pool_size > 0),
    };
    Some(Upstream {
        discovery: Arc::new(Discovery::new(source?, policy)),
        pool_size,
        reuse,
        protocol: Protocol::default(),
        resolver: resolver?,
        connect_timeout,
        handshake_timeout,
        dead_peer,
        expect: raw.expect.take().unwrap_or_default(),
        tls,
    })
}

fn credentials(
    raw: &RawCredentials,
    skip_command: bool,
    errors: &mut ConfigErrors,
) -> Option<(CredentialSource, Credentials)> {
    if raw.aws_iam.is_some() && raw.source.as_deref() != Some("aws-iam") {
        errors.add(
            "credentials.aws_iam",
            "only with credentials.source = \"aws-iam\"",
        );
    }
    match raw.source.as_deref() {
        None | Some("file") => file_credentials(raw, errors),
        Some("exec") => exec_credentials(raw, skip_command, errors),
        Some("aws-iam") => aws_iam_credentials(raw, skip_command, errors),
        Some(other) => {
            errors.add(
                "credentials.source",
                format!("expected \"file\", \"exec\" or \"aws-iam\", got {other:?}"),
            );
            None
        }
    }
}

fn file_credentials(
    raw: &RawCredentials,
    errors: &mut ConfigErrors,
) -> Option<(CredentialSource, Credentials)> {
    let exec_only = [
        ("credentials.command", raw.command.is_some()),
        ("credentials.command_timeout", raw.command_timeout.is_some()),
        ("credentials.refresh_margin", raw.refresh_margin.is_some()),
        (
            "credentials.refresh_interval",
            raw.refresh_interval.is_some(),
        ),
    ];
    for (key, set) in exec_only {
        if set {
            errors.add(key, "only with credentials.source = \"exec\"");
        }
    }
    let Some(path) = raw.file.as_deref() else {
        errors.add("credentials.file", "missing");
        return None;
    };
    Credentials::load(path, raw.username.as_deref())
        .map_err(|e| errors.add("credentials.file", e.to_string()))
        .ok()
        .map(|c| (CredentialSource::File(path.to_owned()), c))
}

/// Checks the `exec` keys and runs the command once (unless `skip_command`: then the
/// credentials are an empty placeholder, never sent): what it prints is the start-up
/// credentials, and a command that fails now is reported like an unreadable file.
fn exec_credentials(
    raw: &RawCredentials,
    skip_command: bool,
    errors: &mut ConfigErrors,
) -> Option<(CredentialSource, Credentials)> {
    if raw.file.is_some() {
        errors.add("credentials.file", "not with credentials.source = \"exec\"");
    }
    let command = match raw.command.as_deref() {
        Some([program, ..]) if !program.is_empty() => raw.command.clone(),
        Some(_) => {
            errors.add(
                "credentials.command",
                "must name a program: [\"prog\", \"arg\", ...]",
            );
            None
        }
        None => {
            errors.add(
                "credentials.command",
                "missing (with credentials.source = \"exec\")",
            );
            None
        }
    };
    let timeout = positive(
        errors,
        "credentials.command_timeout",
        raw.command_timeout,
        10,
    );
    let interval = match raw.refresh_interval {
        Some(d) if d.is_zero() => {
            errors.add("credentials.refresh_interval", "must be longer than 0s");
            None
        }
        other => other,
    };
    let source = Fetcher::Exec(ExecSource {
        command: command?,
        timeout,
        default_username: raw.username.clone(),
    });
    let schedule = Schedule {
        margin: raw.refresh_margin,
        interval,
    };
    if skip_command {
        let placeholder = Credentials::new(raw.username.clone(), String::new().into());
        return Some((
            CredentialSource::Refreshed { source, schedule },
            placeholder,
        ));
    }
    let fetched = run_once(&source)
        .map_err(|e| errors.add("credentials.command", e))
        .ok()?;
    Some((CredentialSource::Refreshed { source, schedule }, fetched))
}

/// `source = "aws-iam"`: the keys of `[credentials.aws_iam]`, and a first token.
fn aws_iam_credentials(
    raw: &RawCredentials,
    skip_command: bool,
    errors: &mut ConfigErrors,
) -> Option<(CredentialSource, Credentials)> {
    let not_here = [
        ("credentials.file", raw.file.is_some()),
        ("credentials.command", raw.command.is_some()),
        ("credentials.command_timeout", raw.command_timeout.is_some()),
        (
            "credentials.refresh_interval",
            raw.refresh_interval.is_some(),
        ),
    ];
    for (key, set) in not_here {
        if set {
            errors.add(key, "not with credentials.source = \"aws-iam\"");
        }
    }
    let plain = "letters, digits, - and _ only";
    let user = match raw.username.as_deref() {
        Some(u) if aws_iam::plain_name(u) => Some(u.to_owned()),
        Some(_) => {
            errors.add("credentials.username", plain);
            None
        }
        None => {
            errors.add(
                "credentials.username",
                "missing: the ElastiCache / MemoryDB user id (with credentials.source = \"aws-iam\")",
            );
            None
        }
    };
    let iam = raw.aws_iam.as_ref();
    let cache_name = match iam.and_then(|i| i.cache_name.as_deref()) {
        Some(c) if aws_iam::plain_name(c) => Some(c.to_owned()),
        Some(_) => {
            errors.add("credentials.aws_iam.cache_name", plain);
            None
        }
        None => {
            errors.add("credentials.aws_iam.cache_name", "missing");
            None
        }
    };
    let service = match iam.and_then(|i| i.service.as_deref()) {
        None | Some("elasticache") => "elasticache",
        Some("memorydb") => "memorydb",
        Some(other) => {
            errors.add(
                "credentials.aws_iam.service",
                format!("expected \"elasticache\" or \"memorydb\", got {other:?}"),
            );
            "elasticache"
        }
    };
    let source = Fetcher::AwsIam(AwsIamSource {
        cache_name: cache_name?,
        user: user?,
        region: iam.and_then(|i| i.region.clone()),
        service: service.to_owned(),
        serverless: iam.and_then(|i| i.serverless).unwrap_or(false),
        last: Default::default(),
    });
    let schedule = Schedule {
        margin: raw.refresh_margin,
        interval: None,
    };
    if skip_command {
        let placeholder = Credentials::new(raw.username.clone(), String::new().into());
        return Some((
            CredentialSource::Refreshed { source, schedule },
            placeholder,
        ));
    }
    let fetched = run_once(&source)
        .map_err(|e| errors.add("credentials.aws_iam", e))
        .ok()?;
    Some((CredentialSource::Refreshed { source, schedule }, fetched))
}

/// [`Fetcher::fetch`] from synchronous code, inside a runtime or not: on a thread of its
/// own, with a runtime of its own.
fn run_once(source: &Fetcher) -> Result<Credentials, String> {
    let source = source.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime to run it: {e}"))?;
        match runtime.block_on(source.fetch()) {
            Ok(fetched) => Ok(fetched.credentials),
            Err((e, stderr)) if stderr.is_empty() => Err(e),
            Err((e, stderr)) => Err(format!("{e} (stderr: {stderr})")),
        }
    })
    .join()
    .unwrap_or_else(|_| Err("running it panicked".to_owned()))
}

fn handshake(raw: RawHandshake, errors: &mut ConfigErrors) -> Handshake {
    let database = match raw.database {
        Some(n) if !(0..=i64::from(u32::MAX)).contains(&n) => {
            errors.add(
                "handshake.database",
                format!("must be a database number, got {n}"),
            );
            None
        }
        other => other.map(|n| n as u32),
    };
    if let Some(name) = &raw.client_name {
        if name.is_empty() || name.bytes().any(|b| !(b'!'..=b'~').contains(&b)) {
            errors.add(
                "handshake.client_name",
                "must be printable ASCII without spaces",
            );
        }
    }
    Handshake {
        client_name: raw.client_name,
        database,
    }
}

fn admin(raw: RawAdmin, errors: &mut ConfigErrors) -> Admin {
    let address = raw.address.as_deref().and_then(|a| {
        a.parse()
            .map_err(|_| errors.add("admin.address", format!("expected ip:port, got {a:?}")))
            .ok()
    });
    let probe_interval = positive(errors, "admin.probe_interval", raw.probe_interval, 5);
    let ready_within = raw.ready_within.unwrap_or(probe_interval * 3);
    if ready_within < probe_interval {
        errors.add(
            "admin.ready_within",
            "must be at least admin.probe_interval",
        );
    }
    let allow_quit = raw.allow_quit.unwrap_or(false);
    if allow_quit && raw.address.is_none() {
        errors.add(
            "admin.allow_quit",
            "needs admin.address, where POST /quitquitquit is served",
        );
    }
    Admin {
        address,
        probe_interval,
        ready_within,
        allow_quit,
    }
}

fn positive(
    errors: &mut ConfigErrors,
    key: &str,
    value: Option<Duration>,
    default_secs: u64,
) -> Duration {
    let default = Duration::from_secs(default_secs);
    match value {
        None => default,
        Some(d) if d.is_zero() => {
            errors.add(key, "must be longer than 0s");
            default
        }
        Some(d) => d,
    }
}

/// The kernel counts keepalive time in whole seconds, up to 32767 (`MAX_TCP_KEEPIDLE`); zero
/// is off. A value it would refuse on every connection is refused here, once.
fn keepalive(errors: &mut ConfigErrors, key: &str, value: Option<Duration>) -> Option<Duration> {
    let d = value?;
    if d.is_zero() || (d.subsec_nanos() == 0 && (1..=32767).contains(&d.as_secs())) {
        Some(d)
    } else {
        errors.add(key, "must be 0 (off) or whole seconds from 1s to 32767s");
        None
    }
}
