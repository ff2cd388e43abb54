//! The subscriber thread: one connection in pub/sub mode holding one `SUBSCRIBE` per room with
//! members in this process (with `--redis-sharded`, one connection per cluster master, each
//! holding `SSUBSCRIBE` for the rooms whose slot it owns). Between short reads it applies the room directory's changes
//! (subscribe at once, unsubscribe after a delay against churn), probes a silent link, and on
//! any error reconnects with back-off and resubscribes every live room.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::resp::{self, SubConn};
use super::shards::{self, Topology};
use super::{envelope, BridgeLink, Dropped, RoomChange};
use crate::bus::{Delivery, Injector};
use crate::worker::Shared;

/// How long a room's channel stays subscribed after its last member left.
const UNSUBSCRIBE_AFTER: Duration = Duration::from_secs(2);
/// A link that brought nothing for this long is probed with a PING.
const PROBE_AFTER: Duration = Duration::from_secs(30);
const PROBE_GRACE: Duration = Duration::from_secs(5);
/// Channels per SUBSCRIBE / UNSUBSCRIBE command.
const PER_COMMAND: usize = 512;
/// Messages read from one connection before the room changes are looked at again.
const PER_ROUND: usize = 256;

pub(super) fn spawn(
    changes: Receiver<RoomChange>,
    link: Arc<BridgeLink>,
    shared: Arc<Shared>,
    injector: Injector,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("megasock-redis-sub".into())
        .spawn(move || {
            let (seed, sharded) = (
                shared.config.redis.clone().unwrap_or_default(),
                shared.config.redis_sharded,
            );
            Subscriber {
                link,
                shared,
                injector,
                changes,
                wanted: HashSet::new(),
                leaving: HashMap::new(),
            }
            .run(seed, sharded)
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
    fn run(mut self, seed: String, sharded: bool) {
        let mut backoff = Duration::from_millis(100);
        // The first failure is logged even if the link was never up (a wrong URL or port).
        let mut warned = false;
        loop {
            self.take_changes();
            let err = match self.connect(&seed, sharded) {
                Ok((topology, mut cons)) => {
                    backoff = Duration::from_millis(100);
                    warned = false;
                    self.serve(&topology, &mut cons).err()
                }
                Err(e) => Some(e),
            };
            if let Some(e) = err {
                let was_up = self.link.stats.subscriber_up.swap(false, Relaxed);
                if was_up || !warned {
                    log::warn!("redis subscriber: {e}; retrying with back-off");
                    warned = true;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }

    /// The topology (one server, or the cluster's masters) and a connection to each server.
    fn connect(&self, seed: &str, sharded: bool) -> std::io::Result<(Topology, Vec<SubConn>)> {
        let topology = shards::discover(seed, sharded).map_err(std::io::Error::other)?;
        let servers = topology.servers();
        // Short reads, spread over the servers, so changes are applied promptly.
        let wait = Duration::from_millis((50 / servers.len() as u64).max(5));
        let cons = servers
            .iter()
            .map(|url| SubConn::connect(url, wait))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok((topology, cons))
    }

    /// Subscribes (or unsubscribes) `channels`, each on the server that owns it.
    fn command(
        topology: &Topology,
        cons: &mut [SubConn],
        verb: &str,
        channels: &[String],
    ) -> std::io::Result<()> {
        for (i, con) in cons.iter_mut().enumerate() {
            let mut mine: Vec<&String> =
                channels.iter().filter(|c| topology.owner(c) == i).collect();
            // SSUBSCRIBE takes channels of one slot per command; plain SUBSCRIBE any.
            let slot = |c: &&String| match topology {
                Topology::Cluster(_) => shards::slot(c.as_bytes()),
                Topology::Single(_) => 0,
            };
            mine.sort_by_key(slot);
            for group in mine.chunk_by(|a, b| slot(a) == slot(b)) {
                for chunk in group.chunks(PER_COMMAND) {
                    con.send(&redis::cmd(verb).arg(chunk).get_packed_command())?;
                }
            }
        }
        Ok(())
    }

    /// One connection set's life: subscribe every wanted room, then read until an error.
    fn serve(&mut self, topology: &Topology, cons: &mut [SubConn]) -> std::io::Result<()> {
        let (_, subscribe, unsubscribe) = topology.verbs();
        let started = Instant::now();
        let all: Vec<String> = self.wanted.iter().map(|r| self.link.channel(r)).collect();
        Self::command(topology, cons, subscribe, &all)?;
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
                "redis subscriber connected to {} server(s); {} room channels subscribed",
                cons.len(),
                all.len()
            );
        }
        let mut heard = Instant::now();
        let mut probed = false;
        loop {
            for con in cons.iter_mut() {
                // Everything already buffered on this connection, then the next one.
                // A bounded number per round: a busy channel must not hold back the room
                // changes (a new room waiting for its SUBSCRIBE) or the other connections.
                for _ in 0..PER_ROUND {
                    let Some(v) = con.read_value()? else { break };
                    heard = Instant::now();
                    if let Some((channel, payload)) = resp::message(&v) {
                        self.deliver(&String::from_utf8_lossy(channel), payload);
                    }
                }
            }
            let (join, leave) = self.take_changes();
            if !join.is_empty() {
                Self::command(topology, cons, subscribe, &join)?;
            }
            if !leave.is_empty() {
                Self::command(topology, cons, unsubscribe, &leave)?;
            }
            self.link
                .stats
                .subscriptions
                .store(self.wanted.len() as u64, Relaxed);
            // A link silent for PROBE_AFTER gets a PING (answered in-band on a subscribed
            // connection); still silent PROBE_GRACE later, it is restarted.
            let silent = heard.elapsed();
            if silent > PROBE_AFTER + PROBE_GRACE {
                return Err(std::io::Error::other(format!(
                    "no answer to a PING in {PROBE_GRACE:?} after {PROBE_AFTER:?} of silence"
                )));
            }
            if silent > PROBE_AFTER && !probed {
                for con in cons.iter_mut() {
                    con.send(&redis::cmd("PING").get_packed_command())?;
                }
                probed = true;
            }
            if silent < PROBE_AFTER {
                probed = false;
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
