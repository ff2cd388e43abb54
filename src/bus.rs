//! The cross-core bus: lock-free queues between workers bounded in bytes, and wake-ups that
//! cost a syscall only when the receiver may be asleep.
//!
//! Each worker owns one inbound ring (a crossbeam channel); every other worker holds a sender
//! to it. One sender's messages to one receiver travel through that one FIFO, so per-sender
//! order holds across workers.
//!
//! # Bounded in bytes
//! A ring counts the bytes it holds ([`RingState::queued`]: frames plus a fixed cost per
//! delivery) against `--ring-capacity`. A delivery is refused only when the ring is not empty
//! and it would pass the capacity, so one message larger than the capacity still travels, and
//! the bytes in a ring never exceed the capacity plus one delivery per sender.
//!
//! # Sleeping without losing a wake-up
//! The receiver announces sleep, then looks at its ring once more before `poll`; the sender
//! pushes, then wakes only if the receiver announced sleep:
//! - receiver: `sleeping.store(true, SeqCst)`; if the ring is not empty, `store(false)` and
//!   poll with a zero timeout; otherwise poll.
//! - sender: push; `if sleeping.swap(false, SeqCst) { waker.wake() }`.
//!
//! With SeqCst on both sides either the receiver sees the message in its second look, or the
//! sender sees the flag and wakes it. A busy receiver is never woken, so a stream of messages
//! costs no eventfd writes.
//!
//! # A full ring
//! A message for a full ring waits in the sender's per-destination overflow queue, and every
//! later message for that destination goes behind it (or order would break). The sender then
//! sets its bit in the ring's `waiting` mask and tries once more (the receiver may have
//! drained in between); the receiver, once its ring is at most half full, clears the mask and
//! wakes every sender in it. Only publishers whose rooms have members behind a full ring are
//! paused ([`CrossCoreBus::blocks`]), so memory stays bounded and no message is lost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use crossbeam_utils::CachePadded;
use mio::Waker;

use crate::room_index::RoomShared;

/// A message for the members of a room on another worker.
pub struct Delivery {
    pub room: Arc<RoomShared>,
    /// One or more encoded frames, shared with every other recipient.
    pub frames: Bytes,
    /// Messages inside `frames`.
    pub messages: u32,
    /// When the messages arrived (for the delivery latency samples).
    pub born: std::time::Instant,
}

/// What a delivery costs in its ring: its frames and the delivery itself.
#[inline]
fn cost(d: &Delivery) -> usize {
    d.frames.len() + std::mem::size_of::<Delivery>()
}

/// Puts a delivery in a ring if it has room (an empty ring takes anything); gives it back if
/// not. The only place a ring's byte count grows.
fn push_ring(
    ring: &RingState,
    tx: &Sender<Delivery>,
    capacity: usize,
    d: Delivery,
) -> Result<(), Delivery> {
    let c = cost(&d);
    let before = ring.queued.fetch_add(c, Ordering::SeqCst);
    if before > 0 && before + c > capacity {
        ring.queued.fetch_sub(c, Ordering::SeqCst);
        return Err(d);
    }
    if tx.send(d).is_err() {
        // The receiver is gone (shutting down): nobody is left to deliver to.
        ring.queued.fetch_sub(c, Ordering::SeqCst);
    }
    Ok(())
}

/// How a worker is woken.
pub struct Wakeup {
    pub waker: Waker,
    pub sleeping: AtomicBool,
}

impl Wakeup {
    /// Wakes the worker if it announced sleep. Returns true if a syscall was made.
    #[inline]
    pub fn nudge(&self) -> bool {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            // A failed wake (eventfd counter overflow) still leaves the fd readable.
            let _ = self.waker.wake();
            true
        } else {
            false
        }
    }

    /// Wakes the worker whether or not it sleeps (it may be polling with a long timeout).
    fn force(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// The shared side of one worker's inbound ring: its byte count and who waits for room.
pub struct RingState {
    queued: CachePadded<AtomicUsize>,
    /// Bit `w` is set while worker `w` holds overflow for this ring.
    waiting: Box<[AtomicU64]>,
}

impl RingState {
    /// Bytes in the ring now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// One ring state per worker (shared with the metrics).
pub fn ring_states(n: usize) -> Arc<[RingState]> {
    (0..n)
        .map(|_| RingState {
            queued: CachePadded::new(AtomicUsize::new(0)),
            waiting: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        })
        .collect()
}

/// One worker's end of the bus.
pub struct CrossCoreBus {
    me: usize,
    capacity: usize,
    inbound: Receiver<Delivery>,
    outbound: Vec<Sender<Delivery>>,
    rings: Arc<[RingState]>,
    wakeups: Arc<[Arc<Wakeup>]>,
    overflow: Vec<VecDeque<Delivery>>,
    /// Destinations whose overflow is not empty.
    overflowing: usize,
    /// Destinations pushed to since the last [`CrossCoreBus::wake_peers`].
    touched: Vec<bool>,
}

/// Builds the rings for `n` workers; `wakeups[i]` and `rings[i]` belong to worker `i`. The
/// [`Injector`] lets a thread that is not a worker (the publish API) send into them.
pub fn build(
    capacity: usize,
    rings: Arc<[RingState]>,
    wakeups: Arc<[Arc<Wakeup>]>,
) -> (Vec<CrossCoreBus>, Injector) {
    let n = rings.len();
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| crossbeam_channel::unbounded()).unzip();
    let injector = Injector {
        capacity,
        outbound: txs.clone(),
        rings: rings.clone(),
        wakeups: wakeups.clone(),
        overflow: (0..n).map(|_| VecDeque::new()).collect(),
        overflow_bytes: 0,
    };
    let buses = rxs
        .into_iter()
        .enumerate()
        .map(|(me, inbound)| CrossCoreBus {
            me,
            capacity,
            inbound,
            outbound: txs.clone(),
            rings: rings.clone(),
            wakeups: wakeups.clone(),
            overflow: (0..n).map(|_| VecDeque::new()).collect(),
            overflowing: 0,
            touched: vec![false; n],
        })
        .collect();
    (buses, injector)
}

/// Sends deliveries into the workers' rings from outside them (the publish API's thread),
/// with the same rules as a worker: one FIFO per destination (its overflow first), bounded
/// in bytes, never dropping what it accepted. It never pauses: the caller refuses new work
/// while [`Injector::overflow_bytes`] is high.
pub struct Injector {
    capacity: usize,
    outbound: Vec<Sender<Delivery>>,
    rings: Arc<[RingState]>,
    wakeups: Arc<[Arc<Wakeup>]>,
    overflow: Vec<VecDeque<Delivery>>,
    overflow_bytes: usize,
}

impl Injector {
    /// Sends to worker `to` (behind what already waits for it) and wakes it if it sleeps.
    pub fn send(&mut self, to: usize, d: Delivery) {
        let waiting = if self.overflow[to].is_empty() {
            self.push(to, d).err()
        } else {
            Some(d)
        };
        if let Some(d) = waiting {
            self.overflow_bytes += cost(&d);
            self.overflow[to].push_back(d);
        }
    }

    fn push(&mut self, to: usize, d: Delivery) -> Result<(), Delivery> {
        push_ring(&self.rings[to], &self.outbound[to], self.capacity, d)?;
        self.wakeups[to].nudge();
        Ok(())
    }

    /// Sends only if the ring has room now (and nothing of ours waits for it); false if not:
    /// for a caller that must never wait or hold (the Redis subscriber drops and counts).
    pub fn try_send(&mut self, to: usize, d: Delivery) -> bool {
        self.overflow[to].is_empty() && self.push(to, d).is_ok()
    }

    /// Another injector into the same rings, with its own (empty) overflow: for a second
    /// thread that sends from outside the workers.
    pub fn fork(&self) -> Injector {
        Injector {
            capacity: self.capacity,
            outbound: self.outbound.clone(),
            rings: self.rings.clone(),
            wakeups: self.wakeups.clone(),
            overflow: (0..self.outbound.len()).map(|_| VecDeque::new()).collect(),
            overflow_bytes: 0,
        }
    }

    /// Moves what waits into rings that have room. Returns the bytes still waiting.
    pub fn retry(&mut self) -> usize {
        for to in 0..self.overflow.len() {
            while let Some(d) = self.overflow[to].pop_front() {
                let c = cost(&d);
                match self.push(to, d) {
                    Ok(()) => self.overflow_bytes -= c,
                    Err(d) => {
                        self.overflow[to].push_front(d);
                        break;
                    }
                }
            }
        }
        self.overflow_bytes
    }

    /// Bytes accepted but still waiting for room in a ring.
    pub fn overflow_bytes(&self) -> usize {
        self.overflow_bytes
    }

    /// The ring capacity (how much the caller may let wait before refusing more).
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// What a send did, for the metrics.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Ring,
    Overflow,
}

impl CrossCoreBus {
    /// Sends to worker `to`, behind anything already waiting for it.
    pub fn send(&mut self, to: usize, d: Delivery) -> Sent {
        debug_assert_ne!(to, self.me);
        if !self.overflow[to].is_empty() {
            self.overflow[to].push_back(d);
            return Sent::Overflow;
        }
        match self.push(to, d) {
            Ok(()) => Sent::Ring,
            Err(d) => {
                self.overflow[to].push_back(d);
                self.overflowing += 1;
                self.retry(to);
                Sent::Overflow
            }
        }
    }

    /// Pushes if the ring has room; gives the delivery back if not.
    fn push(&mut self, to: usize, d: Delivery) -> Result<(), Delivery> {
        push_ring(&self.rings[to], &self.outbound[to], self.capacity, d)?;
        self.touched[to] = true;
        Ok(())
    }

    /// Moves what waits for `to` into its ring while it has room. If some must still wait,
    /// asks the receiver to wake us when it has drained (every time: the receiver clears the
    /// request when it wakes us), then looks once more in case it drained before it could see
    /// the request.
    fn retry(&mut self, to: usize) {
        for attempt in 0..2 {
            while let Some(d) = self.overflow[to].pop_front() {
                if let Err(d) = self.push(to, d) {
                    self.overflow[to].push_front(d);
                    break;
                }
            }
            if self.overflow[to].is_empty() {
                self.overflowing -= 1;
                return;
            }
            if attempt == 0 {
                let word = &self.rings[to].waiting[self.me / 64];
                word.fetch_or(1 << (self.me % 64), Ordering::SeqCst);
            }
        }
    }

    /// Moves overflow into rings that have room again. Returns true if overflow remains.
    pub fn retry_overflow(&mut self) -> bool {
        for to in 0..self.overflow.len() {
            if !self.overflow[to].is_empty() {
                self.retry(to);
            }
        }
        self.overflowing > 0
    }

    /// Wakes every worker sent to since the last call (once each, and only if asleep).
    /// Returns the number of wake syscalls made.
    pub fn wake_peers(&mut self) -> u64 {
        let mut n = 0;
        for (w, t) in self.touched.iter_mut().enumerate() {
            if std::mem::take(t) && self.wakeups[w].nudge() {
                n += 1;
            }
        }
        n
    }

    /// True while some destination's ring was full and messages wait here.
    #[inline]
    pub fn is_backed_up(&self) -> bool {
        self.overflowing > 0
    }

    /// True if a message published to `room` now would wait behind a full ring: its
    /// publishers must wait (the others go on).
    #[inline]
    pub fn blocks(&self, room: &RoomShared) -> bool {
        if self.overflowing == 0 {
            return false;
        }
        let mut blocked = false;
        room.for_each_other_worker(self.me, |w| blocked |= !self.overflow[w].is_empty());
        blocked
    }

    /// Takes one inbound delivery.
    #[inline]
    pub fn try_recv(&self) -> Option<Delivery> {
        let d = self.inbound.try_recv().ok()?;
        self.rings[self.me]
            .queued
            .fetch_sub(cost(&d), Ordering::SeqCst);
        Some(d)
    }

    /// After draining: if senders wait for room and the ring is at most half full, wake them.
    pub fn release_waiting_senders(&self) {
        let ring = &self.rings[self.me];
        if ring.waiting.iter().all(|w| w.load(Ordering::SeqCst) == 0)
            || ring.queued.load(Ordering::SeqCst) > self.capacity / 2
        {
            return;
        }
        for (i, word) in ring.waiting.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                self.wakeups[i * 64 + b].force();
            }
        }
    }

    /// Announces sleep; returns false (and cancels it) if the ring is not empty.
    pub fn prepare_to_sleep(&self) -> bool {
        let me = &self.wakeups[self.me];
        me.sleeping.store(true, Ordering::SeqCst);
        if !self.inbound.is_empty() {
            me.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Called after poll returns.
    pub fn awake(&self) {
        self.wakeups[self.me]
            .sleeping
            .store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room_index::RoomDirectory;

    fn setup(n: usize, capacity: usize) -> (Vec<CrossCoreBus>, Arc<[RingState]>, Vec<mio::Poll>) {
        let polls: Vec<mio::Poll> = (0..n).map(|_| mio::Poll::new().unwrap()).collect();
        let wakeups: Arc<[Arc<Wakeup>]> = polls
            .iter()
            .map(|p| {
                Arc::new(Wakeup {
                    waker: Waker::new(p.registry(), mio::Token(0)).unwrap(),
                    sleeping: AtomicBool::new(false),
                })
            })
            .collect();
        let rings = ring_states(n);
        (build(capacity, rings.clone(), wakeups).0, rings, polls)
    }

    fn delivery(room: &Arc<RoomShared>, len: usize) -> Delivery {
        Delivery {
            room: room.clone(),
            frames: Bytes::from(vec![7u8; len]),
            messages: 1,
            born: std::time::Instant::now(),
        }
    }

    #[test]
    fn rings_are_bounded_in_bytes_and_keep_order_through_overflow() {
        let (mut buses, rings, _polls) = setup(2, 64 * 1024);
        let dir = RoomDirectory::new(2);
        let room = dir.attach("r", 1);
        let mut sent = 0;
        for i in 0..40 {
            // 40 × 16 KiB: the ring takes about 4 of them, the rest wait in overflow.
            let mut d = delivery(&room, 16 * 1024);
            d.messages = i;
            buses[0].send(1, d);
            sent += 1;
        }
        assert!(
            rings[1].queued() <= 64 * 1024 + 16 * 1024 + 64,
            "{}",
            rings[1].queued()
        );
        assert!(buses[0].is_backed_up());
        assert!(
            buses[0].blocks(&room),
            "room with members behind the full ring"
        );
        let other = dir.attach("elsewhere", 0);
        assert!(
            !buses[0].blocks(&other),
            "a room with no members there goes on"
        );
        let mut seen = Vec::new();
        while seen.len() < sent {
            while let Some(d) = buses[1].try_recv() {
                seen.push(d.messages);
            }
            buses[1].release_waiting_senders();
            buses[0].retry_overflow();
        }
        assert_eq!(seen, (0..40).collect::<Vec<_>>(), "order kept");
        assert_eq!(rings[1].queued(), 0);
        assert!(!buses[0].is_backed_up());
    }

    #[test]
    fn a_sender_that_still_cannot_push_after_a_wake_asks_again() {
        let (mut buses, rings, _polls) = setup(2, 64 * 1024);
        let dir = RoomDirectory::new(2);
        let room = dir.attach("r", 1);
        let me = |rings: &Arc<[RingState]>| rings[1].waiting[0].load(Ordering::SeqCst) & 1;
        for _ in 0..3 {
            buses[0].send(1, delivery(&room, 40 * 1024)); // one in the ring, two waiting
        }
        assert_eq!(me(&rings), 1, "asked to be woken");
        assert!(buses[1].try_recv().is_some());
        buses[1].release_waiting_senders();
        assert_eq!(me(&rings), 0, "woken: the request is used up");
        buses[0].retry_overflow(); // one more fits, the last still waits
        assert!(buses[0].is_backed_up());
        assert_eq!(me(&rings), 1, "still waiting, so it asks again");
    }

    #[test]
    fn a_message_bigger_than_the_ring_still_travels() {
        let (mut buses, rings, _polls) = setup(2, 4096);
        let dir = RoomDirectory::new(2);
        let room = dir.attach("r", 1);
        assert_eq!(buses[0].send(1, delivery(&room, 100_000)), Sent::Ring);
        assert!(rings[1].queued() > 100_000);
        assert!(buses[1].try_recv().is_some());
        assert_eq!(rings[1].queued(), 0);
    }
}
