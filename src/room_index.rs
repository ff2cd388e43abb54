//! Rooms: which connections of this worker are in which room, and which workers have members.
//!
//! Two levels:
//! - [`RoomDirectory`] (one per server, behind a mutex) maps a room name to a [`RoomShared`]
//!   that carries a stable id and a bit per worker that has members. It is touched only when a
//!   worker gets its first member of a room or loses its last one, never per message.
//! - [`RoomIndex`] (one per worker, no locks) maps rooms to local member lists. Members are slab
//!   keys; a connection remembers its position in the list, so leaving is O(1).
//!
//! A publisher reads the worker bits of the room (one atomic load per word) to know which other
//! workers need the message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use slab::Slab;

use crate::outbox::FrameBatch;

/// What every worker knows about a room.
pub struct RoomShared {
    pub id: u64,
    pub name: Box<str>,
    /// Bit `w` is set while worker `w` has at least one member.
    workers: Box<[AtomicU64]>,
    /// Members across all workers (changed on join and leave only).
    members: AtomicU64,
}

impl RoomShared {
    /// Members across all workers.
    pub fn members(&self) -> u64 {
        self.members.load(Ordering::Relaxed)
    }

    /// Calls `f` for every worker that has members.
    #[inline]
    pub fn for_each_worker(&self, f: impl FnMut(usize)) {
        self.for_each_other_worker(usize::MAX, f);
    }

    /// Calls `f` for every worker other than `me` that has members.
    #[inline]
    pub fn for_each_other_worker(&self, me: usize, mut f: impl FnMut(usize)) {
        for (word_index, word) in self.workers.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let w = word_index * 64 + b;
                if w != me {
                    f(w);
                }
            }
        }
    }
}

/// Name -> room, shared by all workers.
pub struct RoomDirectory {
    workers: usize,
    /// Told when a room gets its first member in this process, or loses its last (the Redis
    /// bridge subscribes to its channel meanwhile).
    observer: std::sync::OnceLock<crossbeam_channel::Sender<crate::bridge::RoomChange>>,
    inner: Mutex<DirectoryInner>,
    /// Memberships across all rooms and workers.
    memberships: AtomicU64,
}

struct DirectoryInner {
    next_id: u64,
    rooms: HashMap<Box<str>, Arc<RoomShared>>,
}

impl RoomDirectory {
    pub fn new(workers: usize) -> RoomDirectory {
        RoomDirectory {
            workers,
            inner: Mutex::new(DirectoryInner {
                next_id: 1,
                rooms: HashMap::new(),
            }),
            memberships: AtomicU64::new(0),
            observer: std::sync::OnceLock::new(),
        }
    }

    /// Sends first/last-member events to `tx` from now on.
    pub fn observe(&self, tx: crossbeam_channel::Sender<crate::bridge::RoomChange>) {
        let _ = self.observer.set(tx);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DirectoryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The room called `name`, if it has members somewhere.
    pub fn find(&self, name: &str) -> Option<Arc<RoomShared>> {
        self.lock().rooms.get(name).cloned()
    }

    /// Memberships across all rooms and workers.
    pub fn memberships(&self) -> u64 {
        self.memberships.load(Ordering::Relaxed)
    }

    /// The `n` rooms with the most members, most first.
    pub fn top(&self, n: usize) -> Vec<(Box<str>, u64)> {
        let mut all: Vec<(Box<str>, u64)> = self
            .lock()
            .rooms
            .values()
            .map(|r| (r.name.clone(), r.members()))
            .collect();
        let n = n.min(all.len());
        if n > 0 {
            all.select_nth_unstable_by(n - 1, |a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        all.truncate(n);
        all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        all
    }

    /// Worker `w` gets its first member of `name`.
    pub fn attach(&self, name: &str, w: usize) -> Arc<RoomShared> {
        let mut inner = self.lock();
        let words = self.workers.div_ceil(64);
        let room = if let Some(r) = inner.rooms.get(name) {
            r.clone()
        } else {
            let id = inner.next_id;
            inner.next_id += 1;
            let r = Arc::new(RoomShared {
                id,
                name: name.into(),
                workers: (0..words).map(|_| AtomicU64::new(0)).collect(),
                members: AtomicU64::new(0),
            });
            inner.rooms.insert(name.into(), r.clone());
            if let Some(o) = self.observer.get() {
                let _ = o.send(crate::bridge::RoomChange::First(name.into()));
            }
            r
        };
        room.workers[w / 64].fetch_or(1 << (w % 64), Ordering::AcqRel);
        room
    }

    /// Worker `w` lost its last member of `room`.
    pub fn detach(&self, room: &RoomShared, w: usize) {
        let mut inner = self.lock();
        room.workers[w / 64].fetch_and(!(1 << (w % 64)), Ordering::AcqRel);
        let empty = room.workers.iter().all(|x| x.load(Ordering::Acquire) == 0);
        if empty {
            inner.rooms.remove(&room.name);
            if let Some(o) = self.observer.get() {
                let _ = o.send(crate::bridge::RoomChange::Last(room.name.clone()));
            }
        }
    }

    /// Rooms with members somewhere.
    pub fn len(&self) -> usize {
        self.lock().rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One worker's rooms.
#[derive(Default)]
pub struct RoomIndex {
    rooms: Slab<LocalRoom>,
    by_name: HashMap<Box<str>, u32>,
    by_id: HashMap<u64, u32>,
}

pub struct LocalRoom {
    pub shared: Arc<RoomShared>,
    pub members: Vec<u32>,
    /// Frames published here this loop turn, sent together at the end of the turn.
    pub batch: FrameBatch,
}

/// Where a member sits, kept by the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    pub room: u32,
    pub position: u32,
}

impl RoomIndex {
    /// Adds `member` to room `name`, creating it locally (and in the directory) if needed.
    pub fn join(
        &mut self,
        dir: &RoomDirectory,
        worker: usize,
        name: &str,
        member: u32,
    ) -> Membership {
        let room = match self.by_name.get(name) {
            Some(&r) => r,
            None => {
                let shared = dir.attach(name, worker);
                let id = shared.id;
                let r = self.rooms.insert(LocalRoom {
                    shared,
                    members: Vec::new(),
                    batch: FrameBatch::default(),
                }) as u32;
                self.by_name.insert(name.into(), r);
                self.by_id.insert(id, r);
                r
            }
        };
        let local = &mut self.rooms[room as usize];
        local.shared.members.fetch_add(1, Ordering::Relaxed);
        dir.memberships.fetch_add(1, Ordering::Relaxed);
        let members = &mut local.members;
        members.push(member);
        Membership {
            room,
            position: (members.len() - 1) as u32,
        }
    }

    /// Removes a member. Returns the key of the member that moved into its position (whose
    /// `Membership::position` the caller must update), if any.
    pub fn leave(
        &mut self,
        dir: &RoomDirectory,
        worker: usize,
        m: Membership,
    ) -> Option<(u32, u32)> {
        let local = &mut self.rooms[m.room as usize];
        local.shared.members.fetch_sub(1, Ordering::Relaxed);
        dir.memberships.fetch_sub(1, Ordering::Relaxed);
        local.members.swap_remove(m.position as usize);
        let moved = local
            .members
            .get(m.position as usize)
            .map(|&k| (k, m.position));
        if local.members.is_empty() {
            let local = self.rooms.remove(m.room as usize);
            self.by_name.remove(&local.shared.name);
            self.by_id.remove(&local.shared.id);
            dir.detach(&local.shared, worker);
        }
        moved
    }

    pub fn get(&self, room: u32) -> &LocalRoom {
        &self.rooms[room as usize]
    }

    pub fn get_mut(&mut self, room: u32) -> &mut LocalRoom {
        &mut self.rooms[room as usize]
    }

    /// Whether `room` is a live local room (slots are reused after a room empties).
    pub fn contains(&self, room: u32) -> bool {
        self.rooms.contains(room as usize)
    }

    /// The local room for a room id received from another worker.
    pub fn by_id(&self, id: u64) -> Option<u32> {
        self.by_id.get(&id).copied()
    }

    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_leave_and_worker_bits() {
        let dir = RoomDirectory::new(3);
        let mut w0 = RoomIndex::default();
        let mut w2 = RoomIndex::default();
        let a = w0.join(&dir, 0, "lobby", 10);
        let b = w0.join(&dir, 0, "lobby", 11);
        let c = w2.join(&dir, 2, "lobby", 5);
        let shared = w0.get(a.room).shared.clone();
        let mut others = vec![];
        shared.for_each_other_worker(0, |w| others.push(w));
        assert_eq!(others, vec![2]);
        assert_eq!(shared.members(), 3);
        assert_eq!(dir.memberships(), 3);
        assert_eq!(dir.top(5), vec![("lobby".into(), 3)]);
        assert_eq!(dir.find("lobby").map(|r| r.id), Some(shared.id));
        assert_eq!(w0.leave(&dir, 0, a), Some((11, 0)), "11 moved into slot 0");
        w0.leave(
            &dir,
            0,
            Membership {
                room: b.room,
                position: 0,
            },
        );
        assert!(w0.is_empty());
        others.clear();
        shared.for_each_other_worker(2, |w| others.push(w));
        assert!(others.is_empty(), "worker 0 has no members any more");
        assert_eq!(dir.len(), 1);
        w2.leave(&dir, 2, c);
        assert!(dir.is_empty());
        assert_eq!(dir.memberships(), 0);
        assert!(dir.find("lobby").is_none());
    }
}
