//! The publisher thread: one connection, commands pipelined per batch of what the workers
//! queued (up to 512 at a time), reconnecting with back-off. While Redis is down, what arrives
//! is counted as dropped and discarded, so the queue never grows past its bound.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::{BridgeLink, Dropped, Outgoing};
use crate::worker::Shared;

const BATCH: usize = 512;

pub(super) fn spawn(
    client: redis::Client,
    rx: Receiver<Outgoing>,
    queued: Arc<AtomicUsize>,
    link: Arc<BridgeLink>,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("megasock-redis-pub".into())
        .spawn(move || run(client, rx, queued, link, shared))?;
    Ok(())
}

fn run(
    client: redis::Client,
    rx: Receiver<Outgoing>,
    queued: Arc<AtomicUsize>,
    link: Arc<BridgeLink>,
    shared: Arc<Shared>,
) {
    let stream_key = shared.config.redis_stream.clone();
    let maxlen = shared.config.redis_stream_maxlen;
    let node_hex: String = link.node().iter().map(|b| format!("{b:02x}")).collect();
    let mut con: Option<redis::Connection> = None;
    let mut backoff = Duration::from_millis(100);
    let mut retry_at = Instant::now();
    let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH);
    loop {
        if con.is_none() && Instant::now() >= retry_at {
            match client.get_connection_with_timeout(Duration::from_secs(2)) {
                Ok(c) => {
                    let _ = c.set_write_timeout(Some(Duration::from_secs(5)));
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    con = Some(c);
                    backoff = Duration::from_millis(100);
                    if !link.stats.publisher_up.swap(true, Relaxed) {
                        log::info!("redis publisher connected");
                    }
                }
                Err(e) => {
                    if link.stats.publisher_up.swap(false, Relaxed) {
                        log::warn!("redis publisher lost its connection: {e}; retrying");
                    }
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(o) => o,
            Err(RecvTimeoutError::Timeout) => continue,
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
        let Some(c) = con.as_mut() else {
            link.stats
                .count_drop(Dropped::RedisDown, messages + appended);
            batch.clear();
            continue;
        };
        let mut pipe = redis::pipe();
        for o in batch.drain(..) {
            match o {
                Outgoing::Publish {
                    channel, payload, ..
                } => {
                    pipe.cmd("PUBLISH").arg(channel).arg(&payload[..]).ignore();
                }
                Outgoing::Stream {
                    room,
                    conn,
                    ts_ms,
                    data,
                } => {
                    if let Some(key) = &stream_key {
                        pipe.cmd("XADD")
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
                            .arg("ts")
                            .arg(ts_ms)
                            .arg("data")
                            .arg(&data[..])
                            .ignore();
                    }
                }
            }
        }
        match pipe.query::<()>(c) {
            Ok(()) => {
                link.stats.published.fetch_add(messages, Relaxed);
                link.stats.stream_appended.fetch_add(appended, Relaxed);
            }
            Err(e) => {
                // At-most-once: some of the batch may have gone through; all is counted lost.
                link.stats
                    .count_drop(Dropped::RedisDown, messages + appended);
                con = None;
                if link.stats.publisher_up.swap(false, Relaxed) {
                    log::warn!("redis publisher lost its connection: {e}; retrying");
                }
                retry_at = Instant::now() + backoff;
            }
        }
    }
}
