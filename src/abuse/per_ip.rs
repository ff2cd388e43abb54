//! `--max-connections-per-ip`: open connections per client address, across every worker.
//!
//! A table sharded by the address's hash (64 mutex-guarded maps), touched once when a
//! connection is accepted and once when it is dropped, never per message. An address's entry
//! leaves the table when its count returns to zero, so the table holds at most one entry per
//! open connection (its memory is bounded by `--max-connections`). Hashes are keyed per
//! process (`RandomState`), so a client cannot aim many addresses at one shard.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

const SHARDS: usize = 64;

pub struct ConnectionsPerIp {
    limit: u32,
    shards: Box<[Mutex<HashMap<u64, u32>>]>,
    hasher: std::collections::hash_map::RandomState,
    entries: AtomicUsize,
}

impl ConnectionsPerIp {
    pub fn new(limit: u32) -> ConnectionsPerIp {
        ConnectionsPerIp {
            limit,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
            entries: AtomicUsize::new(0),
        }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        // A panic while holding a shard cannot leave a count half-written: keep going.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more connection from `key`; false (and nothing counted) at the limit.
    pub fn acquire(&self, key: u64) -> bool {
        let mut shard = self.shard(key);
        let n = shard.entry(key).or_insert(0);
        if *n >= self.limit {
            return false;
        }
        *n += 1;
        if *n == 1 {
            self.entries.fetch_add(1, Relaxed);
        }
        true
    }

    /// One connection from `key` closed.
    pub fn release(&self, key: u64) {
        let mut shard = self.shard(key);
        if let Some(n) = shard.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                shard.remove(&key);
                self.entries.fetch_sub(1, Relaxed);
            }
        }
    }

    /// Addresses with at least one connection.
    pub fn entries(&self) -> usize {
        self.entries.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_up_to_the_limit_and_forgets_at_zero() {
        let t = ConnectionsPerIp::new(2);
        assert!(t.acquire(7) && t.acquire(7));
        assert!(!t.acquire(7));
        assert!(t.acquire(8));
        assert_eq!(t.entries(), 2);
        t.release(7);
        assert!(t.acquire(7));
        for _ in 0..2 {
            t.release(7);
        }
        t.release(8);
        assert_eq!(t.entries(), 0);
        assert!(t.shards.iter().all(|s| s.lock().unwrap().is_empty()));
        t.release(9); // never counted: nothing happens
        assert_eq!(t.entries(), 0);
    }

    #[test]
    fn workers_share_the_count() {
        let t = std::sync::Arc::new(ConnectionsPerIp::new(1000));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || (0..500).filter(|_| t.acquire(1)).count())
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 1000);
    }
}
