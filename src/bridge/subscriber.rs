//! The subscriber thread: one connection in pub/sub mode holding one `SUBSCRIBE` per room with
//! members in this process. Between short reads it applies the room directory's changes
//! (subscribe at once, unsubscribe after a delay against churn), probes a silent link, and on
//! any error reconnects with back-off and resubscribes every live room.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::{envelope, BridgeLink, Dropped, RoomChange};
use crate::bus::{Delivery, Injector};
use crate::worker::Shared;

/// How long a room's channel stays subscribed after its last member left.
const UNSUBSCRIBE_AFTER: Duration = Duration::from_secs(2);
/// A link that brought nothing for this long is probed with a PING.
const PROBE_AFTER: Duration = Duration::from_secs(30);
/// Channels per SUBSCRIBE / UNSUBSCRIBE command.
const PER_COMMAND: usize = 512;

pub(super) fn spawn(
    client: redis::Client,
    changes: Receiver<RoomChange>,
    link: Arc<BridgeLink>,
    shared: Arc<Shared>,
    injector: Injector,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("megasock-redis-sub".into())
        .spawn(move || {
            Subscriber {
                link,
                shared,
                injector,
                changes,
                wanted: HashSet::new(),
                leaving: HashMap::new(),
            }
            .run(client)
        })?;
    Ok(())
}

struct Subscriber {
    link: Arc<BridgeLink>,
    shared: Arc<Shared>,
    injector: Injector,
    changes: Receiver<RoomChange>,
    /// Rooms with members here (their channels must be subscribed).
    wanted: HashSet<Box<str>>,
    /// Rooms whose last member left, and when their channel is let go.
    leaving: HashMap<Box<str>, Instant>,
}

impl Subscriber {
    fn run(mut self, client: redis::Client) {
        let mut backoff = Duration::from_millis(100);
        loop {
            self.take_changes();
            let mut con = match client.get_connection_with_timeout(Duration::from_secs(2)) {
                Ok(c) => c,
                Err(e) => {
                    if self.link.stats.subscriber_up.swap(false, Relaxed) {
                        log::warn!("redis subscriber lost its connection: {e}; retrying");
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            if let Err(e) = self.serve(&mut con) {
                if self.link.stats.subscriber_up.swap(false, Relaxed) {
                    log::warn!("redis subscriber lost its connection: {e}; reconnecting");
                }
            }
        }
    }

    /// One connection's life: subscribe every wanted room, then read until an error.
    fn serve(&mut self, con: &mut redis::Connection) -> redis::RedisResult<()> {
        con.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut ps = con.as_pubsub();
        let started = Instant::now();
        let all: Vec<String> = self.wanted.iter().map(|r| self.link.channel(r)).collect();
        for chunk in all.chunks(PER_COMMAND) {
            ps.subscribe(chunk)?;
        }
        self.link
            .stats
            .resubscribe_us
            .store(started.elapsed().as_micros() as u64, Relaxed);
        self.link
            .stats
            .subscriptions
            .store(all.len() as u64, Relaxed);
        if !self.link.stats.subscriber_up.swap(true, Relaxed) {
            log::info!(
                "redis subscriber connected; {} room channels subscribed",
                all.len()
            );
        }
        let mut heard = Instant::now();
        loop {
            match ps.get_message() {
                Ok(msg) => {
                    heard = Instant::now();
                    self.deliver(msg.get_channel_name(), msg.get_payload_bytes());
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
            }
            let (join, leave) = self.take_changes();
            if !join.is_empty() {
                for chunk in join.chunks(PER_COMMAND) {
                    ps.subscribe(chunk)?;
                }
            }
            if !leave.is_empty() {
                for chunk in leave.chunks(PER_COMMAND) {
                    ps.unsubscribe(chunk)?;
                }
            }
            self.link
                .stats
                .subscriptions
                .store(self.wanted.len() as u64, Relaxed);
            if heard.elapsed() > PROBE_AFTER {
                let _: String = ps.ping()?;
                heard = Instant::now();
            }
        }
    }

    /// Applies the directory's changes; returns channels to subscribe and to let go.
    fn take_changes(&mut self) -> (Vec<String>, Vec<String>) {
        let mut join = Vec::new();
        while let Ok(change) = self.changes.try_recv() {
            match change {
                RoomChange::First(room) => {
                    // Back before its channel was let go: nothing to do.
                    if self.leaving.remove(&room).is_none() && self.wanted.insert(room.clone()) {
                        join.push(self.link.channel(&room));
                    }
                }
                RoomChange::Last(room) => {
                    self.leaving
                        .insert(room, Instant::now() + UNSUBSCRIBE_AFTER);
                }
            }
        }
        let now = Instant::now();
        let due: Vec<Box<str>> = self
            .leaving
            .iter()
            .filter(|(_, at)| now >= **at)
            .map(|(r, _)| r.clone())
            .collect();
        let mut leave = Vec::new();
        for room in due {
            self.leaving.remove(&room);
            if self.wanted.remove(&room) {
                leave.push(self.link.channel(&room));
            }
        }
        (join, leave)
    }

    /// A message from Redis: to every worker with members of its room, in arrival order.
    fn deliver(&mut self, channel: &str, payload: &[u8]) {
        let prefix = self.link.channel("");
        let Some(room) = channel.strip_prefix(&prefix) else {
            return;
        };
        let got = envelope::unwrap(payload);
        if got.node.as_ref() == Some(self.link.node()) {
            return; // ours, already delivered here
        }
        let stats = &self.link.stats;
        stats.received.fetch_add(got.messages as u64, Relaxed);
        if let Some(ts) = got.published_ns {
            stats.lag(super::now_ns().saturating_sub(ts) / 1_000);
        }
        let Some(shared_room) = self.shared.rooms.find(room) else {
            return; // its last member here just left
        };
        let born = Instant::now();
        let injector = &mut self.injector;
        shared_room.for_each_worker(|w| {
            let d = Delivery {
                room: shared_room.clone(),
                frames: got.frames.clone(),
                messages: got.messages,
                born,
            };
            if !injector.try_send(w, d) {
                stats.count_drop(Dropped::WorkerRingFull, got.messages as u64);
            }
        });
    }
}
