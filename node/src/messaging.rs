//! Messaging: named queues and exchanges (direct, fanout, topic), messages
//! with `replyto` and `correlationId` for RPC, and per-message expiry.
//!
//! Two brokers behind one type: an embedded in-process broker (the
//! default) and RabbitMQ through lapin (feature `rabbitmq`), where
//! queues and exchanges live in the broker and every publish is persistent
//! and confirmed. Both pass the same tests. Every queue and consumer
//! channel is bounded.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// Most messages an embedded queue holds; publishing to a full queue fails.
pub const QUEUE_BOUND: usize = 100_000;
/// Deliveries buffered per consumer.
pub const CONSUMER_BOUND: usize = 256;

/// Why a messaging call failed.
#[derive(Debug, thiserror::Error)]
pub enum MqError {
    #[error("queue {0:?} does not exist")]
    NoQueue(String),
    #[error("exchange {0:?} does not exist")]
    NoExchange(String),
    #[error("exchange {name:?} exists with type {existing}, not {wanted}")]
    ExchangeKindMismatch {
        name: String,
        existing: &'static str,
        wanted: &'static str,
    },
    #[error("unknown exchange type {0:?}; use direct, fanout or topic")]
    BadKind(String),
    #[error("queue {0:?} is full ({QUEUE_BOUND} messages)")]
    Full(String),
    #[error("invalid name {0:?}: 1 to 255 characters, no control characters")]
    BadName(String),
    #[error("broker: {0}")]
    Broker(String),
}

/// How an exchange routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
}

impl ExchangeKind {
    pub fn parse(s: &str) -> Result<Self, MqError> {
        match s {
            "direct" => Ok(ExchangeKind::Direct),
            "fanout" => Ok(ExchangeKind::Fanout),
            "topic" => Ok(ExchangeKind::Topic),
            other => Err(MqError::BadKind(other.to_owned())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
        }
    }
}

/// A message as published and delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub body: Vec<u8>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// Dropped if not delivered within this long.
    pub expiration: Option<Duration>,
}

/// AMQP topic matching: words split by '.', `*` matches one word, `#` zero or more.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match (p.first(), k.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
            (Some(w), Some(x)) if w == x => go(&p[1..], &k[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    };
    go(&p, &k)
}

fn check_name(name: &str) -> Result<(), MqError> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(MqError::BadName(name.to_owned()));
    }
    Ok(())
}

/// The broker a node uses.
#[derive(Debug, Clone)]
pub enum Broker {
    Embedded(Embedded),
    #[cfg(feature = "rabbitmq")]
    Rabbit(rabbit::Rabbit),
}

impl Broker {
    pub fn embedded() -> Broker {
        Broker::Embedded(Embedded::default())
    }

    /// Connects to RabbitMQ at `url` (amqp://...).
    #[cfg(feature = "rabbitmq")]
    pub async fn rabbitmq(url: &str) -> Result<Broker, MqError> {
        Ok(Broker::Rabbit(rabbit::Rabbit::connect(url).await?))
    }

    /// Declares a queue; `None` makes a private temporary queue and returns its name.
    pub async fn declare_queue(&self, name: Option<&str>) -> Result<String, MqError> {
        if let Some(n) = name {
            check_name(n)?;
        }
        match self {
            Broker::Embedded(b) => Ok(b.declare_queue(name)),
            #[cfg(feature = "rabbitmq")]
            Broker::Rabbit(b) => b.declare_queue(name).await,
        }
    }

    pub async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), MqError> {
        check_name(name)?;
        match self {
            Broker::Embedded(b) => b.declare_exchange(name, kind),
            #[cfg(feature = "rabbitmq")]
            Broker::Rabbit(b) => b.declare_exchange(name, kind).await,
        }
    }

    /// Routes messages published to `exchange` with a matching key to `queue`.
    pub async fn bind(&self, queue: &str, exchange: &str, routing_key: &str) -> Result<(), MqError> {
        match self {
            Broker::Embedded(b) => b.bind(queue, exchange, routing_key),
            #[cfg(feature = "rabbitmq")]
            Broker::Rabbit(b) => b.bind(queue, exchange, routing_key).await,
        }
    }

    /// Publishes to an exchange, or with exchange "" straight to the queue
    /// named by `routing_key`.
    pub async fn publish(&self, exchange: &str, routing_key: &str, msg: Message) -> Result<(), MqError> {
        match self {
            Broker::Embedded(b) => b.publish(exchange, routing_key, msg),
            #[cfg(feature = "rabbitmq")]
            Broker::Rabbit(b) => b.publish(exchange, routing_key, msg).await,
        }
    }

    /// Starts consuming a queue; deliveries arrive on the receiver. Dropping
    /// it ends the subscription.
    pub async fn consume(&self, queue: &str) -> Result<mpsc::Receiver<Message>, MqError> {
        match self {
            Broker::Embedded(b) => b.consume(queue),
            #[cfg(feature = "rabbitmq")]
            Broker::Rabbit(b) => b.consume(queue).await,
        }
    }

    /// Takes the next message of a queue, if one is waiting.
    pub async fn get(&self, queue: &str) -> Result<Option<Message>, MqError> {
        match self {
            Broker::Embedded(b) => b.get(queue),
            #[cfg(feature = "rabbitmq")]
            Broker::Rabbit(b) => b.get(queue).await,
        }
    }

    /// `get`, waiting up to `wait` for a message to arrive.
    pub async fn get_wait(&self, queue: &str, wait: Duration) -> Result<Option<Message>, MqError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(m) = self.get(queue).await? {
                return Ok(Some(m));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep_until((tokio::time::Instant::now() + Duration::from_millis(50)).min(deadline)).await;
        }
    }

    pub async fn delete_queue(&self, name: &str) -> Result<(), MqError> {
        match self {
            Broker::Embedded(b) => b.delete_queue(name),
            #[cfg(feature = "rabbitmq")]
            Broker::Rabbit(b) => b.delete_queue(name).await,
        }
    }
}

/// The in-process broker.
#[derive(Debug, Clone, Default)]
pub struct Embedded {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, Queue>,
    exchanges: HashMap<String, Exchange>,
    next_temp: u64,
}

#[derive(Debug, Default)]
struct Queue {
    waiting: VecDeque<(Message, Option<Instant>)>,
    consumers: Vec<mpsc::Sender<Message>>,
    next_consumer: usize,
}

#[derive(Debug)]
struct Exchange {
    kind: ExchangeKind,
    bindings: Vec<(String, String)>,
}

impl Queue {
    /// Hands waiting messages to consumers, round robin, dropping expired
    /// ones and consumers that went away.
    fn pump(&mut self) {
        let now = Instant::now();
        while let Some((msg, deadline)) = self.waiting.pop_front() {
            if deadline.is_some_and(|d| d <= now) {
                continue;
            }
            self.consumers.retain(|c| !c.is_closed());
            let mut msg = Some(msg);
            for _ in 0..self.consumers.len() {
                let i = self.next_consumer % self.consumers.len();
                self.next_consumer = self.next_consumer.wrapping_add(1);
                match self.consumers[i].try_send(msg.take().unwrap_or_default()) {
                    Ok(()) => break,
                    Err(mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m)) => msg = Some(m),
                }
            }
            if let Some(m) = msg {
                self.waiting.push_front((m, deadline));
                return;
            }
        }
    }
}

impl Embedded {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-changed
        // in a way that matters more than losing the broker: recover it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn declare_queue(&self, name: Option<&str>) -> String {
        let mut s = self.lock();
        let name = match name {
            Some(n) => n.to_owned(),
            None => {
                s.next_temp += 1;
                format!("amq.gen-{}", s.next_temp)
            }
        };
        s.queues.entry(name.clone()).or_default();
        name
    }

    fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), MqError> {
        let mut s = self.lock();
        match s.exchanges.get(name) {
            Some(e) if e.kind != kind => Err(MqError::ExchangeKindMismatch {
                name: name.into(),
                existing: e.kind.name(),
                wanted: kind.name(),
            }),
            Some(_) => Ok(()),
            None => {
                s.exchanges.insert(
                    name.to_owned(),
                    Exchange {
                        kind,
                        bindings: Vec::new(),
                    },
                );
                Ok(())
            }
        }
    }

    fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), MqError> {
        let mut s = self.lock();
        if !s.queues.contains_key(queue) {
            return Err(MqError::NoQueue(queue.into()));
        }
        let ex = s
            .exchanges
            .get_mut(exchange)
            .ok_or_else(|| MqError::NoExchange(exchange.into()))?;
        let b = (queue.to_owned(), key.to_owned());
        if !ex.bindings.contains(&b) {
            ex.bindings.push(b);
        }
        Ok(())
    }

    fn publish(&self, exchange: &str, key: &str, msg: Message) -> Result<(), MqError> {
        let mut s = self.lock();
        let targets: Vec<String> = if exchange.is_empty() {
            if !s.queues.contains_key(key) {
                return Err(MqError::NoQueue(key.into()));
            }
            vec![key.to_owned()]
        } else {
            let ex = s
                .exchanges
                .get(exchange)
                .ok_or_else(|| MqError::NoExchange(exchange.into()))?;
            let mut t: Vec<String> = ex
                .bindings
                .iter()
                .filter(|(_, k)| match ex.kind {
                    ExchangeKind::Direct => k == key,
                    ExchangeKind::Fanout => true,
                    ExchangeKind::Topic => topic_matches(k, key),
                })
                .map(|(q, _)| q.clone())
                .collect();
            t.sort();
            t.dedup();
            t
        };
        let deadline = msg.expiration.map(|e| Instant::now() + e);
        for q in &targets {
            let queue = s.queues.get_mut(q).ok_or_else(|| MqError::NoQueue(q.clone()))?;
            if queue.waiting.len() >= QUEUE_BOUND {
                return Err(MqError::Full(q.clone()));
            }
            queue.waiting.push_back((msg.clone(), deadline));
            queue.pump();
        }
        Ok(())
    }

    fn consume(&self, queue: &str) -> Result<mpsc::Receiver<Message>, MqError> {
        let mut s = self.lock();
        let q = s.queues.get_mut(queue).ok_or_else(|| MqError::NoQueue(queue.into()))?;
        let (tx, rx) = mpsc::channel(CONSUMER_BOUND);
        q.consumers.push(tx);
        q.pump();
        Ok(rx)
    }

    fn get(&self, queue: &str) -> Result<Option<Message>, MqError> {
        let mut s = self.lock();
        let q = s.queues.get_mut(queue).ok_or_else(|| MqError::NoQueue(queue.into()))?;
        let now = Instant::now();
        while let Some((msg, deadline)) = q.waiting.pop_front() {
            if deadline.is_none_or(|d| d > now) {
                return Ok(Some(msg));
            }
        }
        Ok(None)
    }

    fn delete_queue(&self, name: &str) -> Result<(), MqError> {
        let mut s = self.lock();
        s.queues.remove(name).ok_or_else(|| MqError::NoQueue(name.into()))?;
        for ex in s.exchanges.values_mut() {
            ex.bindings.retain(|(q, _)| q != name);
        }
        Ok(())
    }

    /// Messages waiting in a queue (for metrics).
    pub fn depth(&self, queue: &str) -> Option<usize> {
        self.lock().queues.get(queue).map(|q| q.waiting.len())
    }
}

#[cfg(feature = "rabbitmq")]
mod rabbit {
    use std::sync::Arc;

    use futures_util::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind as LapinKind};
    use tokio::sync::mpsc;

    use super::{CONSUMER_BOUND, ExchangeKind, Message, MqError};

    fn err(e: lapin::Error) -> MqError {
        MqError::Broker(e.to_string())
    }

    /// RabbitMQ through lapin: one connection, a confirming channel for publishes.
    #[derive(Clone)]
    pub struct Rabbit {
        conn: Arc<Connection>,
        publish: Channel,
    }

    impl std::fmt::Debug for Rabbit {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Rabbit").finish_non_exhaustive()
        }
    }

    impl Rabbit {
        pub async fn connect(url: &str) -> Result<Rabbit, MqError> {
            let conn = Connection::connect(url, ConnectionProperties::default())
                .await
                .map_err(err)?;
            let publish = conn.create_channel().await.map_err(err)?;
            publish
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(err)?;
            Ok(Rabbit {
                conn: Arc::new(conn),
                publish,
            })
        }

        pub async fn declare_queue(&self, name: Option<&str>) -> Result<String, MqError> {
            let opts = match name {
                Some(_) => QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                None => QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
            };
            let q = self
                .publish
                .queue_declare(name.unwrap_or("").into(), opts, FieldTable::default())
                .await
                .map_err(err)?;
            Ok(q.name().to_string())
        }

        pub async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), MqError> {
            let k = match kind {
                ExchangeKind::Direct => LapinKind::Direct,
                ExchangeKind::Fanout => LapinKind::Fanout,
                ExchangeKind::Topic => LapinKind::Topic,
            };
            // A failed declare closes the channel; declare on a fresh one.
            let ch = self.conn.create_channel().await.map_err(err)?;
            ch.exchange_declare(
                name.into(),
                k,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| MqError::Broker(format!("declaring exchange {name:?}: {e}")))
        }

        pub async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), MqError> {
            let ch = self.conn.create_channel().await.map_err(err)?;
            ch.queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| MqError::Broker(format!("binding {queue:?} to {exchange:?}: {e}")))
        }

        pub async fn publish(&self, exchange: &str, key: &str, msg: Message) -> Result<(), MqError> {
            let mut props = BasicProperties::default().with_delivery_mode(2);
            if let Some(r) = &msg.reply_to {
                props = props.with_reply_to(r.as_str().into());
            }
            if let Some(c) = &msg.correlation_id {
                props = props.with_correlation_id(c.as_str().into());
            }
            if let Some(e) = msg.expiration {
                props = props.with_expiration(e.as_millis().to_string().as_str().into());
            }
            let confirm = self
                .publish
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    &msg.body,
                    props,
                )
                .await
                .map_err(err)?
                .await
                .map_err(err)?;
            if confirm.is_nack() {
                return Err(MqError::Broker("the broker refused the message".into()));
            }
            Ok(())
        }

        pub async fn consume(&self, queue: &str) -> Result<mpsc::Receiver<Message>, MqError> {
            let ch = self.conn.create_channel().await.map_err(err)?;
            ch.basic_qos(CONSUMER_BOUND as u16, Default::default())
                .await
                .map_err(err)?;
            let mut consumer = ch
                .basic_consume(
                    queue.into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| MqError::Broker(format!("consuming {queue:?}: {e}")))?;
            let (tx, rx) = mpsc::channel(CONSUMER_BOUND);
            tokio::spawn(async move {
                // Keep the channel alive as long as the consumer runs.
                let _ch = ch;
                while let Some(Ok(d)) = consumer.next().await {
                    let props = &d.properties;
                    let msg = Message {
                        body: d.data.clone(),
                        reply_to: props.reply_to().as_ref().map(|s| s.to_string()),
                        correlation_id: props.correlation_id().as_ref().map(|s| s.to_string()),
                        expiration: None,
                    };
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                    if d.ack(BasicAckOptions::default()).await.is_err() {
                        return;
                    }
                }
            });
            Ok(rx)
        }

        pub async fn get(&self, queue: &str) -> Result<Option<Message>, MqError> {
            let ch = self.conn.create_channel().await.map_err(err)?;
            let got = ch
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .map_err(|e| MqError::Broker(format!("reading {queue:?}: {e}")))?;
            let Some(m) = got else { return Ok(None) };
            let d = m.delivery;
            d.ack(BasicAckOptions::default()).await.map_err(err)?;
            let props = &d.properties;
            Ok(Some(Message {
                body: d.data.clone(),
                reply_to: props.reply_to().as_ref().map(|s| s.to_string()),
                correlation_id: props.correlation_id().as_ref().map(|s| s.to_string()),
                expiration: None,
            }))
        }

        pub async fn delete_queue(&self, name: &str) -> Result<(), MqError> {
            let ch = self.conn.create_channel().await.map_err(err)?;
            ch.queue_delete(name.into(), QueueDeleteOptions::default())
                .await
                .map_err(err)
                .map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert!(topic_matches("a.*.c", "a.b.c"));
        assert!(!topic_matches("a.*.c", "a.b.x.c"));
        assert!(topic_matches("a.#", "a"));
        assert!(topic_matches("a.#", "a.b.c"));
        assert!(topic_matches("#.c", "a.b.c"));
        assert!(topic_matches("#", ""));
        assert!(!topic_matches("a.b", "a.b.c"));
    }
}
