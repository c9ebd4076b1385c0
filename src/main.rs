//! The process edge: command line, environment, tracing, signals, exit codes.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use redis_ambassador::config::{Config, LoadOptions, LogFormat};
use redis_ambassador::{check, Listener};

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
    };
    let config = match Config::load(&options) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("redis-ambassador: {errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(config.log_format);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
            return match check::run(&config).await {
                Ok(report) => {
                    println!("{}\n{report}\ncheck: ok", config.summary());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("{}\ncheck: FAILED: {e}", config.summary());
                    ExitCode::FAILURE
                }
            };
        }
        let listener = match Listener::bind(&config.listen.address).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(address = %config.listen.address, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        redis_ambassador::run(config, listener, shutdown_signal()).await;
        ExitCode::SUCCESS
    })
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

/// Completes at the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
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
