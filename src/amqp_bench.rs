//! The same work-item cycle against RabbitMQ: persistent messages,
//! publisher confirms awaited per message, manual consumer acks.

use crate::bench::{Figures, WorkItemBench};

#[cfg(not(feature = "rabbitmq"))]
pub async fn workitems_rabbitmq(_: &WorkItemBench, _: &str) -> anyhow::Result<Figures> {
    anyhow::bail!("--against needs a build with the rabbitmq feature (cargo build --features rabbitmq)")
}

#[cfg(feature = "rabbitmq")]
pub async fn workitems_rabbitmq(b: &WorkItemBench, url: &str) -> anyhow::Result<Figures> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use futures_util::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {url}"))?;
    let queue = format!("ocmesh-bench-{}", std::process::id());
    let setup = conn.create_channel().await?;
    setup
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let pushed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut publishers = Vec::new();
    for _ in 0..b.workers {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let (pushed, total, size, queue) = (pushed.clone(), b.items, b.payload.max(8), queue.clone());
        publishers.push(tokio::spawn(async move {
            while pushed.fetch_add(1, Ordering::Relaxed) < total {
                let mut body = vec![b'x'; size];
                body[..8].copy_from_slice(&(started.elapsed().as_nanos() as u64).to_le_bytes());
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?
                    .await?;
                anyhow::ensure!(confirm.is_ack(), "broker refused a message");
            }
            anyhow::Ok(())
        }));
    }
    let mut consumers = Vec::new();
    for w in 0..b.workers {
        let ch = conn.create_channel().await?;
        ch.basic_qos(100, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                format!("bench-{w}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (done, total) = (done.clone(), b.items);
        consumers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while done.load(Ordering::Relaxed) < total {
                let next = tokio::time::timeout(Duration::from_millis(100), consumer.next()).await;
                let Ok(Some(delivery)) = next else { continue };
                let delivery = delivery?;
                delivery.ack(BasicAckOptions::default()).await?;
                let mut sent = [0u8; 8];
                sent.copy_from_slice(&delivery.data[..8]);
                lat.push(
                    started
                        .elapsed()
                        .saturating_sub(Duration::from_nanos(u64::from_le_bytes(sent))),
                );
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(lat)
        }));
    }
    for p in publishers {
        p.await??;
    }
    let mut lat = Vec::new();
    for c in consumers {
        lat.extend(c.await??);
    }
    let elapsed = started.elapsed();
    setup
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(Figures::from_latencies(lat, elapsed))
}
