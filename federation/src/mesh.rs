//! The mesh: one QUIC endpoint per site that accepts peers and dials the
//! configured ones, and one sync session per connected peer.
//!
//! The shell around `ocmesh_replication::SyncSession`: it turns the
//! session's outputs into stream writes and store reads and writes, and
//! stream frames, local commits and timers into session inputs. One
//! connection per peer pair is kept: a connection to a newer run of the
//! peer (a greater incarnation in its hello) replaces the one to an older
//! run at once; between the same two runs, when both sides dial each other,
//! the connection dialed by the site whose name sorts first wins on both
//! sides.
//!
//! What goes to a peer in full is decided per peer: the share settings
//! configured for its site name (`MeshConfig::sharing`) and the principal
//! the peer site acts as (`site:<name>`, its roles resolved from this
//! site's role documents, refreshed at most every `POLICY_TTL`). Anything
//! else goes as a withheld stub (see `ocmesh_replication::filter`), and a
//! file chunk is served only for a file document the peer may receive.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use ocmesh_node::{ApplyReport, Node, WriteError};
use ocmesh_proto::federation::{Frame, frame::Kind};
use ocmesh_replication::chunks::{Hash as ChunkHash, MAX_WANTED};
use ocmesh_replication::withheld::MAX_HELLO_RANGES;
use ocmesh_replication::{
    Change, Input, Output, PeerPolicy, RangeSet, SessionConfig, ShareConfig, SyncSession, VersionVector,
};

use crate::frame::{FrameError, encode_hello_frame, incarnation_of, read_frame, write_frame};
use crate::peer_addr::PeerAddr;
use crate::status::{PeerStatus, PeerTable};
use crate::tls::{self, SiteIdentity, TlsError};

/// QUIC application close codes.
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_DUPLICATE: u32 = 1;
const CLOSE_PROTOCOL: u32 = 2;
const CLOSE_REFUSED_CHANGES: u32 = 3;
const CLOSE_FRAME: u32 = 4;
const CLOSE_SELF: u32 = 5;
const CLOSE_SUPERSEDED: u32 = 6;

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the dial backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new connection may take to deliver the peer's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a peer's resolved roles are used before they are read again.
const POLICY_TTL: Duration = Duration::from_secs(1);

/// How a site joins the mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub listen: SocketAddr,
    /// Peers to dial: addresses, or `host:port` names looked up before
    /// every attempt.
    pub peers: Vec<PeerAddr>,
    pub session: SessionConfig,
    /// What is shared with each peer, by its site name (from its
    /// certificate); a peer not listed gets `ShareConfig::default()`:
    /// everything but what its `_acl` denies it.
    pub sharing: HashMap<String, ShareConfig>,
    /// Sees every frame sent to a peer (for tests and debugging).
    pub tap: Option<FrameTap>,
}

/// A callback given the peer's site name and each frame sent to it,
/// encoded (length prefix included).
#[derive(Clone)]
pub struct FrameTap(pub Arc<TapFn>);

/// The callback of a [`FrameTap`].
pub type TapFn = dyn Fn(&str, &[u8]) + Send + Sync;

impl std::fmt::Debug for FrameTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameTap")
    }
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen for peers on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("certificate is for site {cert:?} but the node's data belongs to site {node:?}")]
    SiteMismatch { cert: String, node: String },
}

/// Why one session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("connection closed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("peer stream: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol: {0}")]
    Protocol(#[from] ocmesh_replication::SessionError),
    #[error("refused the peer's changes: {0}")]
    Refused(ocmesh_node::WriteError),
    #[error("store: {0}")]
    Store(String),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("the peer ended the sync stream")]
    StreamEnded,
    #[error("no hello from the peer within {HELLO_TIMEOUT:?}")]
    NoHello,
    #[error("shutting down")]
    Shutdown,
}

/// Counters of the mesh.
#[derive(Debug, Default)]
pub struct MeshStats {
    pub sessions_started: AtomicU64,
    pub refused_connections: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub frames_received: AtomicU64,
    /// Bytes of sync frames received (length prefixes included).
    pub bytes_received: AtomicU64,
    /// Connections to an older run of a peer replaced by one to its newer run.
    pub superseded_connections: AtomicU64,
    /// Chunks received from peers and stored.
    pub chunks_stored: AtomicU64,
    /// Chunks a peer sent that the store refused.
    pub chunks_refused: AtomicU64,
    /// Changes withheld from peers (sent as stubs), over all sessions.
    pub changes_withheld: AtomicU64,
    /// Chunks a peer asked for that it may not read: answered as missing.
    pub chunks_withheld: AtomicU64,
    /// Most received batches one session had in the node's writer at once
    /// (at most `SessionConfig::max_applying`).
    pub applying_peak: AtomicU64,
    /// Times a session's share of the writer filled up, so its next frame
    /// waited for the oldest batch to become durable, over all sessions.
    pub applying_full: AtomicU64,
}

/// The active connection with each peer site.
#[derive(Debug, Default)]
struct Registry {
    by_site: HashMap<String, Active>,
    next_id: u64,
}

#[derive(Debug)]
struct Active {
    id: u64,
    dialed_by_us: bool,
    /// The peer's incarnation, from its hello.
    incarnation: u64,
    conn: Connection,
}

struct Shared {
    node: Node,
    local_site: String,
    /// This run of the site (see `MeshHello` in federation.proto).
    incarnation: u64,
    /// Dial backoff jitter.
    rng: Mutex<StdRng>,
    config: MeshConfig,
    table: PeerTable,
    registry: Mutex<Registry>,
    /// What each peer last acknowledged, for the status of idle peers.
    acked: Mutex<HashMap<String, VersionVector>>,
    /// Site names learnt per address (quinn answers and dials from one
    /// socket, so a peer that dialed us from R listens on R): lets a dialer
    /// that has not got through yet report under the peer's name.
    known_sites: Mutex<HashMap<SocketAddr, String>>,
    /// The placeholder status slot of each peer configured by name, by the
    /// address the name last resolved to: a connection from that address
    /// replaces the placeholder, as one from a configured address does.
    named_slots: Mutex<HashMap<SocketAddr, String>>,
    stats: MeshStats,
    shutdown: watch::Receiver<bool>,
    /// Chunks some session has asked its peer for, and when: another
    /// session does not ask for them too until `CHUNK_ASK_TTL` has passed,
    /// so a missing chunk comes over one link only.
    chunks_asked: Mutex<HashMap<ChunkHash, Instant>>,
    /// Stubs received and stubs filled, from each session to the others.
    notices: broadcast::Sender<Notice>,
    /// Numbers sessions, for `Notice::from`.
    next_session: AtomicU64,
}

/// Stubs a session received, and stubs it replaced by their changes: the
/// site's other sessions ask their peers for the first and offer them the
/// second.
#[derive(Debug, Clone)]
struct Notice {
    /// The session that applied them (it does not hear its own notices).
    from: u64,
    stubs: RangeSet,
    filled: RangeSet,
}

/// Notices a lagging session may miss (it then relies on its next hello).
const NOTICE_BOUND: usize = 256;

/// How long one session's ask for a chunk keeps other sessions from asking
/// (a little over one poll, so a peer that lacked it is soon asked again).
const CHUNK_ASK_TTL: Duration = Duration::from_secs(3);
/// How often a session looks for chunks this site still lacks.
const CHUNK_POLL: Duration = Duration::from_secs(2);

/// A running mesh. Dropping it does not stop it; call `shutdown`.
#[derive(Debug)]
pub struct Mesh {
    endpoint: Endpoint,
    table: PeerTable,
    shared: Arc<SharedDebug>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// `Shared` behind a Debug-able wrapper.
struct SharedDebug(Arc<Shared>);

impl std::fmt::Debug for SharedDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("local_site", &self.0.local_site)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An incarnation for a process starting now: its start time in
/// microseconds since the Unix epoch (at least 1), so a restarted site's
/// run compares greater than the one it replaces unless the wall clock was
/// set back by more than the downtime (then peers fall back to the QUIC
/// idle timeout, as without incarnations).
pub fn new_incarnation() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
        .max(1)
}

/// Socket buffers asked for on the mesh's UDP socket (the kernel caps them
/// at its maximum, `net.core.rmem_max`/`wmem_max` on Linux). The default
/// receive buffer (about 200 KiB) overflows whenever a catch-up's packets
/// arrive while the receiving process is busy applying, and every overflow
/// is a loss QUIC resends and backs off for.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Binds a UDP socket for a QUIC endpoint with [`SOCKET_BUFFER_BYTES`]
/// asked for both buffers (best effort: a smaller kernel cap is not an
/// error).
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    if let Err(e) = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "could not enlarge the UDP receive buffer");
    }
    if let Err(e) = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "could not enlarge the UDP send buffer");
    }
    Ok(socket)
}

impl Mesh {
    /// Binds the endpoint and starts accepting and dialing.
    pub fn start(node: Node, identity: &SiteIdentity, config: MeshConfig) -> Result<Mesh, MeshError> {
        check_site(&node, identity)?;
        let bind_err = |source| MeshError::Bind {
            addr: config.listen,
            source,
        };
        let socket = bind_udp(config.listen).map_err(bind_err)?;
        let endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(tls::server_config(identity)?),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        Mesh::start_on(node, identity, config, endpoint, new_incarnation())
    }

    /// Starts the mesh on an endpoint the caller built (for example over a
    /// simulated socket, with `Endpoint::new_with_abstract_socket`), as run
    /// `incarnation` of the site. The endpoint's server and client
    /// configurations are set here; `config.listen` is not used.
    pub fn start_on(
        node: Node,
        identity: &SiteIdentity,
        config: MeshConfig,
        mut endpoint: Endpoint,
        incarnation: u64,
    ) -> Result<Mesh, MeshError> {
        check_site(&node, identity)?;
        endpoint.set_server_config(Some(tls::server_config(identity)?));
        endpoint.set_default_client_config(tls::client_config(identity)?);
        let (stop, shutdown) = watch::channel(false);
        let table = PeerTable::default();
        let seed = node
            .site()
            .bytes()
            .fold(incarnation, |h, b| h.rotate_left(5) ^ u64::from(b));
        let shared = Arc::new(Shared {
            local_site: node.site().to_owned(),
            incarnation,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            node,
            config,
            table: table.clone(),
            registry: Mutex::default(),
            acked: Mutex::default(),
            known_sites: Mutex::default(),
            named_slots: Mutex::default(),
            stats: MeshStats::default(),
            shutdown,
            chunks_asked: Mutex::default(),
            notices: broadcast::channel(NOTICE_BOUND).0,
            next_session: AtomicU64::new(0),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(shared.clone(), endpoint.clone()));
        for peer in &shared.config.peers {
            tasks.spawn(dial_loop(shared.clone(), endpoint.clone(), peer.clone()));
        }
        tasks.spawn(refresh_idle_status(shared.clone()));
        Ok(Mesh {
            endpoint,
            table,
            shared: Arc::new(SharedDebug(shared)),
            stop,
            tasks,
        })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The peer status table (shared, live).
    pub fn peers(&self) -> PeerTable {
        self.table.clone()
    }

    pub fn stats(&self) -> &MeshStats {
        &self.shared.0.stats
    }

    /// Closes every connection and waits for the tasks to end.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
        while self.tasks.join_next().await.is_some() {}
        self.endpoint.wait_idle().await;
    }
}

fn check_site(node: &Node, identity: &SiteIdentity) -> Result<(), MeshError> {
    if identity.site() != node.site() {
        return Err(MeshError::SiteMismatch {
            cert: identity.site().to_owned(),
            node: node.site().to_owned(),
        });
    }
    Ok(())
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, endpoint: Endpoint) {
    let mut connections = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = stopped(shared.shutdown.clone()) => break,
        };
        let Some(incoming) = incoming else { break };
        let from = incoming.remote_address();
        let shared = shared.clone();
        connections.spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    shared.stats.refused_connections.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%from, reason = %e, "refused an incoming peer connection");
                    return;
                }
            };
            let site = match tls::peer_site(&conn) {
                Ok(s) => s,
                Err(e) => {
                    shared.stats.refused_connections.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%from, reason = %e, "refused an incoming peer: no usable site name");
                    conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"no site name in certificate");
                    return;
                }
            };
            if site == shared.local_site {
                tracing::debug!(%from, "this site dialed itself (its own address is in its peer list); closed");
                conn.close(VarInt::from_u32(CLOSE_SELF), b"that is us");
                return;
            }
            tracing::info!(%from, peer = %site, "peer connected to us");
            if let Ok(mut known) = shared.known_sites.lock() {
                known.insert(from, site.clone());
            }
            shared.table.remove(&format!("addr:{from}"));
            let named = shared.named_slots.lock().ok().and_then(|n| n.get(&from).cloned());
            if let Some(slot) = named {
                shared.table.remove(&slot);
            }
            let _ = run_connection(&shared, conn, site, false, from.to_string()).await;
        });
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}

async fn dial_loop(shared: Arc<Shared>, endpoint: Endpoint, peer: PeerAddr) {
    let address = peer.to_string();
    let ipv4 = endpoint.local_addr().map(|a| a.is_ipv4()).unwrap_or(true);
    let mut addr = match &peer {
        PeerAddr::Addr(a) => *a,
        PeerAddr::Name { .. } => SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let mut slot = format!("addr:{address}");
    let init = {
        let address = address.clone();
        move || PeerStatus {
            site: None,
            address,
            direction: "outbound",
            connected: false,
            last_error: None,
            ..PeerStatus::default()
        }
    };
    shared.table.update(&slot, init.clone(), |_| {});
    let mut backoff = BACKOFF_START;
    let mut shutdown = shared.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let attempt = async {
            // A name is looked up on every attempt: a restarted container
            // or pod keeps its name, not its address.
            addr = peer.resolve(ipv4).await?;
            if matches!(peer, PeerAddr::Name { .. })
                && slot.starts_with("addr:")
                && let Ok(mut named) = shared.named_slots.lock()
            {
                named.insert(addr, slot.clone());
            }
            let connecting = endpoint.connect(addr, tls::SERVER_NAME).map_err(|e| e.to_string())?;
            match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
            }
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = stopped(shutdown.clone()) => return,
        };
        match result {
            Ok(conn) => match tls::peer_site(&conn) {
                Ok(site) if site == shared.local_site => {
                    // One peer list shared by every site (a compose file,
                    // a Helm chart) names each site itself too.
                    tracing::info!(peer = %address, %addr, "this peer address is this site itself; not dialing it again");
                    conn.close(VarInt::from_u32(CLOSE_SELF), b"that is us");
                    shared.table.remove(&slot);
                    return;
                }
                Ok(site) => {
                    if let Ok(mut known) = shared.known_sites.lock() {
                        known.insert(addr, site.clone());
                    }
                    if slot != site {
                        shared.table.remove(&slot);
                        slot = site.clone();
                    }
                    let started = Instant::now();
                    match run_connection(&shared, conn, site.clone(), true, address.clone()).await {
                        Ok(()) => {}
                        Err(ConnectionOutcome::Duplicate) => {
                            // The peer's own dial is the connection both sides keep:
                            // wait for it to end instead of dialing again.
                            wait_until_inactive(&shared, &site, &mut shutdown).await;
                            continue;
                        }
                    }
                    if started.elapsed() >= STABLE_SESSION {
                        backoff = BACKOFF_START;
                    }
                }
                Err(e) => {
                    tracing::warn!(%addr, reason = %e, "refused peer: no usable site name in its certificate");
                    conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"no site name in certificate");
                }
            },
            Err(reason) => {
                shared.stats.refused_connections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %address, %reason, retry_in = ?backoff, "cannot connect to peer");
                shared
                    .table
                    .update(&slot, init.clone(), |s| s.last_error = Some(reason));
            }
        }
        // Full jitter over the upper half, so restarted sites do not dial in lockstep.
        let sleep = match shared.rng.lock() {
            Ok(mut rng) => rng.random_range(backoff / 2..=backoff),
            Err(_) => backoff,
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = stopped(shutdown.clone()) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn wait_until_inactive(shared: &Shared, site: &str, shutdown: &mut watch::Receiver<bool>) {
    loop {
        let active = shared
            .registry
            .lock()
            .map(|r| r.by_site.contains_key(site))
            .unwrap_or(false);
        if !active || *shutdown.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

enum ConnectionOutcome {
    Duplicate,
}

/// Opens the sync stream and exchanges hellos; then registers the
/// connection as the one for `site` (or closes it as a duplicate), runs its
/// sync session to the end and unregisters it.
async fn run_connection(
    shared: &Arc<Shared>,
    conn: Connection,
    site: String,
    dialed_by_us: bool,
    address: String,
) -> Result<(), ConnectionOutcome> {
    // Which connection to keep depends on the peer's incarnation, which its
    // hello carries, so the hellos come before the registration.
    let opening = tokio::time::timeout(HELLO_TIMEOUT, open_session(shared, &conn, &site, dialed_by_us));
    let opened = tokio::select! {
        r = opening => r.unwrap_or(Err(SessionEnd::NoHello)),
        _ = stopped(shared.shutdown.clone()) => Err(SessionEnd::Shutdown),
    };
    let opened = match opened {
        Ok(o) => o,
        Err(end) => {
            close_for(shared, &conn, &site, &end);
            return Ok(());
        }
    };
    let id = match register(shared, &conn, &site, dialed_by_us, opened.incarnation) {
        Some(id) => id,
        None => {
            tracing::debug!(peer = %site, "closing a duplicate connection");
            conn.close(VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate connection");
            return Err(ConnectionOutcome::Duplicate);
        }
    };
    shared.stats.sessions_started.fetch_add(1, Ordering::Relaxed);
    let direction = if dialed_by_us { "outbound" } else { "inbound" };
    shared.table.update(
        &site,
        || PeerStatus {
            site: Some(site.clone()),
            address: address.clone(),
            direction,
            connected: true,
            last_error: None,
            ..PeerStatus::default()
        },
        |s| {
            s.site = Some(site.clone());
            s.connected = true;
            if dialed_by_us || s.direction == "inbound" {
                s.address = address.clone();
            }
        },
    );
    let end = run_session(shared, &conn, &site, opened).await;
    close_for(shared, &conn, &site, &end);
    let was_active = shared
        .registry
        .lock()
        .map(|mut r| r.by_site.get(&site).is_some_and(|a| a.id == id) && r.by_site.remove(&site).is_some())
        .unwrap_or(false);
    if was_active {
        shared.table.update(
            &site,
            || unreachable_status(&site),
            |s| {
                s.connected = false;
                s.last_error = Some(end.to_string());
            },
        );
    }
    Ok(())
}

/// Logs and counts why a session ended, and closes its connection with the
/// matching code.
fn close_for(shared: &Shared, conn: &Connection, site: &str, end: &SessionEnd) {
    let (code, reason) = match end {
        SessionEnd::Shutdown => (CLOSE_SHUTDOWN, "shutting down"),
        SessionEnd::Protocol(_) => (CLOSE_PROTOCOL, "protocol error"),
        SessionEnd::Refused(_) => (CLOSE_REFUSED_CHANGES, "changes refused"),
        SessionEnd::Frame(_) => (CLOSE_FRAME, "bad frame"),
        SessionEnd::NoHello => (CLOSE_PROTOCOL, "no hello"),
        _ => (CLOSE_SHUTDOWN, "session ended"),
    };
    match end {
        SessionEnd::Shutdown => tracing::info!(peer = %site, "session ended: shutting down"),
        SessionEnd::Connection(e) => tracing::info!(peer = %site, reason = %e, "peer connection lost"),
        SessionEnd::Protocol(_) | SessionEnd::Frame(_) | SessionEnd::Refused(_) | SessionEnd::NoHello => {
            shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(peer = %site, reason = %end, "closing the session with the peer");
        }
        other => tracing::warn!(peer = %site, reason = %other, "session ended"),
    }
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

fn unreachable_status(site: &str) -> PeerStatus {
    PeerStatus {
        site: Some(site.to_owned()),
        address: String::new(),
        direction: "inbound",
        connected: false,
        last_error: None,
        ..PeerStatus::default()
    }
}

/// Which of two connections with one peer site to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Existing,
    New,
}

/// The one-connection-per-pair rule, decided alike on both sides: a
/// connection to a newer run of the peer (greater incarnation) beats one to
/// an older run, whose process is gone (a killed site's connection lingers
/// at its peers until the idle timeout); between connections to the same
/// run, the one dialed by the site whose name sorts first wins, and of two
/// dialed the same way the existing one stays.
fn keep(local_site: &str, peer_site: &str, existing: (u64, bool), new: (u64, bool)) -> Keep {
    let ((old_inc, old_dialed_by_us), (new_inc, new_dialed_by_us)) = (existing, new);
    match new_inc.cmp(&old_inc) {
        std::cmp::Ordering::Greater => Keep::New,
        std::cmp::Ordering::Less => Keep::Existing,
        std::cmp::Ordering::Equal => {
            let we_win_ties = local_site < peer_site;
            let preferred = |dialed_by_us: bool| dialed_by_us == we_win_ties;
            if preferred(old_dialed_by_us) || !preferred(new_dialed_by_us) {
                Keep::Existing
            } else {
                Keep::New
            }
        }
    }
}

/// Makes `conn` the active connection for `site`, or returns `None` when
/// the existing one is the one to keep (see [`keep`]).
fn register(shared: &Shared, conn: &Connection, site: &str, dialed_by_us: bool, incarnation: u64) -> Option<u64> {
    let mut r = shared.registry.lock().ok()?;
    if let Some(existing) = r.by_site.get(site) {
        let decision = keep(
            &shared.local_site,
            site,
            (existing.incarnation, existing.dialed_by_us),
            (incarnation, dialed_by_us),
        );
        if decision == Keep::Existing {
            if incarnation < existing.incarnation {
                tracing::warn!(peer = %site, incarnation, kept = existing.incarnation, "refusing a connection from an older run of the peer");
            }
            return None;
        }
        if incarnation > existing.incarnation {
            shared.stats.superseded_connections.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %site, old = existing.incarnation, new = incarnation, "the peer restarted: replacing the connection to its old run");
            existing
                .conn
                .close(VarInt::from_u32(CLOSE_SUPERSEDED), b"superseded by a newer run");
        } else {
            existing
                .conn
                .close(VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate connection");
        }
    }
    r.next_id += 1;
    let id = r.next_id;
    r.by_site.insert(
        site.to_owned(),
        Active {
            id,
            dialed_by_us,
            incarnation,
            conn: conn.clone(),
        },
    );
    Some(id)
}

/// A sync stream whose hellos have been exchanged.
struct Opened {
    send: SendStream,
    recv: RecvStream,
    session: SyncSession,
    local: watch::Receiver<VersionVector>,
    /// Outputs of `open` other than the hello, and what the peer's first
    /// frame (its hello) yields.
    pending: VecDeque<Output>,
    incarnation: u64,
    notices: broadcast::Receiver<Notice>,
    session_id: u64,
}

/// Opens the sync stream (the dialer opens it), sends our hello with our
/// incarnation and reads the peer's first frame.
async fn open_session(
    shared: &Arc<Shared>,
    conn: &Connection,
    site: &str,
    dialed_by_us: bool,
) -> Result<Opened, SessionEnd> {
    let (mut send, mut recv) = if dialed_by_us {
        conn.open_bi().await?
    } else {
        conn.accept_bi().await?
    };
    let mut local = shared.node.subscribe();
    // Before the withheld set is read, so no stub received meanwhile is missed.
    let notices = shared.notices.subscribe();
    let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let policy = peer_policy(shared, site).await.map_err(SessionEnd::Store)?;
    let reader = shared.node.clone();
    let withheld = off_runtime(move || reader.withheld(MAX_HELLO_RANGES))
        .await
        .map_err(SessionEnd::Store)?;
    let mut session = SyncSession::new(
        shared.config.session.clone(),
        shared.local_site.clone(),
        local.borrow_and_update().clone(),
    )
    .with_policy(policy)
    .with_withheld(withheld);
    let mut pending = VecDeque::new();
    for out in session.open() {
        match out {
            Output::Send(Frame {
                kind: Some(Kind::Hello(hello)),
            }) => {
                let bytes = encode_hello_frame(&hello, shared.incarnation)?;
                if let Some(tap) = &shared.config.tap {
                    (tap.0)(site, &bytes);
                }
                send.write_all(&bytes).await?;
                shared.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                shared.stats.bytes_sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            other => pending.push_back(other),
        }
    }
    let mut buf = Vec::new();
    let first = read_frame(&mut recv, &mut buf).await?.ok_or(SessionEnd::StreamEnded)?;
    shared.stats.frames_received.fetch_add(1, Ordering::Relaxed);
    shared
        .stats
        .bytes_received
        .fetch_add(4 + buf.len() as u64, Ordering::Relaxed);
    let incarnation = incarnation_of(&buf);
    tracing::debug!(peer = %site, incarnation, "hello from the peer");
    fold_local_update(&mut session, &mut local, &mut pending);
    pending.extend(session.handle(Input::Frame(first), now_ms()));
    Ok(Opened {
        send,
        recv,
        session,
        local,
        pending,
        incarnation,
        notices,
        session_id,
    })
}

/// Hands the session a local update waiting on the node's watch. Called
/// before every frame from the peer: the session judges the peer's claims
/// against what it knows this site holds, and a change of ours can reach
/// the peer through a third site before the update is taken from the watch
/// in the driver's `select!` (or while the hello was on its way).
fn fold_local_update(
    session: &mut SyncSession,
    local: &mut watch::Receiver<VersionVector>,
    pending: &mut VecDeque<Output>,
) {
    if local.has_changed().unwrap_or(false) {
        let vv = local.borrow_and_update().clone();
        pending.extend(session.handle(Input::LocalAdvanced(vv), now_ms()));
    }
}

/// Runs the sync session over the opened stream.
async fn run_session(shared: &Arc<Shared>, conn: &Connection, site: &str, opened: Opened) -> SessionEnd {
    let config = &shared.config.session;
    // The peer can have at most its window of batches and acks for ours in
    // flight, plus its hello: with this bound the reader never waits on us
    // while we wait on the peer.
    let inbound_bound = (config.max_in_flight as usize) * 2 + 2;
    let (frames_tx, frames_rx) = mpsc::channel(inbound_bound);
    let Opened {
        send,
        recv,
        session,
        local,
        pending,
        notices,
        session_id,
        ..
    } = opened;
    let reader = tokio::spawn(read_frames(recv, frames_tx));
    let end = drive(
        shared,
        conn,
        site,
        send,
        frames_rx,
        session,
        local,
        pending,
        (notices, session_id),
    )
    .await;
    reader.abort();
    end
}

/// A frame read from the peer, with its size on the wire.
type Received = Result<(Frame, usize), FrameError>;

async fn read_frames(mut recv: RecvStream, tx: mpsc::Sender<Received>) {
    let mut buf = Vec::new();
    loop {
        let r = read_frame(&mut recv, &mut buf).await;
        let last = !matches!(r, Ok(Some(_)));
        let item = match r {
            Ok(Some(f)) => Ok((f, 4 + buf.len())),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    shared: &Arc<Shared>,
    conn: &Connection,
    site: &str,
    mut send: SendStream,
    mut frames: mpsc::Receiver<Received>,
    mut session: SyncSession,
    mut local: watch::Receiver<VersionVector>,
    mut pending: VecDeque<Output>,
    (mut notices, session_id): (broadcast::Receiver<Notice>, u64),
) -> SessionEnd {
    let node = &shared.node;
    let mut shutdown = shared.shutdown.clone();
    let mut chunk_poll = tokio::time::interval(CHUNK_POLL);
    chunk_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut policy_at = Instant::now();
    let mut withheld_counted = 0u64;
    let mut full_counted = 0u64;
    // Batches in the node's writer, oldest first: each answers once
    // durable. The session bounds them (`accepts_frames`).
    let mut applying: VecDeque<(u64, Applying)> = VecDeque::new();
    loop {
        while let Some(out) = pending.pop_front() {
            if matches!(out, Output::Fetch(_) | Output::FetchRanges(_)) && policy_at.elapsed() >= POLICY_TTL {
                // The peer's roles may have changed: decide on fresh ones.
                match peer_policy(shared, site).await {
                    Ok(p) => session.set_policy(p),
                    Err(e) => return SessionEnd::Store(e),
                }
                policy_at = Instant::now();
            }
            match out {
                Output::Send(f) => match write_frame_tapped(shared, site, &mut send, &f).await {
                    Ok(n) => {
                        shared.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                        shared.stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(FrameError::Io(e)) => return SessionEnd::Store(format!("sending to peer: {e}")),
                    Err(e) => return SessionEnd::Frame(e),
                },
                Output::Fetch(req) => {
                    let reader = node.clone();
                    let changes = match off_runtime(move || reader.read_changes(&req)).await {
                        Ok(c) => c,
                        Err(e) => return SessionEnd::Store(e),
                    };
                    pending.extend(session.handle(Input::Fetched(changes), now_ms()));
                }
                Output::FetchRanges(req) => {
                    let reader = node.clone();
                    let changes = match off_runtime(move || reader.read_change_ranges(&req)).await {
                        Ok(c) => c,
                        Err(e) => return SessionEnd::Store(e),
                    };
                    pending.extend(session.handle(Input::FetchedRanges(changes), now_ms()));
                }
                Output::Apply { batch, changes } => applying.push_back((batch, submit_apply(node, changes).await)),
                Output::PeerHas(vv) => {
                    if let Ok(mut acked) = shared.acked.lock() {
                        acked.entry(site.to_owned()).or_default().merge(&vv);
                    }
                }
                Output::ReadChunk(hash) => {
                    let reader = node.clone();
                    let policy = session.policy().clone();
                    // Only chunks of a file the peer may receive: `Err(())`
                    // when no such file lists it.
                    let read = move || -> Result<Result<Option<Vec<u8>>, ()>, ocmesh_node::ReadError> {
                        let files = reader.files_with_chunk(&hash)?;
                        let readable = files.iter().any(|f| {
                            ocmesh_replication::filter::decide_doc(ocmesh_node::files::FILES, Some(f), &policy).is_ok()
                        });
                        if !readable {
                            return Ok(Err(()));
                        }
                        reader.read_chunk(&hash).map(Ok)
                    };
                    let data = match off_runtime(read).await {
                        Ok(Ok(d)) => d,
                        Ok(Err(())) => {
                            shared.stats.chunks_withheld.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(peer = %site, hash = %hex_hash(&hash), "peer asked for a chunk of no file it may read");
                            None
                        }
                        Err(e) => return SessionEnd::Store(e),
                    };
                    pending.extend(session.handle(Input::ChunkRead { hash, data }, now_ms()));
                }
                Output::StoreChunk { hash, data } => match node.receive_chunk(hash, data).await {
                    Ok(()) => {
                        shared.stats.chunks_stored.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        // The session already checked the hash: this is the store failing.
                        shared.stats.chunks_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %site, error = %e, "could not store a chunk from the peer");
                    }
                },
                Output::Close(e) => return SessionEnd::Protocol(e),
            }
        }
        let stats = session.stats().clone();
        let unacked = session.unacked();
        let wire = conn.stats();
        shared
            .stats
            .changes_withheld
            .fetch_add(stats.withheld - withheld_counted, Ordering::Relaxed);
        withheld_counted = stats.withheld;
        shared
            .stats
            .applying_full
            .fetch_add(stats.applying_full - full_counted, Ordering::Relaxed);
        full_counted = stats.applying_full;
        shared
            .stats
            .applying_peak
            .fetch_max(stats.applying_peak, Ordering::Relaxed);
        shared.table.update(
            site,
            || unreachable_status(site),
            |s| {
                s.unacked = unacked;
                s.changes_sent = stats.changes_sent;
                s.changes_received = stats.changes_received;
                s.wire_bytes_sent = wire.udp_tx.bytes;
                s.wire_bytes_received = wire.udp_rx.bytes;
                s.wire_packets_lost = wire.path.lost_packets;
                s.changes_withheld = stats.withheld;
                s.stubs_received = stats.stubs_received;
                s.refilled = stats.refilled;
            },
        );
        let accepts_frames = session.accepts_frames();
        tokio::select! {
            // The oldest batch only: acks go out in batch order.
            applied = next_applied(&mut applying) => {
                let Some((batch, _)) = applying.pop_front() else {
                    continue;
                };
                let report = match applied {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => return SessionEnd::Refused(e),
                    Err(e) => return SessionEnd::Store(e.to_string()),
                };
                tracing::trace!(peer = %site, batch, applied = report.applied, duplicates = report.duplicates, "applied batch");
                if !report.new_stubs.is_empty() || !report.filled_ranges.is_empty() {
                    // No receiver is no error: no other session is up.
                    let _ = shared.notices.send(Notice {
                        from: session_id,
                        stubs: report.new_stubs,
                        filled: report.filled_ranges,
                    });
                }
                // The writer publishes its vector only once a group is
                // durable, so this holds at least this batch, maybe later
                // ones too: all of it durable, so all of it may be acked.
                let have = node.version_vector();
                pending.extend(session.handle(Input::Applied { batch, have }, now_ms()));
            }
            frame = frames.recv(), if accepts_frames => match frame {
                Some(Ok((f, n))) => {
                    shared.stats.frames_received.fetch_add(1, Ordering::Relaxed);
                    shared.stats.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                    fold_local_update(&mut session, &mut local, &mut pending);
                    pending.extend(session.handle(Input::Frame(f), now_ms()));
                }
                Some(Err(e)) => return SessionEnd::Frame(e),
                None => {
                    return match conn.close_reason() {
                        Some(e) => SessionEnd::Connection(e),
                        None => SessionEnd::StreamEnded,
                    };
                }
            },
            changed = local.changed() => {
                if changed.is_err() {
                    return SessionEnd::Shutdown;
                }
                let vv = local.borrow_and_update().clone();
                pending.extend(session.handle(Input::LocalAdvanced(vv), now_ms()));
            }
            notice = notices.recv() => match notice {
                Ok(n) if n.from != session_id => {
                    if !n.stubs.is_empty() {
                        pending.extend(session.handle(Input::LocalWithheld(n.stubs), now_ms()));
                    }
                    if !n.filled.is_empty() {
                        pending.extend(session.handle(Input::Offer(n.filled), now_ms()));
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(peer = %site, missed, "missed stub notices; the peer's next hello asks again");
                }
                Err(broadcast::error::RecvError::Closed) => return SessionEnd::Shutdown,
            },
            _ = chunk_poll.tick() => {
                let wanted = match chunks_to_ask(shared).await {
                    Ok(w) => w,
                    Err(e) => return SessionEnd::Store(e),
                };
                if !wanted.is_empty() {
                    pending.extend(session.handle(Input::ChunksWanted(wanted), now_ms()));
                }
            }
            e = conn.closed() => return SessionEnd::Connection(e),
            _ = shutdown.changed() => return SessionEnd::Shutdown,
        }
    }
}

/// A batch in the node's writer: answers once it is durable (or refused).
type Applying = JoinHandle<Result<ApplyReport, WriteError>>;

/// Hands a batch to the node's writer and returns once it is queued there,
/// so the next batch can follow while the writer works on this one.
///
/// `Node::apply` pre-parses the bodies and sends the batch to the writer's
/// queue in its first poll (tokio's bounded channel serves senders in the
/// order they first asked), so the next batch, submitted after this
/// returns, lands behind it; the writer answers in queue order, each once
/// its group is durable. Were the order ever lost, the writer would refuse
/// the later batch as leaving a gap, never write it out of order.
///
/// Run on a blocking thread, like the reads: under a simulated paused clock
/// (turmoil) time then stands still while the writer works, instead of
/// running on.
async fn submit_apply(node: &Node, changes: Vec<Change>) -> Applying {
    let applier = node.clone();
    let rt = tokio::runtime::Handle::current();
    let (queued_tx, queued_rx) = oneshot::channel();
    let task = tokio::task::spawn_blocking(move || {
        rt.block_on(async move {
            let mut apply = std::pin::pin!(applier.apply(changes));
            let first = std::future::poll_fn(|cx| std::task::Poll::Ready(apply.as_mut().poll(cx))).await;
            // The receiver may be gone with its session; the batch goes on.
            let _ = queued_tx.send(());
            match first {
                std::task::Poll::Ready(r) => r,
                std::task::Poll::Pending => apply.await,
            }
        })
    });
    // An error here means the task ended without queueing (it panicked);
    // its handle reports that.
    let _ = queued_rx.await;
    task
}

/// The answer for the oldest batch in the writer; pending while none is.
async fn next_applied(
    applying: &mut VecDeque<(u64, Applying)>,
) -> Result<Result<ApplyReport, WriteError>, tokio::task::JoinError> {
    match applying.front_mut() {
        Some((_, task)) => task.await,
        None => std::future::pending().await,
    }
}

fn hex_hash(hash: &ChunkHash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a frame, showing it to the tap first if there is one.
async fn write_frame_tapped(
    shared: &Shared,
    site: &str,
    send: &mut SendStream,
    f: &Frame,
) -> Result<usize, FrameError> {
    if let Some(tap) = &shared.config.tap {
        let bytes = crate::frame::encode_frame(f)?;
        (tap.0)(site, &bytes);
    }
    write_frame(send, f).await
}

/// What may go to `site` in full: its share settings and its principal's
/// roles as this site's role documents say now.
async fn peer_policy(shared: &Arc<Shared>, site: &str) -> Result<PeerPolicy, String> {
    let share = shared.config.sharing.get(site).cloned().unwrap_or_default();
    let reader = shared.node.clone();
    let name = site.to_owned();
    let who = off_runtime(move || reader.site_principal(&name)).await?;
    let admin = who.is_admin();
    Ok(PeerPolicy::new(share, site, who.roles, admin))
}

/// Runs a store read on tokio's blocking pool; either failure as text.
async fn off_runtime<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    read: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(read).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Chunks this site lacks that no other session has asked for lately.
async fn chunks_to_ask(shared: &Arc<Shared>) -> Result<Vec<ChunkHash>, String> {
    let reader = shared.node.clone();
    let wanted = off_runtime(move || reader.wanted_chunks(4 * MAX_WANTED)).await?;
    if wanted.is_empty() {
        return Ok(wanted);
    }
    let now = Instant::now();
    let mut asked = shared
        .chunks_asked
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    asked.retain(|_, at| now.duration_since(*at) < CHUNK_ASK_TTL);
    let fresh: Vec<ChunkHash> = wanted.into_iter().filter(|h| !asked.contains_key(h)).collect();
    for h in &fresh {
        asked.insert(*h, now);
    }
    Ok(fresh)
}

/// Keeps `unacked` of peers without a session current as local writes go on.
async fn refresh_idle_status(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        let local = shared.node.version_vector();
        let acked = shared.acked.lock().map(|a| a.clone()).unwrap_or_default();
        for status in shared.table.snapshot() {
            if status.connected {
                continue;
            }
            if let Some(site) = &status.site {
                let have = acked.get(site).cloned().unwrap_or_default();
                shared.table.update(
                    site,
                    || unreachable_status(site),
                    |s| s.unacked = local.missing_from(&have),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Keep, keep};

    /// Registers connections in arrival order as `register` does; returns
    /// the index of the one left active.
    fn survivor(local: &str, peer: &str, arrivals: &[(usize, u64, bool)]) -> Option<usize> {
        let mut active: Option<(usize, u64, bool)> = None;
        for &(i, inc, dialed_by_us) in arrivals {
            match active {
                Some((_, old_inc, old_dialed))
                    if keep(local, peer, (old_inc, old_dialed), (inc, dialed_by_us)) == Keep::Existing => {}
                _ => active = Some((i, inc, dialed_by_us)),
            }
        }
        active.map(|(i, _, _)| i)
    }

    #[test]
    fn both_sides_keep_the_same_connection_in_any_arrival_order() {
        // Connection 0 dialed by a, 1 dialed by b, between runs 7 of a and 9 of b.
        let at_a = [(0, 9, true), (1, 9, false)];
        let at_b = [(0, 7, false), (1, 7, true)];
        for a_order in [[0, 1], [1, 0]] {
            for b_order in [[0, 1], [1, 0]] {
                let a = survivor("a", "b", &a_order.map(|i| at_a[i]));
                let b = survivor("b", "a", &b_order.map(|i| at_b[i]));
                assert_eq!(a, Some(0), "the connection dialed by the first name wins");
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn a_newer_run_replaces_an_older_one_whoever_dialed() {
        for old_dialed in [true, false] {
            for new_dialed in [true, false] {
                for (local, peer) in [("a", "b"), ("b", "a")] {
                    assert_eq!(keep(local, peer, (5, old_dialed), (6, new_dialed)), Keep::New);
                    assert_eq!(keep(local, peer, (6, old_dialed), (5, new_dialed)), Keep::Existing);
                }
            }
        }
        // A peer that does not send an incarnation (0) is replaced by its
        // restarted, newer self.
        assert_eq!(keep("b", "a", (0, false), (1_764_000_000_000_000, false)), Keep::New);
    }
}
