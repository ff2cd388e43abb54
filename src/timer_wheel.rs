//! A hashed timer wheel for per-connection deadlines (handshake, ping, idle, close).
//!
//! Time is counted in ticks of [`TICK`]. Each connection has at most one entry in the wheel, in
//! the slot of its next check. Activity on a connection costs nothing here: the connection
//! stores its own "last heard from" tick, and when its slot fires the owner decides whether to
//! act or to re-insert the entry at the new deadline. A tick therefore touches only the
//! connections whose slot it is, which keeps timers cheap at a million connections.
//!
//! Deadlines further than the wheel's span simply land in a slot that fires early; the owner
//! sees the deadline has not passed and re-inserts.

use std::time::Duration;

/// Length of one tick.
pub const TICK: Duration = Duration::from_millis(100);
const SLOTS: usize = 1024;

/// What the wheel stores: a slab key and the generation that owned it when inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub key: u32,
    pub generation: u32,
    /// The tick this entry was scheduled for; the owner ignores entries it has superseded.
    pub at: u32,
}

pub struct TimerWheel {
    slots: Vec<Vec<Entry>>,
    /// Every slot before this tick has been handed out by [`TimerWheel::advance`].
    next_tick: u64,
}

impl Default for TimerWheel {
    fn default() -> Self {
        Self::new()
    }
}

impl TimerWheel {
    pub fn new() -> TimerWheel {
        TimerWheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            next_tick: 0,
        }
    }

    /// Converts a duration to whole ticks, rounding up (a timeout never fires early).
    pub fn ticks(d: Duration) -> u64 {
        let t = TICK.as_nanos();
        (d.as_nanos().div_ceil(t)) as u64
    }

    /// Schedules a check of `entry` at tick `at` (or at the next tick if `at` has passed).
    pub fn insert(&mut self, at: u64, entry: Entry) {
        let at = at.max(self.next_tick);
        self.slots[(at % SLOTS as u64) as usize].push(entry);
    }

    /// Moves every entry whose slot is due at `now` into `due` (in slot order).
    pub fn advance(&mut self, now: u64, due: &mut Vec<Entry>) {
        // Past a whole revolution every slot is due once; no need to visit a slot twice.
        let stop = now.min(self.next_tick + SLOTS as u64 - 1);
        while self.next_tick <= stop {
            let slot = &mut self.slots[(self.next_tick % SLOTS as u64) as usize];
            due.append(slot);
            if slot.capacity() > 64 {
                slot.shrink_to(64);
            }
            self.next_tick += 1;
        }
        self.next_tick = self.next_tick.max(now + 1);
    }

    /// The tick whose slot fires next.
    pub fn next_tick(&self) -> u64 {
        self.next_tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(key: u32) -> Entry {
        Entry {
            key,
            generation: 0,
            at: 0,
        }
    }

    #[test]
    fn fires_in_order_and_not_early() {
        let mut w = TimerWheel::new();
        w.insert(5, e(1));
        w.insert(3, e(2));
        let mut due = vec![];
        w.advance(2, &mut due);
        assert!(due.is_empty());
        w.advance(4, &mut due);
        assert_eq!(due, vec![e(2)]);
        due.clear();
        w.advance(5, &mut due);
        assert_eq!(due, vec![e(1)]);
    }

    #[test]
    fn far_deadlines_fire_early_for_recheck_and_late_jumps_lose_nothing() {
        let mut w = TimerWheel::new();
        w.insert(SLOTS as u64 + 7, e(1));
        w.insert(9, e(2));
        let mut due = vec![];
        w.advance(10, &mut due);
        assert_eq!(
            due,
            vec![e(1), e(2)],
            "slot 7 fires a revolution early: owner re-inserts"
        );
        due.clear();
        w.insert(20, e(3));
        w.advance(100_000, &mut due);
        assert_eq!(due, vec![e(3)]);
        assert_eq!(TimerWheel::ticks(Duration::from_millis(250)), 3);
    }
}
