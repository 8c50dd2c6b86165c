//! Criterion: one work item through push, pop and complete, each step
//! durable, with 1 KiB of payload; and a pop from a deep queue. The
//! concurrent throughput comparison with RabbitMQ is `ocmesh bench
//! workitems --against ...`.

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Map, Value, json};

use ocmesh_node::{Node, NodeConfig, Principal, acl};

fn principal() -> Principal {
    Principal {
        id: "000000000000000000000001".into(),
        name: "bench".into(),
        roles: vec![acl::ADMINS_ROLE_ID.into()],
    }
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn cycle(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tmp");
    let node = Node::open(NodeConfig {
        data_dir: dir.path().into(),
        site: "bench".into(),
        admin_password: Some("b".into()),
    })
    .expect("open")
    .node;
    let who = principal();
    rt.block_on(node.add_queue(obj(json!({"name": "q"})), &who))
        .expect("queue");
    let payload = "x".repeat(1024);
    c.bench_function("workitem push+pop+complete (1 KiB, durable)", |b| {
        b.to_async(&rt).iter(|| async {
            node.push_workitems("q", vec![obj(json!({"payload": {"data": payload}}))], &who)
                .await
                .expect("push");
            let item = node.pop_workitem("q", &who, None).await.expect("pop").expect("an item");
            let id = item["_id"].as_str().expect("id").to_owned();
            node.update_workitem(&id, "successful", None, None, None, &who)
                .await
                .expect("complete");
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = cycle
}
criterion_main!(benches);
