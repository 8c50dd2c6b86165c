//! The mesh: one QUIC endpoint per site that accepts peers and dials the
//! configured ones, and one sync session per connected peer.
//!
//! The shell around `ocmesh_replication::SyncSession`: it turns the
//! session's outputs into stream writes and store reads and writes, and
//! stream frames, local commits and timers into session inputs. One
//! connection per peer pair is kept: when both sides dial each other, the
//! connection dialed by the site whose name sorts first wins on both sides.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use ocmesh_node::Node;
use ocmesh_proto::federation::Frame;
use ocmesh_replication::chunks::{Hash as ChunkHash, MAX_WANTED};
use ocmesh_replication::{Input, Output, SessionConfig, SyncSession, VersionVector};

use crate::frame::{FrameError, read_frame, write_frame};
use crate::status::{PeerStatus, PeerTable};
use crate::tls::{self, SiteIdentity, TlsError};

/// QUIC application close codes.
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_DUPLICATE: u32 = 1;
const CLOSE_PROTOCOL: u32 = 2;
const CLOSE_REFUSED_CHANGES: u32 = 3;
const CLOSE_FRAME: u32 = 4;
const CLOSE_SELF: u32 = 5;

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the dial backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a site joins the mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub listen: SocketAddr,
    pub peers: Vec<SocketAddr>,
    pub session: SessionConfig,
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
    /// Chunks received from peers and stored.
    pub chunks_stored: AtomicU64,
    /// Chunks a peer sent that the store refused.
    pub chunks_refused: AtomicU64,
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
    conn: Connection,
}

struct Shared {
    node: Node,
    local_site: String,
    config: MeshConfig,
    table: PeerTable,
    registry: Mutex<Registry>,
    /// What each peer last acknowledged, for the status of idle peers.
    acked: Mutex<HashMap<String, VersionVector>>,
    /// Site names learnt per address (quinn answers and dials from one
    /// socket, so a peer that dialed us from R listens on R): lets a dialer
    /// that has not got through yet report under the peer's name.
    known_sites: Mutex<HashMap<SocketAddr, String>>,
    stats: MeshStats,
    shutdown: watch::Receiver<bool>,
    /// Chunks some session has asked its peer for, and when: another
    /// session does not ask for them too until `CHUNK_ASK_TTL` has passed,
    /// so a missing chunk comes over one link only.
    chunks_asked: Mutex<HashMap<ChunkHash, Instant>>,
}

/// How long one session's ask for a chunk keeps other sessions from asking.
const CHUNK_ASK_TTL: Duration = Duration::from_secs(10);
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

impl Mesh {
    /// Binds the endpoint and starts accepting and dialing.
    pub fn start(node: Node, identity: &SiteIdentity, config: MeshConfig) -> Result<Mesh, MeshError> {
        if identity.site() != node.site() {
            return Err(MeshError::SiteMismatch {
                cert: identity.site().to_owned(),
                node: node.site().to_owned(),
            });
        }
        let mut endpoint =
            Endpoint::server(tls::server_config(identity)?, config.listen).map_err(|source| MeshError::Bind {
                addr: config.listen,
                source,
            })?;
        endpoint.set_default_client_config(tls::client_config(identity)?);
        let (stop, shutdown) = watch::channel(false);
        let table = PeerTable::default();
        let shared = Arc::new(Shared {
            local_site: node.site().to_owned(),
            node,
            config,
            table: table.clone(),
            registry: Mutex::default(),
            acked: Mutex::default(),
            known_sites: Mutex::default(),
            stats: MeshStats::default(),
            shutdown,
            chunks_asked: Mutex::default(),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(shared.clone(), endpoint.clone()));
        for &addr in &shared.config.peers {
            tasks.spawn(dial_loop(shared.clone(), endpoint.clone(), addr));
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
            tracing::info!(%from, peer = %site, "peer connected to us");
            if let Ok(mut known) = shared.known_sites.lock() {
                known.insert(from, site.clone());
            }
            shared.table.remove(&format!("addr:{from}"));
            let _ = run_connection(&shared, conn, site, false, from.to_string()).await;
        });
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}

async fn dial_loop(shared: Arc<Shared>, endpoint: Endpoint, addr: SocketAddr) {
    let address = addr.to_string();
    let mut slot = format!("addr:{address}");
    let init = {
        let address = address.clone();
        move || PeerStatus {
            site: None,
            address,
            direction: "outbound",
            connected: false,
            unacked: 0,
            changes_sent: 0,
            changes_received: 0,
            last_error: None,
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
                    tracing::error!(%addr, "peer address answers with this site's own certificate; not syncing with ourselves");
                    conn.close(VarInt::from_u32(CLOSE_SELF), b"that is us");
                    backoff = BACKOFF_MAX;
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
                tracing::warn!(%addr, %reason, retry_in = ?backoff, "cannot connect to peer");
                shared
                    .table
                    .update(&slot, init.clone(), |s| s.last_error = Some(reason));
            }
        }
        // Full jitter over the upper half, so restarted sites do not dial in lockstep.
        let sleep = rand::rng().random_range(backoff / 2..=backoff);
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

/// Registers the connection as the one for `site` (or closes it as a
/// duplicate), runs its sync session to the end and unregisters it.
async fn run_connection(
    shared: &Arc<Shared>,
    conn: Connection,
    site: String,
    dialed_by_us: bool,
    address: String,
) -> Result<(), ConnectionOutcome> {
    let id = match register(shared, &conn, &site, dialed_by_us) {
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
            unacked: 0,
            changes_sent: 0,
            changes_received: 0,
            last_error: None,
        },
        |s| {
            s.site = Some(site.clone());
            s.connected = true;
            if dialed_by_us || s.direction == "inbound" {
                s.address = address.clone();
            }
        },
    );
    let end = run_session(shared, &conn, &site, dialed_by_us).await;
    let (code, reason) = match &end {
        SessionEnd::Shutdown => (CLOSE_SHUTDOWN, "shutting down"),
        SessionEnd::Protocol(_) => (CLOSE_PROTOCOL, "protocol error"),
        SessionEnd::Refused(_) => (CLOSE_REFUSED_CHANGES, "changes refused"),
        SessionEnd::Frame(_) => (CLOSE_FRAME, "bad frame"),
        _ => (CLOSE_SHUTDOWN, "session ended"),
    };
    match &end {
        SessionEnd::Shutdown => tracing::info!(peer = %site, "session ended: shutting down"),
        SessionEnd::Connection(e) => tracing::info!(peer = %site, reason = %e, "peer connection lost"),
        SessionEnd::Protocol(_) | SessionEnd::Frame(_) | SessionEnd::Refused(_) => {
            shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(peer = %site, reason = %end, "closing the session with the peer");
        }
        other => tracing::warn!(peer = %site, reason = %other, "session ended"),
    }
    conn.close(VarInt::from_u32(code), reason.as_bytes());
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

fn unreachable_status(site: &str) -> PeerStatus {
    PeerStatus {
        site: Some(site.to_owned()),
        address: String::new(),
        direction: "inbound",
        connected: false,
        unacked: 0,
        changes_sent: 0,
        changes_received: 0,
        last_error: None,
    }
}

/// Makes `conn` the active connection for `site`, or returns `None` when
/// the existing one is the one to keep. Both sites decide alike: the
/// connection dialed by the site whose name sorts first wins.
fn register(shared: &Shared, conn: &Connection, site: &str, dialed_by_us: bool) -> Option<u64> {
    let mut r = shared.registry.lock().ok()?;
    let we_win_ties = shared.local_site.as_str() < site;
    let preferred = |dialed_by_us: bool| dialed_by_us == we_win_ties;
    if let Some(existing) = r.by_site.get(site) {
        if preferred(existing.dialed_by_us) || !preferred(dialed_by_us) {
            return None;
        }
        existing
            .conn
            .close(VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate connection");
    }
    r.next_id += 1;
    let id = r.next_id;
    r.by_site.insert(
        site.to_owned(),
        Active {
            id,
            dialed_by_us,
            conn: conn.clone(),
        },
    );
    Some(id)
}

/// Runs the sync session over one bidirectional stream: the dialer opens it.
async fn run_session(shared: &Arc<Shared>, conn: &Connection, site: &str, dialed_by_us: bool) -> SessionEnd {
    let streams = if dialed_by_us {
        conn.open_bi().await
    } else {
        conn.accept_bi().await
    };
    let (send, recv) = match streams {
        Ok(s) => s,
        Err(e) => return SessionEnd::Connection(e),
    };
    let config = shared.config.session.clone();
    // The peer can have at most its window of batches and acks for ours in
    // flight, plus its hello: with this bound the reader never waits on us
    // while we wait on the peer.
    let inbound_bound = (config.max_in_flight as usize) * 2 + 2;
    let (frames_tx, frames_rx) = mpsc::channel(inbound_bound);
    let reader = tokio::spawn(read_frames(recv, frames_tx));
    let end = drive(shared, conn, site, send, frames_rx, config).await;
    reader.abort();
    end
}

async fn read_frames(mut recv: RecvStream, tx: mpsc::Sender<Result<Frame, FrameError>>) {
    let mut buf = Vec::new();
    loop {
        let r = read_frame(&mut recv, &mut buf).await;
        let last = !matches!(r, Ok(Some(_)));
        let item = match r {
            Ok(Some(f)) => Ok(f),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

async fn drive(
    shared: &Arc<Shared>,
    conn: &Connection,
    site: &str,
    mut send: SendStream,
    mut frames: mpsc::Receiver<Result<Frame, FrameError>>,
    config: SessionConfig,
) -> SessionEnd {
    let node = &shared.node;
    let mut local = node.subscribe();
    let mut session = SyncSession::new(config, shared.local_site.clone(), local.borrow_and_update().clone());
    let mut pending: VecDeque<Output> = session.open().into();
    let mut shutdown = shared.shutdown.clone();
    let mut chunk_poll = tokio::time::interval(CHUNK_POLL);
    chunk_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while let Some(out) = pending.pop_front() {
            match out {
                Output::Send(f) => match write_frame(&mut send, &f).await {
                    Ok(n) => {
                        shared.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                        shared.stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(FrameError::Io(e)) => return SessionEnd::Store(format!("sending to peer: {e}")),
                    Err(e) => return SessionEnd::Frame(e),
                },
                Output::Fetch(req) => {
                    let reader = node.clone();
                    let read = tokio::task::spawn_blocking(move || reader.read_changes(&req)).await;
                    let changes = match read {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => return SessionEnd::Store(e.to_string()),
                        Err(e) => return SessionEnd::Store(e.to_string()),
                    };
                    pending.extend(session.handle(Input::Fetched(changes), now_ms()));
                }
                Output::Apply { batch, changes } => {
                    let report = match node.apply(changes).await {
                        Ok(r) => r,
                        Err(e) => return SessionEnd::Refused(e),
                    };
                    tracing::trace!(peer = %site, batch, applied = report.applied, duplicates = report.duplicates, "applied batch");
                    let have = node.version_vector();
                    pending.extend(session.handle(Input::Applied { batch, have }, now_ms()));
                }
                Output::PeerHas(vv) => {
                    if let Ok(mut acked) = shared.acked.lock() {
                        acked.entry(site.to_owned()).or_default().merge(&vv);
                    }
                }
                Output::ReadChunk(hash) => {
                    let reader = node.clone();
                    let data = match tokio::task::spawn_blocking(move || reader.read_chunk(&hash)).await {
                        Ok(Ok(d)) => d,
                        Ok(Err(e)) => return SessionEnd::Store(e.to_string()),
                        Err(e) => return SessionEnd::Store(e.to_string()),
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
        shared.table.update(
            site,
            || unreachable_status(site),
            |s| {
                s.unacked = unacked;
                s.changes_sent = stats.changes_sent;
                s.changes_received = stats.changes_received;
            },
        );
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(Ok(f)) => {
                    shared.stats.frames_received.fetch_add(1, Ordering::Relaxed);
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

/// Chunks this site lacks that no other session has asked for lately.
async fn chunks_to_ask(shared: &Arc<Shared>) -> Result<Vec<ChunkHash>, String> {
    let reader = shared.node.clone();
    let wanted = tokio::task::spawn_blocking(move || reader.wanted_chunks(4 * MAX_WANTED))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
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
