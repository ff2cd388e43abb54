//! The publisher thread: one connection (with `--redis-sharded`, one per cluster master, each
//! command sent to the master owning its channel), commands pipelined per batch of what the workers
//! queued (up to 512 at a time), reconnecting with back-off. While Redis is down, what arrives
//! is counted as dropped and discarded, so the queue never grows past its bound.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::shards::{self, Topology};
use super::{BridgeLink, Dropped, Outgoing};
use crate::worker::Shared;

const BATCH: usize = 512;
/// An idle publisher checks its link this often.
const PROBE_IDLE: Duration = Duration::from_secs(1);

pub(super) fn spawn(
    rx: Receiver<Outgoing>,
    queued: Arc<AtomicUsize>,
    link: Arc<BridgeLink>,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("megasock-redis-pub".into())
        .spawn(move || run(rx, queued, link, shared))?;
    Ok(())
}

/// Connections to every server of the topology.
fn connect(seed: &str, sharded: bool) -> redis::RedisResult<(Topology, Vec<redis::Connection>)> {
    let topology = shards::discover(seed, sharded)?;
    let mut cons = Vec::new();
    for url in topology.servers() {
        let c = redis::Client::open(url.as_str())?
            .get_connection_with_timeout(Duration::from_secs(2))?;
        c.set_write_timeout(Some(Duration::from_secs(5)))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        cons.push(c);
    }
    Ok((topology, cons))
}

fn run(
    rx: Receiver<Outgoing>,
    queued: Arc<AtomicUsize>,
    link: Arc<BridgeLink>,
    shared: Arc<Shared>,
) {
    let seed = shared.config.redis.clone().unwrap_or_default();
    let sharded = shared.config.redis_sharded;
    let stream_key = shared.config.redis_stream.clone();
    let maxlen = shared.config.redis_stream_maxlen;
    let node_hex: String = link.node().iter().map(|b| format!("{b:02x}")).collect();
    let mut up: Option<(Topology, Vec<redis::Connection>)> = None;
    let mut backoff = Duration::from_millis(100);
    let mut retry_at = Instant::now();
    let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH);
    let mut last_ok = Instant::now();
    let mut warned = false;
    loop {
        if up.is_none() && Instant::now() >= retry_at {
            match connect(&seed, sharded) {
                Ok(t) => {
                    up = Some(t);
                    backoff = Duration::from_millis(100);
                    warned = false;
                    if !link.stats.publisher_up.swap(true, Relaxed) {
                        log::info!("redis publisher connected");
                    }
                }
                Err(e) => {
                    if link.stats.publisher_up.swap(false, Relaxed) || !warned {
                        log::warn!("redis publisher: {e}; retrying with back-off");
                        warned = true;
                    }
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(o) => o,
            Err(RecvTimeoutError::Timeout) => {
                // Idle: make sure the link still works, so a dead one is found (and replaced)
                // before the next message needs it, not by losing that message.
                if up.is_some() && last_ok.elapsed() > PROBE_IDLE {
                    let alive = up.as_mut().is_some_and(|(_, cons)| {
                        cons.iter_mut()
                            .all(|c| redis::cmd("PING").query::<String>(c).is_ok())
                    });
                    if alive {
                        last_ok = Instant::now();
                    } else {
                        up = None;
                        if link.stats.publisher_up.swap(false, Relaxed) {
                            log::warn!(
                                "redis publisher lost its connection (no answer to PING); retrying"
                            );
                        }
                        retry_at = Instant::now();
                    }
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        let cost: usize = batch.iter().map(Outgoing::cost).sum();
        queued.fetch_sub(cost, Relaxed);
        let (messages, appended) = batch.iter().fold((0u64, 0u64), |(m, a), o| match o {
            Outgoing::Publish { messages, .. } => (m + *messages as u64, a),
            Outgoing::Stream { .. } => (m, a + 1),
        });
        let Some((topology, cons)) = up.as_mut() else {
            link.stats
                .count_drop(Dropped::RedisDown, messages + appended);
            batch.clear();
            continue;
        };
        // One pipeline per server, each command on the server that owns its channel or key.
        let (publish, _, _) = topology.verbs();
        let mut pipes: Vec<redis::Pipeline> = (0..cons.len()).map(|_| redis::pipe()).collect();
        for o in batch.drain(..) {
            match o {
                Outgoing::Publish {
                    channel, payload, ..
                } => {
                    pipes[topology.owner(&channel)]
                        .cmd(publish)
                        .arg(&channel)
                        .arg(&payload[..])
                        .ignore();
                }
                Outgoing::Stream {
                    room,
                    conn,
                    addr,
                    ts_ms,
                    data,
                } => {
                    if let Some(key) = &stream_key {
                        pipes[topology.owner(key)]
                            .cmd("XADD")
                            .arg(key)
                            .arg("MAXLEN")
                            .arg("~")
                            .arg(maxlen)
                            .arg("*")
                            .arg("room")
                            .arg(&*room)
                            .arg("conn")
                            .arg(conn)
                            .arg("node")
                            .arg(&node_hex)
                            .arg("addr")
                            .arg(addr.map_or(String::new(), |a| a.to_string()))
                            .arg("ts")
                            .arg(ts_ms)
                            .arg("data")
                            .arg(&data[..])
                            .ignore();
                    }
                }
            }
        }
        let mut failed = None;
        for (pipe, con) in pipes.iter().zip(cons.iter_mut()) {
            if pipe.is_empty() {
                continue;
            }
            if let Err(e) = pipe.query::<()>(con) {
                failed = Some(e);
                break;
            }
        }
        match failed {
            None => {
                last_ok = Instant::now();
                link.stats.published.fetch_add(messages, Relaxed);
                link.stats.stream_appended.fetch_add(appended, Relaxed);
            }
            Some(e) => {
                // At-most-once: some of the batch may have gone through; all is counted lost.
                // A moved slot or a lost server: reconnect and read the topology again.
                link.stats
                    .count_drop(Dropped::RedisDown, messages + appended);
                up = None;
                if link.stats.publisher_up.swap(false, Relaxed) {
                    log::warn!("redis publisher lost its connection: {e}; retrying");
                }
                retry_at = Instant::now() + backoff;
            }
        }
    }
}
