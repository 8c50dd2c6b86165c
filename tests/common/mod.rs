//! Real `ocmesh` processes on loopback for integration tests.

#![allow(dead_code)]

pub mod proxied_mesh;
pub mod udp_proxy;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

pub const PASSWORD: &str = "test-password";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ocmesh")
}

pub fn free_tcp() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    l.local_addr().expect("addr")
}

pub fn free_udp() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.local_addr().expect("addr")
}

/// Runs `ocmesh` with `args` to completion; fails on a non-zero exit.
pub fn ocmesh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin()).args(args).output()?;
    if !out.status.success() {
        bail!("ocmesh {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A CA directory with certificates for `sites`.
pub fn make_ca(dir: &Path, sites: &[&str]) -> anyhow::Result<()> {
    let d = dir.to_str().context("utf-8 path")?;
    ocmesh(&["ca", "init", d])?;
    for s in sites {
        ocmesh(&["ca", "issue", d, s])?;
    }
    Ok(())
}

/// One `ocmesh run` process with its own data directory.
pub struct Site {
    pub name: String,
    pub http: SocketAddr,
    pub mesh: Option<SocketAddr>,
    pub data: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    /// Extra environment for the process (after every inherited
    /// `OCMESH_*` variable is removed).
    env: Vec<(String, String)>,
    /// Whether `start` passes `--data` and `--http` itself.
    addr_flags: bool,
    child: Option<Child>,
    pub client: reqwest::Client,
}

impl Site {
    /// A site in the mesh with certificates from `ca_dir`, dialing `peers`.
    pub fn meshed(root: &Path, ca_dir: &Path, name: &str, mesh: SocketAddr, peers: &[SocketAddr]) -> Site {
        let mut args: Vec<String> = vec![
            "--mesh".into(),
            mesh.to_string(),
            "--ca".into(),
            ca_dir.join("ca.pem").display().to_string(),
            "--cert".into(),
            ca_dir.join(format!("{name}.pem")).display().to_string(),
            "--key".into(),
            ca_dir.join(format!("{name}.key")).display().to_string(),
        ];
        for p in peers {
            args.push("--peer".into());
            args.push(p.to_string());
        }
        Site::new(root, name, Some(mesh), args)
    }

    /// A lone site.
    pub fn single(root: &Path, name: &str) -> Site {
        Site::new(root, name, None, vec!["--site".into(), name.into()])
    }

    /// A lone site with extra `ocmesh run` arguments.
    pub fn single_with(root: &Path, name: &str, extra: &[&str]) -> Site {
        let mut args = vec!["--site".to_owned(), name.to_owned()];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        Site::new(root, name, None, args)
    }

    /// A site whose whole configuration comes from `args` and `env`:
    /// `start` adds neither `--data` nor `--http`, so these must reach the
    /// process some other way (flags, `OCMESH_*`, a `--config` file) and
    /// agree with `data` and `http`.
    pub fn custom(
        root: &Path,
        name: &str,
        http: SocketAddr,
        mesh: Option<SocketAddr>,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Site {
        let mut s = Site::new(root, name, mesh, args);
        s.http = http;
        s.env = env;
        s.addr_flags = false;
        s
    }

    fn new(root: &Path, name: &str, mesh: Option<SocketAddr>, args: Vec<String>) -> Site {
        let data = root.join(format!("{name}-data"));
        Site {
            name: name.into(),
            http: free_tcp(),
            mesh,
            log: root.join(format!("{name}.log")),
            data,
            args,
            env: Vec::new(),
            addr_flags: true,
            child: None,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
        }
    }

    /// Starts the process and waits for `/health`. An HTTP port picked
    /// for it that something else took in the meantime (another test's
    /// site, or a connection given it as its own port) is picked again.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.start_once().await {
                Err(e) if self.addr_flags && attempts < 4 && e.to_string().contains("cannot listen for HTTP on") => {
                    self.http = free_tcp();
                }
                done => return done,
            }
        }
    }

    async fn start_once(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(bin());
        cmd.arg("run");
        if self.addr_flags {
            cmd.arg("--data")
                .arg(&self.data)
                .arg("--http")
                .arg(self.http.to_string());
        }
        cmd.args(&self.args);
        hermetic(&mut cmd);
        let child = cmd
            .env("OCMESH_ADMIN_PASSWORD", PASSWORD)
            .env("OCMESH_LOG", "info,ocmesh_federation=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(r) = self.client.get(self.url("/health")).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                bail!(
                    "{} exited with {status}; its log ends:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "{} not healthy within 30 s; its log ends:\n{}",
            self.name,
            self.log_tail(60)
        )
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("{} ignored SIGTERM for 10 s; killed it", self.name);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the process's stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn doc_url(&self, collection: &str, id: &str) -> String {
        self.url(&format!("/api/v1/collections/{collection}/documents/{id}"))
    }

    pub async fn insert(&self, collection: &str, body: &Value) -> anyhow::Result<Value> {
        let r = self
            .client
            .post(self.url(&format!("/api/v1/collections/{collection}/documents")))
            .basic_auth("admin", Some(PASSWORD))
            .json(body)
            .send()
            .await?;
        if r.status() != 201 {
            bail!("insert at {}: {} {}", self.name, r.status(), r.text().await?);
        }
        Ok(r.json().await?)
    }

    pub async fn put(&self, collection: &str, id: &str, body: &Value) -> anyhow::Result<Value> {
        let r = self
            .client
            .put(self.doc_url(collection, id))
            .basic_auth("admin", Some(PASSWORD))
            .json(body)
            .send()
            .await?;
        if r.status() != 200 {
            bail!("put at {}: {} {}", self.name, r.status(), r.text().await?);
        }
        Ok(r.json().await?)
    }

    /// GET with admin credentials: (status, JSON body).
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .client
            .get(self.url(path))
            .basic_auth("admin", Some(PASSWORD))
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    pub async fn doc(&self, collection: &str, id: &str) -> anyhow::Result<Option<Value>> {
        let (status, body) = self
            .get(&format!("/api/v1/collections/{collection}/documents/{id}"))
            .await?;
        Ok((status == 200).then_some(body))
    }

    pub async fn versions(&self, collection: &str, id: &str) -> anyhow::Result<Value> {
        let (status, body) = self
            .get(&format!("/api/v1/collections/{collection}/documents/{id}/versions"))
            .await?;
        if status != 200 {
            bail!("versions of {id} at {}: {status} {body}", self.name);
        }
        Ok(body)
    }

    pub async fn peers(&self) -> anyhow::Result<Vec<Value>> {
        let (_, body) = self.get("/api/v1/mesh/peers").await?;
        Ok(body.as_array().cloned().unwrap_or_default())
    }

    /// A cloneable handle on this site's REST API for load tasks; it keeps
    /// working across a kill and restart (the HTTP address stays).
    pub fn rest(&self) -> Rest {
        Rest {
            name: self.name.clone(),
            base: self.url(""),
            client: self.client.clone(),
        }
    }
}

/// `site` lists `peer` as connected with nothing left unacknowledged.
pub async fn peer_in_sync(site: &Site, peer: &str) -> anyhow::Result<bool> {
    Ok(site
        .peers()
        .await?
        .iter()
        .any(|p| p["site"] == peer && p["connected"] == true && p["unacked"] == 0))
}

/// The peers list, for failure messages.
pub async fn peers_of(site: &Site) -> String {
    match site.peers().await {
        Ok(p) => format!("{}'s peers: {}", site.name, Value::Array(p)),
        Err(e) => format!("{}'s peers: {e:#}", site.name),
    }
}

/// A site's REST API by address, with admin credentials.
#[derive(Clone, Debug)]
pub struct Rest {
    pub name: String,
    pub base: String,
    pub client: reqwest::Client,
}

impl Rest {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> anyhow::Result<(u16, String)> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .basic_auth("admin", Some(PASSWORD));
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await?))
    }

    /// (status, body text): for byte-for-byte comparisons.
    pub async fn get_raw(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.send(reqwest::Method::GET, path, None).await
    }

    /// Sends `body` with `method`; fails unless the answer is `want`.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        want: u16,
    ) -> anyhow::Result<Value> {
        let (status, text) = self.send(method.clone(), path, body).await?;
        if status != want {
            bail!("{method} {path} at {}: {status} {text}", self.name);
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text)?)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None, 200).await
    }

    pub async fn post(&self, path: &str, body: &Value, want: u16) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, Some(body), want).await
    }

    /// Every document of `collection` (up to 100,000), sorted by `_id`.
    pub async fn all(&self, collection: &str) -> anyhow::Result<Vec<Value>> {
        let body = serde_json::json!({"filter": {}, "sort": {"_id": 1}, "top": 100_000});
        let v = self
            .post(&format!("/api/v1/collections/{collection}/query"), &body, 200)
            .await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Pushes one item; the stored item.
    pub async fn push(&self, queue: &str, item: &Value) -> anyhow::Result<Value> {
        let v = self
            .post(&format!("/api/v1/workitemqueues/{queue}/workitems"), item, 201)
            .await?;
        Ok(v.get(0).cloned().unwrap_or(Value::Null))
    }

    /// Pops with `wait` seconds: the item, or `None` on 204.
    pub async fn pop(&self, queue: &str, wait: f64) -> anyhow::Result<Option<Value>> {
        let path = format!("/api/v1/workitemqueues/{queue}/pop?wait={wait}");
        let (status, text) = self.send(reqwest::Method::POST, &path, None).await?;
        match status {
            200 => Ok(Some(serde_json::from_str(&text)?)),
            204 => Ok(None),
            _ => bail!("pop {queue} at {}: {status} {text}", self.name),
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.kill();
        // The test harness captures this and shows it only for a failing
        // test (a panic or an `Err` returned from the test function).
        if self.log.exists() {
            println!(
                "----- last lines of {}'s stderr ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
    }
}

/// Keeps the caller's environment out of a child: every inherited
/// `OCMESH_*` variable is removed, so only what the test sets applies.
/// One default is set: OpenIAP gRPC on an ephemeral port, since processes
/// run side by side (a test's own `OCMESH_GRPC` or `--grpc` wins).
pub fn hermetic(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("OCMESH_") {
            cmd.env_remove(k);
        }
    }
    // An error's message, not a backtrace of it, must end a site's log:
    // a failed start shows only the log's last lines.
    cmd.env("OCMESH_GRPC", "127.0.0.1:0").env("RUST_LIB_BACKTRACE", "0")
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    while Instant::now() < deadline {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})")
}
