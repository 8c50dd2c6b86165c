//! One suite, two brokers: the embedded one always, RabbitMQ on
//! 127.0.0.1:5672 when reachable (required where OCMESH_REQUIRE_AMQP=1).

use std::time::Duration;

use ocmesh_node::messaging::{Broker, ExchangeKind, Message};

async fn recv(rx: &mut tokio::sync::mpsc::Receiver<Message>, within: Duration) -> Option<Message> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

fn msg(body: &str) -> Message {
    Message {
        body: body.as_bytes().to_vec(),
        ..Message::default()
    }
}

async fn suite(b: &Broker, tag: &str) {
    let wait = Duration::from_secs(5);
    let name = |s: &str| format!("ocmesh-test-{tag}-{}-{s}", std::process::id());

    // Direct to a queue by name.
    let q = b.declare_queue(Some(&name("direct"))).await.expect("queue");
    let mut rx = b.consume(&q).await.expect("consume");
    b.publish("", &q, msg("hello")).await.expect("publish");
    assert_eq!(recv(&mut rx, wait).await.expect("delivered").body, b"hello");

    // Fanout reaches every bound queue.
    let fx = name("fan");
    b.declare_exchange(&fx, ExchangeKind::Fanout).await.expect("exchange");
    let (q1, q2) = (
        b.declare_queue(None).await.expect("q1"),
        b.declare_queue(None).await.expect("q2"),
    );
    b.bind(&q1, &fx, "").await.expect("bind");
    b.bind(&q2, &fx, "").await.expect("bind");
    let (mut r1, mut r2) = (b.consume(&q1).await.expect("c1"), b.consume(&q2).await.expect("c2"));
    b.publish(&fx, "anything", msg("all")).await.expect("publish");
    assert_eq!(recv(&mut r1, wait).await.expect("q1").body, b"all");
    assert_eq!(recv(&mut r2, wait).await.expect("q2").body, b"all");

    // Topic patterns.
    let tx = name("topic");
    b.declare_exchange(&tx, ExchangeKind::Topic).await.expect("exchange");
    let tq = b.declare_queue(None).await.expect("tq");
    b.bind(&tq, &tx, "plant.*.alarm").await.expect("bind");
    let mut tr = b.consume(&tq).await.expect("consume");
    b.publish(&tx, "plant.7.status", msg("no")).await.expect("publish");
    b.publish(&tx, "plant.7.alarm", msg("yes")).await.expect("publish");
    assert_eq!(recv(&mut tr, wait).await.expect("matched").body, b"yes");
    assert!(
        recv(&mut tr, Duration::from_millis(300)).await.is_none(),
        "unmatched key delivered"
    );

    // RPC: replyto and correlationId.
    let server_q = b.declare_queue(Some(&name("rpc"))).await.expect("server queue");
    let mut server = b.consume(&server_q).await.expect("server");
    let reply_q = b.declare_queue(None).await.expect("reply queue");
    let mut client = b.consume(&reply_q).await.expect("client");
    let request = Message {
        body: b"2+2".to_vec(),
        reply_to: Some(reply_q.clone()),
        correlation_id: Some("c-42".into()),
        expiration: None,
    };
    b.publish("", &server_q, request).await.expect("request");
    let got = recv(&mut server, wait).await.expect("request delivered");
    let reply = Message {
        body: b"4".to_vec(),
        correlation_id: got.correlation_id.clone(),
        ..Message::default()
    };
    b.publish("", got.reply_to.as_deref().expect("reply_to"), reply)
        .await
        .expect("reply");
    let answer = recv(&mut client, wait).await.expect("reply delivered");
    assert_eq!(
        (answer.body.as_slice(), answer.correlation_id.as_deref()),
        (&b"4"[..], Some("c-42"))
    );

    // Expiry: a message nobody takes in time is gone.
    let eq = b.declare_queue(Some(&name("expiry"))).await.expect("queue");
    let short = Message {
        body: b"stale".to_vec(),
        expiration: Some(Duration::from_millis(100)),
        ..Message::default()
    };
    b.publish("", &eq, short).await.expect("publish");
    b.publish(
        "",
        &eq,
        Message {
            expiration: Some(Duration::from_secs(60)),
            ..msg("fresh")
        },
    )
    .await
    .expect("publish");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut er = b.consume(&eq).await.expect("consume");
    assert_eq!(recv(&mut er, wait).await.expect("fresh one").body, b"fresh");
    assert!(
        recv(&mut er, Duration::from_millis(300)).await.is_none(),
        "expired message delivered"
    );

    // Taking one message at a time (what REST clients do).
    let gq = b.declare_queue(Some(&name("get"))).await.expect("queue");
    assert!(b.get(&gq).await.expect("get").is_none());
    b.publish("", &gq, msg("one")).await.expect("publish");
    b.publish("", &gq, msg("two")).await.expect("publish");
    assert_eq!(b.get_wait(&gq, wait).await.expect("get").expect("one").body, b"one");
    assert_eq!(b.get_wait(&gq, wait).await.expect("get").expect("two").body, b"two");
    b.delete_queue(&gq).await.expect("delete");

    // Errors name the problem.
    assert!(b.publish(&name("no-such-exchange"), "k", msg("x")).await.is_err());
    assert!(
        b.declare_exchange(&fx, ExchangeKind::Topic).await.is_err(),
        "kind mismatch"
    );
    assert!(b.declare_queue(Some("")).await.is_err());

    for q in [name("direct"), name("rpc"), name("expiry")] {
        b.delete_queue(&q).await.expect("delete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker() {
    suite(&Broker::embedded(), "embedded").await;
}

#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_broker() {
    let addr = "127.0.0.1:5672";
    let reachable = addr
        .parse()
        .is_ok_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    if !reachable {
        if std::env::var("OCMESH_REQUIRE_AMQP").as_deref() == Ok("1") {
            panic!("OCMESH_REQUIRE_AMQP=1 but no RabbitMQ broker answers on {addr}");
        }
        eprintln!("skipping rabbitmq_broker: no RabbitMQ broker answers on {addr}");
        return;
    }
    let b = Broker::rabbitmq("amqp://guest:guest@127.0.0.1:5672/%2f")
        .await
        .expect("connect");
    suite(&b, "rabbit").await;
}
