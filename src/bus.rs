//! The cross-core bus: bounded lock-free rings between workers, and wake-ups that cost a
//! syscall only when the receiver may be asleep.
//!
//! Each worker owns one inbound ring (a bounded crossbeam channel); every other worker holds a
//! sender to it. One sender's messages to one receiver travel through that one FIFO, so
//! per-sender order holds across workers.
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
//! later message for that destination goes behind it (or order would break). While any
//! overflow is non-empty the sending worker stops reading from its publishers, so memory stays
//! bounded: backpressure to the publishers, never loss.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::Waker;

use crate::room_index::RoomShared;

/// A message for the members of a room on another worker.
pub struct Delivery {
    pub room: Arc<RoomShared>,
    /// One or more encoded frames, shared with every other recipient.
    pub frames: Bytes,
    /// Messages inside `frames`.
    pub messages: u32,
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
}

/// One worker's end of the bus.
pub struct CrossCoreBus {
    me: usize,
    inbound: Receiver<Delivery>,
    outbound: Vec<Sender<Delivery>>,
    wakeups: Arc<[Arc<Wakeup>]>,
    overflow: Vec<VecDeque<Delivery>>,
    overflowing: usize,
    /// Destinations pushed to since the last [`CrossCoreBus::wake_peers`].
    touched: Vec<bool>,
}

/// Builds the rings for `n` workers; `wakeups[i]` belongs to worker `i`.
pub fn build(n: usize, capacity: usize, wakeups: Arc<[Arc<Wakeup>]>) -> Vec<CrossCoreBus> {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| crossbeam_channel::bounded(capacity)).unzip();
    rxs.into_iter()
        .enumerate()
        .map(|(me, inbound)| CrossCoreBus {
            me,
            inbound,
            outbound: txs.clone(),
            wakeups: wakeups.clone(),
            overflow: (0..n).map(|_| VecDeque::new()).collect(),
            overflowing: 0,
            touched: vec![false; n],
        })
        .collect()
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
        match self.outbound[to].try_send(d) {
            Ok(()) => {
                self.touched[to] = true;
                Sent::Ring
            }
            // The receiver is gone (shutting down): nobody is left to deliver to.
            Err(TrySendError::Disconnected(_)) => Sent::Ring,
            Err(TrySendError::Full(d)) => {
                self.overflow[to].push_back(d);
                self.overflowing += 1;
                self.touched[to] = true;
                Sent::Overflow
            }
        }
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

    /// Moves overflow into rings that have room again. Returns true if overflow remains.
    pub fn retry_overflow(&mut self) -> bool {
        if self.overflowing == 0 {
            return false;
        }
        for to in 0..self.overflow.len() {
            let q = &mut self.overflow[to];
            if q.is_empty() {
                continue;
            }
            while let Some(d) = q.pop_front() {
                match self.outbound[to].try_send(d) {
                    Ok(()) => self.touched[to] = true,
                    Err(TrySendError::Full(d)) => {
                        q.push_front(d);
                        break;
                    }
                    // The receiver is gone (shutting down): nobody left to deliver to.
                    Err(TrySendError::Disconnected(_)) => {}
                }
            }
            if q.is_empty() {
                self.overflowing -= 1;
            }
        }
        self.overflowing > 0
    }

    /// True while some destination's ring was full and messages wait here.
    #[inline]
    pub fn is_backed_up(&self) -> bool {
        self.overflowing > 0
    }

    /// Takes one inbound delivery.
    #[inline]
    pub fn try_recv(&self) -> Option<Delivery> {
        self.inbound.try_recv().ok()
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
