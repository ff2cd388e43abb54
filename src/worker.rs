//! A worker: one thread, one `mio::Poll`, its own listeners, connections and rooms.
//!
//! # One turn of the loop
//! poll (timeout = next timer tick, or zero if work is pending) -> accept and read every ready
//! connection (reading parses frames in place and routes each message) -> read the connections
//! left over from last turn -> drain a bounded batch from the cross-core ring -> wake the
//! workers this turn sent to -> fire due timers -> flush every connection that got output,
//! once each, with vectored writes.
//!
//! # Edge-triggered readiness
//! mio registrations are edge-triggered: a connection whose read is cut short (read budget, or
//! publishers paused by a full ring) gets no new event, so it goes on the `backlog` and is read
//! again next turn. A short read means the socket was drained; an EOF that arrived together
//! with data is caught because `is_read_closed` forces reading to the end.
//!
//! # Tokens
//! A token is `generation << 32 | slab key`. Slab keys are reused (most recently freed first),
//! so an event still in the batch for a closed connection must not reach the connection that
//! took its slot: events and timer entries whose generation differs are ignored.

use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::bus::{self, CrossCoreBus, Delivery, Wakeup};
use crate::codec::{self, Kind, OutKind, Parsed, Violation};
use crate::config::{Config, SlowConsumerPolicy};
use crate::connection::{flags, Connection, Fragments, Inbound, State};
use crate::handshake::{self, Route, Upgrade};
use crate::metrics::{Disconnect, DropReason, Metrics, WorkerStats};
use crate::outbox::{Chunk, Flushed};
use crate::room_index::{RoomDirectory, RoomIndex};
use crate::timer_wheel::{Entry, TimerWheel, TICK};

/// Size of the per-worker read buffer shared by all its connections.
const SCRATCH: usize = 64 * 1024;
/// Reads of one connection per turn before it must wait for the next turn (fairness).
const READS_PER_TURN: usize = 16;
/// Cross-core deliveries taken per turn.
const INBOUND_BATCH: usize = 4096;
/// A room's frames for one turn go out early once they reach this size, so one turn's batch
/// never holds a connection's queue hostage for long.
const BATCH_LIMIT: usize = 64 * 1024;
/// How long accept stays paused after EMFILE/ENFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX - 1;

/// State shared by all workers (read-mostly; nothing here is touched per message).
pub struct Shared {
    pub config: Config,
    pub max_connections: usize,
    /// Sockets past `max_connections` that still get a 503 (from the fd reserve); beyond
    /// that a new socket is closed at once, so a flood cannot exhaust the fds.
    pub reject_headroom: usize,
    /// Sockets held across all workers (counts against `max_connections`).
    pub sockets: AtomicUsize,
    pub shutdown: AtomicBool,
    pub metrics: Metrics,
    pub rooms: RoomDirectory,
    pub wakeups: Arc<[Arc<Wakeup>]>,
}

impl Shared {
    /// Asks every worker to drain and stop.
    pub fn begin_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for w in self.wakeups.iter() {
            let _ = w.waker.wake();
        }
    }
}

/// Every worker's wake-up, indexed by worker id.
pub type Wakeups = Arc<[Arc<Wakeup>]>;

/// Creates the polls and wake-ups for `n` workers.
pub fn polls(n: usize) -> io::Result<(Vec<Poll>, Wakeups)> {
    let mut polls = Vec::with_capacity(n);
    let mut wakeups = Vec::with_capacity(n);
    for _ in 0..n {
        let poll = Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), WAKER)?;
        wakeups.push(Arc::new(Wakeup {
            waker,
            sleeping: AtomicBool::new(false),
        }));
        polls.push(poll);
    }
    Ok((polls, wakeups.into()))
}

/// Builds one bus end per worker.
pub fn buses(shared: &Shared) -> Vec<CrossCoreBus> {
    bus::build(
        shared.wakeups.len(),
        shared.config.ring_capacity,
        shared.wakeups.clone(),
    )
}

/// Hot-path counts kept in plain integers and added to the shared atomics once per turn.
#[derive(Default)]
struct Tally {
    bytes_in: u64,
    messages_in: u64,
    frames_out: u64,
    bytes_out: u64,
    write_syscalls: u64,
    bus_received: u64,
}

impl Tally {
    fn publish(&mut self, s: &WorkerStats) {
        let t = std::mem::take(self);
        for (counter, n) in [
            (&s.bytes_in, t.bytes_in),
            (&s.messages_in, t.messages_in),
            (&s.frames_out, t.frames_out),
            (&s.bytes_out, t.bytes_out),
            (&s.write_syscalls, t.write_syscalls),
            (&s.bus_received, t.bus_received),
        ] {
            if n > 0 {
                WorkerStats::add(counter, n);
            }
        }
    }
}

/// How long the loop's turns take (the time from waking up to polling again): a worker whose
/// turns grow long is late for every connection it holds. Recorded in a histogram and
/// published as quantiles about once a second.
struct TurnTimes {
    hist: hdrhistogram::Histogram<u64>,
    published_at: u32,
}

impl TurnTimes {
    fn new() -> TurnTimes {
        TurnTimes {
            hist: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2)
                .expect("static histogram bounds are valid"),
            published_at: 0,
        }
    }

    fn record(&mut self, turn: Duration, now: u32, s: &WorkerStats) {
        self.hist.saturating_record(turn.as_micros().max(1) as u64);
        if now >= self.published_at + ticks_of(Duration::from_secs(1)) {
            self.published_at = now;
            let h = &self.hist;
            s.turn_p50_us
                .store(h.value_at_quantile(0.5), Ordering::Relaxed);
            s.turn_p99_us
                .store(h.value_at_quantile(0.99), Ordering::Relaxed);
            s.turn_max_us.store(h.max(), Ordering::Relaxed);
            self.hist.reset();
        }
    }
}

/// Ticks derived from the configuration.
struct Ticks {
    handshake: u32,
    ping: u32,
    idle: u32,
    close: u32,
}

pub struct Worker {
    id: usize,
    poll: Poll,
    listeners: Vec<TcpListener>,
    conns: Slab<Connection>,
    dirty: Vec<u32>,
    backlog: Vec<(u32, u32)>,
    rooms: RoomIndex,
    bus: CrossCoreBus,
    wheel: TimerWheel,
    due: Vec<Entry>,
    scratch: Vec<u8>,
    shared: Arc<Shared>,
    ticks: Ticks,
    start: Instant,
    now: u32,
    next_generation: u32,
    accept_paused_until: Option<u32>,
    draining_until: Option<u32>,
    /// Size of the partial frame the last parse stopped at (so its stash is allocated once).
    stash_hint: usize,
    /// Rooms with frames published this turn.
    pending_rooms: Vec<u32>,
    turns: TurnTimes,
    /// Echo frames of the connection being read (see `flush_echoes`).
    echoes: BytesMut,
    echo_messages: u32,
    tally: Tally,
}

fn ticks_of(d: Duration) -> u32 {
    TimerWheel::ticks(d).min(u32::MAX as u64 / 2) as u32
}

impl Worker {
    pub fn new(
        id: usize,
        poll: Poll,
        mut listeners: Vec<TcpListener>,
        bus: CrossCoreBus,
        shared: Arc<Shared>,
    ) -> io::Result<Worker> {
        for (i, l) in listeners.iter_mut().enumerate() {
            poll.registry()
                .register(l, Token(LISTENER_BASE - i), Interest::READABLE)?;
        }
        let c = &shared.config;
        let ticks = Ticks {
            handshake: ticks_of(c.handshake_timeout),
            ping: ticks_of(c.ping_interval),
            idle: ticks_of(c.idle_timeout),
            close: ticks_of(c.close_timeout),
        };
        let per_worker = shared.max_connections / c.workers + 1;
        Ok(Worker {
            id,
            poll,
            listeners,
            // Growing a slab copies every connection: reserve room for this worker's share.
            conns: Slab::with_capacity(per_worker.min(1 << 20)),
            dirty: Vec::new(),
            backlog: Vec::new(),
            rooms: RoomIndex::default(),
            bus,
            wheel: TimerWheel::new(),
            due: Vec::new(),
            scratch: vec![0; SCRATCH],
            shared,
            ticks,
            start: Instant::now(),
            now: 0,
            next_generation: 1,
            accept_paused_until: None,
            draining_until: None,
            stash_hint: 0,
            pending_rooms: Vec::new(),
            turns: TurnTimes::new(),
            echoes: BytesMut::new(),
            echo_messages: 0,
            tally: Tally::default(),
        })
    }

    fn stats(&self) -> &WorkerStats {
        &self.shared.metrics.workers[self.id]
    }

    fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Runs until shutdown has drained every connection.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            let sleeping = timeout != Some(Duration::ZERO) && self.bus.prepare_to_sleep();
            let res = self.poll.poll(
                &mut events,
                if sleeping {
                    timeout
                } else {
                    Some(Duration::ZERO)
                },
            );
            self.bus.awake();
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            let woke = Instant::now();
            self.now = ((woke - self.start).as_nanos() / TICK.as_nanos()) as u32;

            for ev in events.iter() {
                let t = ev.token();
                if t == WAKER {
                    continue;
                }
                if t.0 > LISTENER_BASE - self.listeners.len() && t.0 <= LISTENER_BASE {
                    self.accept_all(LISTENER_BASE - t.0);
                    continue;
                }
                let key = (t.0 & 0xffff_ffff) as u32;
                let generation = (t.0 >> 32) as u32;
                if !self.is_current(key, generation) {
                    continue;
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.on_readable(key, ev.is_read_closed() || ev.is_error());
                }
                if ev.is_writable() && self.is_current(key, generation) {
                    let c = &self.conns[key as usize];
                    if c.has(flags::WANTS_WRITE) {
                        self.flush(key);
                    }
                }
            }
            self.read_backlog();
            self.flush_batches();
            self.drain_inbound();
            if self.bus.is_backed_up() {
                self.bus.retry_overflow();
            }
            self.fire_timers();
            if let Some(until) = self.accept_paused_until {
                if self.now >= until {
                    self.accept_paused_until = None;
                    for i in 0..self.listeners.len() {
                        self.accept_all(i);
                    }
                }
            }
            if self.draining_until.is_none() && self.shared.shutdown.load(Ordering::Relaxed) {
                self.begin_drain();
            }
            // Everything that may have sent to another worker this turn is done: wake them.
            let wakes = self.bus.wake_peers();
            WorkerStats::add(&self.stats().wakeups_sent, wakes);
            self.flush_dirty();
            self.tally.publish(&self.shared.metrics.workers[self.id]);
            self.turns.record(
                woke.elapsed(),
                self.now,
                &self.shared.metrics.workers[self.id],
            );
            if let Some(until) = self.draining_until {
                // Done when every client is gone and nothing waits for another worker's ring.
                if self.conns.is_empty() && !self.bus.is_backed_up() {
                    return Ok(());
                }
                if self.now >= until {
                    let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
                    for k in keys {
                        self.drop_conn(k);
                    }
                    return Ok(());
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let backlog_ready = if self.bus.is_backed_up() {
            // Only connections waiting for their read budget may go on; publishers wait.
            self.backlog.iter().any(|&(k, _)| {
                self.conns
                    .get(k as usize)
                    .is_some_and(|c| c.membership().is_none())
            })
        } else {
            !self.backlog.is_empty()
        };
        if !self.dirty.is_empty() || backlog_ready {
            return Some(Duration::ZERO);
        }
        if self.bus.is_backed_up() {
            return Some(Duration::from_millis(1));
        }
        let next = Duration::from_nanos(self.wheel.next_tick() * TICK.as_nanos() as u64);
        Some(
            next.saturating_sub(self.start.elapsed())
                .max(Duration::from_millis(1))
                .min(TICK),
        )
    }

    #[inline]
    fn is_current(&self, key: u32, generation: u32) -> bool {
        self.conns
            .get(key as usize)
            .is_some_and(|c| c.generation == generation)
    }

    // ---- accepting -------------------------------------------------------------------------

    fn accept_all(&mut self, listener: usize) {
        if self.draining_until.is_some() || self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let (stream, _) = match self.listeners[listener].accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if !is_resource_exhaustion(&e) => {
                    // ECONNABORTED and the like: that one client is gone; take the next.
                    WorkerStats::add(&self.stats().accept_errors, 1);
                    continue;
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: the connection stays in the backlog and no new
                    // edge comes; retrying now would spin. Pause and retry from the timer.
                    WorkerStats::add(&self.stats().accept_errors, 1);
                    let backoff = ticks_of(ACCEPT_BACKOFF);
                    self.accept_paused_until = Some(self.now + backoff);
                    log::warn!(
                        "worker {}: accept failed: {e}; pausing accepts for {:?} (raise the fd \
                         limit or --max-connections headroom: scripts/tune.sh check)",
                        self.id,
                        ACCEPT_BACKOFF
                    );
                    return;
                }
            };
            WorkerStats::add(&self.stats().accepted, 1);
            let held = self.shared.sockets.fetch_add(1, Ordering::Relaxed);
            let max = self.shared.max_connections;
            // Over the limit a client still gets a 503, using the fd reserve; far over it
            // (a flood) the socket is closed at once so the reserve is never exhausted.
            if held >= max + self.shared.reject_headroom {
                self.shared.sockets.fetch_sub(1, Ordering::Relaxed);
                self.stats().disconnect(Disconnect::OverCapacity);
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let generation = self.next_generation;
            self.next_generation = (self.next_generation + 1) & 0x7fff_ffff;
            let entry = self.conns.vacant_entry();
            let key = entry.key() as u32;
            let token = Token(((generation as usize) << 32) | key as usize);
            let mut conn = Connection::new(stream, generation, self.now);
            if let Err(e) = self.poll.registry().register(
                &mut conn.stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("worker {}: register failed: {e}", self.id);
                self.shared.sockets.fetch_sub(1, Ordering::Relaxed);
                self.shared.metrics.workers[self.id].disconnect(Disconnect::IoError);
                continue;
            }
            entry.insert(conn);
            self.stats().connections.fetch_add(1, Ordering::Relaxed);
            if held >= max {
                self.stats().disconnect(Disconnect::OverCapacity);
                self.stats().http_status(503);
                let now = self.now;
                self.conns[key as usize].linger(handshake::over_capacity(), now);
                self.mark_dirty(key);
                self.schedule(key, self.now + self.ticks.close);
            } else {
                self.schedule(key, self.now + self.ticks.handshake);
            }
        }
    }

    // ---- reading ---------------------------------------------------------------------------

    /// Reads a ready connection until the socket is drained, the read budget is spent, or the
    /// connection closes.
    fn on_readable(&mut self, key: u32, to_the_end: bool) {
        let conn = &mut self.conns[key as usize];
        if self.bus.is_backed_up() && conn.membership().is_some() && conn.state == State::Open {
            // A ring is full: publishers wait (edge-triggered, so remember them).
            self.defer_read(key);
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut reads = 0;
        while let Some(conn) = self.conns.get_mut(key as usize) {
            let n = match (&conn.stream).read(&mut scratch) {
                Ok(0) => {
                    self.on_eof(key);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.fail_io(key);
                    break;
                }
            };
            let now = self.now;
            conn.heard(now);
            self.tally.bytes_in += n as u64;
            self.take_input(key, &mut scratch[..n]);
            self.flush_echoes(key);
            reads += 1;
            if !self.conns.contains(key as usize) {
                break;
            }
            if n < scratch.len() && !to_the_end {
                break; // drained: the next byte brings a new edge
            }
            if reads >= READS_PER_TURN
                || (self.bus.is_backed_up() && self.conns[key as usize].membership().is_some())
            {
                self.defer_read(key);
                break;
            }
        }
        self.scratch = scratch;
    }

    fn defer_read(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        if !c.has(flags::IN_BACKLOG) {
            c.set(flags::IN_BACKLOG);
            self.backlog.push((key, c.generation));
        }
    }

    fn read_backlog(&mut self) {
        if self.backlog.is_empty() {
            return;
        }
        let list = std::mem::take(&mut self.backlog);
        for (key, generation) in list {
            if !self.is_current(key, generation) {
                continue;
            }
            self.conns[key as usize].clear(flags::IN_BACKLOG);
            self.on_readable(key, true);
        }
    }

    /// Routes freshly read bytes: appended to the connection's stash if it has one (a partial
    /// frame or request), otherwise parsed in place in the worker's scratch buffer.
    fn take_input(&mut self, key: u32, fresh: &mut [u8]) {
        let conn = &mut self.conns[key as usize];
        let mut inbound = conn.inbound.take();
        let mut stash = inbound
            .as_mut()
            .map(|ib| std::mem::take(&mut ib.stash))
            .unwrap_or_default();
        self.stash_hint = 0;
        if stash.is_empty() {
            let used = self.consume(key, fresh, &mut inbound);
            if used < fresh.len() && self.conns.contains(key as usize) {
                stash.reserve_exact(self.stash_hint.max(fresh.len() - used));
                stash.extend_from_slice(&fresh[used..]);
            }
        } else {
            stash.extend_from_slice(fresh);
            let used = self.consume(key, &mut stash, &mut inbound);
            stash.drain(..used);
            if stash.is_empty() {
                stash = Vec::new(); // a connection between frames owns no buffer
            } else {
                stash.reserve(self.stash_hint.saturating_sub(stash.len()));
            }
        }
        // Put the inbound state back unless the connection is gone or it holds nothing.
        if let Some(conn) = self.conns.get_mut(key as usize) {
            if !stash.is_empty() {
                inbound.get_or_insert_with(Box::default).stash = stash;
            }
            conn.inbound = inbound.filter(|ib| !ib.is_idle());
        }
    }

    /// Consumes what it can of `buf`; returns the number of bytes used. Stops early if the
    /// connection is closed or dropped.
    fn consume(&mut self, key: u32, buf: &mut [u8], inbound: &mut Option<Box<Inbound>>) -> usize {
        let state = self.conns[key as usize].state;
        match state {
            State::Handshake => self.consume_request(key, buf, inbound),
            State::Open | State::Closing => self.consume_frames(key, buf, inbound),
            State::Lingering => buf.len(), // discard
        }
    }

    fn consume_request(
        &mut self,
        key: u32,
        buf: &mut [u8],
        inbound: &mut Option<Box<Inbound>>,
    ) -> usize {
        let (route, response, consumed) = match handshake::parse(buf) {
            Upgrade::Incomplete => return 0,
            Upgrade::Reject(r) => {
                self.stats().http_status(r.status);
                self.stats().disconnect(Disconnect::HttpRejected);
                let now = self.now;
                self.conns[key as usize].linger(handshake::error_response(r), now);
                self.mark_dirty(key);
                self.schedule(key, now + self.ticks.close);
                return buf.len();
            }
            Upgrade::Accept {
                route,
                response,
                consumed,
            } => (route, response, consumed),
        };
        let membership = match route {
            Route::Echo => None,
            Route::Room(name) => Some(self.rooms.join(&self.shared.rooms, self.id, name, key)),
        };
        self.stats().http_status(101);
        WorkerStats::add(&self.stats().handshakes, 1);
        let now = self.now;
        self.conns[key as usize].upgrade(response, membership, now);
        self.mark_dirty(key);
        self.schedule_liveness(key);
        consumed + self.consume_frames(key, &mut buf[consumed..], inbound)
    }

    fn consume_frames(
        &mut self,
        key: u32,
        buf: &mut [u8],
        inbound: &mut Option<Box<Inbound>>,
    ) -> usize {
        let max_message = self.config().max_message_size;
        let mut pos = 0;
        loop {
            let Some(conn) = self.conns.get(key as usize) else {
                return buf.len();
            };
            if conn.state == State::Lingering {
                return buf.len();
            }
            let closing = conn.state == State::Closing;
            let fragments = inbound.as_ref().and_then(|ib| ib.fragments.as_ref());
            let in_progress = fragments.map_or(0, |f| f.data.len());
            let text_in_progress = fragments.map(|f| (f.kind == Kind::Text, f.utf8));
            let parsed = codec::parse_header(&buf[pos..], max_message - in_progress)
                .and_then(|p| check_sequence(p, text_in_progress.is_some()));
            let header = match parsed {
                Ok(Parsed::NeedMore) => break,
                Ok(Parsed::Frame(h)) => h,
                Err(_) if closing => {
                    self.drop_conn(key);
                    return buf.len();
                }
                Err(v) => {
                    clear_fragments(inbound);
                    self.violate(key, v);
                    return buf.len();
                }
            };
            let total = header.header_len + header.payload_len;
            // Payload bytes of this frame unmasked (and checked) by an earlier read: only the
            // first frame of a stash can have them.
            let resume = if pos == 0 {
                inbound
                    .as_mut()
                    .map_or(Default::default(), |ib| std::mem::take(&mut ib.partial))
            } else {
                Default::default()
            };
            if buf.len() - pos < total {
                // Partial frame: the stash is sized for it once instead of growing per read.
                self.stash_hint = total;
                let available = &mut buf[pos + header.header_len..];
                // Fail fast: check the text received so far instead of waiting for the whole
                // frame (Autobahn 6.4.3/6.4.4), continuing from the message's UTF-8 state.
                let start = match (header.kind, text_in_progress) {
                    _ if closing => None,
                    (Kind::Text, None) => Some(resume),
                    (Kind::Continuation, Some((true, utf8))) if resume.unmasked == 0 => {
                        Some(codec::PartialText { unmasked: 0, utf8 })
                    }
                    (Kind::Continuation, Some((true, _))) => Some(resume),
                    _ => None,
                };
                let partial = match start {
                    None => resume,
                    Some(done) => match codec::check_partial_text(available, header.mask, done) {
                        Ok(p) => p,
                        Err(v) => {
                            clear_fragments(inbound);
                            self.violate(key, v);
                            return buf.len();
                        }
                    },
                };
                inbound.get_or_insert_with(Box::default).partial = partial;
                break;
            }
            let payload = &mut buf[pos + header.header_len..pos + total];
            let done = resume.unmasked as usize;
            codec::unmask_from(&mut payload[done..], header.mask, done);
            pos += total;
            if let Err(v) = self.on_frame(key, header.kind, header.fin, payload, inbound) {
                clear_fragments(inbound);
                if self
                    .conns
                    .get(key as usize)
                    .is_some_and(|c| c.state == State::Open)
                {
                    self.violate(key, v);
                } else {
                    self.drop_conn(key);
                }
                return buf.len();
            }
        }
        pos
    }

    /// Handles one complete, unmasked frame.
    fn on_frame(
        &mut self,
        key: u32,
        kind: Kind,
        fin: bool,
        payload: &[u8],
        inbound: &mut Option<Box<Inbound>>,
    ) -> Result<(), Violation> {
        let state = self.conns[key as usize].state;
        if kind.is_control() {
            self.flush_echoes(key); // keep replies in the order the client sent
        }
        match kind {
            Kind::Ping => {
                if state == State::Open {
                    self.enqueue(key, codec::encode(OutKind::Pong, payload), 0);
                }
            }
            Kind::Pong => {}
            Kind::Close => {
                let code = codec::check_close_payload(payload)?;
                let now = self.now;
                if state == State::Open {
                    self.flush_own_output(key);
                    self.stats().disconnect(Disconnect::ClientClose);
                    // Echo the code (RFC 6455 5.5.1); an empty close is answered empty.
                    let reply = match code {
                        Some(c) => codec::encode_close(c, ""),
                        None => codec::encode(OutKind::Close, &[]),
                    };
                    self.conns[key as usize].linger(reply, now);
                } else {
                    // Our close was answered: the handshake is complete.
                    let c = &mut self.conns[key as usize];
                    c.state = State::Lingering;
                    c.since = now;
                }
                self.mark_dirty(key);
                self.schedule(key, now + self.ticks.close);
            }
            Kind::Text | Kind::Binary => {
                if inbound.as_ref().is_some_and(|ib| ib.fragments.is_some()) {
                    return Err(Violation::protocol(
                        "new message before the fragmented one finished",
                    ));
                }
                if fin {
                    if kind == Kind::Text && simdutf8::basic::from_utf8(payload).is_err() {
                        return Err(invalid_utf8());
                    }
                    if state == State::Open {
                        self.deliver(key, kind, payload);
                    }
                } else {
                    let mut f = Fragments {
                        kind,
                        data: payload.to_vec(),
                        utf8: Default::default(),
                    };
                    if kind == Kind::Text && !f.utf8.feed(payload) {
                        return Err(invalid_utf8());
                    }
                    inbound.get_or_insert_with(Box::default).fragments = Some(f);
                }
            }
            Kind::Continuation => {
                let Some(f) = inbound.as_mut().and_then(|ib| ib.fragments.as_mut()) else {
                    return Err(Violation::protocol("continuation without a message"));
                };
                f.data.extend_from_slice(payload);
                if f.kind == Kind::Text && !f.utf8.feed(payload) {
                    return Err(invalid_utf8());
                }
                if fin {
                    let f = inbound
                        .as_mut()
                        .and_then(|ib| ib.fragments.take())
                        .expect("checked above");
                    if f.kind == Kind::Text && !f.utf8.is_complete() {
                        return Err(invalid_utf8());
                    }
                    if state == State::Open {
                        self.deliver(key, f.kind, &f.data);
                    }
                }
            }
        }
        Ok(())
    }

    /// A complete message from an open connection: echo it, or add it to its room's batch.
    fn deliver(&mut self, key: u32, kind: Kind, payload: &[u8]) {
        self.tally.messages_in += 1;
        let out = if kind == Kind::Text {
            OutKind::Text
        } else {
            OutKind::Binary
        };
        let Some(m) = self.conns[key as usize].membership() else {
            codec::encode_into(&mut self.echoes, out, payload);
            self.echo_messages += 1;
            return;
        };
        WorkerStats::add(&self.stats().published, 1);
        let local = self.rooms.get_mut(m.room);
        if local.batch.is_empty() {
            self.pending_rooms.push(m.room);
        }
        codec::encode_into(&mut local.batch, out, payload);
        local.batch_messages += 1;
        if local.batch.len() >= BATCH_LIMIT {
            self.flush_room_batch(m.room);
        }
    }

    /// Queues the echoes gathered from one read as one chunk: one allocation per read, not
    /// per message.
    fn flush_echoes(&mut self, key: u32) {
        if self.echoes.is_empty() {
            return;
        }
        let frames = self.echoes.split().freeze();
        let messages = std::mem::take(&mut self.echo_messages);
        if self.conns.contains(key as usize) {
            self.enqueue(key, frames, messages);
        }
    }

    /// Sends what this connection published or asked echoed so far, before anything that
    /// ends its Open state (its own messages must still reach it and its room).
    fn flush_own_output(&mut self, key: u32) {
        self.flush_echoes(key);
        if let Some(m) = self.conns.get(key as usize).and_then(|c| c.membership()) {
            self.flush_room_batch(m.room);
        }
    }

    fn flush_batches(&mut self) {
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
    fn flush_room_batch(&mut self, room: u32) {
        let local = self.rooms.get_mut(room);
        if local.batch.is_empty() {
            return;
        }
        let frames = local.batch.split().freeze();
        let messages = std::mem::take(&mut local.batch_messages);
        let shared = local.shared.clone();
        // Index loop: enqueue never changes membership (a slow consumer only changes state;
        // it leaves the room when it is dropped), so the member list is stable here.
        for i in 0..self.rooms.get(room).members.len() {
            let member = self.rooms.get(room).members[i];
            self.enqueue(member, frames.clone(), messages);
        }
        let (mut ring, mut overflow) = (0u64, 0u64);
        let was_backed_up = self.bus.is_backed_up();
        let bus = &mut self.bus;
        shared.for_each_other_worker(self.id, |w| {
            let d = Delivery {
                room: shared.clone(),
                frames: frames.clone(),
                messages,
            };
            match bus.send(w, d) {
                bus::Sent::Ring => ring += 1,
                bus::Sent::Overflow => overflow += 1,
            }
        });
        let stats = &self.shared.metrics.workers[self.id];
        let messages = messages as u64;
        WorkerStats::add(&stats.bus_sent, (ring + overflow) * messages);
        if overflow > 0 {
            WorkerStats::add(&stats.bus_overflowed, overflow * messages);
        }
        if !was_backed_up && self.bus.is_backed_up() {
            WorkerStats::add(&stats.publisher_pauses, 1);
        }
    }

    fn drain_inbound(&mut self) {
        for _ in 0..INBOUND_BATCH {
            let Some(d) = self.bus.try_recv() else {
                return;
            };
            self.tally.bus_received += 1;
            let Some(room) = self.rooms.by_id(d.room.id) else {
                continue; // its last local member left meanwhile: nobody here to deliver to
            };
            for i in 0..self.rooms.get(room).members.len() {
                let member = self.rooms.get(room).members[i];
                self.enqueue(member, d.frames.clone(), d.messages);
            }
        }
    }

    // ---- writing ---------------------------------------------------------------------------

    /// Queues frames carrying `messages` messages for a connection, applying the
    /// backpressure limit.
    fn enqueue(&mut self, key: u32, bytes: Bytes, messages: u32) {
        let max = self.shared.config.max_backpressure;
        let policy = self.shared.config.slow_consumer;
        let now = self.now;
        let stats = &self.shared.metrics.workers[self.id];
        let conn = &mut self.conns[key as usize];
        if conn.state != State::Open {
            stats.dropped[DropReason::RecipientClosing as usize]
                .fetch_add(messages as u64, Ordering::Relaxed);
            return;
        }
        // One message bigger than the limit still goes out to a connection that has caught up
        // (the limit bounds what piles up, and --max-message-size bounds a message).
        let queued = conn.outbox.queued();
        if queued > 0 && queued + bytes.len() > max {
            let mut dropped = messages as u64;
            if policy == SlowConsumerPolicy::Close {
                dropped += conn.close_slow_consumer(now);
                stats.disconnect(Disconnect::SlowConsumer);
            }
            stats.dropped[DropReason::SlowConsumer as usize].fetch_add(dropped, Ordering::Relaxed);
            if policy == SlowConsumerPolicy::Drop {
                return;
            }
            self.schedule(key, now + self.ticks.close);
        } else {
            conn.outbox.push_chunk(Chunk { bytes, messages });
        }
        self.mark_dirty(key);
    }

    #[inline]
    fn mark_dirty(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        if !c.has(flags::DIRTY) {
            c.set(flags::DIRTY);
            self.dirty.push(key);
        }
    }

    fn flush_dirty(&mut self) {
        let mut list = std::mem::take(&mut self.dirty);
        for &key in &list {
            if let Some(c) = self.conns.get_mut(key as usize) {
                c.clear(flags::DIRTY);
                if !c.has(flags::WANTS_WRITE) {
                    self.flush(key);
                }
            }
        }
        // Flushing never marks anything dirty, so the (empty) list keeps its allocation.
        list.clear();
        self.dirty = list;
    }

    /// Writes a connection's queue; on a full socket waits for writable readiness.
    fn flush(&mut self, key: u32) {
        let conn = &mut self.conns[key as usize];
        let t = &mut self.tally;
        let res = conn.outbox.flush(
            &mut &conn.stream,
            &mut t.write_syscalls,
            &mut t.bytes_out,
            &mut t.frames_out,
        );
        match res {
            Ok(Flushed::Blocked) => conn.set(flags::WANTS_WRITE),
            Ok(Flushed::All) => {
                conn.clear(flags::WANTS_WRITE);
                if conn.state == State::Lingering {
                    if conn.has(flags::PEER_EOF) {
                        self.drop_conn(key); // all said, and the client has hung up
                    } else if !conn.has(flags::FIN_SENT) {
                        conn.set(flags::FIN_SENT);
                        let _ = conn.stream.shutdown(Shutdown::Write);
                    }
                }
            }
            Err(_) => self.fail_io(key),
        }
    }

    // ---- closing ---------------------------------------------------------------------------

    /// The client broke the protocol: send the close code, then wait for its close.
    fn violate(&mut self, key: u32, v: Violation) {
        let reason = match v.code {
            codec::CLOSE_INVALID_DATA => Disconnect::InvalidUtf8,
            codec::CLOSE_TOO_BIG => Disconnect::MessageTooBig,
            _ => Disconnect::ProtocolError,
        };
        self.stats().disconnect(reason);
        self.flush_own_output(key); // messages before the bad frame are still delivered
        let now = self.now;
        let c = &mut self.conns[key as usize];
        if c.state == State::Open {
            c.begin_close(v.code, v.reason, now);
            self.mark_dirty(key);
            self.schedule(key, now + self.ticks.close);
        } else {
            self.drop_conn(key);
        }
    }

    /// The client closed its side. What is queued for it (an echo, a close reply, an HTTP
    /// error) still goes out: a half-closed client is still reading.
    fn on_eof(&mut self, key: u32) {
        let state = self.conns[key as usize].state;
        if matches!(state, State::Open | State::Handshake) {
            self.stats().disconnect(Disconnect::PeerGone);
        }
        self.flush_own_output(key);
        let c = &mut self.conns[key as usize];
        if c.outbox.is_empty() || state == State::Handshake {
            self.drop_conn(key);
            return;
        }
        c.set(flags::PEER_EOF);
        if state != State::Lingering {
            c.state = State::Lingering;
            c.since = self.now;
        }
        let at = c.since + self.ticks.close;
        self.schedule(key, at);
        self.flush(key); // drops the connection once everything is written
    }

    fn fail_io(&mut self, key: u32) {
        let c = &self.conns[key as usize];
        if matches!(c.state, State::Open | State::Handshake) {
            self.stats().disconnect(Disconnect::IoError);
        }
        self.drop_conn(key);
    }

    /// Removes a connection for good: leaves its room and closes the socket.
    fn drop_conn(&mut self, key: u32) {
        if let Some(m) = self.conns.get(key as usize).and_then(|c| c.membership()) {
            // Its room may be about to empty here: what was published this turn still goes
            // to the other workers' members.
            self.flush_room_batch(m.room);
        }
        let Some(conn) = self.conns.try_remove(key as usize) else {
            return;
        };
        if let Some(m) = conn.membership() {
            if let Some((moved, position)) = self.rooms.leave(&self.shared.rooms, self.id, m) {
                self.conns[moved as usize].set_room_position(position);
            }
        }
        self.shared.sockets.fetch_sub(1, Ordering::Relaxed);
        self.stats().connections.fetch_sub(1, Ordering::Relaxed);
        drop(conn); // closing the fd removes it from epoll
    }

    fn begin_drain(&mut self) {
        let drain = ticks_of(self.config().drain_timeout);
        self.draining_until = Some(self.now + drain);
        for mut l in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
        let now = self.now;
        for key in keys {
            match self.conns[key as usize].state {
                State::Handshake => {
                    self.stats().disconnect(Disconnect::Shutdown);
                    self.drop_conn(key);
                }
                State::Open => {
                    self.stats().disconnect(Disconnect::Shutdown);
                    self.conns[key as usize].begin_close(
                        codec::CLOSE_GOING_AWAY,
                        "server shutting down",
                        now,
                    );
                    self.mark_dirty(key);
                    self.schedule(key, now + drain);
                }
                State::Closing | State::Lingering => {}
            }
        }
    }

    // ---- timers ----------------------------------------------------------------------------

    /// Makes `at` the connection's next check (superseding any earlier entry).
    fn schedule(&mut self, key: u32, at: u32) {
        let c = &mut self.conns[key as usize];
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

    /// Next liveness check of an open connection: a ping when quiet, then the idle deadline.
    fn schedule_liveness(&mut self, key: u32) {
        let c = &self.conns[key as usize];
        let wait = if c.has(flags::PINGED) || self.ticks.ping >= self.ticks.idle {
            self.ticks.idle
        } else {
            self.ticks.ping
        };
        let at = c.since + wait;
        self.schedule(key, at);
    }

    fn fire_timers(&mut self) {
        let mut due = std::mem::take(&mut self.due);
        self.wheel.advance(self.now as u64, &mut due);
        for e in due.drain(..) {
            let Some(c) = self.conns.get(e.key as usize) else {
                continue;
            };
            if c.generation != e.generation || c.timer_at != e.at {
                continue; // closed, reused, or superseded
            }
            let now = self.now;
            match c.state {
                State::Handshake => {
                    if now >= c.since + self.ticks.handshake {
                        self.stats().disconnect(Disconnect::HandshakeTimeout);
                        self.drop_conn(e.key);
                    } else {
                        let at = c.since + self.ticks.handshake;
                        self.schedule(e.key, at);
                    }
                }
                State::Open => self.check_liveness(e.key),
                State::Closing | State::Lingering => {
                    let deadline = match self.draining_until {
                        Some(d) => d.max(c.since + self.ticks.close),
                        None => c.since + self.ticks.close,
                    };
                    if now >= deadline {
                        self.drop_conn(e.key);
                    } else {
                        self.schedule(e.key, deadline);
                    }
                }
            }
        }
        self.due = due;
    }

    fn check_liveness(&mut self, key: u32) {
        let now = self.now;
        let stats = &self.shared.metrics.workers[self.id];
        let c = &mut self.conns[key as usize];
        let quiet = now.saturating_sub(c.since);
        if quiet >= self.ticks.idle {
            stats.disconnect(Disconnect::IdleTimeout);
            c.begin_close(codec::CLOSE_GOING_AWAY, "idle timeout", now);
            self.mark_dirty(key);
            self.schedule(key, now + self.ticks.close);
            return;
        }
        if quiet >= self.ticks.ping && !c.has(flags::PINGED) {
            c.set(flags::PINGED);
            WorkerStats::add(&stats.pings_sent, 1);
            // A ping is not subject to the backpressure limit: it is tiny and it is how a
            // dead peer gets found.
            c.outbox.push(codec::encode(OutKind::Ping, b""));
            // Look again one interval from now: if the pong came, the next ping is due then.
            let at = (c.since + self.ticks.idle).min(now + self.ticks.ping);
            self.mark_dirty(key);
            self.schedule(key, at);
            return;
        }
        self.schedule_liveness(key);
    }
}

fn invalid_utf8() -> Violation {
    Violation {
        code: codec::CLOSE_INVALID_DATA,
        reason: "text is not valid UTF-8",
    }
}

/// Data-frame order: a continuation needs a message in progress, a new message needs none.
fn check_sequence(p: Parsed, in_progress: bool) -> Result<Parsed, Violation> {
    if let Parsed::Frame(h) = &p {
        match h.kind {
            Kind::Continuation if !in_progress => {
                return Err(Violation::protocol("continuation without a message"))
            }
            Kind::Text | Kind::Binary if in_progress => {
                return Err(Violation::protocol(
                    "new message before the fragmented one finished",
                ))
            }
            _ => {}
        }
    }
    Ok(p)
}

/// A failed connection's half-reassembled message is of no further use.
fn clear_fragments(inbound: &mut Option<Box<Inbound>>) {
    if let Some(ib) = inbound.as_mut() {
        ib.fragments = None;
    }
}

/// Accept errors that retrying at once cannot fix (out of fds or kernel memory).
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
