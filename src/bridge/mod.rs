//! The Redis bridge (`--redis URL`): rooms across megasock processes and boxes through Redis
//! pub/sub, and every client message appended to a Redis Stream (`--redis-stream KEY`).
//!
//! Per process, not per worker: one subscriber connection ([`subscriber`]) and one pipelined
//! publisher connection ([`publisher`]), each on its own thread with the sync `redis` crate.
//! - Out: a room batch published on this node is delivered locally at once and handed (one
//!   queue, bounded in bytes) to the publisher, which sends it to `{prefix}room:{room}` in an
//!   [`envelope`]. A full queue or a Redis that is down never makes a worker wait: the message
//!   is counted as dropped for Redis (local delivery already happened).
//! - In: the subscriber holds one `SUBSCRIBE` per room with members anywhere in this process
//!   (taken when the first member joins, released 2 s after the last leaves, against churn),
//!   drops its own node's envelopes, and puts the rest into the workers' rings in the order
//!   Redis delivered them. A full ring never blocks the Redis read: the message is counted and
//!   dropped (Redis itself disconnects a subscriber that falls behind).
//!
//! The contract is at-most-once across nodes: messages published while a link is down, or
//! dropped at a full queue, are lost for the other nodes, and counted
//! (`megasock_redis_dropped_total{reason}`). Within one node nothing changes: local delivery
//! keeps its own guarantees.

mod envelope;
mod publisher;
pub mod resp;
pub mod shards;
mod subscriber;

pub use envelope::{unwrap, wrap, NodeId, Received};

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use crate::bus::Injector;
use crate::config::Config;
use crate::metrics::LATENCY_BUCKETS_US;
use crate::worker::Shared;

/// Something for the publisher thread.
pub(crate) enum Outgoing {
    Publish {
        channel: String,
        payload: Bytes,
        messages: u32,
    },
    Stream {
        room: Arc<str>,
        conn: String,
        addr: Option<std::net::SocketAddr>,
        ts_ms: u64,
        data: Bytes,
    },
}

impl Outgoing {
    fn cost(&self) -> usize {
        match self {
            Outgoing::Publish {
                channel, payload, ..
            } => channel.len() + payload.len() + 64,
            Outgoing::Stream { conn, data, .. } => conn.len() + data.len() + 96,
        }
    }
}

/// Why a message did not make it across Redis.
#[derive(Clone, Copy)]
pub(crate) enum Dropped {
    /// The queue to the publisher was full (Redis slower than this node publishes).
    QueueFull = 0,
    /// Redis was unreachable when the publisher tried.
    RedisDown = 1,
    /// A message from Redis found a worker's ring full.
    WorkerRingFull = 2,
}

const DROP_LABELS: [&str; 3] = ["queue_full", "redis_down", "worker_ring_full"];

/// Counters of the bridge (written by its threads and the workers, read by the metrics).
#[derive(Default)]
pub struct BridgeStats {
    pub subscriber_up: AtomicBool,
    pub publisher_up: AtomicBool,
    pub published: AtomicU64,
    pub received: AtomicU64,
    pub stream_appended: AtomicU64,
    dropped: [AtomicU64; 3],
    pub subscriptions: AtomicU64,
    pub resubscribe_us: AtomicU64,
    lag_buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    lag_count: AtomicU64,
    lag_sum_us: AtomicU64,
}

impl BridgeStats {
    pub(crate) fn count_drop(&self, why: Dropped, messages: u64) {
        self.dropped[why as usize].fetch_add(messages, Relaxed);
    }

    pub(crate) fn lag(&self, us: u64) {
        let b = LATENCY_BUCKETS_US
            .iter()
            .position(|&ub| us <= ub)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.lag_buckets[b].fetch_add(1, Relaxed);
        self.lag_count.fetch_add(1, Relaxed);
        self.lag_sum_us.fetch_add(us, Relaxed);
    }

    /// Both connections are up.
    pub fn link_up(&self) -> bool {
        self.subscriber_up.load(Relaxed) && self.publisher_up.load(Relaxed)
    }
}

/// What workers and the publish API hold: the way into the publisher's queue.
pub struct BridgeLink {
    node: NodeId,
    prefix: String,
    stream: bool,
    tx: Sender<Outgoing>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    pub stats: Arc<BridgeStats>,
}

/// The other ends, for [`start`].
pub struct BridgeParts {
    rx: Receiver<Outgoing>,
    queued: Arc<AtomicUsize>,
    changes: Receiver<RoomChange>,
}

/// A room got its first member in this process, or lost its last.
pub enum RoomChange {
    First(Box<str>),
    Last(Box<str>),
}

/// Creates the link (for `Shared`) and the parts the bridge threads take, if `--redis` is set.
/// `changes` receives the room directory's first/last-member events.
pub fn link(config: &Config, changes: Receiver<RoomChange>) -> Option<(BridgeLink, BridgeParts)> {
    config.redis.as_ref()?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let queued = Arc::new(AtomicUsize::new(0));
    Some((
        BridgeLink {
            node: node_id(),
            prefix: config.redis_prefix.clone(),
            stream: config.redis_stream.is_some(),
            tx,
            queued: queued.clone(),
            capacity: config.redis_queue,
            stats: Arc::new(BridgeStats::default()),
        },
        BridgeParts {
            rx,
            queued,
            changes,
        },
    ))
}

fn node_id() -> NodeId {
    use std::hash::{BuildHasher, Hasher};
    let mut id = [0u8; 16];
    for (i, half) in id.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id() as u64 ^ ((i as u64) << 32));
        h.write_u128(now_ns() as u128);
        half.copy_from_slice(&h.finish().to_be_bytes());
    }
    id
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl BridgeLink {
    /// The channel of a room.
    pub fn channel(&self, room: &str) -> String {
        format!("{}room:{room}", self.prefix)
    }

    /// Whether client messages also go to the stream.
    #[inline]
    pub fn streams(&self) -> bool {
        self.stream
    }

    fn push(&self, o: Outgoing, messages: u64) {
        let c = o.cost();
        let before = self.queued.fetch_add(c, Relaxed);
        if before > 0 && before + c > self.capacity {
            self.queued.fetch_sub(c, Relaxed);
            self.stats.count_drop(Dropped::QueueFull, messages);
            return;
        }
        if self.tx.send(o).is_err() {
            self.queued.fetch_sub(c, Relaxed);
        }
    }

    /// Publishes frames published on this node (never waits).
    pub fn publish(&self, room: &str, frames: &[u8], messages: u32) {
        let payload = wrap(&self.node, now_ns(), messages, frames);
        self.push(
            Outgoing::Publish {
                channel: self.channel(room),
                payload,
                messages,
            },
            messages as u64,
        );
    }

    /// Appends one client message to the stream (never waits).
    pub fn append(
        &self,
        room: Arc<str>,
        conn: String,
        addr: Option<std::net::SocketAddr>,
        data: &[u8],
    ) {
        self.push(
            Outgoing::Stream {
                room,
                conn,
                addr,
                ts_ms: now_ns() / 1_000_000,
                data: Bytes::copy_from_slice(data),
            },
            1,
        );
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Prometheus text for the bridge.
    pub fn render(&self, out: &mut String) {
        let s = &self.stats;
        let line = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        line(
            out,
            "megasock_redis_link_up",
            "gauge",
            "1 while both Redis connections (subscriber, publisher) are up.",
            (s.link_up() as u8).to_string(),
        );
        line(
            out,
            "megasock_redis_published_total",
            "counter",
            "Messages published to Redis.",
            s.published.load(Relaxed).to_string(),
        );
        line(
            out,
            "megasock_redis_received_total",
            "counter",
            "Messages received from other nodes through Redis.",
            s.received.load(Relaxed).to_string(),
        );
        line(
            out,
            "megasock_redis_stream_appended_total",
            "counter",
            "Client messages appended to the Redis stream.",
            s.stream_appended.load(Relaxed).to_string(),
        );
        line(
            out,
            "megasock_redis_subscriptions",
            "gauge",
            "Room channels subscribed.",
            s.subscriptions.load(Relaxed).to_string(),
        );
        line(
            out,
            "megasock_redis_resubscribe_seconds",
            "gauge",
            "How long the last (re)subscription of every room took.",
            (s.resubscribe_us.load(Relaxed) as f64 / 1e6).to_string(),
        );
        line(
            out,
            "megasock_redis_queued_bytes",
            "gauge",
            "Bytes waiting for the Redis publisher.",
            self.queued.load(Relaxed).to_string(),
        );
        out.push_str("# HELP megasock_redis_dropped_total Messages that did not cross Redis, by reason.\n# TYPE megasock_redis_dropped_total counter\n");
        for (i, label) in DROP_LABELS.iter().enumerate() {
            let _ = writeln!(
                out,
                "megasock_redis_dropped_total{{reason=\"{label}\"}} {}",
                s.dropped[i].load(Relaxed)
            );
        }
        out.push_str("# HELP megasock_redis_pubsub_lag_seconds Receive time minus publish time of messages from other nodes.\n# TYPE megasock_redis_pubsub_lag_seconds histogram\n");
        let mut cumulative = 0;
        for (b, ub) in LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += s.lag_buckets[b].load(Relaxed);
            let _ = writeln!(
                out,
                "megasock_redis_pubsub_lag_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *ub as f64 / 1e6
            );
        }
        cumulative += s.lag_buckets[LATENCY_BUCKETS_US.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "megasock_redis_pubsub_lag_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "megasock_redis_pubsub_lag_seconds_sum {}",
            s.lag_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "megasock_redis_pubsub_lag_seconds_count {}",
            s.lag_count.load(Relaxed)
        );
    }
}

/// Starts the subscriber and publisher threads.
pub fn start(parts: BridgeParts, shared: Arc<Shared>, injector: Injector) -> std::io::Result<()> {
    let link = shared.bridge.as_ref().expect("bridge configured").clone();
    let url = shared.config.redis.clone().expect("--redis set");
    // Checked here so a bad URL stops the start with a clear message.
    redis::Client::open(url.as_str()).map_err(|e| {
        std::io::Error::other(format!(
            "--redis {url}: {e} (expected redis://HOST:PORT[/DB])"
        ))
    })?;
    publisher::spawn(parts.rx, parts.queued, link.clone(), shared.clone())?;
    subscriber::spawn(parts.changes, link, shared, injector)?;
    Ok(())
}
