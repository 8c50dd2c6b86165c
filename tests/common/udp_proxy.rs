//! A UDP fault proxy on loopback for the mesh tests.
//!
//! One [`UdpProxy`] stands on one directed dial path X→Y: X's `--peer`
//! points at the proxy's address, and the proxy forwards each datagram to
//! Y's real mesh address from an upstream socket of its own (one per client
//! source address), relaying Y's replies back to the client. Both directions
//! pass the same faults, which can be changed while traffic flows:
//! a drop probability (drawn from a seeded RNG), an added delay with jitter
//! (so datagrams may overtake each other), and a cut that drops everything,
//! including datagrams already held for delay.
//!
//! Everything is bounded: at most [`MAX_CLIENTS`] upstream sockets, at most
//! [`MAX_HELD`] datagrams held for delay (more are dropped and counted), and
//! a bounded channel between the receiving tasks and the one task that
//! releases held datagrams in due order.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Upstream sockets per proxy (one per client source address).
pub const MAX_CLIENTS: usize = 16;
/// Datagrams held for delay per proxy; beyond this they are dropped.
pub const MAX_HELD: usize = 4096;
/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_536;

/// The faults a proxy applies, both directions alike.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Probability in [0, 1] that a datagram is dropped.
    pub drop: f64,
    /// Added one-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from [0, jitter] per datagram.
    pub jitter: Duration,
    /// Drop everything, both ways.
    pub cut: bool,
}

/// Counters of one proxy (both directions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.forwarded_packets += o.forwarded_packets;
        self.forwarded_bytes += o.forwarded_bytes;
        self.dropped_packets += o.dropped_packets;
        self.dropped_bytes += o.dropped_bytes;
    }
}

#[derive(Debug, Default)]
struct Stats {
    forwarded_packets: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_packets: AtomicU64,
    dropped_bytes: AtomicU64,
}

impl Stats {
    fn forwarded(&self, bytes: usize) {
        self.forwarded_packets.fetch_add(1, Ordering::Relaxed);
        self.forwarded_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn dropped(&self, bytes: usize) {
        self.dropped_packets.fetch_add(1, Ordering::Relaxed);
        self.dropped_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// State shared by a proxy's tasks and its handle.
#[derive(Debug)]
struct Shared {
    faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
    stats: Stats,
}

impl Shared {
    fn faults(&self) -> Faults {
        self.faults.lock().map(|f| *f).unwrap_or_default()
    }

    /// When to release a datagram just received, or `None` to drop it.
    fn admit(&self) -> Option<Instant> {
        let f = self.faults();
        if f.cut {
            return None;
        }
        let Ok(mut rng) = self.rng.lock() else {
            return None;
        };
        if f.drop > 0.0 && rng.random::<f64>() < f.drop {
            return None;
        }
        let jitter = f.jitter.as_micros() as u64;
        let extra = if jitter > 0 { rng.random_range(0..=jitter) } else { 0 };
        Some(Instant::now() + f.delay + Duration::from_micros(extra))
    }
}

/// Where a released datagram goes.
#[derive(Debug, Clone)]
enum Out {
    /// To the target, through the client's (connected) upstream socket.
    Up(Arc<UdpSocket>),
    /// Back to the client, from the proxy's listening socket.
    Down(Arc<UdpSocket>, SocketAddr),
}

#[derive(Debug)]
struct Held {
    due: Instant,
    seq: u64,
    data: Vec<u8>,
    out: Out,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    /// Reversed, so `BinaryHeap` (a max-heap) yields the earliest due first.
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// One directed dial path through a fault proxy. Dropping it stops every
/// task it runs.
#[derive(Debug)]
pub struct UdpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    _tasks: JoinSet<()>,
}

impl UdpProxy {
    /// A proxy on 127.0.0.1 (ephemeral port) forwarding to `target`, with
    /// no faults yet; `seed` seeds its drop and jitter draws.
    pub async fn start(target: SocketAddr, seed: u64) -> anyhow::Result<UdpProxy> {
        let listener = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            stats: Stats::default(),
        });
        let (tx, rx) = mpsc::channel::<Held>(1024);
        let mut tasks = JoinSet::new();
        tasks.spawn(release(rx, shared.clone()));
        tasks.spawn(listen(listener, target, tx, shared.clone()));
        Ok(UdpProxy {
            addr,
            target,
            shared,
            _tasks: tasks,
        })
    }

    /// Where the dialer should send: the proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn set(&self, faults: Faults) {
        if let Ok(mut f) = self.shared.faults.lock() {
            *f = faults;
        }
    }

    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Loss and delay as given; a cut stays as it is.
    pub fn degrade(&self, drop: f64, delay: Duration, jitter: Duration) {
        if let Ok(mut f) = self.shared.faults.lock() {
            f.drop = drop;
            f.delay = delay;
            f.jitter = jitter;
        }
    }

    pub fn cut(&self) {
        if let Ok(mut f) = self.shared.faults.lock() {
            f.cut = true;
        }
    }

    pub fn restore(&self) {
        if let Ok(mut f) = self.shared.faults.lock() {
            f.cut = false;
        }
    }

    pub fn counters(&self) -> Counters {
        let s = &self.shared.stats;
        Counters {
            forwarded_packets: s.forwarded_packets.load(Ordering::Relaxed),
            forwarded_bytes: s.forwarded_bytes.load(Ordering::Relaxed),
            dropped_packets: s.dropped_packets.load(Ordering::Relaxed),
            dropped_bytes: s.dropped_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Hands a received datagram to the release task, or drops it.
fn hold(tx: &mpsc::Sender<Held>, shared: &Shared, seq: &mut u64, data: &[u8], out: Out) {
    let Some(due) = shared.admit() else {
        shared.stats.dropped(data.len());
        return;
    };
    *seq += 1;
    let held = Held {
        due,
        seq: *seq,
        data: data.to_vec(),
        out,
    };
    if tx.try_send(held).is_err() {
        shared.stats.dropped(data.len());
    }
}

/// Receives from clients; opens one upstream socket per client, whose
/// replies a task of its own relays back.
async fn listen(listener: Arc<UdpSocket>, target: SocketAddr, tx: mpsc::Sender<Held>, shared: Arc<Shared>) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    // Dropped with this task: stops the relays with it.
    let mut relays = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut seq = 0u64;
    loop {
        let (n, from) = match listener.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(_) => {
                // ICMP errors surface here on some systems; keep serving.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let up = match upstreams.get(&from) {
            Some(up) => up.clone(),
            None if upstreams.len() >= MAX_CLIENTS => {
                shared.stats.dropped(n);
                continue;
            }
            None => {
                let Ok(up) = upstream(target).await else {
                    shared.stats.dropped(n);
                    continue;
                };
                let up = Arc::new(up);
                upstreams.insert(from, up.clone());
                relays.spawn(relay_back(
                    up.clone(),
                    listener.clone(),
                    from,
                    tx.clone(),
                    shared.clone(),
                ));
                up
            }
        };
        hold(&tx, &shared, &mut seq, &buf[..n], Out::Up(up));
    }
}

async fn upstream(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    s.connect(target).await?;
    Ok(s)
}

/// The target's replies on one upstream socket, back to its client.
async fn relay_back(
    up: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    tx: mpsc::Sender<Held>,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut seq = 0u64;
    loop {
        match up.recv(&mut buf).await {
            Ok(n) => hold(&tx, &shared, &mut seq, &buf[..n], Out::Down(listener.clone(), client)),
            // A connected socket reports the target's port unreachable
            // (target down) as an error on the next receive: keep going.
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Releases held datagrams in due order (so jitter reorders them); a cut
/// drops what is still held when it comes due.
async fn release(mut rx: mpsc::Receiver<Held>, shared: Arc<Shared>) {
    let mut heap: BinaryHeap<Held> = BinaryHeap::new();
    loop {
        let next = heap.peek().map(|h| h.due);
        tokio::select! {
            got = rx.recv() => match got {
                Some(h) if heap.len() < MAX_HELD => heap.push(h),
                Some(h) => shared.stats.dropped(h.data.len()),
                None => return,
            },
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                while heap.peek().is_some_and(|h| h.due <= now) {
                    let Some(h) = heap.pop() else { break };
                    if shared.faults().cut {
                        shared.stats.dropped(h.data.len());
                        continue;
                    }
                    let sent = match &h.out {
                        Out::Up(up) => up.send(&h.data).await,
                        Out::Down(listener, client) => listener.send_to(&h.data, *client).await,
                    };
                    match sent {
                        Ok(_) => shared.stats.forwarded(h.data.len()),
                        Err(_) => shared.stats.dropped(h.data.len()),
                    }
                }
            }
        }
    }
}
