//! The OpenIAP Python package from PyPI (`openiap`, pinned), unmodified,
//! against a real `ocmesh run`, once over gRPC and once over WebSocket
//! (`/ws/v2`): sign-in (and a refused one), documents, a work item pushed,
//! popped and completed, an error reply that leaves the connection usable,
//! a watch event, an RPC round trip through message queues, collections,
//! upserts, aggregate, a file uploaded and downloaded, a work item with a
//! file pushed by one client, popped with its file and completed by a
//! second, and routed to its queue's success queue, a JSONPath watch, and
//! a collection dropped.
//! The results are cross-checked over REST, and every message the
//! package's descriptors carry must match our .proto files field for field.
//!
//! `websockets` is pinned below 14: openiap 0.0.37 reads the `open`
//! attribute that websockets 14 removed, so with a newer one its WebSocket
//! transport fails on the client side before reaching any server.
//!
//! The test installs the package into a venv under the target directory
//! (reused by later runs). When Python, venv or PyPI is not available it
//! prints why and passes, unless `OCMESH_REQUIRE_PYTHON=1` is set, in which
//! case that is a failure. Every external step has a time limit.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use common::{PASSWORD, Site, free_tcp, hermetic};

const OPENIAP_VERSION: &str = "0.0.37";
/// What the test installs (the marker file records it).
const REQUIREMENTS: [&str; 2] = ["openiap==0.0.37", "websockets<14"];

fn required() -> bool {
    std::env::var("OCMESH_REQUIRE_PYTHON").is_ok_and(|v| v == "1")
}

/// What a bounded child process left behind.
struct Ran {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    fn describe(&self) -> String {
        let status = match self.status {
            Some(s) => s.to_string(),
            None => "killed after its time limit".to_owned(),
        };
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!(
            "{status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }
}

/// Runs `cmd` to completion or kills it at `limit`; output goes through
/// files, so a chatty child cannot block on a full pipe.
fn run_bounded(cmd: &mut Command, limit: Duration, scratch: &Path) -> anyhow::Result<Ran> {
    std::fs::create_dir_all(scratch)?;
    let (out, err) = (scratch.join("stdout"), scratch.join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Ran {
        status,
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    })
}

/// A Python with `openiap==OPENIAP_VERSION` installed, or why there is none.
fn python_with_openiap() -> Result<PathBuf, String> {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let venv = base.join(format!("openiap-py-{OPENIAP_VERSION}"));
    let python = venv.join("bin").join("python");
    let marker = venv.join("ocmesh-installed");
    let scratch = base.join("openiap-py-logs");
    let err = |what: &str, e: anyhow::Error| format!("{what}: {e:#}");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == REQUIREMENTS.join(" ")) {
        let check = run_bounded(
            Command::new(&python).args(["-c", "import openiap, grpc, google.protobuf"]),
            Duration::from_secs(60),
            &scratch,
        )
        .map_err(|e| err("cannot run the venv's python", e))?;
        if check.ok() {
            return Ok(python);
        }
    }
    let _ = std::fs::remove_dir_all(&venv);
    let made = run_bounded(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        Duration::from_secs(120),
        &scratch,
    )
    .map_err(|e| err("python3 is not available", e))?;
    if !made.ok() {
        return Err(format!("python3 -m venv failed: {}", made.describe()));
    }
    let pip = run_bounded(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--timeout",
                "20",
                "--retries",
                "2",
            ])
            .args(REQUIREMENTS),
        Duration::from_secs(300),
        &scratch,
    )
    .map_err(|e| err("cannot run pip", e))?;
    if !pip.ok() {
        return Err(format!(
            "pip could not install {} from PyPI: {}",
            REQUIREMENTS.join(" "),
            pip.describe()
        ));
    }
    std::fs::write(&marker, REQUIREMENTS.join(" ")).map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
    Ok(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openiap_python_package_drives_ocmesh() -> anyhow::Result<()> {
    let python = match tokio::task::spawn_blocking(python_with_openiap).await? {
        Ok(p) => p,
        Err(reason) if required() => bail!("OCMESH_REQUIRE_PYTHON=1, but {reason}"),
        Err(reason) => {
            eprintln!("SKIPPED the_openiap_python_package_drives_ocmesh: {reason}");
            return Ok(());
        }
    };

    let root = tempfile::tempdir()?;
    same_messages_as_the_package(&python, root.path()).await?;
    let grpc = free_tcp();
    let mut site = Site::single_with(root.path(), "py", &["--grpc", &grpc.to_string()]);
    site.start().await?;

    for (url, tag) in [
        (format!("grpc://{grpc}"), "grpc"),
        (format!("ws://{}/ws/v2", site.http), "ws"),
    ] {
        let summary = run_client(&python, &url, tag, root.path())
            .await
            .map_err(|e| anyhow::anyhow!("{e:#}\n--- ocmesh log ---\n{}", site.log_tail(40)))?;
        assert_eq!(summary["user"], "admin");
        assert_eq!(summary["roles"], serde_json::json!(["admins", "users"]));
        assert_eq!(summary["watch"], "insert", "{summary}");
        assert_eq!(summary["rpc"], serde_json::json!({"answer": 42}), "{summary}");
        assert_eq!(summary["download"], "hello world", "{summary}");

        // What the Python client did is what the node holds.
        let id = summary["workitem"].as_str().context("work item id")?;
        let (status, item) = site.get(&format!("/api/v1/workitems/{id}")).await?;
        assert_eq!(status, 200, "{item}");
        assert_eq!(item["state"], "successful", "{item}");
        assert_eq!(item["payload"], serde_json::json!({"order": 42, "shipped": true}));
        let (status, queue) = site.get(&format!("/api/v1/workitemqueues/{tag}jobs")).await?;
        assert_eq!(status, 200, "{queue}");
        assert_eq!(queue["success_wiq"], format!("{tag}done"), "{queue}");

        // The item with a file, completed by the second client and routed.
        assert_eq!(summary["routed"], format!("{tag}done"), "{summary}");
        assert_eq!(
            summary["file_bytes"],
            256 + format!("attachment for {tag}: ").len(),
            "{summary}"
        );
        let id = summary["fileitem"].as_str().context("file work item id")?;
        let (status, item) = site.get(&format!("/api/v1/workitems/{id}")).await?;
        assert_eq!(status, 200, "{item}");
        assert_eq!(item["state"], "successful", "{item}");
        let files = item["files"].as_array().context("files")?;
        assert_eq!(files.len(), 1, "{item}");
        assert_eq!(files[0]["filename"], format!("{tag}-attachment.bin"), "{item}");
        let file_id = files[0]["_id"].as_str().context("file id")?;
        let meta = site.doc("fs.files", file_id).await?.context("the file's document")?;
        assert_eq!(meta["length"], summary["file_bytes"], "{meta}");
        // The dropped collection's document is gone, by a delete version.
        let dropped = summary["dropped"].as_str().context("dropped document id")?;
        assert_eq!(site.doc(&format!("{tag}drop"), dropped).await?, None);
        let history = site.versions(&format!("{tag}drop"), dropped).await?;
        assert_eq!(
            history.as_array().map(Vec::len),
            Some(2),
            "insert and delete: {history}"
        );
    }
    assert!(
        site.log_text().contains("openiap signin"),
        "the node logged the sign-ins"
    );
    Ok(())
}

/// A message's fields: name → (number, type's short name, repeated).
type Fields = BTreeMap<String, (u64, String, bool)>;

/// The messages of proto/proto/openiap/*.proto (flat messages only, as ours are).
fn our_messages() -> anyhow::Result<BTreeMap<String, Fields>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/proto/openiap");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "proto") {
            continue;
        }
        let text: String = std::fs::read_to_string(&path)?
            .lines()
            .map(|l| l.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let mut rest = text.as_str();
        while let Some(at) = rest.find("message ") {
            rest = &rest[at + "message ".len()..];
            let open = rest.find('{').context("message without a body")?;
            let close = rest.find('}').context("unclosed message")?;
            let name = rest[..open].trim().to_owned();
            let mut fields = Fields::new();
            for decl in rest[open + 1..close].split(';') {
                let words: Vec<&str> = decl.split_whitespace().collect();
                let (repeated, words) = match words.split_first() {
                    Some((&"repeated", tail)) => (true, tail),
                    _ => (false, &words[..]),
                };
                if let [kind, field, "=", number] = words {
                    let short = kind.rsplit('.').next().unwrap_or(kind).to_owned();
                    fields.insert((*field).to_owned(), (number.parse()?, short, repeated));
                }
            }
            out.insert(name, fields);
            rest = &rest[close..];
        }
    }
    Ok(out)
}

/// Every message the package's descriptors carry is in our .proto files
/// with the same field names, numbers, types and cardinality, and no field
/// we add reuses one of its numbers.
async fn same_messages_as_the_package(python: &Path, root: &Path) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openiap_descriptors.py");
    let scratch = root.join("python-descriptors");
    let mut cmd = Command::new(python);
    hermetic(&mut cmd).arg(&script);
    let ran = tokio::task::spawn_blocking(move || run_bounded(&mut cmd, Duration::from_secs(60), &scratch)).await??;
    if !ran.ok() {
        bail!("reading the package's descriptors failed: {}", ran.describe());
    }
    let theirs: BTreeMap<String, BTreeMap<String, (u64, String, bool)>> =
        serde_json::from_str(ran.stdout.trim()).context("descriptor JSON")?;
    let ours = our_messages()?;
    let mut wrong = Vec::new();
    for (message, fields) in &theirs {
        let Some(mine) = ours.get(message) else {
            wrong.push(format!("{message}: missing"));
            continue;
        };
        for (field, want) in fields {
            match mine.get(field) {
                Some(got) if got == want => {}
                got => wrong.push(format!("{message}.{field}: package {want:?}, ours {got:?}")),
            }
        }
        let numbers: Vec<u64> = fields.values().map(|f| f.0).collect();
        for (field, got) in mine.iter().filter(|(f, _)| !fields.contains_key(*f)) {
            if numbers.contains(&got.0) {
                wrong.push(format!(
                    "{message}.{field}: our field reuses the package's number {}",
                    got.0
                ));
            }
        }
    }
    assert!(theirs.len() > 50, "the package carries its messages: {}", theirs.len());
    if !wrong.is_empty() {
        bail!(
            "our .proto files differ from openiap {OPENIAP_VERSION}:\n{}",
            wrong.join("\n")
        );
    }
    Ok(())
}

/// Runs the smoke script against `url`; its summary line, parsed.
async fn run_client(python: &Path, url: &str, tag: &str, root: &Path) -> anyhow::Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openiap_smoke.py");
    let scratch = root.join(format!("python-{tag}"));
    let mut cmd = Command::new(python);
    hermetic(&mut cmd)
        .arg(&script)
        .arg(url)
        .arg("admin")
        .arg(PASSWORD)
        .arg(tag)
        .env("PYTHONUNBUFFERED", "1")
        // The client reads these when given no URL; keep the caller's out.
        .env_remove("apiurl")
        .env_remove("grpcapiurl")
        .env_remove("jwt");
    let ran = tokio::task::spawn_blocking(move || run_bounded(&mut cmd, Duration::from_secs(120), &scratch)).await??;
    let Some(line) = ran.stdout.lines().find_map(|l| l.strip_prefix("OPENIAP-OK ")) else {
        bail!("the openiap client failed over {url}: {}", ran.describe());
    };
    if !ran.ok() {
        bail!(
            "the openiap client over {url} printed success but exited with {}",
            ran.describe()
        );
    }
    serde_json::from_str(line).context("summary line")
}
