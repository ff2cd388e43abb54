//! Fan-out: a message published to a room is encoded once into the room's batch; at the end
//! of the turn (or once the batch is big) the batch goes, as one shared chunk, into the outbox
//! of every local member and through the bus to every other worker with members.
//!
//! Backpressure is judged here, in bytes and after the kernel had its chance: a chunk that
//! would take a connection's queue past `--max-backpressure` first makes the worker write
//! that queue out, and only what the kernel still refuses counts against the limit. A prompt
//! reader therefore survives any burst; a reader that stops is closed with 1008 (or misses
//! messages, with `--slow-consumer drop`), and its queue never holds more than the limit plus
//! one chunk.

use std::sync::atomic::Ordering;

use super::{Worker, INBOUND_BATCH};
use crate::bus::{self, Delivery};
use crate::codec::{self, OutKind};
use crate::config::SlowConsumerPolicy;
use crate::connection::ready;
use crate::metrics::{Disconnect, DropReason, WorkerStats};
use crate::outbox::Chunk;

/// A room's frames for one turn go out early once they reach this size, so one turn's batch
/// never holds a connection's queue hostage for long.
const BATCH_LIMIT: usize = 64 * 1024;

impl Worker {
    /// Adds a message from a member to its room's batch.
    pub(super) fn publish(&mut self, room: u32, kind: OutKind, payload: &[u8]) {
        WorkerStats::add(&self.stats().published, 1);
        let local = self.rooms.get_mut(room);
        if local.batch.is_empty() {
            self.pending_rooms.push(room);
        }
        local.batch.push(kind, payload);
        if local.batch.len() >= BATCH_LIMIT {
            self.flush_room_batch(room);
        }
    }

    pub(super) fn flush_batches(&mut self) {
        let mut rooms = std::mem::take(&mut self.pending_rooms);
        for &room in &rooms {
            if self.rooms.contains(room) {
                self.flush_room_batch(room);
            }
        }
        rooms.clear();
        self.pending_rooms = rooms;
    }

    /// Sends a room's batch (frames encoded once, in publication order) to every local member
    /// and to every other worker that has members.
    pub(super) fn flush_room_batch(&mut self, room: u32) {
        let local = self.rooms.get_mut(room);
        let Some(chunk) = local.batch.take() else {
            return;
        };
        let shared = local.shared.clone();
        if let Some(bridge) = &self.shared.bridge {
            // Other nodes' members, through Redis (never waits; see bridge docs).
            bridge.publish(&shared.name, &chunk.bytes, chunk.messages);
        }
        let born = self.turn_start;
        if !local.members.is_empty() {
            self.births.push(born);
        }
        self.deliver_local(room, &chunk);
        let (mut ring, mut overflow) = (0u64, 0u64);
        let bus = &mut self.bus;
        shared.for_each_other_worker(self.id, |w| {
            let d = Delivery {
                room: shared.clone(),
                frames: chunk.bytes.clone(),
                messages: chunk.messages,
                born,
            };
            match bus.send(w, d) {
                bus::Sent::Ring => ring += 1,
                bus::Sent::Overflow => overflow += 1,
            }
        });
        let stats = &self.shared.metrics.workers[self.id];
        let messages = chunk.messages as u64;
        WorkerStats::add(&stats.bus_sent, (ring + overflow) * messages);
        if overflow > 0 {
            WorkerStats::add(&stats.bus_overflowed, overflow * messages);
        }
    }

    pub(super) fn drain_inbound(&mut self) {
        for _ in 0..INBOUND_BATCH {
            let Some(d) = self.bus.try_recv() else {
                return;
            };
            self.tally.bus_received += 1;
            let Some(room) = self.rooms.by_id(d.room.id) else {
                continue; // its last local member left meanwhile: nobody here to deliver to
            };
            self.births.push(d.born);
            let chunk = Chunk {
                bytes: d.frames,
                messages: d.messages,
            };
            self.deliver_local(room, &chunk);
        }
    }

    /// Queues a room's chunk for every local member: the plain frames for members without
    /// permessage-deflate, and for the others the chunk compressed once per window size
    /// present among them (in practice once: browsers never ask for a smaller window), made
    /// on first need and shared like the plain one. Chunks from other workers arrive plain
    /// and are compressed here, so a room spread over workers is compressed once per worker.
    fn deliver_local(&mut self, room: u32, chunk: &Chunk) {
        // By window bits - 9.
        let mut compressed: [Option<Chunk>; 7] = Default::default();
        // Index loop: enqueue never changes membership (nothing is dropped while fanning
        // out; a slow consumer only changes phase), so the member list is stable here.
        for i in 0..self.rooms.get(room).members.len() {
            let member = self.rooms.get(room).members[i];
            let variant = match self.conns[member as usize].session.deflate() {
                None => chunk.clone(),
                Some(a) => {
                    let bits = a.compress_window_bits();
                    let (compressor, tally) = (&mut self.compressor, &mut self.tally.deflate);
                    compressed[usize::from(bits.saturating_sub(9)).min(6)]
                        .get_or_insert_with(|| Chunk {
                            bytes: compressor.compress_frames(&chunk.bytes, bits, tally),
                            messages: chunk.messages,
                        })
                        .clone()
                }
            };
            self.enqueue(member, variant);
        }
    }

    /// Queues a chunk for a connection, applying the backpressure limit (module docs).
    pub(super) fn enqueue(&mut self, key: u32, chunk: Chunk) {
        let feeding = key == self.feeding;
        // The session being fed is out of its slot (`with_session`); it is open if it emits.
        if !feeding && !self.conns[key as usize].session.accepts_data() {
            self.stats().dropped[DropReason::RecipientClosing as usize]
                .fetch_add(chunk.messages as u64, Ordering::Relaxed);
            return;
        }
        if self.over_limit(key, chunk.bytes.len()) {
            let refused = chunk.messages as u64;
            match self.config().slow_consumer {
                SlowConsumerPolicy::Drop => self.count_slow_drop(refused),
                // Its session is closed once the read is done (`judge_backpressure`).
                SlowConsumerPolicy::Close if feeding => {
                    self.feeding_over_limit = true;
                    self.count_slow_drop(refused);
                }
                SlowConsumerPolicy::Close => self.close_slow_consumer(key, refused),
            }
            return;
        }
        self.conns[key as usize].outbox.push_chunk(chunk);
        self.mark_dirty(key);
    }

    /// True if `extra` more bytes would take the queue past the limit even after the kernel
    /// took what it would. A queue that is empty always takes one chunk (the limit bounds
    /// what piles up; `--max-message-size` bounds a message).
    fn over_limit(&mut self, key: u32, extra: usize) -> bool {
        let max = self.config().max_backpressure;
        let over = |w: &Worker| {
            let q = w.conns[key as usize].outbox.queued();
            q > 0 && q + extra > max
        };
        if !over(self) {
            return false;
        }
        // An error surfaces again when the connection is flushed at the end of the turn;
        // nothing may be dropped in the middle of a fan-out.
        let _ = self.write_out(key);
        over(self)
    }

    /// After a session was fed: if its own output (echoes, its copy of its room's messages)
    /// went over the limit meanwhile, it is closed now that its session is back in place.
    pub(super) fn judge_backpressure(&mut self, key: u32) {
        if std::mem::take(&mut self.feeding_over_limit) {
            self.close_slow_consumer(key, 0);
        }
    }

    fn count_slow_drop(&self, messages: u64) {
        self.stats().dropped[DropReason::SlowConsumer as usize]
            .fetch_add(messages, Ordering::Relaxed);
    }

    /// Over the limit with `--slow-consumer close`: the queued messages not yet started are
    /// dropped so the close frame is next on the wire, and the socket goes after
    /// `--close-timeout` even if the client never reads again.
    fn close_slow_consumer(&mut self, key: u32, refused: u64) {
        let now = self.now;
        let c = &mut self.conns[key as usize];
        let dropped = refused + c.outbox.discard_unstarted();
        if let Some(frame) = c.session.close(codec::CLOSE_POLICY, "slow consumer", now) {
            c.outbox.push(frame);
            self.stats().disconnect(Disconnect::SlowConsumer);
        }
        self.count_slow_drop(dropped);
        self.mark_dirty(key);
        self.reschedule(key);
    }

    #[inline]
    pub(super) fn mark_dirty(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        if !c.has(ready::DIRTY) {
            c.set(ready::DIRTY);
            self.dirty.push(key);
        }
    }
}
