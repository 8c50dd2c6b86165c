//! The files in deploy/ against the real binary. There is no container
//! runtime, Kubernetes or Helm here, so this checks what can be checked
//! without them:
//!
//! - every `ocmesh` command line in deploy/compose.yaml, the systemd unit
//!   and the Helm StatefulSet resolves with `ocmesh run --check-config`
//!   (flags, `OCMESH_*` environment, config file) after only the
//!   substitutions named in each test;
//! - the YAML files keep to a checked subset (indentation, keys, flow
//!   lists as JSON, block scalars), Helm's `.Values` references exist in
//!   values.yaml, and ports agree across the Dockerfile, compose, the unit's
//!   config, the chart and the binary's defaults;
//! - the unit has the keys a hardened service needs;
//! - compose's certificate script runs for real (paths moved into a
//!   temporary directory), twice, and the three compose sites and the
//!   three Helm pods run as real processes on loopback with those flags
//!   and mesh, peer names looked up through the resolver (`localhost`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use common::{Site, bin, free_tcp, free_udp, hermetic, make_ca, peer_in_sync, peers_of, wait_until};

const DEFAULT_HTTP: u16 = 3000;
const DEFAULT_GRPC: u16 = 50051;
/// The mesh has no default port; deploy/ uses this one everywhere.
const MESH: u16 = 7000;
const SITES: [&str; 3] = ["a", "b", "c"];

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(deploy(rel)).unwrap_or_else(|e| panic!("deploy/{rel}: {e}"))
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_template_line(t: &str) -> bool {
    t.starts_with("{{") && t.ends_with("}}")
}

/// Checks the YAML these files use: spaces only, indentation in steps of
/// two, a nested block deeper than its key, every line a `key: value`, a
/// `key:` opening a block, a list item or block-scalar content; flow lists
/// valid JSON (when not templated); quotes closed. With `templated`, lines
/// that are a template action alone are skipped, as Helm removes them.
fn check_yaml(name: &str, text: &str, templated: bool) {
    let mut scalar_at: Option<usize> = None;
    let mut opened: Option<usize> = None;
    let mut last_content_indent = 0usize;
    for (n, raw) in text.lines().enumerate() {
        let at = format!("{name}:{}: {raw:?}", n + 1);
        let line = raw.trim_end();
        let t = line.trim_start();
        if let Some(k) = scalar_at {
            if t.is_empty() || indent(line) > k {
                continue;
            }
            scalar_at = None;
        }
        if t.is_empty() || t.starts_with('#') || (templated && is_template_line(t)) {
            continue;
        }
        assert!(
            !raw.starts_with('\t') && !raw[..indent(raw)].contains('\t'),
            "{at}: tab"
        );
        if t == "---" {
            opened = None;
            last_content_indent = 0;
            continue;
        }
        let ind = indent(line);
        assert_eq!(ind % 2, 0, "{at}: indentation not a multiple of two");
        let mut rest = t;
        let mut content = ind;
        let mut item = false;
        while let Some(r) = rest.strip_prefix("- ") {
            rest = r.trim_start();
            content += 2;
            item = true;
        }
        if rest == "-" {
            item = true;
            rest = "";
        }
        // After `key:` anything goes (a nested block, or a null value);
        // otherwise a line may not be deeper than the one before's content.
        if opened.is_none() {
            assert!(
                ind <= last_content_indent,
                "{at}: deeper than the line before without a key opening a block"
            );
        }
        opened = None;
        last_content_indent = content;
        if rest.is_empty() {
            opened = Some(ind);
            continue;
        }
        let (key, value) = match rest.find(": ").map(|i| (&rest[..i], rest[i + 2..].trim())) {
            Some((k, v)) if !k.starts_with(['"', '[', '{']) || (templated && k.starts_with("{{")) => (Some(k), v),
            _ => match rest.strip_suffix(':') {
                Some(k) if !k.contains(' ') || k.starts_with("{{") => (Some(k), ""),
                _ => (None, rest),
            },
        };
        assert!(key.is_some() || item, "{at}: neither `key: value` nor a list item");
        if let Some(k) = key {
            assert!(!k.is_empty(), "{at}: empty key");
            if !(templated && k.contains("{{")) {
                assert!(
                    k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.<>/$".contains(c) || c == '"'),
                    "{at}: key {k:?}"
                );
            }
        }
        let value = value.split(" #").next().unwrap_or(value).trim();
        // `key: &anchor` opens a block as `key:` does.
        if value.is_empty() || (value.starts_with('&') && !value.contains(' ')) {
            if key.is_some() {
                opened = Some(ind);
                last_content_indent = content;
            }
        } else if ["|", "|-", ">", ">-"].contains(&value) {
            scalar_at = Some(ind);
        } else if value.starts_with('[') && !(templated && value.contains("{{")) {
            serde_json::from_str::<Vec<Value>>(value).unwrap_or_else(|e| panic!("{at}: flow list is not JSON: {e}"));
        } else if value.starts_with('"') {
            assert!(value.len() > 1 && value.ends_with('"'), "{at}: quote not closed");
        } else if value.starts_with('\'') {
            assert!(value.len() > 1 && value.ends_with('\''), "{at}: quote not closed");
        }
    }
}

/// The dotted paths of every mapping key in a plain YAML file.
fn key_paths(text: &str) -> BTreeSet<String> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with('-') {
            continue;
        }
        let Some(i) = t.find(':') else { continue };
        let key = t[..i].trim_matches('"').to_owned();
        let ind = indent(line);
        while stack.last().is_some_and(|(k, _)| *k >= ind) {
            stack.pop();
        }
        stack.push((ind, key));
        out.insert(stack.iter().map(|(_, k)| k.as_str()).collect::<Vec<_>>().join("."));
    }
    out
}

/// The value of a `key: value` at `path` in a plain YAML file.
fn value_at(text: &str, path: &str) -> Option<String> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with('-') {
            continue;
        }
        let Some(i) = t.find(':') else { continue };
        let ind = indent(line);
        while stack.last().is_some_and(|(k, _)| *k >= ind) {
            stack.pop();
        }
        stack.push((ind, t[..i].to_owned()));
        let here = stack.iter().map(|(_, k)| k.as_str()).collect::<Vec<_>>().join(".");
        if here == path {
            let v = t[i + 1..].split(" #").next().unwrap_or_default().trim();
            return Some(v.trim_matches('"').to_owned());
        }
    }
    None
}

/// The lines of a block that starts at the line `header` (exact, trimmed
/// of nothing) and runs while lines are deeper than it.
fn block<'a>(text: &'a str, header: &str) -> Vec<&'a str> {
    let mut lines = text.lines();
    let Some(first) = lines.by_ref().find(|l| l.trim_end() == header) else {
        panic!("no line {header:?}");
    };
    let ind = indent(first);
    lines
        .take_while(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || indent(l) > ind)
        .collect()
}

/// `ocmesh <args> --check-config` with `env`, nothing else of ours inherited.
fn check_config(args: &[String], env: &[(&str, String)]) -> anyhow::Result<String> {
    let mut cmd = Command::new(bin());
    hermetic(&mut cmd);
    cmd.env_remove("OCMESH_GRPC");
    let out = cmd
        .args(args)
        .arg("--check-config")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "ocmesh {args:?} --check-config failed: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

fn setting<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {key} in {report}"))
}

// ---------------------------------------------------------------- compose

fn compose() -> String {
    read("compose.yaml")
}

/// The `command:` of a compose site: a JSON list on one line.
fn compose_command(text: &str, site: &str) -> Vec<String> {
    let lines = block(text, &format!("  {site}:"));
    let line = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("command: "))
        .unwrap_or_else(|| panic!("no command for {site}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{site}'s command is not a JSON list: {e}"))
}

/// The `certs` service's shell script (its block-scalar command).
fn cert_script(text: &str) -> String {
    let lines = block(text, "  certs:");
    let start = lines
        .iter()
        .position(|l| l.trim() == "- |")
        .expect("certs command is a `- |` script");
    let body: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > indent(lines[start]))
        .copied()
        .collect();
    let ind = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| indent(l))
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|l| l.get(ind..).unwrap_or("").to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

fn list_items(lines: &[&str], key: &str) -> Vec<String> {
    let Some(at) = lines.iter().position(|l| l.trim_end() == format!("{key}:")) else {
        return Vec::new();
    };
    let ind = indent(lines[at]);
    lines[at + 1..]
        .iter()
        .take_while(|l| indent(l) > ind || l.trim().is_empty())
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|s| s.trim_matches('"').to_owned())
        .collect()
}

#[test]
fn compose_file_is_well_formed_and_its_ports_agree() {
    let text = compose();
    check_yaml("compose.yaml", &text, false);
    let services = key_paths(&text);
    for s in ["certs", "a", "b", "c"] {
        assert!(services.contains(&format!("services.{s}")), "no service {s}");
    }
    for v in ["ca", "tls-a", "tls-b", "tls-c", "data-a", "data-b", "data-c"] {
        assert!(services.contains(&format!("volumes.{v}")), "no volume {v}");
    }
    // The shared site settings: health check on /health at the HTTP port,
    // the admin password from the environment, after the certificates.
    let site = block(&text, "x-site: &site").join("\n");
    assert!(site.contains(&format!(
        r#"test: ["CMD", "curl", "-fsS", "http://127.0.0.1:{DEFAULT_HTTP}/health"]"#
    )));
    assert!(site.contains("OCMESH_ADMIN_PASSWORD: ${OCMESH_ADMIN_PASSWORD:?"));
    assert!(site.contains("condition: service_completed_successfully"));
    let mut published = BTreeSet::new();
    for s in SITES {
        let lines = block(&text, &format!("  {s}:"));
        assert!(
            lines.iter().any(|l| l.trim() == "<<: *site"),
            "{s} uses the shared settings"
        );
        let cmd = compose_command(&text, s);
        let flag = |f: &str| {
            let i = cmd.iter().position(|a| a == f).unwrap_or_else(|| panic!("{s}: no {f}"));
            cmd[i + 1].clone()
        };
        assert_eq!(flag("--http"), format!("0.0.0.0:{DEFAULT_HTTP}"));
        assert_eq!(flag("--grpc"), format!("0.0.0.0:{DEFAULT_GRPC}"));
        assert_eq!(flag("--mesh"), format!("0.0.0.0:{MESH}"));
        assert_eq!(flag("--cert"), format!("/etc/ocmesh/tls/{s}.pem"));
        assert_eq!(flag("--key"), format!("/etc/ocmesh/tls/{s}.key"));
        let peers: BTreeSet<String> = cmd
            .iter()
            .zip(cmd.iter().skip(1))
            .filter(|(f, _)| *f == "--peer")
            .map(|(_, p)| p.clone())
            .collect();
        let others: BTreeSet<String> = SITES
            .iter()
            .filter(|o| **o != s)
            .map(|o| format!("{o}:{MESH}"))
            .collect();
        assert_eq!(peers, others, "{s} dials every other site by its service name");
        let volumes = list_items(&lines, "    volumes");
        assert!(
            volumes.contains(&format!("data-{s}:{}", flag("--data"))),
            "{s}: {volumes:?}"
        );
        assert!(
            volumes.contains(&format!("tls-{s}:/etc/ocmesh/tls:ro")),
            "{s}: {volumes:?}"
        );
        for p in list_items(&lines, "    ports") {
            let (host, container) = p.rsplit_once(':').expect("host:container");
            let container: u16 = container.parse().expect("port");
            assert!([DEFAULT_HTTP, DEFAULT_GRPC].contains(&container), "{s} publishes {p}");
            assert!(host.starts_with("127.0.0.1:"), "{s} publishes {p} beyond loopback");
            assert!(published.insert(host.to_owned()), "{p} published twice");
        }
    }
    // The image's exposed ports are the ones the sites listen on.
    let docker = read("Dockerfile");
    let expose = docker
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE")
        .split_whitespace()
        .collect::<BTreeSet<_>>();
    assert_eq!(
        expose,
        BTreeSet::from([
            format!("{DEFAULT_HTTP}/tcp").as_str(),
            format!("{DEFAULT_GRPC}/tcp").as_str(),
            format!("{MESH}/udp").as_str()
        ])
    );
}

#[test]
fn compose_command_lines_resolve_in_the_real_binary() {
    let text = compose();
    for s in SITES {
        let cmd = compose_command(&text, s);
        assert_eq!(cmd[0], "run");
        let report = check_config(&cmd, &[("OCMESH_ADMIN_PASSWORD", "x".into())]).expect("valid");
        assert_eq!(setting(&report, "http"), format!("0.0.0.0:{DEFAULT_HTTP}"));
        assert_eq!(setting(&report, "mesh"), format!("0.0.0.0:{MESH}"));
        assert_eq!(setting(&report, "data"), "/var/lib/ocmesh");
        assert!(report.ends_with("config ok\n"), "{report}");
    }
    // The check refuses what a run refuses.
    let e = check_config(&["run".into(), "--peer".into(), "b:7000".into()], &[]).expect_err("peer without mesh");
    assert!(format!("{e:#}").contains("--peer needs --mesh"), "{e:#}");
    let e = check_config(&["run".into(), "--peer".into(), "b:x".into()], &[]).expect_err("bad peer");
    assert!(format!("{e:#}").contains("not a peer address"), "{e:#}");
    // Every `ocmesh` line of the certificate script names a real subcommand.
    let script = cert_script(&text);
    let lines: Vec<&str> = script.lines().filter_map(|l| l.split("ocmesh ").nth(1)).collect();
    assert_eq!(lines.len(), 4, "{script}");
    for l in lines {
        let words: Vec<&str> = l.split_whitespace().collect();
        let out = Command::new(bin())
            .args(&words[..2])
            .arg("--help")
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "ocmesh {l}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let usage = String::from_utf8_lossy(&out.stdout).into_owned();
        let usage = usage.lines().find(|u| u.starts_with("Usage:")).unwrap_or_default();
        let positionals = usage.matches('<').count();
        assert_eq!(words.len() - 2, positionals, "ocmesh {l}: {usage}");
    }
}

/// A directory with `ocmesh` (the binary under test) and a `chown` that
/// does nothing, for running compose's certificate script unprivileged.
fn shim_path(root: &Path) -> anyhow::Result<String> {
    let dir = root.join("bin");
    std::fs::create_dir_all(&dir)?;
    std::os::unix::fs::symlink(bin(), dir.join("ocmesh"))?;
    let chown = dir.join("chown");
    std::fs::write(&chown, "#!/bin/sh\nexit 0\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&chown, std::fs::Permissions::from_mode(0o755))?;
    Ok(format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    ))
}

fn run_cert_script(script: &str, path: &str) -> anyhow::Result<()> {
    let out = Command::new("/bin/sh")
        .arg("-ec")
        .arg(script)
        .env("PATH", path)
        .output()?;
    if !out.status.success() {
        bail!("certificate script failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Starts one site per entry and waits until each lists every other as
/// connected and in sync, then checks a write at the first reaches the last.
async fn mesh_of(sites: &mut [Site], names: &[String]) -> anyhow::Result<()> {
    for s in sites.iter_mut() {
        s.start().await?;
    }
    for s in sites.iter() {
        for other in names.iter().filter(|n| **n != s.name) {
            let ok = wait_until(
                Duration::from_secs(30),
                &format!("{} in sync with {other}", s.name),
                || async { peer_in_sync(s, other).await },
            )
            .await;
            if let Err(e) = ok {
                bail!("{e:#}\n{}\n{}", peers_of(s).await, s.log_tail(30));
            }
        }
        let peers = s.peers().await?;
        assert_eq!(
            peers.len(),
            names.len() - 1,
            "{}: {}",
            s.name,
            Value::Array(peers.clone())
        );
        assert!(
            !peers.iter().any(|p| p["site"] == s.name.as_str()),
            "{} lists itself",
            s.name
        );
    }
    let (first, last) = (&sites[0], &sites[sites.len() - 1]);
    let doc = first.insert("entities", &json!({"name": "from deploy test"})).await?;
    let id = doc["_id"].as_str().context("_id")?.to_owned();
    wait_until(Duration::from_secs(20), "the document at the last site", || async {
        Ok(last.doc("entities", &id).await?.is_some())
    })
    .await?;
    // Each serves the management page.
    for s in sites.iter() {
        let r = s.client.get(s.url("/ui")).send().await?;
        assert_eq!(r.status(), 200);
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(ct.starts_with("text/html"), "{ct}");
    }
    Ok(())
}

/// Compose's `certs` script and its three sites, on loopback: each
/// container path moved into a temporary directory, `0.0.0.0:PORT` to a
/// free loopback port, and each peer's service name to `localhost` at that
/// site's mesh port (so names go through the resolver as in compose).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_sites_mesh_on_loopback() -> anyhow::Result<()> {
    let text = compose();
    let root = tempfile::tempdir()?;
    let r = root.path().display().to_string();
    let script = cert_script(&text)
        .replace(" /ca", &format!(" {r}/ca"))
        .replace(" /tls/", &format!(" {r}/tls/"));
    for s in SITES {
        std::fs::create_dir_all(root.path().join("tls").join(s))?; // compose makes the mount points
    }
    let path = shim_path(root.path())?;
    run_cert_script(&script, &path)?;
    let a_cert = std::fs::read(root.path().join("tls/a/a.pem"))?;
    run_cert_script(&script, &path).context("the script runs again on every `up`")?;
    assert_eq!(
        std::fs::read(root.path().join("tls/a/a.pem"))?,
        a_cert,
        "a second run keeps the certificates"
    );
    assert!(
        !root.path().join("tls/a/ca.key").exists(),
        "the CA key stays in the ca volume"
    );
    assert!(
        !root.path().join("tls/a/b.key").exists(),
        "a site gets only its own key"
    );

    let mesh: BTreeMap<&str, SocketAddr> = SITES.iter().map(|s| (*s, free_udp())).collect();
    let mut sites = Vec::new();
    for s in SITES {
        let http = free_tcp();
        let grpc = free_tcp();
        let data = root.path().join(format!("{s}-data"));
        let args: Vec<String> = compose_command(&text, s)
            .into_iter()
            .skip(1) // `run`: Site::start gives it
            .map(|a| {
                if a == format!("0.0.0.0:{DEFAULT_HTTP}") {
                    http.to_string()
                } else if a == format!("0.0.0.0:{DEFAULT_GRPC}") {
                    grpc.to_string()
                } else if a == format!("0.0.0.0:{MESH}") {
                    mesh[s].to_string()
                } else if a == "/var/lib/ocmesh" {
                    data.display().to_string()
                } else if let Some(rest) = a.strip_prefix("/etc/ocmesh/tls/") {
                    format!("{r}/tls/{s}/{rest}")
                } else if let Some(peer) = a.strip_suffix(&format!(":{MESH}")).and_then(|p| mesh.get(p)) {
                    format!("localhost:{}", peer.port())
                } else {
                    a
                }
            })
            .collect();
        assert!(args.iter().any(|a| a.starts_with("localhost:")), "{args:?}");
        sites.push(Site::custom(root.path(), s, http, Some(mesh[s]), args, Vec::new()));
    }
    let names: Vec<String> = SITES.iter().map(|s| (*s).to_owned()).collect();
    mesh_of(&mut sites, &names).await
}

// ---------------------------------------------------------------- systemd

#[test]
fn systemd_unit_is_hardened_and_its_command_resolves() {
    let text = read("systemd/ocmesh.service");
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = String::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            current = name.to_owned();
            continue;
        }
        let (k, v) = t
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: {t:?} is not key=value", n + 1));
        assert!(!current.is_empty(), "line {}: outside a section", n + 1);
        sections
            .entry(current.clone())
            .or_default()
            .push((k.to_owned(), v.to_owned()));
    }
    let service = &sections["Service"];
    let get = |k: &str| -> Vec<&str> {
        service
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (k, v) in [
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("StateDirectory", "ocmesh"),
        ("EnvironmentFile", "/etc/ocmesh/ocmesh.env"),
    ] {
        assert_eq!(get(k), vec![v], "{k}");
    }
    assert!(
        get("DynamicUser") == vec!["yes"] || get("User").len() == 1,
        "a dynamic or dedicated user"
    );
    let nofile: u64 = get("LimitNOFILE")[0].parse().expect("LimitNOFILE is a number");
    assert!(nofile >= 4096);
    assert_eq!(
        sections["Install"],
        vec![("WantedBy".into(), "multi-user.target".into())]
    );
    assert!(
        sections["Unit"]
            .iter()
            .any(|(k, v)| k == "After" && v.contains("network-online.target"))
    );

    // ExecStart, with systemd's specifiers for the state (%S) and
    // credentials (%d) directories filled in and the example config.
    let exec = get("ExecStart");
    assert_eq!(exec.len(), 1);
    let words: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!(words[0], "/usr/local/bin/ocmesh");
    let creds: BTreeSet<&str> = get("LoadCredential")
        .iter()
        .map(|c| c.split_once(':').expect("name:path").0)
        .collect();
    let args: Vec<String> = words[1..]
        .iter()
        .map(|w| {
            if let Some(name) = w.strip_prefix("%d/") {
                assert!(creds.contains(name), "{w} is not a LoadCredential");
                format!("/run/credentials/ocmesh.service/{name}")
            } else if w.contains('%') {
                w.replace("%S", "/var/lib")
            } else if *w == "/etc/ocmesh/ocmesh.toml" {
                deploy("systemd/ocmesh.toml").display().to_string()
            } else {
                (*w).to_owned()
            }
        })
        .collect();
    let env = read("systemd/ocmesh.env.example");
    let password = env
        .lines()
        .find_map(|l| l.strip_prefix("OCMESH_ADMIN_PASSWORD="))
        .expect("the env file sets the admin password");
    let report = check_config(&args, &[("OCMESH_ADMIN_PASSWORD", password.into())]).expect("valid");
    assert_eq!(setting(&report, "data"), "/var/lib/ocmesh");
    assert_eq!(setting(&report, "http"), format!("0.0.0.0:{DEFAULT_HTTP}"));
    assert_eq!(setting(&report, "grpc"), format!("0.0.0.0:{DEFAULT_GRPC}"));
    assert_eq!(setting(&report, "mesh"), format!("0.0.0.0:{MESH}"));
    assert_eq!(setting(&report, "key"), "/run/credentials/ocmesh.service/site.key");
}

// ---------------------------------------------------------------- Helm

const TEMPLATES: [&str; 4] = ["statefulset.yaml", "service.yaml", "secret.yaml", "_helpers.tpl"];

fn helm(rel: &str) -> String {
    read(&format!("helm/ocmesh/{rel}"))
}

#[test]
fn helm_chart_is_well_formed_and_refers_to_real_values() {
    let chart = helm("Chart.yaml");
    check_yaml("Chart.yaml", &chart, false);
    assert_eq!(value_at(&chart, "apiVersion").as_deref(), Some("v2"));
    assert_eq!(value_at(&chart, "name").as_deref(), Some("ocmesh"));
    assert!(value_at(&chart, "version").is_some_and(|v| v.split('.').count() == 3));
    let values = helm("values.yaml");
    check_yaml("values.yaml", &values, false);
    let keys = key_paths(&values);
    for (key, port) in [
        ("ports.http", DEFAULT_HTTP),
        ("ports.grpc", DEFAULT_GRPC),
        ("ports.mesh", MESH),
    ] {
        assert_eq!(value_at(&values, key), Some(port.to_string()), "{key}");
    }
    for t in TEMPLATES {
        let text = helm(&format!("templates/{t}"));
        if t.ends_with(".yaml") {
            check_yaml(t, &text, true);
        }
        let mut opens = 0;
        for (i, _) in text.match_indices("{{") {
            opens += 1;
            assert!(text[i..].find("}}").is_some(), "{t}: unclosed action");
        }
        assert_eq!(opens, text.matches("}}").count(), "{t}: unbalanced braces");
        for (i, _) in text.match_indices(".Values.") {
            let path: String = text[i + ".Values.".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
                .collect();
            let path = path.trim_end_matches('.');
            assert!(keys.contains(path), "{t}: .Values.{path} is not in values.yaml");
        }
        for (i, _) in text.match_indices("include \"") {
            let name = &text[i + 9..];
            let name = &name[..name.find('"').expect("name end")];
            assert!(
                helm("templates/_helpers.tpl").contains(&format!("define \"{name}\"")),
                "{t}: include of undefined {name}"
            );
        }
    }
    let sts = helm("templates/statefulset.yaml");
    for needed in [
        "kind: StatefulSet",
        "volumeClaimTemplates:",
        "path: /health",
        "readinessProbe:",
        "livenessProbe:",
        "runAsNonRoot: true",
        "secretKeyRef:",
        "key: OCMESH_ADMIN_PASSWORD",
        "protocol: UDP",
    ] {
        assert!(sts.contains(needed), "statefulset lacks {needed}");
    }
    let svc = helm("templates/service.yaml");
    assert!(svc.contains("clusterIP: None") && svc.contains("protocol: UDP") && svc.contains("name: grpc"));
    let secret = helm("templates/secret.yaml");
    assert!(secret.contains("kind: Secret") && secret.contains("OCMESH_ADMIN_PASSWORD:") && secret.contains("b64enc"));
}

/// The StatefulSet's container args, with the chart's values for
/// `{{ .Values.ports.* }}` and a pod name for `$(POD_NAME)`.
fn helm_args(pod: &str) -> Vec<String> {
    let sts = helm("templates/statefulset.yaml");
    let values = helm("values.yaml");
    let lines: Vec<&str> = sts.lines().collect();
    list_items(&lines, "          args")
        .into_iter()
        .map(|a| {
            let mut a = a.replace("$(POD_NAME)", pod);
            for key in ["http", "grpc", "mesh"] {
                let v = value_at(&values, &format!("ports.{key}")).expect("port");
                a = a.replace(&format!("{{{{ .Values.ports.{key} }}}}"), &v);
            }
            assert!(!a.contains("{{") && !a.contains("$("), "unrendered {a}");
            a
        })
        .collect()
}

/// What `ocmesh.peers` renders for `sites` pods of release `name` in `ns`.
fn helm_peers(name: &str, ns: &str, sites: usize, port: u16) -> String {
    let helpers = helm("templates/_helpers.tpl");
    assert!(
        helpers.contains("{{- if $i }},{{ end }}{{ $name }}-{{ $i }}.{{ $name }}-mesh.{{ $ns }}.svc:{{ $port }}"),
        "the peers helper changed: update this test"
    );
    (0..sites)
        .map(|i| format!("{name}-{i}.{name}-mesh.{ns}.svc:{port}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn helm_command_line_resolves_in_the_real_binary() {
    let values = helm("values.yaml");
    let sites: usize = value_at(&values, "sites").expect("sites").parse().expect("number");
    let peers = helm_peers("ocmesh", "default", sites, MESH);
    for i in 0..sites {
        let pod = format!("ocmesh-{i}");
        let args = helm_args(&pod);
        let report = check_config(
            &args,
            &[("OCMESH_PEERS", peers.clone()), ("OCMESH_ADMIN_PASSWORD", "x".into())],
        )
        .expect("valid");
        assert_eq!(setting(&report, "cert"), format!("/etc/ocmesh/tls/{pod}.pem"));
        assert_eq!(setting(&report, "peers"), peers);
        assert_eq!(setting(&report, "http"), format!("0.0.0.0:{DEFAULT_HTTP}"));
    }
}

/// The chart's three pods on loopback: its args, with the one peer list
/// every pod gets (each pod's own name included), names as `localhost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_pods_mesh_on_loopback_with_one_shared_peer_list() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let pods: Vec<String> = (0..3).map(|i| format!("ocmesh-{i}")).collect();
    let tls = root.path().join("tls");
    make_ca(&tls, &pods.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mesh: Vec<SocketAddr> = pods.iter().map(|_| free_udp()).collect();
    let peers = mesh
        .iter()
        .map(|m| format!("localhost:{}", m.port()))
        .collect::<Vec<_>>()
        .join(",");
    let mut sites = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let (http, grpc) = (free_tcp(), free_tcp());
        let data = root.path().join(format!("{pod}-data"));
        let args: Vec<String> = helm_args(pod)
            .into_iter()
            .skip(1)
            .map(|a| {
                if a == format!("0.0.0.0:{DEFAULT_HTTP}") {
                    http.to_string()
                } else if a == format!("0.0.0.0:{DEFAULT_GRPC}") {
                    grpc.to_string()
                } else if a == format!("0.0.0.0:{MESH}") {
                    mesh[i].to_string()
                } else if a == "/var/lib/ocmesh" {
                    data.display().to_string()
                } else if let Some(rest) = a.strip_prefix("/etc/ocmesh/tls/") {
                    tls.join(rest).display().to_string()
                } else {
                    a
                }
            })
            .collect();
        sites.push(Site::custom(
            root.path(),
            pod,
            http,
            Some(mesh[i]),
            args,
            vec![("OCMESH_PEERS".into(), peers.clone())],
        ));
    }
    mesh_of(&mut sites, &pods).await?;
    assert!(
        sites[0].log_text().contains("this peer address is this site itself"),
        "{}",
        sites[0].log_tail(40)
    );
    Ok(())
}

// ---------------------------------------------------------------- Dockerfile

#[test]
fn dockerfile_builds_features_that_exist_and_runs_unprivileged() -> anyhow::Result<()> {
    let text = read("Dockerfile");
    // Instructions, continuation lines joined.
    let mut instructions: Vec<(String, String)> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let t = line.trim();
        if pending.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if t.starts_with('#') {
            continue;
        }
        pending.push_str(t.trim_end_matches('\\'));
        pending.push(' ');
        if !t.ends_with('\\') {
            let (op, rest) = pending.trim().split_once(' ').unwrap_or((pending.trim(), ""));
            instructions.push((op.to_owned(), rest.trim().to_owned()));
            pending.clear();
        }
    }
    let all = |op: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, r)| r.as_str())
            .collect()
    };
    let froms = all("FROM");
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(
        froms[0].starts_with("rust:") && froms[0].ends_with(" AS build"),
        "{froms:?}"
    );
    assert!(froms[1].contains("slim"), "{froms:?}");
    let build = all("RUN")
        .into_iter()
        .find(|r| r.contains("cargo build"))
        .expect("cargo build");
    assert!(build.contains("--release") && build.contains("--locked") && build.contains("--features \"${FEATURES}\""));
    // The default and documented features are features of the root package.
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))?;
    let features: BTreeSet<&str> = manifest
        .split("[features]")
        .nth(1)
        .expect("[features]")
        .lines()
        .take_while(|l| !l.starts_with('['))
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim()))
        .collect();
    let default = all("ARG")
        .into_iter()
        .find_map(|a| a.strip_prefix("FEATURES="))
        .expect("ARG FEATURES=")
        .trim_matches('"');
    for f in default.split(',').filter(|f| !f.is_empty()).chain(
        text.lines()
            .filter_map(|l| l.split("--build-arg FEATURES=").nth(1))
            .map(|r| r.split_whitespace().next().unwrap_or_default()),
    ) {
        assert!(features.contains(f), "feature {f:?} is not in Cargo.toml: {features:?}");
    }
    let user = all("USER");
    assert_eq!(user.len(), 1);
    assert!(!user[0].starts_with("0") && !user[0].starts_with("root"), "{user:?}");
    assert_eq!(all("VOLUME"), vec![r#"["/var/lib/ocmesh"]"#]);
    assert_eq!(all("ENTRYPOINT"), vec![r#"["ocmesh"]"#]);
    let health = all("HEALTHCHECK");
    assert!(
        health[0].contains(&format!("http://127.0.0.1:{DEFAULT_HTTP}/health")),
        "{health:?}"
    );
    // CMD with the image's ENV is a valid run.
    let env: Vec<(String, String)> = all("ENV")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let cmd: Vec<String> = serde_json::from_str(all("CMD")[0])?;
    let env_refs: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let report = check_config(&cmd, &env_refs).expect("CMD is valid");
    assert_eq!(setting(&report, "http"), format!("0.0.0.0:{DEFAULT_HTTP}"));
    assert_eq!(setting(&report, "grpc"), format!("0.0.0.0:{DEFAULT_GRPC}"));
    assert_eq!(setting(&report, "data"), "/var/lib/ocmesh");
    // The build context leaves build output out.
    let ignore = read("Dockerfile.dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target"));
    Ok(())
}
