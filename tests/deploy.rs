//! The Kubernetes manifests agree with the image and the profiles, and say the lifecycle the
//! README promises. CI validates them against the API schemas (`.ci/run`); what a schema
//! cannot see (which container is the sidecar, whether the grace period covers the drain, a
//! profile or port the image does not have) is checked here, on their text.

use std::path::Path;

const MANIFESTS: [&str; 3] = [
    "deploy/kubernetes/deployment.yaml",
    "deploy/kubernetes/deployment-without-native-sidecars.yaml",
    "deploy/kubernetes/job.yaml",
];

fn read(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The lines of `text` without comments and trailing blanks.
fn lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(|l| l.split(" #").next().unwrap().trim_end())
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect()
}

/// Every value the manifest gives the environment variable `name`.
fn env_values(manifest: &str, name: &str) -> Vec<String> {
    let lines = lines(manifest);
    let key = format!("- name: {name}");
    lines
        .windows(2)
        .filter(|w| w[0].trim() == key)
        .map(|w| {
            let value = w[1]
                .trim()
                .strip_prefix("value: ")
                .expect("value: after name:");
            value.trim_matches('"').to_owned()
        })
        .collect()
}

/// The block under the first line equal (trimmed) to `head`: the lines indented deeper.
fn block<'a>(lines: &[&'a str], head: &str) -> Vec<&'a str> {
    let at = lines
        .iter()
        .position(|l| l.trim() == head)
        .unwrap_or_else(|| panic!("no {head:?}"));
    let indent = |l: &str| l.len() - l.trim_start().len();
    let base = indent(lines[at]);
    lines[at + 1..]
        .iter()
        .take_while(|l| indent(l) > base || (indent(l) == base && l.trim_start().starts_with("- ")))
        .copied()
        .collect()
}

/// The number after `key: ` on a line of the manifest.
fn number(manifest: &str, key: &str) -> u64 {
    let prefix = format!("{key}: ");
    lines(manifest)
        .iter()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}"))
}

/// Whole seconds from `"30s"`.
fn seconds(duration: &str) -> u64 {
    duration
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{duration:?}"))
}

/// The value of `key = "..."` in a profile.
fn profile_value(profile: &str, key: &str) -> String {
    let prefix = format!("{key} = ");
    lines(profile)
        .iter()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no {key}"))
}

#[test]
fn the_native_sidecar_starts_before_the_app_and_stops_after_it() {
    let manifest = read(MANIFESTS[0]);
    let lines = lines(&manifest);
    let init = block(&lines, "initContainers:");
    let sidecar = block(&init, "- name: redis-ambassador");
    assert!(
        sidecar.iter().any(|l| l.trim() == "restartPolicy: Always"),
        "{sidecar:#?}"
    );
    let startup = block(&sidecar, "startupProbe:");
    assert!(
        startup.iter().any(|l| l.contains("path: /readyz")),
        "{startup:#?}"
    );
    let check = block(&init, "- name: redis-ambassador-check");
    assert!(
        check.iter().any(|l| l.trim() == "args: [\"--check\"]"),
        "{check:#?}"
    );
    let first = init
        .iter()
        .position(|l| l.contains("redis-ambassador-check"))
        .unwrap();
    let second = init
        .iter()
        .position(|l| l.trim() == "- name: redis-ambassador")
        .unwrap();
    assert!(first < second, "the check runs before the sidecar starts");
    let app = block(&lines, "containers:");
    assert!(
        !app.iter().any(|l| l.contains("image: redis-ambassador")),
        "the ambassador is not an ordinary container here: {app:#?}"
    );
}

#[test]
fn every_manifest_agrees_with_the_image_and_the_profiles() {
    let dockerfile = read("Dockerfile");
    let admin_port = dockerfile
        .split("AMBASSADOR__ADMIN__ADDRESS=0.0.0.0:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the image's admin address");
    for path in MANIFESTS {
        let manifest = read(path);
        for profile in env_values(&manifest, "AMBASSADOR_PROFILE") {
            let file = format!("profiles/{profile}.toml");
            assert!(dockerfile.contains(&file), "{path}: the image lacks {file}");
            let text = read(&file);
            let creds = profile_value(&text, "file");
            assert!(
                creds.starts_with("/run/secrets/") && manifest.contains("mountPath: /run/secrets"),
                "{path}: {file}'s credentials {creds} are not where the Secret is mounted"
            );
            // The grace period covers the delay and the drain (and some of the app's own
            // shutdown): past it, the kubelet kills what is left.
            let drain = seconds(&profile_value(&text, "drain_timeout"));
            let delay = env_values(&manifest, "AMBASSADOR__SHUTDOWN__MIN_DELAY")
                .first()
                .map_or(0, |d| seconds(d));
            let grace = number(&manifest, "terminationGracePeriodSeconds");
            assert!(
                grace > delay + drain,
                "{path}: grace {grace}s <= {delay}s + {drain}s"
            );
        }
        assert!(
            manifest.contains(&format!("containerPort: {admin_port} }}")),
            "{path}: the admin port is the image's {admin_port}"
        );
        let listen = env_values(&manifest, "AMBASSADOR__LISTEN__ADDRESS");
        let url = env_values(&manifest, "REDIS_URL");
        assert_eq!(
            listen,
            ["127.0.0.1:6379"],
            "{path}: only the pod's own containers"
        );
        assert_eq!(
            url,
            ["redis://127.0.0.1:6379"],
            "{path}: the app talks to the ambassador"
        );
    }
    let job = read(MANIFESTS[2]);
    assert_eq!(env_values(&job, "AMBASSADOR__ADMIN__ALLOW_QUIT"), ["true"]);
    assert!(job.contains(&format!(
        "--post-data= http://127.0.0.1:{admin_port}/quitquitquit"
    )));
}
