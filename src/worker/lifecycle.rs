//! Lifecycle: each connection's one timer (its session says when and what), the drain on
//! shutdown, and the two ways a connection leaves: dropped after its session is done, or on an
//! I/O error.

use std::sync::atomic::Ordering;

use super::{ticks_of, Worker};
use crate::connection::ready;
use crate::session::Due;
use crate::timer_wheel::Entry;

impl Worker {
    /// Makes `at` the connection's next check (superseding any earlier entry). `timer_at` is
    /// the tick of the one live entry (0: none, every deadline is at least one tick away), so
    /// asking twice for the same tick adds no second entry.
    pub(super) fn schedule(&mut self, key: u32, at: u32) {
        let c = &mut self.conns[key as usize];
        if c.timer_at == at {
            return;
        }
        c.timer_at = at;
        self.wheel.insert(
            at as u64,
            Entry {
                key,
                generation: c.generation,
                at,
            },
        );
    }

    /// Schedules the check the session's phase calls for (after a phase change the worker
    /// made: accept, slow consumer, drain; activity itself costs no wheel operation).
    pub(super) fn reschedule(&mut self, key: u32) {
        let at = self.conns[key as usize].session.deadline(&self.limits);
        self.schedule(key, at);
    }

    pub(super) fn fire_timers(&mut self) {
        let mut due = std::mem::take(&mut self.due);
        self.wheel.advance(self.now as u64, &mut due);
        for e in due.drain(..) {
            let Some(c) = self.conns.get(e.key as usize) else {
                continue;
            };
            if c.generation != e.generation || c.timer_at != e.at {
                continue; // closed, reused, or superseded
            }
            let paused = c.has(ready::PAUSED);
            self.conns[e.key as usize].timer_at = 0; // this entry is spent
            let (now, lim) = (self.now, self.limits);
            match self.with_session(e.key, |s, host| s.on_timer(now, paused, &lim, host)) {
                Due::Drop => self.drop_conn(e.key),
                Due::At(at) => self.schedule(e.key, at),
            }
        }
        self.due = due;
    }

    /// Stops accepting and asks every session to close (1001); sessions still closing get
    /// until `--drain-timeout`.
    pub(super) fn begin_drain(&mut self) {
        self.draining = true;
        self.limits.drain_until = Some(self.now + ticks_of(self.config().drain_timeout));
        for mut l in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_backlog.clear();
        let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
        let now = self.now;
        for key in keys {
            match self.with_session(key, |s, host| s.shutdown(now, host)) {
                Some(Due::Drop) => self.drop_conn(key),
                _ => self.reschedule(key),
            }
        }
    }

    /// Draining is done when every client is gone and nothing waits for another worker's
    /// ring, or when the drain timeout passed (then the rest are dropped).
    pub(super) fn drained(&mut self) -> bool {
        if self.conns.is_empty() && !self.bus.is_backed_up() {
            return true;
        }
        if self.limits.drain_until.is_some_and(|d| self.now >= d) {
            let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
            for k in keys {
                self.drop_conn(k);
            }
            return true;
        }
        false
    }

    pub(super) fn fail_io(&mut self, key: u32) {
        self.with_session(key, |s, host| s.io_failed(host));
        self.drop_conn(key);
    }

    /// Removes a connection for good: leaves its room and closes the socket.
    pub(super) fn drop_conn(&mut self, key: u32) {
        debug_assert_ne!(key, self.feeding, "a session being fed is never dropped");
        if let Some(m) = self.conns.get(key as usize).and_then(|c| c.membership()) {
            // Its room may be about to empty here: what was published this turn still goes
            // to the other workers' members.
            self.flush_room_batch(m.room);
        }
        let Some(conn) = self.conns.try_remove(key as usize) else {
            return;
        };
        self.proxied.remove(&key);
        if conn.session.holds_inflater() {
            self.stats().inflaters_held.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(m) = conn.membership() {
            if let Some((moved, position)) = self.rooms.leave(&self.shared.rooms, self.id, m) {
                self.conns[moved as usize].set_room_position(position);
            }
        }
        self.release_ip(key);
        self.shared.sockets.fetch_sub(1, Ordering::Relaxed);
        self.stats().connections.fetch_sub(1, Ordering::Relaxed);
        drop(conn); // closing the fd removes it from epoll
    }
}
