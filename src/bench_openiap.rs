//! `ocmesh bench openiap`: what the OpenIAP gRPC layer costs. In one
//! process, the same work-item round trip (push one item, pop one,
//! complete it as successful) runs twice on fresh nodes: from concurrent
//! OpenIAP clients over loopback gRPC (tonic, the generated `openiap`
//! types, each client signed in on its own stream and connection), and
//! from as many tasks calling the node directly. The overhead is
//! `1 - grpc_rate / direct_rate`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prost::Message;
use prost_types::Any;
use serde_json::{Map, json};
use tokio::sync::{mpsc, oneshot};
use tonic::Streaming;

use ocmesh_node::Principal;
use ocmesh_proto::openiap as pb;
use ocmesh_proto::openiap::flow_service_client::FlowServiceClient;

use crate::bench::Figures;

const QUEUE: &str = "bench";
const USER: &str = "admin";
const PASSWORD: &str = "bench";
/// Longest wait for one reply before the bench gives up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of `ocmesh bench openiap`.
#[derive(clap::Args, Debug, Clone)]
pub struct OpenIapBench {
    /// Round trips (push, pop, complete) to run each way.
    #[arg(long, default_value_t = 5_000)]
    pub cycles: u64,
    /// Concurrent gRPC clients, and as many concurrent direct tasks.
    #[arg(long, default_value_t = 16)]
    pub clients: u64,
    /// Payload bytes per item.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
}

/// A fresh node with the bench queue.
async fn temp_node(tag: &str) -> anyhow::Result<crate::bench::TempNode> {
    let tmp = crate::bench::temp_node_with(&format!("openiap-{tag}"), PASSWORD)?;
    let who = tmp.node.authenticate(USER, PASSWORD).await?;
    let mut queue = Map::new();
    queue.insert("name".into(), json!(QUEUE));
    tmp.node.add_queue(queue, &who).await?;
    Ok(tmp)
}

fn payload_text(bytes: usize) -> String {
    json!({"data": "x".repeat(bytes)}).to_string()
}

/// The cycle through the node's own API, from `clients` tasks.
async fn direct(b: &OpenIapBench) -> anyhow::Result<Figures> {
    let tmp = temp_node("direct").await?;
    let who: Principal = tmp.node.authenticate(USER, PASSWORD).await?;
    let claimed = Arc::new(AtomicU64::new(0));
    let payload = Arc::new(serde_json::from_str::<serde_json::Value>(&payload_text(b.payload))?);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..b.clients {
        let (node, who, claimed, payload, total) = (
            tmp.node.clone(),
            who.clone(),
            claimed.clone(),
            payload.clone(),
            b.cycles,
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while claimed.fetch_add(1, Ordering::Relaxed) < total {
                let t = Instant::now();
                let mut item = Map::new();
                item.insert("payload".into(), (*payload).clone());
                node.push_workitems(QUEUE, vec![item], &who).await?;
                let item = loop {
                    match node.pop_workitem(QUEUE, &who, None).await? {
                        Some(item) => break item,
                        None => tokio::task::yield_now().await,
                    }
                };
                let id = item["_id"].as_str().context("popped item without _id")?.to_owned();
                node.update_workitem(&id, "successful", None, None, None, &who).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    Ok(Figures::from_latencies(lat, started.elapsed()))
}

/// One OpenIAP client: a SetupStream whose replies come back in order
/// (each request waits for its reply).
struct Client {
    tx: mpsc::Sender<pb::Envelope>,
    rx: Streaming<pb::Envelope>,
    next: u64,
}

fn any<M: Message>(name: &str, msg: &M) -> Any {
    Any {
        type_url: format!("{}{name}", pb::TYPE_URL_PREFIX),
        value: msg.encode_to_vec(),
    }
}

impl Client {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
        let mut client = FlowServiceClient::connect(format!("http://{addr}"))
            .await
            .with_context(|| format!("connecting to the OpenIAP gRPC server on {addr}"))?;
        let (tx, rx) = mpsc::channel::<pb::Envelope>(16);
        let rx = client
            .setup_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .context("opening the OpenIAP stream")?
            .into_inner();
        Ok(Client { tx, rx, next: 0 })
    }

    /// Sends `command` with `msg` and decodes its `<command>reply`.
    async fn call<M: Message, R: Message + Default>(
        &mut self,
        command: &str,
        name: &str,
        msg: &M,
    ) -> anyhow::Result<R> {
        self.next += 1;
        let id = self.next.to_string();
        let env = pb::Envelope {
            command: command.into(),
            id: id.clone(),
            data: Some(any(name, msg)),
            ..Default::default()
        };
        self.tx.send(env).await.context("the OpenIAP stream closed")?;
        let reply = tokio::time::timeout(REPLY_TIMEOUT, self.rx.message())
            .await
            .with_context(|| format!("no reply to {command} within {REPLY_TIMEOUT:?}"))?
            .with_context(|| format!("the OpenIAP stream failed during {command}"))?
            .with_context(|| format!("the OpenIAP stream ended during {command}"))?;
        if reply.rid != id {
            bail!("reply for request {:?} while waiting for {id:?}", reply.rid);
        }
        let data = reply.data.unwrap_or_default();
        if reply.command == "error" {
            let e = pb::ErrorResponse::decode(data.value.as_slice()).unwrap_or_default();
            bail!("{command} failed: {} (code {})", e.message, e.code);
        }
        if reply.command != format!("{command}reply") {
            bail!("{command} got a {:?} reply", reply.command);
        }
        R::decode(data.value.as_slice()).with_context(|| format!("{command}reply does not decode"))
    }
}

/// The cycle over gRPC from `clients` signed-in clients.
async fn grpc(b: &OpenIapBench) -> anyhow::Result<Figures> {
    let tmp = temp_node("grpc").await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let flow = ocmesh_api::openiap::FlowServer::new(tmp.node.clone(), Default::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(ocmesh_api::openiap::serve_grpc(listener, flow, async {
        let _ = stopped.await;
    }));

    let mut clients = Vec::new();
    for _ in 0..b.clients {
        let mut c = Client::connect(addr).await?;
        let _: pb::SigninResponse = c
            .call(
                "signin",
                "SigninRequest",
                &pb::SigninRequest {
                    username: USER.into(),
                    password: PASSWORD.into(),
                    ..Default::default()
                },
            )
            .await?;
        clients.push(c);
    }
    let claimed = Arc::new(AtomicU64::new(0));
    let payload = payload_text(b.payload);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut c in clients {
        let (claimed, payload, total) = (claimed.clone(), payload.clone(), b.cycles);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while claimed.fetch_add(1, Ordering::Relaxed) < total {
                let t = Instant::now();
                let push = pb::PushWorkitemRequest {
                    wiq: QUEUE.into(),
                    name: "bench".into(),
                    payload: payload.clone(),
                    ..Default::default()
                };
                let _: pb::PushWorkitemResponse = c.call("pushworkitem", "PushWorkitemRequest", &push).await?;
                let pop = pb::PopWorkitemRequest {
                    wiq: QUEUE.into(),
                    ..Default::default()
                };
                let mut item = loop {
                    let r: pb::PopWorkitemResponse = c.call("popworkitem", "PopWorkitemRequest", &pop).await?;
                    match r.workitem {
                        Some(item) => break item,
                        None => tokio::task::yield_now().await,
                    }
                };
                item.state = "successful".into();
                // Unchanged payload: leave it out, as a client completing an item would.
                item.payload.clear();
                let update = pb::UpdateWorkitemRequest {
                    workitem: Some(item),
                    ..Default::default()
                };
                let done: pb::UpdateWorkitemResponse =
                    c.call("updateworkitem", "UpdateWorkitemRequest", &update).await?;
                if done.workitem.as_ref().map(|w| w.state.as_str()) != Some("successful") {
                    bail!(
                        "updateworkitem left the item in state {:?}",
                        done.workitem.map(|w| w.state)
                    );
                }
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let figures = Figures::from_latencies(lat, started.elapsed());
    let _ = stop.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => bail!("the gRPC server task failed: {e}"),
        Err(_) => bail!("the gRPC server did not stop within 5 s"),
    }
    Ok(figures)
}

fn line(name: &str, f: &Figures) -> String {
    format!(
        "  {name} {} cycles in {:.2} s: {:.0} cycles/s, cycle p50 {:.2} ms, p99 {:.2} ms",
        f.items,
        f.elapsed.as_secs_f64(),
        f.rate(),
        f.p50.as_secs_f64() * 1e3,
        f.p99.as_secs_f64() * 1e3
    )
}

pub async fn run(b: OpenIapBench) -> anyhow::Result<()> {
    if b.clients == 0 || b.cycles == 0 {
        bail!("--clients and --cycles must be at least 1");
    }
    println!(
        "openiap round trip (pushworkitem + popworkitem + updateworkitem successful; {} B payload; {} concurrent clients; {} cycles each way)",
        b.payload, b.clients, b.cycles
    );
    let direct = direct(&b).await?;
    println!("{}", line("direct:", &direct));
    let grpc = grpc(&b).await?;
    println!("{}", line("grpc:  ", &grpc));
    let overhead = 1.0 - grpc.rate() / direct.rate().max(1e-9);
    println!(
        "  overhead 1 - grpc/direct: {:.1}% (target under 30%: {})",
        overhead * 100.0,
        if overhead < 0.30 { "met" } else { "not met" }
    );
    Ok(())
}
