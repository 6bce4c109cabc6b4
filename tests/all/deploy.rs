//! The deploy files, checked as far as this machine allows without a
//! container runtime or a running systemd: the unit passes
//! `systemd-analyze verify`, the compose file describes a consistent
//! cluster, and the Dockerfile ships what exists.

use std::path::{Path, PathBuf};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
fn the_systemd_unit_verifies() {
    // The unit names the installed binary; verify a copy naming the one
    // built here, so the check sees an executable.
    let unit = std::fs::read_to_string(repo("examples/deploy/imhost.service")).expect("unit");
    let bin = imhost_tests::process::imhost_bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("imhost.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/imhost", bin.to_str().expect("path")),
    )
    .expect("write unit");
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian package systemd) runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn the_compose_file_describes_a_consistent_cluster() {
    let text = std::fs::read_to_string(repo("docker-compose.yml")).expect("compose file");
    let mut compose: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    compose.apply_merge().expect("merge keys");
    // apply_merge resolves one level; the nodes merge twice (service, env).
    compose.apply_merge().expect("merge keys");
    let services = compose["services"].as_mapping().expect("services");
    let nodes: Vec<&serde_yaml::Value> = services
        .iter()
        .filter(|(name, _)| name.as_str().is_some_and(|n| n.starts_with("im")))
        .map(|(_, service)| service)
        .collect();
    assert_eq!(nodes.len(), 3, "three nodes");
    for node in &nodes {
        let env = &node["environment"];
        let server = env["IMHOST_SERVER"].as_str().expect("IMHOST_SERVER");
        let servers: Vec<&str> = env["IMHOST_SERVERS"]
            .as_str()
            .expect("IMHOST_SERVERS")
            .split(',')
            .collect();
        assert!(servers.contains(&server), "{server} is in {servers:?}");
        assert_eq!(servers.len(), nodes.len());
        assert_eq!(env["IMHOST_REDIS"].as_str(), Some("redis://redis:6379/"));
        // Terminals reach the node at the name it gives in connect URLs.
        let port = server.rsplit(':').next().expect("port");
        let published = node["ports"][0].as_str().expect("ports");
        assert_eq!(published, format!("{port}:6001"), "{server}");
        assert_eq!(node["build"].as_str(), Some("."));
    }
    assert!(services.contains_key("redis"));
}

#[test]
fn the_dockerfile_ships_plugins_that_exist() {
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).expect("Dockerfile");
    let list = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("&& for p in "))
        .and_then(|l| l.strip_suffix("; do \\"))
        .expect("the plugin loop");
    for plugin in list.split_whitespace() {
        assert!(
            repo(&format!("plugins/{plugin}/{plugin}.toml")).exists(),
            "{plugin}"
        );
    }
    assert!(dockerfile.contains("EXPOSE 6001"));
    assert!(dockerfile.contains("USER imhost"));
}
