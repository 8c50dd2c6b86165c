//! The `ocmesh` binary: run a site, manage the federation CA, simulate.

mod amqp_bench;
mod bench;
mod bench_catchup;
mod bench_crosssite;
mod bench_openiap;
mod config;
mod status;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use ocmesh_federation::{Mesh, MeshConfig, ca, tls};
use ocmesh_node::{Node, NodeConfig};

#[derive(Parser, Debug)]
#[command(
    name = "ocmesh",
    version,
    about = "OpenCore-compatible automation node with a QUIC federation mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a site (with no options: one node on 127.0.0.1:3000, data in ./ocmesh-data).
    Run(Box<config::RunArgs>),
    /// Manage the federation certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Measure throughput and latency.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Show a running site's status (health, peers, store figures) from its REST API.
    Status(status::StatusArgs),
    /// Run a simulation scenario (TOML) in virtual time and check the invariants.
    Sim {
        scenario: PathBuf,
        /// One seed to run (replays exactly).
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// A range of seeds, like 1..1000 (end exclusive).
        #[arg(long)]
        seeds: Option<String>,
        /// Run the sites as `node` (the node over an in-memory disk) or
        /// `model` (the replica model); default: the scenario's `backend`.
        #[arg(long)]
        backend: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// The work-item cycle (push, pop, complete), optionally against RabbitMQ.
    Workitems(bench::WorkItemBench),
    /// The work-item round trip over OpenIAP gRPC against the node called directly.
    Openiap(bench_openiap::OpenIapBench),
    /// A work item pushed at one site, done at another over the QUIC mesh, seen back at the first.
    Crosssite(bench_crosssite::CrossSiteBench),
    /// A returning site catching up on a large backlog over the QUIC mesh, against raw quinn.
    Catchup(bench_catchup::CatchUpBench),
    /// The receiving end of `bench catchup`'s raw quinn baseline (run by it).
    #[command(hide = true)]
    RawSink(bench_catchup::RawSink),
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create a CA: writes DIR/ca.pem and DIR/ca.key.
    Init { dir: PathBuf },
    /// Issue a site certificate signed by the CA in DIR: writes DIR/SITE.pem and DIR/SITE.key.
    Issue { dir: PathBuf, site: String },
}

// The store's write path allocates many short-lived page and document
// buffers; mimalloc handles that pattern markedly better than glibc malloc.
// Built without transparent huge pages (feature `no_thp`): with them, each
// fresh 2 MiB region the writer touched was zeroed whole in one page fault,
// about 7% of the writer's time in `bench workitems`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The tokio runtime a command runs on.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("OCMESH_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Run(args) => {
            let check_only = args.check_config;
            let settings = config::Settings::resolve(*args)?;
            settings.check()?;
            if check_only {
                print!("{}", settings.describe());
                println!("config ok");
                return Ok(());
            }
            runtime()?.block_on(run(settings))
        }
        Command::Bench(BenchCommand::Workitems(b)) => runtime()?.block_on(bench::run_workitems(b)),
        Command::Bench(BenchCommand::Openiap(b)) => runtime()?.block_on(bench_openiap::run(b)),
        Command::Bench(BenchCommand::Crosssite(b)) => runtime()?.block_on(bench_crosssite::run(b)),
        Command::Bench(BenchCommand::Catchup(b)) => runtime()?.block_on(bench_catchup::run(b)),
        Command::Bench(BenchCommand::RawSink(s)) => runtime()?.block_on(bench_catchup::raw_sink(s)),
        Command::Status(args) => runtime()?.block_on(status::run(args)),
        Command::Sim {
            scenario,
            seed,
            seeds,
            backend,
        } => sim(&scenario, seed, seeds.as_deref(), backend.as_deref()),
        Command::Ca(CaCommand::Init { dir }) => {
            let files = ca::init_ca(&dir)?;
            println!("wrote {} and {}", files.cert.display(), files.key.display());
            Ok(())
        }
        Command::Ca(CaCommand::Issue { dir, site }) => {
            let files = ca::issue_site_cert(&dir, &site)?;
            println!("wrote {} and {}", files.cert.display(), files.key.display());
            Ok(())
        }
    }
}

fn sim(path: &std::path::Path, seed: Option<u64>, seeds: Option<&str>, backend: Option<&str>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let scenario = ocmesh_sim::Scenario::from_toml(&text).with_context(|| path.display().to_string())?;
    let backend = match backend {
        Some(b) => b.parse::<ocmesh_sim::Backend>()?,
        None => scenario.backend,
    };
    let flag = match backend {
        ocmesh_sim::Backend::Node => "",
        ocmesh_sim::Backend::Model => " --backend model",
    };
    let range = match (seed, seeds) {
        (Some(s), _) => s..s + 1,
        (None, Some(r)) => {
            let (a, b) = r.split_once("..").context("--seeds takes a range like 1..1000")?;
            a.trim().parse::<u64>().context("--seeds start")?..b.trim().parse::<u64>().context("--seeds end")?
        }
        (None, None) => 0..1,
    };
    let single = range.end - range.start == 1;
    let started = std::time::Instant::now();
    // Seeds are independent runs: one worker per core takes the next seed.
    let next = std::sync::atomic::AtomicU64::new(range.start);
    let totals = std::sync::Mutex::new((0u64, 0u64)); // (failed, events)
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(usize::try_from(range.end - range.start).unwrap_or(usize::MAX))
        .max(1);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if seed >= range.end {
                        break;
                    }
                    let report = ocmesh_sim::run_on(&scenario, backend, seed);
                    let mut t = totals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    t.1 += report.events;
                    // Under the lock, so one run's lines stay together.
                    if single || !report.ok {
                        print!("{report}");
                    }
                    if !report.ok {
                        t.0 += 1;
                        println!("  replay: ocmesh sim {}{flag} --seed {seed}", path.display());
                    }
                }
            });
        }
    });
    let (failed, events) = *totals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} seeds ({backend:?} backend, {workers} at a time), {failed} failed; {events} events in {secs:.2} s ({:.0} events/s)",
        range.end - range.start,
        events as f64 / secs.max(1e-9)
    );
    if failed > 0 {
        anyhow::bail!("{failed} seeds failed");
    }
    Ok(())
}

/// Where the site's store lives: the data directory, or MongoDB with
/// `--mongodb`. Returns the open options and a name for messages.
fn storage(settings: &config::Settings, site: &str) -> anyhow::Result<(ocmesh_node::OpenOptions, String)> {
    let options = ocmesh_node::OpenOptions::default();
    match &settings.mongodb {
        None => Ok((options, format!("data directory {}", settings.data.display()))),
        #[cfg(feature = "mongodb")]
        Some(uri) => {
            let store = ocmesh_node::mongo::MongoBlockStore::connect(uri, site)?;
            let place = format!("{store:?}");
            let options = ocmesh_node::OpenOptions {
                storage: ocmesh_node::Storage::Blocks(std::sync::Arc::new(store)),
                ..options
            };
            Ok((options, place))
        }
        #[cfg(not(feature = "mongodb"))]
        Some(_) => {
            let _ = site;
            anyhow::bail!("--mongodb needs a build with the mongodb feature (cargo build --features mongodb)")
        }
    }
}

async fn run(settings: config::Settings) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let identity = match &settings.tls {
        Some(t) => Some(tls::load_identity(&t.ca, &t.cert, &t.key)?),
        None => None,
    };
    let site = match (&identity, &settings.site) {
        (Some(id), Some(s)) if id.site() != s => {
            anyhow::bail!("--site {s} differs from the site name {} in the certificate", id.site())
        }
        (Some(id), _) => id.site().to_owned(),
        (None, Some(s)) => s.clone(),
        (None, None) => "local".to_owned(),
    };
    let admin_password = std::env::var("OCMESH_ADMIN_PASSWORD").ok().filter(|p| !p.is_empty());
    let (options, place) = storage(&settings, &site)?;
    let opened = Node::open_with(
        NodeConfig {
            data_dir: settings.data.clone(),
            site: site.clone(),
            admin_password,
        },
        options,
    )
    .with_context(|| format!("opening the store in {place}"))?;
    if let Some(p) = &opened.generated_admin_password {
        // Shown once: only its hash is stored.
        eprintln!("created user admin with password {p} (shown only now; set OCMESH_ADMIN_PASSWORD to choose it)");
    }
    let node = opened.node;
    tracing::info!(%site, store = %place, "node ready");

    let mesh = match (&settings.mesh, &identity) {
        (Some(listen), Some(id)) => {
            let mesh = Mesh::start(
                node.clone(),
                id,
                MeshConfig {
                    listen: *listen,
                    peers: settings.peers.clone(),
                    session: Default::default(),
                    sharing: settings.sharing.clone(),
                    tap: None,
                },
            )?;
            let peers: Vec<String> = settings.peers.iter().map(ToString::to_string).collect();
            tracing::info!(addr = %mesh.local_addr()?, peers = %peers.join(","), "mesh listening");
            Some(mesh)
        }
        (Some(_), None) => anyhow::bail!("--mesh needs --ca, --cert and --key"),
        (None, _) => None,
    };

    let listener = tokio::net::TcpListener::bind(settings.http)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", settings.http))?;
    tracing::info!(addr = %listener.local_addr()?, "http listening");
    let grpc_listener = tokio::net::TcpListener::bind(settings.grpc)
        .await
        .with_context(|| format!("cannot listen for OpenIAP gRPC on {}", settings.grpc))?;
    tracing::info!(addr = %grpc_listener.local_addr()?, "openiap grpc listening");
    let mut limits = ocmesh_api::Limits::default();
    if let Some(max) = settings.max_file_bytes {
        limits.max_file_bytes = max;
    }
    let broker = match &settings.amqp {
        None => ocmesh_node::messaging::Broker::embedded(),
        #[cfg(feature = "rabbitmq")]
        Some(url) => {
            let b = ocmesh_node::messaging::Broker::rabbitmq(url)
                .await
                .with_context(|| format!("connecting to {url}"))?;
            tracing::info!(%url, "message queues live in RabbitMQ");
            b
        }
        #[cfg(not(feature = "rabbitmq"))]
        Some(_) => anyhow::bail!("--amqp needs a build with the rabbitmq feature (cargo build --features rabbitmq)"),
    };
    // One stop signal for both servers: SIGINT/SIGTERM, or either server ending.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = std::sync::Arc::new(stop_tx);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let signal_tx = stop_tx.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = signal_tx.send(true);
    });
    let flow = ocmesh_api::openiap::FlowServer::new(node.clone(), Default::default());
    let grpc_tx = stop_tx.clone();
    let grpc_stopped = stopped(stop_rx.clone());
    let grpc_flow = flow.clone();
    let grpc = tokio::spawn(async move {
        let r = ocmesh_api::openiap::serve_grpc(grpc_listener, grpc_flow, grpc_stopped).await;
        let _ = grpc_tx.send(true);
        r
    });
    let closer = flow.clone();
    let router = ocmesh_api::router_with_openiap(node, mesh.as_ref().map(|m| m.peers()), limits, broker, flow);
    let http_stopped = stopped(stop_rx);
    let http = ocmesh_api::serve(listener, router, async move {
        http_stopped.await;
        // WebSocket streams are upgraded HTTP requests: end them too.
        closer.close_streams();
    })
    .await;
    let _ = stop_tx.send(true);
    // Open OpenIAP streams end with the process; give replies in flight a moment.
    let grpc_abort = grpc.abort_handle();
    match tokio::time::timeout(std::time::Duration::from_secs(5), grpc).await {
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "openiap grpc server failed"),
        Ok(Err(e)) => tracing::error!(error = %e, "openiap grpc task failed"),
        Ok(Ok(Ok(()))) => {}
        Err(_) => {
            grpc_abort.abort();
            tracing::info!("openiap streams still open after 5 s; closed them");
        }
    }
    http?;
    if let Some(mesh) = mesh {
        mesh.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}
