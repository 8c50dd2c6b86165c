//! The OpenIAP client protocol over gRPC: `openiap.FlowService`, whose
//! bidirectional `SetupStream` carries every command as an `Envelope`, so
//! OpenIAP's own SDKs (the Python `openiap` package among them) connect
//! unchanged.
//!
//! Each stream gets a connection actor: it reads envelopes in order, runs
//! `signin` inline (so later messages see the new user), and `upload` with
//! its parts (so they stay in order), every other command as its own task,
//! and writes replies, and the events the server pushes (through the
//! connection's bounded event queue), through one bounded queue.
//! Invariants: every channel is bounded (`GrpcLimits::outbound_queue`, with
//! a counter of times it was full); at most `max_in_flight` commands run per
//! connection, and one more gets an `error` reply instead of being queued;
//! at most `max_connections` streams are open per node (one more is
//! refused at once); an envelope over `max_message_bytes` gets an `error` reply, one over the
//! transport cap (`hard_max_message_bytes`) ends that stream with a logged
//! reason; client input never panics the server, and one connection's
//! failure never touches another's.

mod aggregate;
mod commands;
mod config;
mod convert;
mod dispatch;
mod jsonpath;
mod live;
mod workitem_files;
mod ws;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use ocmesh_node::Node;
use ocmesh_proto::openiap::Envelope;
use ocmesh_proto::openiap::flow_service_server::{FlowService, FlowServiceServer};

pub use config::config;
pub use convert::ConvertError;
pub use dispatch::{CommandError, Dispatcher, Handled, LONG_TOKEN_SECS, Session, SignedIn, unpack};
pub use live::{Connection, Events, LiveStats};
pub use ws::websocket;

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct GrpcLimits {
    /// Largest envelope accepted or sent; larger ones get an `error` reply.
    pub max_message_bytes: usize,
    /// Largest envelope the transport decodes at all; beyond it the stream
    /// ends with tonic's OUT_OF_RANGE status naming the sizes.
    pub hard_max_message_bytes: usize,
    /// Commands running at once on one connection.
    pub max_in_flight: usize,
    /// Replies waiting to be written to one connection.
    pub outbound_queue: usize,
    /// Open streams (gRPC and WebSocket together) per node; one more is
    /// refused (RESOURCE_EXHAUSTED, or a close frame).
    pub max_connections: usize,
    /// Events (watch, queue, token refresh) waiting for one connection.
    pub event_queue: usize,
    /// How long a watch waits for room in a full event queue before it is
    /// dropped (the client is not keeping up).
    pub watch_stall: Duration,
    /// Watches, and registered message queues, per connection.
    pub max_watches: usize,
    pub max_queues: usize,
    /// A signed-in connection gets a `refreshtoken` this long before its
    /// token expires.
    pub token_refresh_lead: Duration,
    /// Largest file `upload` accepts, and uploads open at once per connection.
    pub max_upload_bytes: u64,
    pub max_uploads: usize,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        GrpcLimits {
            // OpenIAP clients' default receive limit.
            max_message_bytes: 4 * 1024 * 1024,
            hard_max_message_bytes: 16 * 1024 * 1024,
            max_in_flight: 64,
            outbound_queue: 128,
            max_connections: 4096,
            event_queue: 256,
            watch_stall: Duration::from_secs(10),
            max_watches: 64,
            max_queues: 64,
            token_refresh_lead: Duration::from_secs(3600),
            max_upload_bytes: 1 << 30,
            max_uploads: 4,
        }
    }
}

/// Counters of the gRPC side (read with `GrpcStats::snapshot`).
#[derive(Debug, Default)]
pub struct GrpcStats {
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    pub requests: AtomicU64,
    pub error_replies: AtomicU64,
    /// Requests refused because `max_in_flight` were running.
    pub rejected_in_flight: AtomicU64,
    /// Replies that found the outbound queue full and had to wait.
    pub outbound_full: AtomicU64,
    /// Streams refused because `max_connections` were open.
    pub rejected_connections: AtomicU64,
    /// Streams ended by a transport or decode error.
    pub stream_errors: AtomicU64,
    /// Pushed events (watches, queues, token refreshes).
    pub live: Arc<LiveStats>,
}

impl GrpcStats {
    pub fn snapshot(&self) -> Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "connections_open": g(&self.connections_open),
            "connections_total": g(&self.connections_total),
            "requests": g(&self.requests),
            "error_replies": g(&self.error_replies),
            "rejected_in_flight": g(&self.rejected_in_flight),
            "outbound_full": g(&self.outbound_full),
            "stream_errors": g(&self.stream_errors),
            "rejected_connections": g(&self.rejected_connections),
            "watch_events": g(&self.live.watch_events),
            "watches_dropped": g(&self.live.watches_dropped),
            "watch_events_too_large": g(&self.live.events_too_large),
            "watch_refills": g(&self.live.watch_refills),
            "watch_refills_missed": g(&self.live.watch_refills_missed),
            "queue_events": g(&self.live.queue_events),
            "token_refreshes": g(&self.live.refreshes),
        })
    }
}

/// Why the gRPC server stopped.
#[derive(Debug, thiserror::Error)]
pub enum GrpcServeError {
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The FlowService implementation.
#[derive(Debug, Clone)]
pub struct FlowServer {
    dispatcher: Arc<Dispatcher>,
    limits: GrpcLimits,
    stats: Arc<GrpcStats>,
    /// One permit per open stream.
    slots: Arc<Semaphore>,
    /// Set once by `close_streams`; every connection actor watches it.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

impl FlowServer {
    pub fn new(node: Node, limits: GrpcLimits) -> Self {
        let dispatcher = Arc::new(Dispatcher::new(node, limits));
        FlowServer {
            limits,
            stats: Arc::new(GrpcStats {
                live: dispatcher.live_stats(),
                ..GrpcStats::default()
            }),
            dispatcher,
            closing: Arc::new(tokio::sync::watch::Sender::new(false)),
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
        }
    }

    /// A slot for one more stream, or the refusal to give its client.
    fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            self.stats.rejected_connections.fetch_add(1, Ordering::Relaxed);
            Status::resource_exhausted(format!(
                "this node already serves {} OpenIAP streams; try again later",
                self.limits.max_connections
            ))
        })
    }

    /// Ends every open stream (gRPC with UNAVAILABLE, WebSocket with a
    /// close frame) after the replies already queued, and every later one
    /// at once: for shutdown, so clients reconnect instead of waiting.
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    pub fn stats(&self) -> Arc<GrpcStats> {
        self.stats.clone()
    }

    /// The message broker OpenIAP's queue commands use (the REST API's,
    /// so both see the same queues). Until it is set they wait briefly,
    /// then fail with 503.
    pub fn use_broker(&self, broker: ocmesh_node::messaging::Broker) {
        self.dispatcher.set_broker(broker);
    }

    /// The dispatcher every connection of this server uses.
    pub fn dispatcher(&self) -> Arc<Dispatcher> {
        self.dispatcher.clone()
    }

    /// The tonic service, with the transport's message caps set.
    pub fn into_service(self) -> FlowServiceServer<FlowServer> {
        let hard = self.limits.hard_max_message_bytes.max(self.limits.max_message_bytes);
        FlowServiceServer::new(self)
            .max_decoding_message_size(hard)
            .max_encoding_message_size(hard)
    }
}

/// Serves FlowService on `listener` until `shutdown` completes; then ends
/// the open streams (`close_streams`) and waits for their connections.
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    server: FlowServer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GrpcServeError> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let closer = server.clone();
    let shutdown = async move {
        shutdown.await;
        closer.close_streams();
    };
    tonic::transport::Server::builder()
        .add_service(server.into_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

#[tonic::async_trait]
impl FlowService for FlowServer {
    async fn setup_stream(
        &self,
        request: Request<Streaming<Envelope>>,
    ) -> Result<Response<BoxStream<Envelope>>, Status> {
        let slot = self.admit()?;
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(self.limits.outbound_queue.max(1));
        let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
        tokio::spawn(connection(self.clone(), inbound, tx, "grpc", peer, slot));
        let out = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Replies to one connection; an `Err` ends its stream with that status.
type Outbound = mpsc::Sender<Result<Envelope, Status>>;

/// Queues a reply, counting the times the queue was full. False when the
/// client is gone.
async fn send(tx: &Outbound, stats: &GrpcStats, env: Envelope) -> bool {
    match tx.try_send(Ok(env)) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(env)) => {
            stats.outbound_full.fetch_add(1, Ordering::Relaxed);
            tx.send(env).await.is_ok()
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

async fn send_handled(tx: &Outbound, stats: &GrpcStats, h: Handled) {
    if h.failed {
        stats.error_replies.fetch_add(1, Ordering::Relaxed);
    }
    for r in h.replies {
        if !send(tx, stats, r).await {
            break;
        }
    }
}

/// Runs one command, turning a panic (a bug) into an `error` reply.
async fn run_guarded(dispatcher: &Dispatcher, session: &Session, request: Envelope) -> Handled {
    let fallback = request.clone();
    match std::panic::AssertUnwindSafe(dispatcher.handle(session, request))
        .catch_unwind()
        .await
    {
        Ok(h) => h,
        Err(_) => {
            tracing::error!(command = %fallback.command, "openiap command panicked");
            let e = CommandError::Internal(format!("{} failed inside the server", fallback.command));
            Handled {
                replies: vec![dispatcher.error_reply(&fallback, &e)],
                session: None,
                failed: true,
            }
        }
    }
}

/// The connection actor: reads envelopes until the stream ends. `inbound`
/// yields an `Err` for a stream that broke or could not be decoded.
async fn connection<S>(
    server: FlowServer,
    mut inbound: S,
    tx: Outbound,
    transport: &'static str,
    peer: String,
    slot: OwnedSemaphorePermit,
) where
    S: futures_util::Stream<Item = Result<Envelope, Status>> + Unpin + Send,
{
    use futures_util::StreamExt;
    let stats = server.stats.clone();
    stats.connections_open.fetch_add(1, Ordering::Relaxed);
    stats.connections_total.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%peer, "openiap stream opened");
    let in_flight = Arc::new(Semaphore::new(server.limits.max_in_flight.max(1)));
    let (mut session, mut events) = server.dispatcher.open_session(transport, &peer);
    // Pushed events go out through the same bounded queue as replies.
    let forward = {
        let (tx, stats) = (tx.clone(), stats.clone());
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if !send(&tx, &stats, ev).await {
                    break;
                }
            }
        })
    };
    let mut requests = 0u64;
    let mut closing = server.closing.subscribe();
    let reason = loop {
        let next = tokio::select! {
            biased;
            _ = closing.wait_for(|c| *c) => None,
            next = inbound.next() => Some(next),
        };
        let Some(next) = next else {
            let _ = tx.send(Err(Status::unavailable("ocmesh is shutting down"))).await;
            break "server shutting down".to_owned();
        };
        let env = match next {
            Some(Ok(env)) => env,
            None => break "client closed the stream".to_owned(),
            Some(Err(status)) => {
                // Undecodable or over the transport cap: nothing of it ran.
                stats.stream_errors.fetch_add(1, Ordering::Relaxed);
                let reason = format!("stream error: {status}");
                let _ = tx
                    .send(Err(Status::new(
                        status.code(),
                        format!("stream closed: {}", status.message()),
                    )))
                    .await;
                break reason;
            }
        };
        requests += 1;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        if matches!(
            env.command.as_str(),
            "signin" | "upload" | "beginstream" | "stream" | "endstream"
        ) {
            // In order: what follows a sign-in runs as its user, and an
            // upload's parts arrive in the order they were sent.
            let h = run_guarded(&server.dispatcher, &session, env).await;
            if let Some(s) = h.session.clone() {
                session = s;
            }
            send_handled(&tx, &stats, h).await;
            continue;
        }
        match in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                let (dispatcher, stats, tx, snapshot) =
                    (server.dispatcher.clone(), stats.clone(), tx.clone(), session.clone());
                tokio::spawn(async move {
                    let h = run_guarded(&dispatcher, &snapshot, env).await;
                    send_handled(&tx, &stats, h).await;
                    drop(permit);
                });
            }
            Err(_) => {
                stats.rejected_in_flight.fetch_add(1, Ordering::Relaxed);
                let e = CommandError::TooManyInFlight {
                    limit: server.limits.max_in_flight,
                };
                let reply = server.dispatcher.error_reply(&env, &e);
                stats.error_replies.fetch_add(1, Ordering::Relaxed);
                send(&tx, &stats, reply).await;
            }
        }
    };
    server.dispatcher.close_session(&session).await;
    forward.abort();
    stats.connections_open.fetch_sub(1, Ordering::Relaxed);
    drop(slot);
    tracing::info!(%peer, requests, %reason, "openiap stream closed");
}
