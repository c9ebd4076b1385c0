//! The process edge: command line, environment, tracing, signals, exit codes.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use redis_ambassador::config::{Config, ConfigErrors, LoadOptions, LogFormat};
use redis_ambassador::listener::BindError;
use redis_ambassador::{probe, Listener};

/// Exit status for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// A local, password-free Redis endpoint in front of a remote, authenticated one.
#[derive(Debug, Parser)]
#[command(name = "redis-ambassador", version)]
struct Cli {
    /// Profile to load: <config-dir>/<profile>.toml [default: dev]
    #[arg(long, env = "AMBASSADOR_PROFILE")]
    profile: Option<String>,
    /// Folder holding the profiles
    #[arg(long, env = "AMBASSADOR_CONFIG_DIR", default_value = "profiles")]
    config_dir: PathBuf,
    /// Address to listen on: ip:port or unix:/path (overrides listen.address)
    #[arg(long)]
    listen: Option<String>,
    /// Upstream host:port (overrides upstream.address; no profile file needed)
    #[arg(long)]
    upstream: Option<String>,
    /// Credential file (overrides credentials.file)
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    /// Log format: text or json (overrides log.format)
    #[arg(long)]
    log_format: Option<String>,
    /// Validate, connect and authenticate once, print a redacted summary, exit 0 or 1
    #[arg(long)]
    check: bool,
    /// Ask the running ambassador's admin endpoint (admin.address) whether it is alive, exit
    /// 0 or 1: the container HEALTHCHECK, for images without a shell or curl
    #[arg(long)]
    healthcheck: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_CONFIG),
            };
        }
    };
    let mut overrides = Vec::new();
    let mut set = |key: &str, value: Option<String>| {
        if let Some(v) = value {
            overrides.push((key.to_owned(), v));
        }
    };
    set("listen.address", cli.listen);
    set("upstream.address", cli.upstream);
    set(
        "credentials.file",
        cli.credentials_file.map(|p| p.display().to_string()),
    );
    set("log.format", cli.log_format);
    let options = LoadOptions {
        profile: cli.profile,
        config_dir: cli.config_dir,
        env: std::env::vars()
            .filter(|(k, _)| k.starts_with("AMBASSADOR__"))
            .collect::<HashMap<_, _>>(),
        overrides,
        skip_credentials_command: cli.healthcheck,
    };
    let config = match Config::load(&options) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("redis-ambassador: {errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(config.log_format);

    // One thread, whose scheduler runs tasks in the order they were woken: clients whose
    // bytes arrive one after the other reach the upstream in that order (the multi-thread
    // scheduler runs the most recently woken task first, and two workers race each other).
    // The machine's other cores serve Redis and the application.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("redis-ambassador: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        if cli.check {
            return check(&config).await;
        }
        if cli.healthcheck {
            return healthcheck(&config).await;
        }
        // Before any port is open: a SIGTERM that comes as soon as the process has said it
        // listens must drain, not meet the default action and kill it mid-reply.
        let shutdown = shutdown_signal();
        let listener = match Listener::bind(&config.listen.address).await {
            Ok(l) => l,
            // The configured path holds something the ambassador will not replace: reported
            // as the configuration errors are, by key, with their exit status.
            Err(e @ BindError::PathTaken { .. }) => {
                let errors = ConfigErrors {
                    profile: config.profile.clone(),
                    problems: vec![("listen.address".into(), e.to_string())],
                };
                eprintln!("redis-ambassador: {errors}");
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e) => {
                tracing::error!(address = %config.listen.address, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        let admin = match config.admin.address {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::error!(address = %addr, error = %e, "cannot listen for the admin endpoint");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        redis_ambassador::run(config, listener, admin, shutdown).await;
        ExitCode::SUCCESS
    })
}

/// `--check`: the summary, then one probe connection with the profile's credentials.
async fn check(config: &Config) -> ExitCode {
    println!("{}", config.summary());
    match probe::probe(
        &config.upstream,
        &config.credentials,
        &config.handshake,
        &config.upstream.expect,
    )
    .await
    {
        Ok(report) => {
            println!("connected: {}", report.address);
            if let Some(tls) = &report.tls {
                println!("{tls}");
            }
            println!(
                "authenticated as: {}\nserver version: {}\ncheck: ok",
                report.whoami,
                report.version()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            // One line, and the last: an init container's termination message
            // (FallbackToLogsOnError) is its log's tail, shown by `kubectl describe pod`.
            let reason = e.to_string().replace(['\r', '\n'], " ");
            println!("check: FAILED: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// `--healthcheck`: GET /healthz on the admin endpoint. Two lines of HTTP/1.0 are all a
/// liveness probe needs; an HTTP client crate would add more than it saves here.
async fn healthcheck(config: &Config) -> ExitCode {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(addr) = config.admin.address else {
        eprintln!("redis-ambassador: --healthcheck needs admin.address");
        return ExitCode::FAILURE;
    };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(3), exchange).await {
        Ok(Ok(reply))
            if reply.starts_with(b"HTTP/1.1 200") || reply.starts_with(b"HTTP/1.0 200") =>
        {
            ExitCode::SUCCESS
        }
        _ => ExitCode::FAILURE,
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Installs the SIGTERM and SIGINT handlers now; the future completes at the first of them,
/// and a second one exits at once.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received: draining (a second signal exits at once)");
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting now");
            std::process::exit(1);
        });
    }
}
