//! `[upstream.tls]` settings that are refused at start, each reported under its key along
//! with every other problem (the exit-64 path), and never quoting a private key.

mod common;

use std::path::Path;

use common::pki::Pki;
use common::*;
use redis_ambassador::config::Config;

fn toml_path(key: &str, path: &Path) -> String {
    format!("{key} = \"{}\"\n", path.display())
}

fn config_errors(tls: &str) -> Vec<(String, String)> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("creds"), "x\n").unwrap();
    let text = format!(
        "[upstream]\naddress = \"redis.internal:6380\"\n[upstream.tls]\n{tls}\n\
         [credentials]\nfile = \"{}\"\n",
        dir.path().join("creds").display()
    );
    match try_load_config(dir.path(), &text) {
        Ok(_) => panic!("accepted:\n{tls}"),
        Err(errors) => errors.problems,
    }
}

fn assert_problem(problems: &[(String, String)], key: &str, words: &str) {
    assert!(
        problems
            .iter()
            .any(|(k, message)| k == key && message.contains(words)),
        "no {key}: ...{words}... in {problems:#?}"
    );
}

#[test]
fn unusable_files_are_reported_by_key_all_at_once() {
    let pki = Pki::new();
    let missing = pki.dir.path().join("nope.pem");
    let problems = config_errors(
        &[
            toml_path("ca_file", &missing),
            toml_path("client_cert_file", &pki.client_cert),
        ]
        .concat(),
    );
    assert_problem(&problems, "upstream.tls.ca_file", "cannot read");
    assert_problem(&problems, "upstream.tls.ca_file", "nope.pem");
    assert_problem(
        &problems,
        "upstream.tls.client_key_file",
        "set client_cert_file and client_key_file together",
    );

    let bad = pki.file(
        "bad.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    );
    let problems = config_errors(&toml_path("ca_file", &bad));
    assert_problem(&problems, "upstream.tls.ca_file", "not valid PEM");

    // A key where certificates are expected, and certificates where a key is expected.
    let problems = config_errors(
        &[
            toml_path("ca_file", &pki.client_key),
            toml_path("client_cert_file", &pki.client_cert),
            toml_path("client_key_file", &pki.client_cert),
        ]
        .concat(),
    );
    assert_problem(&problems, "upstream.tls.ca_file", "no certificate in");
    assert_problem(
        &problems,
        "upstream.tls.client_key_file",
        "no PEM private key",
    );
}

#[test]
fn a_client_key_that_does_not_match_its_certificate_is_refused() {
    let pki = Pki::new();
    let tls = [
        toml_path("ca_file", &pki.ca),
        toml_path("client_cert_file", &pki.client_cert),
        toml_path("client_key_file", &pki.server_key),
    ]
    .concat();
    let problems = config_errors(&tls);
    assert_problem(
        &problems,
        "upstream.tls.client_key_file",
        "does not match the certificate",
    );
    assert!(
        problems.iter().all(|(_, m)| !m.contains("PRIVATE KEY")),
        "{problems:?}"
    );
}

#[test]
fn a_server_name_must_be_a_dns_name_or_an_ip() {
    let pki = Pki::new();
    let tls = format!(
        "server_name = \"not a name\"\n{}",
        toml_path("ca_file", &pki.ca)
    );
    let problems = config_errors(&tls);
    assert_problem(
        &problems,
        "upstream.tls.server_name",
        "not a valid DNS name",
    );
}

#[test]
fn disabled_tls_is_plain_tcp() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("creds"), "x\n").unwrap();
    let text = format!(
        "[upstream]\naddress = \"127.0.0.1:6379\"\n[upstream.tls]\nenabled = false\n\
         ca_file = \"/nonexistent\"\n[credentials]\nfile = \"{}\"\n",
        dir.path().join("creds").display()
    );
    let config: Config = load_config(dir.path(), &text);
    assert!(config.upstream.tls.is_none());
}
