//! The Docker Compose example (`deploy/compose/`) agrees with itself, with the image and with
//! the configuration code: every profile loads with the real `Config::load`, given the
//! environment the container would have (the Dockerfile's `ENV`, then the service's) and the
//! secret files Compose would mount at `/run/secrets/<name>`; every upstream a profile names
//! is a service of the file (or, for SRV, the record the `dns` service serves); every app
//! talks to an ambassador on the port that ambassador listens on. No Docker engine needed:
//! this reads the text, as `tests/deploy.rs` does for the Kubernetes manifests.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use redis_ambassador::config::{Config, ListenAddress, LoadOptions};

const DIR: &str = "deploy/compose";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The lines of `text` without comments and blank lines.
fn lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(|l| l.split(" #").next().unwrap().trim_end())
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect()
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The keys one level under the top-level `head:` of a YAML file, each with its block (the
/// lines indented deeper than the key).
fn section<'a>(lines: &[&'a str], head: &str) -> BTreeMap<String, Vec<&'a str>> {
    let at = lines
        .iter()
        .position(|l| *l == format!("{head}:"))
        .unwrap_or_else(|| panic!("no top-level {head}:"));
    let mut entries = BTreeMap::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    for line in lines[at + 1..].iter().take_while(|l| indent(l) > 0) {
        if indent(line) == 2 {
            entries.extend(current.take());
            let name = line.trim().strip_suffix(':').expect("name:").to_owned();
            current = Some((name, Vec::new()));
        } else if let Some((_, block)) = current.as_mut() {
            block.push(*line);
        }
    }
    entries.extend(current);
    entries
}

/// The value after `key: ` in a block, unquoted.
fn value<'a>(block: &[&'a str], key: &str) -> Option<&'a str> {
    let prefix = format!("{key}: ");
    block
        .iter()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .map(|v| v.trim_matches('"'))
}

/// The items of a flow list `key: [a, b]` in a block (empty when the key is absent).
fn list<'a>(block: &[&'a str], key: &str) -> Vec<&'a str> {
    value(block, key)
        .map(|v| {
            let inner = v.strip_prefix('[').and_then(|v| v.strip_suffix(']'));
            let inner = inner.expect("a [flow, list]");
            inner.split(", ").filter(|i| !i.is_empty()).collect()
        })
        .unwrap_or_default()
}

/// The `KEY: value` pairs under a service's `environment:`.
fn environment(block: &[&str]) -> HashMap<String, String> {
    let Some(at) = block.iter().position(|l| l.trim() == "environment:") else {
        return HashMap::new();
    };
    let base = indent(block[at]);
    block[at + 1..]
        .iter()
        .take_while(|l| indent(l) > base)
        .map(|l| {
            let (k, v) = l.trim().split_once(": ").expect("KEY: value");
            (k.to_owned(), v.trim_matches('"').to_owned())
        })
        .collect()
}

/// The `ENV` of the Dockerfile's final stage, as the container starts with it.
fn image_env() -> HashMap<String, String> {
    let dockerfile = read("Dockerfile");
    let at = dockerfile.find("\nENV ").expect("an ENV line");
    let mut env = HashMap::new();
    for line in dockerfile[at + 5..].lines() {
        for pair in line.trim().trim_end_matches('\\').split_whitespace() {
            let (k, v) = pair.split_once('=').expect("KEY=value");
            env.insert(k.to_owned(), v.to_owned());
        }
        if !line.trim_end().ends_with('\\') {
            break;
        }
    }
    env
}

/// The value of `key = ...` in a profile, unquoted.
fn profile_value(profile: &str, key: &str) -> Option<String> {
    let prefix = format!("{key} = ");
    lines(profile)
        .iter()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .map(|v| v.trim_matches('"').to_owned())
}

/// The `host:port` strings of `addresses = [...]` in a profile.
fn profile_list(profile: &str, key: &str) -> Vec<String> {
    profile_value(profile, key)
        .map(|v| {
            v.trim_matches(['[', ']'])
                .split(',')
                .map(|a| a.trim().trim_matches('"').to_owned())
                .collect()
        })
        .unwrap_or_default()
}

struct Compose {
    services: BTreeMap<String, Vec<String>>,
    /// Secret name -> the file Compose mounts at `/run/secrets/<name>`.
    secrets: BTreeMap<String, PathBuf>,
}

impl Compose {
    fn load() -> Compose {
        let text = read(&format!("{DIR}/compose.yaml"));
        let lines = lines(&text);
        let own = |m: BTreeMap<String, Vec<&str>>| -> BTreeMap<String, Vec<String>> {
            m.into_iter()
                .map(|(k, v)| (k, v.into_iter().map(str::to_owned).collect()))
                .collect()
        };
        let secrets = section(&lines, "secrets")
            .into_iter()
            .map(|(name, block)| {
                let file = value(&block, "file").expect("secret file:");
                (name, root().join(DIR).join(file))
            })
            .collect();
        Compose {
            services: own(section(&lines, "services")),
            secrets,
        }
    }

    fn service(&self, name: &str) -> Vec<&str> {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("no service {name}"))
            .iter()
            .map(String::as_str)
            .collect()
    }

    /// The services running the ambassador, with the profile each names.
    fn ambassadors(&self) -> Vec<(String, String)> {
        self.services
            .keys()
            .filter_map(|name| {
                let env = environment(&self.service(name));
                env.get("AMBASSADOR_PROFILE")
                    .map(|p| (name.clone(), p.clone()))
            })
            .collect()
    }

    /// The service's static address on the compose network.
    fn ipv4(&self, name: &str) -> String {
        value(&self.service(name), "ipv4_address")
            .unwrap_or_else(|| panic!("{name} has no ipv4_address"))
            .to_owned()
    }

    /// The profile of `service`, loaded as its container would load it: the secrets it is
    /// granted in place of `/run/secrets/<name>`, the image's environment and then its own.
    fn load_profile(&self, service: &str, profile: &str) -> Config {
        let block = self.service(service);
        assert_eq!(
            value(&block, "build"),
            Some("../.."),
            "{service}: the image is built from the repository root"
        );
        let mut env = image_env();
        env.extend(environment(&block));
        let mount = format!(
            "- ./profiles:{}:ro",
            env.get("AMBASSADOR_CONFIG_DIR")
                .expect("AMBASSADOR_CONFIG_DIR")
        );
        assert!(
            block.iter().any(|l| l.trim() == mount),
            "{service}: the profiles are not mounted at AMBASSADOR_CONFIG_DIR ({mount})"
        );
        let mut text = read(&format!("{DIR}/profiles/{profile}.toml"));
        let granted = list(&block, "secrets");
        while let Some(at) = text.find("/run/secrets/") {
            let rest = &text[at + "/run/secrets/".len()..];
            let name = &rest[..rest.find('"').expect("a quoted path")];
            assert!(
                granted.contains(&name),
                "{service}: profile {profile} reads /run/secrets/{name}, a secret the service is not granted"
            );
            let file = self.secrets.get(name).unwrap_or_else(|| {
                panic!("{profile}: /run/secrets/{name} is not a secret of compose.yaml")
            });
            text = text.replace(&format!("/run/secrets/{name}"), &file.display().to_string());
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("{profile}.toml")), text).unwrap();
        Config::load(&LoadOptions {
            profile: Some(profile.to_owned()),
            config_dir: dir.path().to_owned(),
            env: env
                .into_iter()
                .filter(|(k, _)| k.starts_with("AMBASSADOR__"))
                .collect(),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{service}: {e}"))
    }
}

#[test]
fn every_ambassador_loads_its_profile_as_its_container_would() {
    let compose = Compose::load();
    let ambassadors = compose.ambassadors();
    assert!(ambassadors.len() >= 3, "{ambassadors:?}");
    let mut listening = HashMap::new();
    for (service, profile) in &ambassadors {
        let config = compose.load_profile(service, profile);
        let ListenAddress::Tcp(listen) = config.listen.address else {
            panic!("{service}: listens on a unix socket");
        };
        assert!(
            listen.ip().is_unspecified(),
            "{service}: other containers cannot reach {listen}"
        );
        assert_eq!(
            config.admin.address.map(|a| a.port()),
            Some(9121),
            "{service}: the image's admin port"
        );
        listening.insert(service.clone(), listen.port());
    }
    // Every app talks to an ambassador, on the port it listens on.
    let apps: Vec<&String> = compose
        .services
        .keys()
        .filter(|s| s.starts_with("app") || s.ends_with("-client"))
        .collect();
    assert!(apps.len() >= 3, "{apps:?}");
    for app in apps {
        let command = value(&compose.service(app), "command").expect("command:");
        let target = command
            .split_once("redis-cli -h ")
            .map(|(_, r)| {
                let mut words = r.split(' ');
                let host = words.next().unwrap();
                assert_eq!(words.next(), Some("-p"), "{app}: {command}");
                format!("{host}:{}", words.next().unwrap())
            })
            .or_else(|| {
                let (_, r) = command.split_once("http://")?;
                Some(r.split('/').next().unwrap().to_owned())
            })
            .unwrap_or_else(|| panic!("{app} talks to nothing: {command}"));
        let (host, port) = target.split_once(':').unwrap();
        let listen = listening
            .get(host)
            .unwrap_or_else(|| panic!("{app} talks to {host}, not an ambassador"));
        assert_eq!(
            port,
            listen.to_string(),
            "{app}: {host} listens on {listen}"
        );
    }
}

#[test]
fn every_profile_is_used_and_every_secret_exists() {
    let compose = Compose::load();
    let used: Vec<String> = compose.ambassadors().into_iter().map(|(_, p)| p).collect();
    for entry in std::fs::read_dir(root().join(DIR).join("profiles")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        assert!(
            used.contains(&name),
            "profiles/{name}.toml is used by no service"
        );
    }
    for (service, block) in &compose.services {
        let block: Vec<&str> = block.iter().map(String::as_str).collect();
        for secret in list(&block, "secrets") {
            let file = compose
                .secrets
                .get(secret)
                .unwrap_or_else(|| panic!("{service}: no secret {secret}"));
            assert!(file.is_file(), "{service}: {} is missing", file.display());
        }
    }
}

#[test]
fn upstreams_are_services_of_the_file() {
    let compose = Compose::load();
    let redis = compose.service("redis");
    let redis_port = "6379";
    assert!(
        !value(&redis, "command").unwrap().contains("--port"),
        "redis listens on its default port"
    );
    for (service, profile) in compose.ambassadors() {
        let text = read(&format!("{DIR}/profiles/{profile}.toml"));
        let mut upstreams = profile_list(&text, "addresses");
        upstreams.extend(profile_value(&text, "address"));
        for address in &upstreams {
            let (host, _) = address.rsplit_once(':').unwrap();
            assert!(
                compose.services.contains_key(host),
                "{service}: upstream {address} is not a service"
            );
            if host == "redis" {
                assert_eq!(address, &format!("redis:{redis_port}"));
            }
        }
        if let Some(srv) = profile_value(&text, "srv") {
            let dns_server = profile_value(&text, "dns_server").expect("dns_server");
            assert_eq!(
                dns_server,
                format!("{}:53", compose.ipv4("dns")),
                "{service}: dns_server is the dns service's address"
            );
            // dnsmasq serves the record, and names its target with redis's address.
            let command = value(&compose.service("dns"), "command").unwrap();
            let record = command
                .split(&format!("--srv-host={srv},"))
                .nth(1)
                .unwrap_or_else(|| panic!("dns serves no {srv}: {command}"));
            let mut fields = record.split([',', '"']);
            let (target, port) = (fields.next().unwrap(), fields.next().unwrap());
            assert_eq!(port, redis_port, "{srv} names redis's port");
            let host_record = format!("--host-record={target},{}\"", compose.ipv4("redis"));
            assert!(
                command.contains(&host_record),
                "dns does not give {target} redis's address: {command}"
            );
        } else {
            assert!(
                !upstreams.is_empty(),
                "{service}: profile {profile} names no upstream this test knows"
            );
        }
    }
}

#[test]
fn the_app_password_is_the_one_redis_knows() {
    let compose = Compose::load();
    let app = std::fs::read_to_string(&compose.secrets["redis-app"]).unwrap();
    let (user, password) = (
        profile_value(&app, "username").expect("username"),
        profile_value(&app, "password").expect("password"),
    );
    assert!(
        password.starts_with("demo-only"),
        "the example's secrets are demo values"
    );
    let acl = std::fs::read_to_string(&compose.secrets["redis-users-acl"]).unwrap();
    assert!(
        acl.lines()
            .any(|l| l.starts_with(&format!("user {user} on >{password} "))),
        "redis's ACL file does not give {user} the ambassador's password"
    );
    assert!(
        acl.lines().any(|l| l == "user default off"),
        "only the ambassador's user can get in"
    );
    let redis = compose.service("redis");
    assert!(value(&redis, "command")
        .unwrap()
        .contains("--aclfile\", \"/run/secrets/redis-users-acl\""));
    assert_eq!(list(&redis, "secrets"), ["redis-users-acl"]);
}
