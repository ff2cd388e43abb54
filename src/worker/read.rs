//! Reading: bytes from a ready socket into the worker's scratch buffer, fed to the
//! connection's [`Session`]; the session's actions come back through [`Dispatch`], the
//! worker's side of the [`Host`] contract.

use std::io::{self, Read};
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::{Worker, NOBODY, READS_PER_TURN};

/// Bytes a paused publisher may have read and held (enough to find its pings behind a few
/// small messages; little enough that many paused publishers cost little).
const HOLD: usize = 4096;
use crate::codec::{Kind, OutKind};
use crate::connection::{ready, Connection};
use crate::deflate::{Agreement, InflateError};
use crate::handshake::{self, Page, Rejection, Route};
use crate::metrics::{Disconnect, WorkerStats};
use crate::outbox::Chunk;
use crate::session::{Due, Host, Inflating, Session};

impl Worker {
    /// Reads a ready connection until the socket is drained, the read budget is spent, its
    /// room's ring is full, or the connection closes.
    pub(super) fn on_readable(&mut self, key: u32, to_the_end: bool) {
        if self.publisher_blocked(&self.conns[key as usize]) {
            self.read_held(key);
            if self.conns.contains(key as usize) {
                self.defer_read(key, true); // unless reading found it broken and dropped it
            }
            return;
        }
        let (now, lim) = (self.now, self.limits);
        let c = &mut self.conns[key as usize];
        let was_paused = c.has(ready::PAUSED);
        c.clear(ready::PAUSED);
        if was_paused && c.session.held() > 0 {
            // What arrived during a pause goes first, even if the socket has nothing new.
            self.with_session(key, |s, host| s.receive(&mut [], &lim, now, host));
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut reads = 0;
        loop {
            let (n, more) = match self.read_some(key, &mut scratch) {
                ReadOutcome::Bytes(n, more) => (n, more),
                ReadOutcome::Eof => {
                    self.on_eof(key);
                    break;
                }
                ReadOutcome::Drained | ReadOutcome::Dropped => break,
            };
            let now = self.now;
            let lim = self.limits;
            self.with_session(key, |s, host| s.receive(&mut scratch[..n], &lim, now, host));
            reads += 1;
            if !more && !to_the_end {
                break; // drained: the next byte brings a new edge
            }
            let blocked = self.publisher_blocked(&self.conns[key as usize]);
            if reads >= READS_PER_TURN || blocked {
                self.defer_read(key, blocked);
                break;
            }
        }
        self.scratch = scratch;
    }

    /// Reads a paused publisher into its session's hold, at most [`HOLD`] bytes, so its pings
    /// are answered during the pause (`Session::receive_held`). Its EOF is left in the socket
    /// (a closed socket reads 0 again) for when the pause ends and its last messages go out.
    fn read_held(&mut self, key: u32) {
        let (now, lim) = (self.now, self.limits);
        let mut scratch = std::mem::take(&mut self.scratch);
        while let Some(c) = self.conns.get(key as usize) {
            let room = HOLD.saturating_sub(c.session.held());
            if room == 0 {
                break; // the rest waits in the kernel; TCP flow control slows the client
            }
            let ReadOutcome::Bytes(n, _) = self.read_some(key, &mut scratch[..room]) else {
                break; // an EOF waits for the pause to end; an error dropped the connection
            };
            self.with_session(key, |s, host| {
                s.receive_held(&scratch[..n], &lim, now, host)
            });
        }
        self.scratch = scratch;
    }

    /// The client's address: from its PROXY header, or the socket's peer.
    pub(super) fn client_addr(&self, key: u32) -> Option<std::net::SocketAddr> {
        self.proxied
            .get(&key)
            .copied()
            .or_else(|| self.conns.get(key as usize)?.stream.peer_addr().ok())
    }

    /// One read from a connection's socket into `buf` (plaintext: a TLS connection's is
    /// decrypted by `read_tls`). An I/O error drops the connection.
    fn read_some(&mut self, key: u32, buf: &mut [u8]) -> ReadOutcome {
        loop {
            let Some(c) = self.conns.get(key as usize) else {
                return ReadOutcome::Dropped;
            };
            if c.tls.is_some() {
                return self.read_tls(key, buf);
            }
            match (&c.stream).read(buf) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(n) => {
                    self.tally.bytes_in += n as u64;
                    return ReadOutcome::Bytes(n, n == buf.len());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.fail_io(key);
                    return ReadOutcome::Dropped;
                }
            }
        }
    }

    /// A member of a room whose messages would wait behind a full ring: reading it would
    /// only pile up more. Others (echo, rooms with no members behind that ring) go on.
    pub(super) fn publisher_blocked(&self, c: &Connection) -> bool {
        self.bus.is_backed_up()
            && c.session.accepts_data()
            && c.membership()
                .is_some_and(|m| self.bus.blocks(&self.rooms.get(m.room).shared))
    }

    fn defer_read(&mut self, key: u32, paused: bool) {
        let c = &mut self.conns[key as usize];
        if paused && !c.has(ready::PAUSED) {
            c.set(ready::PAUSED);
            WorkerStats::add(&self.shared.metrics.workers[self.id].publisher_pauses, 1);
        }
        if !c.has(ready::IN_BACKLOG) {
            c.set(ready::IN_BACKLOG);
            self.backlog.push((key, c.generation));
        }
    }

    pub(super) fn read_backlog(&mut self) {
        if self.backlog.is_empty() {
            return;
        }
        let list = std::mem::take(&mut self.backlog);
        for (key, generation) in list {
            if !self.is_current(key, generation) {
                continue;
            }
            self.conns[key as usize].clear(ready::IN_BACKLOG);
            self.on_readable(key, true);
        }
    }

    fn on_eof(&mut self, key: u32) {
        let now = self.now;
        let lim = self.limits;
        match self.with_session(key, |s, host| s.eof(now, &lim, host)) {
            Due::Drop => self.drop_conn(key),
            Due::At(_) if self.conns[key as usize].outbox.is_empty() => self.drop_conn(key),
            Due::At(at) => {
                self.schedule(key, at);
                self.flush(key); // drops the connection once everything is written
            }
        }
    }

    /// Runs `f` on the connection's session with the worker as its host. The session leaves
    /// its slot meanwhile (a stand-in with the same phase takes it), so the host may route
    /// messages anywhere, this connection included; nothing drops a connection in between.
    /// Afterwards the connection's own output is queued, its backpressure judged, and its
    /// timer set for its new phase if it changed.
    pub(super) fn with_session<R>(
        &mut self,
        key: u32,
        f: impl FnOnce(&mut Session, &mut Dispatch<'_>) -> R,
    ) -> R {
        debug_assert_eq!(self.feeding, NOBODY, "sessions are fed one at a time");
        let slot = &mut self.conns[key as usize].session;
        let stand_in = slot.stand_in();
        let mut session = std::mem::replace(slot, stand_in);
        let phase = session.phase();
        let held = session.holds_inflater();
        self.feeding = key;
        let r = f(&mut session, &mut Dispatch { w: self, key });
        self.feeding = NOBODY;
        let moved_on = session.phase() != phase;
        if session.holds_inflater() != held {
            let delta = if held { -1 } else { 1 };
            self.stats()
                .inflaters_held
                .fetch_add(delta, Ordering::Relaxed);
        }
        self.conns[key as usize].session = session;
        self.flush_echoes(key);
        self.judge_backpressure(key);
        if moved_on {
            self.reschedule(key); // each phase has its own clock
                                  // A new phase may have something to do once the queue is written, even when it
                                  // is already empty (a peer that answered our close gets FIN now, not at timeout).
            self.mark_dirty(key);
        }
        r
    }

    /// Queues the echoes gathered from one read as one chunk: one allocation per read, not
    /// per message. The builder is taken whole, so no buffer stays pinned behind it. With
    /// permessage-deflate they are compressed with the worker's compressor.
    pub(super) fn flush_echoes(&mut self, key: u32) {
        if let Some(chunk) = self.echoes.take() {
            let chunk = match self.conns[key as usize].session.deflate() {
                Some(a) => Chunk {
                    bytes: self.compressor.compress_frames(
                        &chunk.bytes,
                        a.compress_window_bits(),
                        &mut self.tally.deflate,
                    ),
                    messages: chunk.messages,
                },
                None => chunk,
            };
            self.enqueue(key, chunk);
        }
    }
}

/// What one read brought.
pub(super) enum ReadOutcome {
    /// Bytes for the session in the buffer, and whether the socket filled the buffer (so
    /// more may wait: edge-triggered, no new event would say so).
    Bytes(usize, bool),
    /// The peer closed its side.
    Eof,
    /// Nothing more now (the next byte brings a new edge).
    Drained,
    /// The connection is gone (an I/O error).
    Dropped,
}

/// The worker as a session's host, for one connection.
pub(super) struct Dispatch<'w> {
    w: &'w mut Worker,
    key: u32,
}

impl Host for Dispatch<'_> {
    fn upgraded(&mut self, route: Route<'_>, deflate: Option<Agreement>) {
        let w = &mut *self.w;
        WorkerStats::add(&w.stats().handshakes, 1);
        if deflate.is_some() {
            WorkerStats::add(&w.stats().deflate_negotiated, 1);
            // The stand-in in the slot learns it too: what this connection is sent before the
            // read ends (its own room message, an echo) is compressed like the rest.
            w.conns[self.key as usize].session.set_deflate(deflate);
        }
        if let Route::Room(name) = route {
            #[cfg(debug_assertions)]
            fault_injection(name);
            let m = w.rooms.join(&w.shared.rooms, w.id, name, self.key);
            w.conns[self.key as usize].join(m);
        }
    }

    fn message(&mut self, kind: Kind, payload: &[u8]) {
        let w = &mut *self.w;
        w.tally.messages_in += 1;
        let out = if kind == Kind::Text {
            OutKind::Text
        } else {
            OutKind::Binary
        };
        let membership = w.conns[self.key as usize].membership();
        if let Some(bridge) = w.shared.bridge.as_ref().filter(|b| b.streams()) {
            let room: std::sync::Arc<str> = match membership {
                Some(m) => w.rooms.get(m.room).shared.name.clone().into(),
                None => "".into(),
            };
            let generation = w.conns[self.key as usize].generation;
            let addr = w.client_addr(self.key);
            bridge.append(
                room,
                format!("{}-{}-{generation}", w.id, self.key),
                addr,
                payload,
            );
        }
        match membership {
            None => w.echoes.push(out, payload),
            Some(m) => w.publish(m.room, out, payload),
        }
    }

    fn send(&mut self, bytes: Bytes) {
        let w = &mut *self.w;
        w.flush_echoes(self.key); // replies keep the order the client sent in
        w.conns[self.key as usize].outbox.push(bytes);
        w.mark_dirty(self.key);
    }

    fn before_close(&mut self) {
        let w = &mut *self.w;
        w.flush_echoes(self.key);
        if let Some(m) = w.conns[self.key as usize].membership() {
            w.flush_room_batch(m.room);
        }
    }

    fn ended(&mut self, why: Disconnect) {
        self.w.stats().disconnect(why);
    }

    fn http_status(&mut self, status: u16) {
        self.w.stats().http_status(status);
    }

    fn pinged(&mut self) {
        WorkerStats::add(&self.w.stats().pings_sent, 1);
    }

    fn inflating(&mut self) -> &mut Inflating {
        &mut self.w.inflating
    }

    fn inflated(&mut self, bytes: usize) {
        self.w.tally.inflated += 1;
        self.w.tally.inflated_bytes += bytes as u64;
    }

    fn inflate_failed(&mut self, why: InflateError) {
        let i = match why {
            InflateError::TooBig => 0,
            InflateError::Corrupt => 1,
        };
        WorkerStats::add(&self.w.stats().inflate_failures[i], 1);
    }

    fn peer(&mut self, addr: Option<std::net::SocketAddr>) -> Result<(), Rejection> {
        if let Some(a) = addr {
            self.w.proxied.insert(self.key, a);
        }
        // The per-address limits count the client (a LOCAL header: the proxy itself).
        match self.w.client_addr(self.key) {
            Some(a) => self.w.guard_ip(self.key, a.ip()),
            None => Ok(()),
        }
    }

    fn admit(
        &mut self,
        head: &[u8],
        target: crate::access::Target<'_>,
    ) -> Result<crate::session::Admission, Rejection> {
        self.w.admit_request(head, target)
    }

    fn page(&mut self, page: Page<'_>) -> Result<Bytes, Rejection> {
        let shared = &self.w.shared;
        match page {
            Page::Demo if shared.config.demo => Ok(handshake::ok_response(
                "text/html; charset=utf-8",
                DEMO_PAGE.as_bytes(),
            )),
            Page::Demo => Err(Rejection {
                status: 404,
                reason: "the demo page is off (--no-demo); use /echo or /ws/{room}",
            }),
            Page::RoomInfo(room) => {
                let members = shared.rooms.find(room).map_or(0, |r| r.members());
                // Room names are restricted to characters that need no JSON escaping.
                let body = format!("{{\"room\":\"{room}\",\"members\":{members}}}\n");
                Ok(handshake::ok_response("application/json", body.as_bytes()))
            }
        }
    }
}

/// The browser demo served at `GET /` (one self-contained page).
const DEMO_PAGE: &str = include_str!("../demo/index.html");

/// Debug builds only: with `MEGASOCK_TEST_FAULTS=1`, joining the room `__worker_panic__`
/// panics the worker and joining `__worker_stall__` blocks it for 4 s, so the tests can check
/// what a dying or stuck worker does to the process and its health check.
#[cfg(debug_assertions)]
fn fault_injection(room: &str) {
    if std::env::var_os("MEGASOCK_TEST_FAULTS").is_none() {
        return;
    }
    match room {
        "__worker_panic__" => panic!("injected fault (MEGASOCK_TEST_FAULTS)"),
        "__worker_stall__" => std::thread::sleep(std::time::Duration::from_secs(4)),
        _ => {}
    }
}
