//! `credentials.source = "aws-iam"` in front of a real redis-server. Nothing here can reach
//! AWS: the real binary runs with an environment of the test's own only (no metadata lookups,
//! credentials and region given in variables or in files). The server's ACL user gets, as
//! its passwords, the tokens the signer would make for every second around the start (the
//! signer itself is checked byte for byte against botocore in its unit test), so the server
//! accepts the token exactly when the ambassador signed what was expected.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use redis_ambassador::credentials::aws_iam::AwsIamSource;

const IAM_USER: &str = "iam-user-01";
const KEY_ID: &str = "AKIDTESTONLY0001";
const SECRET: &str = "test/only+secret=key";

fn source(region: &str) -> (AwsIamSource, String) {
    let source = AwsIamSource {
        cache_name: "test-cache".into(),
        user: IAM_USER.into(),
        region: None,
        service: "elasticache".into(),
        serverless: false,
        last: Default::default(),
    };
    (source, region.to_owned())
}

/// Gives `IAM_USER` on `server` every token signed with `key`/`secret` in `region` for each
/// second from 2 s ago to `ahead` from now.
async fn accept_tokens(server: &RedisServer, key: &str, secret: &str, region: &str, ahead: u64) {
    let from = SystemTime::now() - Duration::from_secs(2);
    accept_tokens_from(server, key, secret, region, from, ahead + 2).await;
}

/// Gives `IAM_USER` on `server` the tokens for each of `seconds` seconds from `from`.
async fn accept_tokens_from(
    server: &RedisServer,
    key: &str,
    secret: &str,
    region: &str,
    from: SystemTime,
    seconds: u64,
) {
    let (source, region) = source(region);
    let keys = aws_credential_types::Credentials::new(key, secret, None, None, "test");
    let mut args = vec![
        "ACL".to_owned(),
        "SETUSER".to_owned(),
        IAM_USER.to_owned(),
        "on".to_owned(),
        "~*".to_owned(),
        "&*".to_owned(),
        "+@all".to_owned(),
    ];
    for offset in 0..seconds {
        let at = from + Duration::from_secs(offset);
        let token = source.token(&keys, &region, at).unwrap();
        args.push(format!(">{token}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(server.direct().await.cmd(&args).await, simple("OK"));
}

fn profile(dir: &Path, server: &RedisServer, region_line: &str) {
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::write(
        dir.join("profiles/test.toml"),
        format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n\
             [credentials]\nsource = \"aws-iam\"\nusername = \"{IAM_USER}\"\n\
             [credentials.aws_iam]\ncache_name = \"test-cache\"\n{region_line}",
            server.addr()
        ),
    )
    .unwrap();
}

/// The environment every test gives the binary: no metadata endpoint, no home folder's
/// `~/.aws`, the profile `test`.
fn fenced(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("HOME", dir.display().to_string()),
        (
            "AWS_CONFIG_FILE",
            dir.join("no-config").display().to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.join("no-credentials").display().to_string(),
        ),
        ("AMBASSADOR_PROFILE", "test".into()),
        (
            "AMBASSADOR_CONFIG_DIR",
            dir.join("profiles").display().to_string(),
        ),
    ]
}

/// A server accepting the tokens of the test's keys in eu-west-1, a profile for it, and a
/// fenced environment holding those keys.
async fn with_environment_keys() -> (RedisServer, tempfile::TempDir, Vec<(&'static str, String)>) {
    let server = RedisServer::start(ServerAuth::app());
    accept_tokens(&server, KEY_ID, SECRET, "eu-west-1", 30).await;
    let dir = tempfile::tempdir().unwrap();
    profile(dir.path(), &server, "region = \"eu-west-1\"\n");
    let mut env = fenced(dir.path());
    env.push(("AWS_ACCESS_KEY_ID", KEY_ID.into()));
    env.push(("AWS_SECRET_ACCESS_KEY", SECRET.into()));
    (server, dir, env)
}

fn start(dir: &Path, env: &[(&'static str, String)]) -> Binary {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Binary::start_isolated(dir, &[], &env)
}

#[tokio::test]
async fn a_token_signed_with_environment_credentials_is_accepted_by_redis() {
    let (_server, dir, env) = with_environment_keys().await;
    let bin = start(dir.path(), &env);
    let warned = bin
        .startup_lines
        .iter()
        .any(|l| l.contains("without [upstream.tls]"));
    assert!(warned, "{:?}", bin.startup_lines);
    let mut client = Raw::connect(&bin.addr).await;
    assert_eq!(client.cmd(&["PING"]).await, simple("PONG"));
    assert_eq!(
        client.cmd(&["ACL", "WHOAMI"]).await,
        bulk(IAM_USER.as_bytes())
    );
    // The token is nowhere in the log.
    let log = bin.startup_lines.join("\n");
    assert!(!log.contains("X-Amz-Signature"), "{log}");
}

#[tokio::test]
async fn each_new_connection_gets_a_token_signed_for_it() {
    let server = RedisServer::start(ServerAuth::app());
    // Only tokens signed from 3 s after now: not the one signed at start.
    let later = SystemTime::now() + Duration::from_secs(3);
    accept_tokens_from(&server, KEY_ID, SECRET, "eu-west-1", later, 30).await;
    let dir = tempfile::tempdir().unwrap();
    profile(dir.path(), &server, "region = \"eu-west-1\"\n");
    let mut env = fenced(dir.path());
    env.push(("AWS_ACCESS_KEY_ID", KEY_ID.into()));
    env.push(("AWS_SECRET_ACCESS_KEY", SECRET.into()));
    let bin = start(dir.path(), &env);
    // Waiting for the clock, not for the ambassador: the tokens accepted start then.
    if let Ok(left) = later.duration_since(SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_millis(100)).await;
    }
    let mut client = Raw::connect(&bin.addr).await;
    assert_eq!(
        client.cmd(&["ACL", "WHOAMI"]).await,
        bulk(IAM_USER.as_bytes())
    );
}

#[tokio::test]
async fn credentials_and_region_from_a_named_profile_in_the_shared_files() {
    let server = RedisServer::start(ServerAuth::app());
    let (key, secret) = ("AKIDPROFILEONLY02", "profile/secret+2");
    accept_tokens(&server, key, secret, "ap-southeast-2", 30).await;
    let dir = tempfile::tempdir().unwrap();
    profile(dir.path(), &server, "");
    let credentials = dir.path().join("credentials");
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = AKIDWRONGDEFAULT\naws_secret_access_key = wrong\n\n\
             [ci]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
        ),
    )
    .unwrap();
    let config = dir.path().join("config");
    std::fs::write(&config, "[profile ci]\nregion = ap-southeast-2\n").unwrap();
    let mut env = fenced(dir.path());
    env.retain(|(k, _)| !k.starts_with("AWS_CONFIG") && !k.starts_with("AWS_SHARED"));
    env.push(("AWS_CONFIG_FILE", config.display().to_string()));
    env.push((
        "AWS_SHARED_CREDENTIALS_FILE",
        credentials.display().to_string(),
    ));
    env.push(("AWS_PROFILE", "ci".into()));
    let bin = start(dir.path(), &env);
    let mut client = Raw::connect(&bin.addr).await;
    assert_eq!(
        client.cmd(&["ACL", "WHOAMI"]).await,
        bulk(IAM_USER.as_bytes())
    );
}

#[tokio::test]
async fn check_names_the_source_and_expiry_and_never_the_token() {
    let (_server, dir, env) = with_environment_keys().await;
    let output = ambassador_command(dir.path(), &["--check"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("aws-iam (elasticache test-cache, region eu-west-1)"),
        "{text}"
    );
    assert!(text.contains("credentials expire: "), "{text}");
    assert!(!text.contains("X-Amz") && !text.contains(SECRET), "{text}");
}

#[test]
fn without_credentials_anywhere_the_start_fails_by_key_without_reaching_out() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("profiles")).unwrap();
    std::fs::write(
        dir.path().join("profiles/test.toml"),
        format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"127.0.0.1:1\"\n\
             [credentials]\nsource = \"aws-iam\"\nusername = \"{IAM_USER}\"\n\
             [credentials.aws_iam]\ncache_name = \"test-cache\"\nregion = \"eu-west-1\"\n"
        ),
    )
    .unwrap();
    let env = fenced(dir.path());
    let started = std::time::Instant::now();
    let output = ambassador_command(dir.path(), &[])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{text}");
    assert!(
        text.contains("credentials.aws_iam: AWS credentials: "),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn the_aws_iam_keys_are_checked_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let profile = "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"a:1\"\n\
        [credentials]\nsource = \"aws-iam\"\nusername = \"bad user\"\nfile = \"/x\"\n\
        [credentials.aws_iam]\nservice = \"s3\"\n";
    let errors = try_load_config(dir.path(), profile)
        .unwrap_err()
        .to_string();
    for want in [
        "credentials.username: letters, digits, - and _ only",
        "credentials.aws_iam.cache_name: missing",
        "credentials.aws_iam.service: expected \"elasticache\" or \"memorydb\", got \"s3\"",
        "credentials.file: not with credentials.source = \"aws-iam\"",
    ] {
        assert!(errors.contains(want), "{want}: {errors}");
    }
}
