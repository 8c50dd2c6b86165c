//! `ocmesh run` settings from three sources: flags win over `OCMESH_*`
//! environment variables, which win over the TOML file given by `--config`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use ocmesh_federation::PeerAddr;
use ocmesh_replication::{AclMode, ShareConfig};

#[derive(clap::Args, Debug, Default)]
pub struct RunArgs {
    /// TOML file with any of: site, data, http, grpc, mesh, ca, cert, key,
    /// peers, and `[share.<peer site>]` tables (what goes to that peer).
    #[arg(long, env = "OCMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Site name (taken from the certificate when --cert is given).
    #[arg(long, env = "OCMESH_SITE")]
    pub site: Option<String>,
    /// Data directory [default: ./ocmesh-data].
    #[arg(long, env = "OCMESH_DATA")]
    pub data: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:3000].
    #[arg(long, env = "OCMESH_HTTP")]
    pub http: Option<SocketAddr>,
    /// OpenIAP gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "OCMESH_GRPC")]
    pub grpc: Option<SocketAddr>,
    /// UDP address to listen for peers on (QUIC); enables the mesh.
    #[arg(long, env = "OCMESH_MESH")]
    pub mesh: Option<SocketAddr>,
    /// Federation CA certificate (PEM).
    #[arg(long, env = "OCMESH_CA")]
    pub ca: Option<PathBuf>,
    /// This site's certificate (PEM), issued by `ocmesh ca issue`.
    #[arg(long, env = "OCMESH_CERT")]
    pub cert: Option<PathBuf>,
    /// This site's private key (PEM).
    #[arg(long, env = "OCMESH_KEY")]
    pub key: Option<PathBuf>,
    /// Largest file upload accepted, in bytes [default: 1 GiB].
    #[arg(long, env = "OCMESH_MAX_FILE_BYTES")]
    pub max_file_bytes: Option<u64>,
    /// Keep message queues and exchanges in RabbitMQ at this amqp:// URL
    /// (needs the rabbitmq feature) instead of the embedded broker.
    #[arg(long, env = "OCMESH_AMQP")]
    pub amqp: Option<String>,
    /// Keep the site's store in MongoDB at this mongodb:// URI (needs the
    /// mongodb feature) instead of the data directory.
    #[arg(long, env = "OCMESH_MONGODB")]
    pub mongodb: Option<String>,
    /// A peer's mesh address to dial, `ip:port` or `host:port` (looked up
    /// before every dial); repeatable (env: comma-separated).
    #[arg(long = "peer", env = "OCMESH_PEERS", value_delimiter = ',')]
    pub peers: Vec<PeerAddr>,
    /// Resolve the flags, environment and config file, report what a run
    /// would use, and exit (0 when valid, 1 naming the problem) without
    /// opening the data directory or any socket.
    #[arg(long, hide = true)]
    pub check_config: bool,
}

/// The `--config` file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    site: Option<String>,
    data: Option<PathBuf>,
    http: Option<String>,
    grpc: Option<String>,
    mesh: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    peers: Option<Vec<String>>,
    max_file_bytes: Option<u64>,
    amqp: Option<String>,
    mongodb: Option<String>,
    /// What is shared with each peer, by the peer's site name.
    share: Option<HashMap<String, ShareFile>>,
}

/// One `[share.<site>]` table.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct ShareFile {
    /// Collections shared with the peer [default: all].
    collections: Option<Vec<String>>,
    /// Work-item queues shared with the peer [default: all].
    queues: Option<Vec<String>>,
    /// `trusted` (default: only an `_acl` deny of the peer withholds) or
    /// `enforce` (the `_acl` must grant the peer read).
    acl: Option<String>,
}

impl ShareFile {
    fn resolve(self, file: &Path, site: &str) -> anyhow::Result<ShareConfig> {
        let acl = match self.acl.as_deref() {
            None | Some("trusted") => AclMode::Trusted,
            Some("enforce") => AclMode::Enforce,
            Some(other) => bail!(
                "{}: [share.{site}] acl = {other:?}: use \"trusted\" or \"enforce\"",
                file.display()
            ),
        };
        Ok(ShareConfig {
            collections: self.collections.map(|c| c.into_iter().collect()),
            queues: self.queues.map(|q| q.into_iter().collect()),
            acl,
        })
    }
}

/// Certificate files for the mesh.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Resolved settings.
#[derive(Debug)]
pub struct Settings {
    pub site: Option<String>,
    pub data: PathBuf,
    pub http: SocketAddr,
    /// Where OpenIAP clients connect (gRPC).
    pub grpc: SocketAddr,
    pub mesh: Option<SocketAddr>,
    pub tls: Option<TlsFiles>,
    pub peers: Vec<PeerAddr>,
    pub max_file_bytes: Option<u64>,
    pub amqp: Option<String>,
    /// The store in MongoDB instead of `data`.
    pub mongodb: Option<String>,
    /// What is shared with each peer site (by name); unlisted peers get
    /// everything their `_acl` does not deny them.
    pub sharing: HashMap<String, ShareConfig>,
}

fn addr(file: &Path, key: &str, value: &str) -> anyhow::Result<SocketAddr> {
    value.parse().with_context(|| {
        format!(
            "{}: `{key}` = {value:?} is not an address like 127.0.0.1:3000",
            file.display()
        )
    })
}

impl Settings {
    pub fn resolve(args: RunArgs) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
                let parsed: FileConfig =
                    toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
                Some((path.clone(), parsed))
            }
            None => None,
        };
        let (path, file) = file.unwrap_or_default();
        let file_addr = |key: &str, v: &Option<String>| v.as_deref().map(|s| addr(&path, key, s)).transpose();
        let http = match args.http {
            Some(a) => a,
            None => file_addr("http", &file.http)?.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3000))),
        };
        let grpc = match args.grpc {
            Some(a) => a,
            None => file_addr("grpc", &file.grpc)?.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051))),
        };
        let mesh = match args.mesh {
            Some(a) => Some(a),
            None => file_addr("mesh", &file.mesh)?,
        };
        let peers = if !args.peers.is_empty() {
            args.peers
        } else {
            file.peers
                .unwrap_or_default()
                .iter()
                .map(|p| {
                    p.parse::<PeerAddr>()
                        .with_context(|| format!("{}: `peers`", path.display()))
                })
                .collect::<Result<_, _>>()?
        };
        let mut sharing = HashMap::new();
        for (site, share) in file.share.unwrap_or_default() {
            let resolved = share.resolve(&path, &site)?;
            sharing.insert(site, resolved);
        }
        let ca = args.ca.or(file.ca);
        let cert = args.cert.or(file.cert);
        let key = args.key.or(file.key);
        let tls = match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca, cert, key }),
            (None, None, None) => None,
            _ => bail!("--ca, --cert and --key go together: give all three or none"),
        };
        Ok(Settings {
            site: args.site.or(file.site),
            data: args
                .data
                .or(file.data)
                .unwrap_or_else(|| ocmesh_node::default_data_dir().to_path_buf()),
            http,
            grpc,
            mesh,
            tls,
            peers,
            max_file_bytes: args.max_file_bytes.or(file.max_file_bytes),
            amqp: args.amqp.or(file.amqp),
            mongodb: args.mongodb.or(file.mongodb),
            sharing,
        })
    }

    /// Combinations a run refuses, found before anything is opened.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.mesh.is_some() && self.tls.is_none() {
            bail!("--mesh needs --ca, --cert and --key");
        }
        if self.mesh.is_none() && !self.peers.is_empty() {
            bail!("--peer needs --mesh (an address to listen for peers on)");
        }
        if self.amqp.is_some() && !cfg!(feature = "rabbitmq") {
            bail!("--amqp needs a build with the rabbitmq feature (cargo build --features rabbitmq)");
        }
        if self.mongodb.is_some() && !cfg!(feature = "mongodb") {
            bail!("--mongodb needs a build with the mongodb feature (cargo build --features mongodb)");
        }
        Ok(())
    }

    /// One line per setting, for `run --check-config`.
    pub fn describe(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let peers: Vec<String> = self.peers.iter().map(ToString::to_string).collect();
        let mut sharing: Vec<&String> = self.sharing.keys().collect();
        sharing.sort();
        format!(
            "site {}\ndata {}\nhttp {}\ngrpc {}\nmesh {}\nca {}\ncert {}\nkey {}\npeers {}\nshare {}\nmax_file_bytes {}\namqp {}\nmongodb {}\n",
            opt(self.site.clone()),
            self.data.display(),
            self.http,
            self.grpc,
            opt(self.mesh.map(|m| m.to_string())),
            opt(self.tls.as_ref().map(|t| t.ca.display().to_string())),
            opt(self.tls.as_ref().map(|t| t.cert.display().to_string())),
            opt(self.tls.as_ref().map(|t| t.key.display().to_string())),
            if peers.is_empty() { "-".into() } else { peers.join(",") },
            if sharing.is_empty() {
                "-".into()
            } else {
                sharing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
            },
            opt(self.max_file_bytes.map(|m| m.to_string())),
            opt(self.amqp.as_ref().map(|_| "(set)".to_owned())),
            opt(self.mongodb.as_ref().map(|_| "(set)".to_owned())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("ocmesh.toml");
        std::fs::write(&p, text).expect("write");
        (dir, p)
    }

    #[test]
    fn flags_win_over_file_and_defaults_fill_the_rest() {
        let (_d, p) = write(
            "http = \"127.0.0.1:4000\"\ngrpc = \"127.0.0.1:4001\"\nsite = \"file-site\"\npeers = [\"127.0.0.1:7001\"]\n",
        );
        let s = Settings::resolve(RunArgs {
            config: Some(p.clone()),
            http: Some("127.0.0.1:5000".parse().expect("addr")),
            ..Default::default()
        })
        .expect("resolve");
        assert_eq!(s.http.port(), 5000);
        assert_eq!(s.grpc.port(), 4001, "the file fills what flags leave");
        assert_eq!(s.site.as_deref(), Some("file-site"));
        assert_eq!(s.peers.len(), 1);
        assert_eq!(s.data, PathBuf::from("ocmesh-data"));
        let s = Settings::resolve(RunArgs {
            config: Some(p),
            ..Default::default()
        })
        .expect("resolve");
        assert_eq!(s.http.port(), 4000);
        assert_eq!(s.grpc.port(), 4001);
    }

    #[test]
    fn share_tables_configure_each_peer() {
        let (_d, p) = write(
            "[share.b]\ncollections = [\"entities\", \"workitems\"]\nqueues = [\"orders\"]\nacl = \"enforce\"\n[share.c]\n",
        );
        let s = Settings::resolve(RunArgs {
            config: Some(p),
            ..Default::default()
        })
        .expect("resolve");
        let b = &s.sharing["b"];
        assert_eq!(b.acl, AclMode::Enforce);
        assert!(
            b.collections
                .as_ref()
                .is_some_and(|c| c.contains("entities") && c.len() == 2)
        );
        assert!(b.queues.as_ref().is_some_and(|q| q.contains("orders")));
        assert_eq!(
            s.sharing["c"],
            ShareConfig::default(),
            "an empty table shares everything"
        );
        let (_d, p) = write("[share.b]\nacl = \"paranoid\"\n");
        let e = Settings::resolve(RunArgs {
            config: Some(p),
            ..Default::default()
        })
        .expect_err("bad acl mode");
        assert!(format!("{e:#}").contains("[share.b] acl"), "{e:#}");
        let (_d, p) = write("[share.b]\ncolections = []\n");
        let e = Settings::resolve(RunArgs {
            config: Some(p),
            ..Default::default()
        })
        .expect_err("unknown key");
        assert!(format!("{e:#}").contains("colections"), "{e:#}");
    }

    #[test]
    fn grpc_listens_on_50051_by_default() {
        let s = Settings::resolve(RunArgs::default()).expect("resolve");
        assert_eq!(s.grpc, SocketAddr::from(([127, 0, 0, 1], 50051)));
    }

    #[test]
    fn bad_files_name_the_problem() {
        let (_d, p) = write("grpc = \"nope\"\n");
        let e = Settings::resolve(RunArgs {
            config: Some(p),
            ..Default::default()
        })
        .expect_err("bad grpc addr");
        assert!(format!("{e:#}").contains("`grpc`"), "{e:#}");
        let (_d, p) = write("http = \"nope\"\n");
        let e = Settings::resolve(RunArgs {
            config: Some(p),
            ..Default::default()
        })
        .expect_err("bad addr");
        assert!(format!("{e:#}").contains("`http`"), "{e:#}");
        let (_d, p) = write("htp = \"127.0.0.1:1\"\n");
        let e = Settings::resolve(RunArgs {
            config: Some(p),
            ..Default::default()
        })
        .expect_err("unknown key");
        assert!(format!("{e:#}").contains("htp"), "{e:#}");
        let e = Settings::resolve(RunArgs {
            ca: Some("ca.pem".into()),
            ..Default::default()
        })
        .expect_err("partial tls");
        assert!(e.to_string().contains("go together"));
    }

    /// Files no operator meant to write: nesting far past any sensible
    /// depth, unterminated tables, bytes that are not UTF-8, wrong types.
    /// Each is an error naming the file, never a crash of the node at start.
    #[test]
    fn malformed_files_are_errors_not_crashes() {
        let deep_array = format!("peers = {}\"x\"{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let deep_table = format!("share = {}1{}\n", "{a = ".repeat(100_000), "}".repeat(100_000));
        let unterminated = format!("peers = {}\n", "[".repeat(100_000));
        let headers = "[share.a.b.c.d.e.f.g.h]\n".repeat(1000);
        let texts: Vec<Vec<u8>> = vec![
            deep_array.into_bytes(),
            deep_table.into_bytes(),
            unterminated.into_bytes(),
            headers.into_bytes(),
            b"peers = \"not a list\"\n".to_vec(),
            b"site = 12\n".to_vec(),
            b"[share\n".to_vec(),
            b"http = \"\\ud800\"\n".to_vec(),
            vec![0xff, 0xfe, 0x00, 0x41],
            b"site = \"a\"\nsite = \"b\"\n".to_vec(),
        ];
        for text in texts {
            let dir = tempfile::tempdir().expect("tmp");
            let p = dir.path().join("ocmesh.toml");
            std::fs::write(&p, &text).expect("write");
            let e = Settings::resolve(RunArgs {
                config: Some(p),
                ..Default::default()
            })
            .expect_err("malformed");
            assert!(format!("{e:#}").contains("ocmesh.toml"), "{e:#}");
        }
    }
}
