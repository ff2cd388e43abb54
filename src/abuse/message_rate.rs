//! `--max-message-rate N/s` with `--max-message-burst B`: a token bucket per connection, kept
//! in the session as one `u32` and refilled from the clock tick whenever the session hears
//! from the client. No timer, no scan: a connection that sends nothing costs nothing.
//!
//! Tokens are counted in 1/[`UNITS`] of a message, so that N/s refills a whole number of
//! units per tick (N units per 100 ms tick: N/10 messages). The bucket holds B messages and
//! starts full; each message (and each ping: a pong costs the server a write too) takes one.
//! A stored value above the capacity means "full" (a new session starts at `u32::MAX`, so it
//! needs no configuration to be built).

use crate::timer_wheel::TICK;

/// Ticks per second, and so token units per message.
pub const UNITS: u32 = (1_000_000_000 / TICK.as_nanos()) as u32;
const _: () = assert!(
    TICK.as_nanos() * UNITS as u128 == 1_000_000_000,
    "whole ticks per second"
);

/// The bucket's parameters (the per-connection state is the `u32` the session keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRate {
    /// Units added per tick: N.
    per_tick: u32,
    /// Units held when full: B messages.
    capacity: u32,
}

impl MessageRate {
    /// `per_second` messages per second, `burst` at once. The config keeps both in range
    /// (`burst * UNITS` fits in a u32).
    pub fn new(per_second: u32, burst: u32) -> MessageRate {
        MessageRate {
            per_tick: per_second,
            capacity: burst.saturating_mul(UNITS),
        }
    }

    /// Messages per second.
    pub fn per_second(&self) -> u32 {
        self.per_tick
    }

    /// Messages at once.
    pub fn burst(&self) -> u32 {
        self.capacity / UNITS
    }

    /// The bucket after `ticks` ticks without a refill.
    #[inline]
    pub fn refill(&self, tokens: u32, ticks: u32) -> u32 {
        let added = (ticks as u64) * (self.per_tick as u64);
        (tokens.min(self.capacity) as u64 + added).min(self.capacity as u64) as u32
    }

    /// Takes one message's worth; false (bucket unchanged) if it is not there.
    #[inline]
    pub fn take(&self, tokens: &mut u32) -> bool {
        let have = (*tokens).min(self.capacity);
        if have < UNITS {
            return false;
        }
        *tokens = have - UNITS;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_the_rate() {
        let r = MessageRate::new(20, 5); // 20/s = 2 per 100 ms tick
        let mut t = u32::MAX; // a new session: full
        assert!((0..5).all(|_| r.take(&mut t)), "the burst");
        assert!(!r.take(&mut t));
        t = r.refill(t, 1);
        assert!(r.take(&mut t) && r.take(&mut t) && !r.take(&mut t));
        t = r.refill(t, 100);
        assert_eq!(
            (0..100).filter(|_| r.take(&mut t)).count(),
            5,
            "never past the burst"
        );
        // Over ten seconds 20 per second get through, plus the burst.
        let mut t = u32::MAX;
        let mut passed = 0;
        for _tick in 0..100 {
            t = r.refill(t, 1);
            passed += (0..10).filter(|_| r.take(&mut t)).count();
        }
        assert_eq!(
            passed,
            5 + 2 * 99,
            "the burst, then 2 per tick after the first"
        );
        // Slow rates refill in fractions of a message per tick.
        let r = MessageRate::new(1, 1);
        let mut t = u32::MAX;
        assert!(r.take(&mut t) && !r.take(&mut t));
        t = r.refill(t, 9);
        assert!(!r.take(&mut t));
        t = r.refill(t, 1);
        assert!(r.take(&mut t));
        assert_eq!(
            r.refill(0, u32::MAX),
            UNITS,
            "no overflow after a long silence"
        );
    }
}
