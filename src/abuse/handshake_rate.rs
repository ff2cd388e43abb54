//! `--max-handshakes-per-ip N`: new connections per client address per second, as a fixed
//! one-second window counter in a table of fixed size, shared by every worker without a lock.
//!
//! The table is [`BUCKETS`] buckets of [`WAYS`] entries (128 KiB). An address hashes (keyed
//! per process) to one bucket; each entry is one `AtomicU64`: a 32-bit tag from the hash,
//! the 16-bit window (second) and a 16-bit count, updated by compare-and-swap. An address not
//! in its bucket takes an entry of an old window, else the one with the lowest count: when
//! more addresses are active in one second than the table holds, the quietest are forgotten
//! and get a fresh count (the limit fails open for them, never closed for an innocent).
//! A fixed window lets up to 2N through around a window's edge; that is the price of one
//! word per address.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub const BUCKETS: usize = 4096;
pub const WAYS: usize = 4;

pub struct HandshakeRate {
    limit: u16,
    entries: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
}

fn pack(tag: u32, window: u16, count: u16) -> u64 {
    (tag as u64) << 32 | (window as u64) << 16 | count as u64
}

fn unpack(e: u64) -> (u32, u16, u16) {
    ((e >> 32) as u32, (e >> 16) as u16, e as u16)
}

impl HandshakeRate {
    /// `limit` is capped at 65535 (the config refuses more).
    pub fn new(limit: u32) -> HandshakeRate {
        HandshakeRate {
            limit: limit.clamp(1, u16::MAX as u32) as u16,
            entries: (0..BUCKETS * WAYS).map(|_| AtomicU64::new(0)).collect(),
            hasher: Default::default(),
        }
    }

    /// Counts a new connection from `key` in second `now`; false if the address already had
    /// `limit` in this second.
    pub fn admit(&self, key: u64, now: u32) -> bool {
        let h = self.hasher.hash_one(key);
        let bucket = &self.entries[(h as usize % BUCKETS) * WAYS..][..WAYS];
        let tag = ((h >> 32) as u32).max(1); // 0 marks an empty entry
        let window = now as u16;
        // A few tries: another worker may be updating the same bucket; past them, let it in.
        for _ in 0..8 {
            let seen: [u64; WAYS] = std::array::from_fn(|i| bucket[i].load(Relaxed));
            let mine = seen.iter().position(|&e| unpack(e).0 == tag);
            let (i, new) = match mine {
                Some(i) => {
                    let (_, w, n) = unpack(seen[i]);
                    if w != window {
                        (i, pack(tag, window, 1))
                    } else if n >= self.limit {
                        return false;
                    } else {
                        (i, pack(tag, window, n + 1))
                    }
                }
                None => {
                    // An empty or old entry, else the quietest of this second.
                    let victim = (0..WAYS)
                        .min_by_key(|&i| {
                            let (t, w, n) = unpack(seen[i]);
                            if t == 0 || w != window {
                                0
                            } else {
                                n as u32 + 1
                            }
                        })
                        .unwrap_or(0);
                    (victim, pack(tag, window, 1))
                }
            };
            if bucket[i]
                .compare_exchange(seen[i], new, Relaxed, Relaxed)
                .is_ok()
            {
                return true;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_window_per_address() {
        let t = HandshakeRate::new(3);
        assert!((0..3).all(|_| t.admit(1, 10)));
        assert!(!t.admit(1, 10));
        assert!(t.admit(2, 10), "another address has its own count");
        assert!(t.admit(1, 11), "the next second starts over");
        assert!(t.admit(1, 11) && t.admit(1, 11) && !t.admit(1, 11));
    }

    #[test]
    fn a_flood_of_addresses_stays_in_the_table_and_forgets_the_quietest() {
        let t = HandshakeRate::new(2);
        // The busy address fills its count.
        assert!(t.admit(42, 5) && t.admit(42, 5) && !t.admit(42, 5));
        // Far more addresses than entries, once each.
        for k in 1000..1000 + (BUCKETS * WAYS * 4) as u64 {
            assert!(t.admit(k, 5));
        }
        assert_eq!(t.entries.len(), BUCKETS * WAYS, "fixed size");
        // The busy one had the highest count in its bucket: it was the last to be evicted.
        // Either way an address is never refused below its limit.
        for k in 5000..5100u64 {
            assert!(t.admit(k, 6) && t.admit(k, 6));
        }
    }
}
