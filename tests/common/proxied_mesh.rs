//! Real `ocmesh run` processes, every pair meshed through fault proxies.
//!
//! Each site dials each other site through a [`UdpProxy`] of its own, so a
//! link between two sites is two proxies (one per dial direction) and every
//! datagram between sites passes a proxy the test controls.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};

use super::udp_proxy::{Counters, UdpProxy};
use super::{Site, free_udp, make_ca, peers_of, wait_until};

pub struct ProxiedMesh {
    pub sites: Vec<Site>,
    /// (i, j): the path site i dials to reach site j.
    proxies: BTreeMap<(usize, usize), UdpProxy>,
    /// Last field: dropped after the sites (whose logs live in it).
    pub root: tempfile::TempDir,
}

impl ProxiedMesh {
    /// Starts one site per name (certificates from a new CA), each dialing
    /// every other through a proxy seeded from `seed`; no faults yet.
    pub async fn start(names: &[&str], seed: u64) -> anyhow::Result<ProxiedMesh> {
        let root = tempfile::tempdir()?;
        let ca = root.path().join("ca");
        make_ca(&ca, names)?;
        let mesh: Vec<_> = names.iter().map(|_| free_udp()).collect();
        let mut proxies = BTreeMap::new();
        for i in 0..names.len() {
            for (j, target) in mesh.iter().enumerate() {
                if i != j {
                    let s = seed.wrapping_mul(1_000).wrapping_add((i * names.len() + j) as u64);
                    proxies.insert((i, j), UdpProxy::start(*target, s).await?);
                }
            }
        }
        let mut sites = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let dials: Vec<_> = (0..names.len())
                .filter(|&j| j != i)
                .map(|j| proxies[&(i, j)].addr())
                .collect();
            sites.push(Site::meshed(root.path(), &ca, name, mesh[i], &dials));
        }
        for s in &mut sites {
            s.start().await?;
        }
        Ok(ProxiedMesh { sites, proxies, root })
    }

    pub fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.sites
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no site {name}"))
    }

    /// Both proxies between sites `i` and `j`.
    pub fn link(&self, i: usize, j: usize) -> impl Iterator<Item = &UdpProxy> {
        self.proxies
            .iter()
            .filter(move |((x, y), _)| (*x, *y) == (i, j) || (*x, *y) == (j, i))
            .map(|(_, p)| p)
    }

    pub fn cut(&self, i: usize, j: usize) {
        self.link(i, j).for_each(UdpProxy::cut);
    }

    pub fn restore(&self, i: usize, j: usize) {
        self.link(i, j).for_each(UdpProxy::restore);
    }

    /// Cuts every link of site `i`.
    pub fn isolate(&self, i: usize) {
        for j in 0..self.sites.len() {
            if j != i {
                self.cut(i, j);
            }
        }
    }

    pub fn restore_all(&self) {
        self.proxies.values().for_each(UdpProxy::restore);
    }

    /// The same loss and delay on every path (cuts stay as they are).
    pub fn degrade_all(&self, drop: f64, delay: Duration, jitter: Duration) {
        for p in self.proxies.values() {
            p.degrade(drop, delay, jitter);
        }
    }

    pub fn counters(&self) -> Counters {
        let mut total = Counters::default();
        for p in self.proxies.values() {
            total += p.counters();
        }
        total
    }

    /// One line per proxy: path, faults, counters.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for ((i, j), p) in &self.proxies {
            let _ = writeln!(
                out,
                "{} -> {}: {:?} {:?}",
                self.sites[*i].name,
                self.sites[*j].name,
                p.faults(),
                p.counters()
            );
        }
        out
    }

    /// Copies every site's log out of the temporary directory (which goes
    /// away with the mesh) into a new directory under the system's temp
    /// directory; its path, for a failure message.
    pub fn save_logs(&self) -> String {
        let dir = std::env::temp_dir().join(format!(
            "ocmesh-logs-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        ));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return format!("(logs not saved: {e})");
        }
        for s in &self.sites {
            if let Some(name) = s.log.file_name() {
                let _ = std::fs::copy(&s.log, dir.join(name));
            }
        }
        dir.display().to_string()
    }

    /// Log lines of every site that contain `needle`, prefixed with the site.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.sites
            .iter()
            .flat_map(|s| {
                s.log_text()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .map(|l| format!("{}: {l}", s.name))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Every site's peer list, for failure messages.
    pub async fn status(&self) -> String {
        let mut out = String::new();
        for s in &self.sites {
            let _ = writeln!(out, "{}", peers_of(s).await);
        }
        out.push_str(&self.report());
        out
    }

    /// Waits until every site lists every other as connected and, with
    /// `in_sync`, with nothing unacknowledged; on timeout the error holds
    /// every peer list and the proxies' counters.
    pub async fn wait_connected(&self, timeout: Duration, in_sync: bool) -> anyhow::Result<()> {
        let names: Vec<String> = self.sites.iter().map(|s| s.name.clone()).collect();
        let what = if in_sync {
            "every site connected to every other with nothing unacknowledged"
        } else {
            "every site connected to every other"
        };
        let done = wait_until(timeout, what, || async {
            for s in &self.sites {
                let peers = s.peers().await?;
                for other in names.iter().filter(|n| **n != s.name) {
                    let ok = peers.iter().any(|p| {
                        p["site"] == other.as_str() && p["connected"] == true && (!in_sync || p["unacked"] == 0)
                    });
                    if !ok {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        })
        .await;
        if let Err(e) = done {
            bail!("{e:#}\n{}", self.status().await);
        }
        Ok(())
    }
}
