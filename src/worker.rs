//! A worker: one thread, one `mio::Poll`, its own listeners, connections and rooms. This file
//! is the loop; what happens to the data on its way is in the submodules, in path order:
//! [`accept`] (sockets in), [`read`] (bytes to the [`Session`](crate::session::Session) and its
//! actions back), [`fanout`] (room batches, outboxes, the cross-core bus), [`write`] (outboxes
//! to sockets), [`lifecycle`] (timers, drain, closing and dropping).
//!
//! # One turn of the loop
//! poll (timeout = next timer tick, or zero if work is pending) -> accept and read every ready
//! connection (reading feeds the session, which routes each message) -> finish what earlier
//! turns left (accept budget, read budget, paused publishers) -> send this turn's room batches
//! -> drain a bounded batch from the inbound ring -> wake senders waiting for room in it ->
//! fire due timers -> wake the workers this turn sent to -> flush every connection that got
//! output, once each, with vectored writes.
//!
//! # Edge-triggered readiness
//! mio registrations are edge-triggered: what a turn does not finish gets no new event. Each
//! connection's unfinished business is one bit in [`Connection::ready`] and one list here
//! (`dirty`: output to flush; `backlog`: input not read to the end; `WANTS_WRITE`: the kernel
//! refused output), and `poll_timeout` is the one place that decides whether there is more
//! to do now: it polls without sleeping exactly when one of those lists can make progress.
//!
//! # Tokens
//! A token is `generation << 32 | slab key`. Slab keys are reused (most recently freed first),
//! so an event still in the batch for a closed connection must not reach the connection that
//! took its slot: events and timer entries whose generation differs are ignored.

mod accept;
mod fanout;
mod guard;
mod lifecycle;
mod read;
mod samplers;
mod transport;
mod write;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::bus::{self, CrossCoreBus, Wakeup};
use crate::config::Config;
use crate::connection::{ready, Connection};
use crate::deflate::{CompressStats, FrameCompressor};
use crate::metrics::{Metrics, WorkerStats};
use crate::outbox::FrameBatch;
use crate::room_index::{RoomDirectory, RoomIndex};
use crate::session::{Inflating, Limits};
use crate::timer_wheel::{Entry, TimerWheel, TICK};

/// Size of the per-worker read buffer shared by all its connections.
const SCRATCH: usize = 64 * 1024;
/// Reads of one connection per turn before it must wait for the next turn (fairness).
const READS_PER_TURN: usize = 16;
/// Sockets accepted per listener per turn, so a connect storm cannot starve open clients.
const ACCEPTS_PER_TURN: usize = 64;
/// Cross-core deliveries taken per turn.
const INBOUND_BATCH: usize = 4096;
/// Idle inflaters a worker keeps for the next compressed message (47,712 B each).
const SPARE_INFLATERS: usize = 4;

const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX - 1;
/// `Worker::feeding` when no session is being fed.
const NOBODY: u32 = u32::MAX;

/// State shared by all workers (read-mostly; nothing here is touched per message).
pub struct Shared {
    pub config: Config,
    /// When the server started (the workers' clocks count from here).
    pub started: Instant,
    pub max_connections: usize,
    /// Sockets past `max_connections` that still get a 503 (from the fd reserve); beyond
    /// that a new socket is closed at once, so a flood cannot exhaust the fds.
    pub reject_headroom: usize,
    /// Sockets held across all workers (counts against `max_connections`).
    pub sockets: AtomicUsize,
    pub shutdown: AtomicBool,
    /// The listening sockets (and the admin listener) went to a successor (`--takeover`).
    pub handed_over: AtomicBool,
    /// The admin thread let go of its copy of the admin listener after a handover.
    pub admin_released: AtomicBool,
    /// Why a worker died, if one did: the others drain and the process exits non-zero.
    pub failure: Mutex<Option<String>>,
    pub metrics: Metrics,
    pub rooms: RoomDirectory,
    /// The per-address limits' tables (`--max-connections-per-ip`, `--max-handshakes-per-ip`).
    pub guards: crate::abuse::Guards,
    /// The Redis bridge's way in, with `--redis`.
    pub bridge: Option<Arc<crate::bridge::BridgeLink>>,
    pub wakeups: Arc<[Arc<Wakeup>]>,
    /// The listening addresses that serve wss:// (`--tls-cert`), and their configuration.
    pub tls: Option<crate::tls::Listeners>,
}

impl Shared {
    /// Asks every worker to drain and stop.
    pub fn begin_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for w in self.wakeups.iter() {
            let _ = w.waker.wake();
        }
    }

    /// A worker died: record why (the first cause wins) and drain the others.
    pub fn worker_failed(&self, id: usize, cause: String) {
        log::error!(
            "worker {id} failed: {cause}; draining the other workers, then exiting with an \
             error so the supervisor restarts megasock"
        );
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(format!("worker {id} failed: {cause}"));
        self.begin_shutdown();
    }

    pub fn failed(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

/// Builds one bus end per worker, and the injector for the publish API.
pub fn buses(shared: &Shared) -> (Vec<CrossCoreBus>, bus::Injector) {
    bus::build(
        shared.config.ring_capacity,
        shared.metrics.rings.clone(),
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
    deflate: CompressStats,
    inflated: u64,
    inflated_bytes: u64,
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
            (&s.deflate_compressed, t.deflate.compressed),
            (&s.deflate_bytes_in, t.deflate.bytes_in),
            (&s.deflate_bytes_out, t.deflate.bytes_out),
            (&s.deflate_plain, t.deflate.plain),
            (&s.deflate_inflated, t.inflated),
            (&s.deflate_inflated_bytes, t.inflated_bytes),
        ] {
            if n > 0 {
                WorkerStats::add(counter, n);
            }
        }
    }
}

pub struct Worker {
    id: usize,
    poll: Poll,
    listeners: Vec<TcpListener>,
    /// Per listener: its TLS configuration if it serves wss://.
    listener_tls: Vec<Option<Arc<rustls::ServerConfig>>>,
    /// Decrypted input and encrypted output of the TLS connections (transport.rs).
    tls_bufs: crate::tls::Buffers,
    /// Listeners whose accept budget ran out with connections still waiting.
    accept_backlog: Vec<usize>,
    conns: Slab<Connection>,
    /// Connections with output queued this turn.
    dirty: Vec<u32>,
    /// Connections readable but not read to the end: `(key, generation)`.
    backlog: Vec<(u32, u32)>,
    rooms: RoomIndex,
    bus: CrossCoreBus,
    wheel: TimerWheel,
    due: Vec<Entry>,
    scratch: Vec<u8>,
    shared: Arc<Shared>,
    limits: Limits,
    start: Instant,
    now: u32,
    next_generation: u32,
    accept_paused_until: Option<u32>,
    /// Accept failed for lack of fds or memory and has not succeeded since (logged once).
    accept_starved: bool,
    draining: bool,
    /// Rooms with frames published this turn.
    pending_rooms: Vec<u32>,
    samplers: samplers::Samplers,
    /// When the current turn began (a message read now arrived then).
    turn_start: Instant,
    /// When each batch delivered this turn was born (for the latency samples).
    births: Vec<Instant>,
    /// Echo frames of the connection being read (see `flush_echoes`).
    echoes: FrameBatch,
    /// The connection whose session is out of its slot being fed (see `read::with_session`).
    feeding: u32,
    /// The connection being fed went over `--max-backpressure` (closed once it is back).
    feeding_over_limit: bool,
    /// Per-address keys of the connections counted by `--max-connections-per-ip` (guard.rs).
    ip_keys: std::collections::HashMap<u32, u64>,
    /// Client addresses from PROXY protocol headers (only with `--proxy-protocol`).
    proxied: std::collections::HashMap<u32, std::net::SocketAddr>,
    /// permessage-deflate, outbound: compresses a batch once per window size for the members
    /// that negotiated it (`fanout.rs`).
    compressor: FrameCompressor,
    /// permessage-deflate, inbound: spare inflaters and the inflate buffer sessions borrow.
    inflating: Inflating,
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
        let limits = Limits {
            max_message: c.max_message_size,
            handshake: ticks_of(c.handshake_timeout),
            ping: ticks_of(c.ping_interval),
            idle: ticks_of(c.idle_timeout),
            close: ticks_of(c.close_timeout),
            message_rate: c.message_rate,
            drain_until: None,
            proxy: c.proxy_protocol,
            deflate: c.deflate,
        };
        let per_worker = shared.max_connections / c.workers + 1;
        let listener_tls = listeners
            .iter()
            .map(|l| {
                let addr = l.local_addr().ok()?;
                shared.tls.as_ref()?.config_for(addr)
            })
            .collect();
        let started = shared.started;
        let compressor = FrameCompressor::new(c.deflate_level, c.deflate_min_size);
        Ok(Worker {
            id,
            poll,
            listeners,
            listener_tls,
            tls_bufs: crate::tls::Buffers::default(),
            accept_backlog: Vec::new(),
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
            limits,
            start: started,
            now: 0,
            next_generation: 1,
            accept_paused_until: None,
            accept_starved: false,
            draining: false,
            pending_rooms: Vec::new(),
            samplers: samplers::Samplers::new(),
            turn_start: Instant::now(),
            births: Vec::new(),
            echoes: FrameBatch::default(),
            feeding: NOBODY,
            feeding_over_limit: false,
            ip_keys: std::collections::HashMap::new(),
            proxied: std::collections::HashMap::new(),
            compressor,
            inflating: Inflating::new(SPARE_INFLATERS),
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
            let sleeping = timeout != Duration::ZERO && self.bus.prepare_to_sleep();
            let res = self.poll.poll(
                &mut events,
                Some(if sleeping { timeout } else { Duration::ZERO }),
            );
            self.bus.awake();
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            let woke = Instant::now();
            self.turn_start = woke;
            self.now = ((woke - self.start).as_nanos() / TICK.as_nanos()) as u32;

            for ev in events.iter() {
                let t = ev.token();
                if t == WAKER {
                    continue;
                }
                if t.0 > LISTENER_BASE - self.listeners.len() && t.0 <= LISTENER_BASE {
                    self.accept(LISTENER_BASE - t.0);
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
                if ev.is_writable()
                    && self.is_current(key, generation)
                    && self.conns[key as usize].has(ready::WANTS_WRITE)
                {
                    self.flush(key);
                }
            }
            self.accept_backlog();
            self.read_backlog();
            self.flush_batches();
            self.drain_inbound();
            self.bus.release_waiting_senders();
            if self.bus.is_backed_up() {
                self.bus.retry_overflow();
            }
            self.fire_timers();
            self.resume_accepting();
            if !self.draining && self.shared.shutdown.load(Ordering::Relaxed) {
                self.begin_drain();
            }
            // Everything that may have sent to another worker this turn is done: wake them.
            let wakes = self.bus.wake_peers();
            WorkerStats::add(&self.stats().wakeups_sent, wakes);
            self.flush_dirty();
            let done = Instant::now();
            let stats = &self.shared.metrics.workers[self.id];
            self.samplers.delivered(&mut self.births, done);
            self.tally.publish(stats);
            self.samplers.turn(done - woke, stats);
            self.samplers.publish(done, stats);
            let age = done.duration_since(self.start).as_millis() as u64;
            stats.last_turn_ms.store(age, Ordering::Relaxed);
            if self.draining && self.drained() {
                return Ok(());
            }
        }
    }

    /// The one place that decides whether there is more to do now (poll without sleeping)
    /// or the worker may sleep until the next timer tick.
    fn poll_timeout(&self) -> Duration {
        let readable_now = self.backlog.iter().any(|&(k, _)| {
            self.conns
                .get(k as usize)
                .is_some_and(|c| !c.has(ready::PAUSED) || !self.publisher_blocked(c))
        });
        if !self.dirty.is_empty() || !self.accept_backlog.is_empty() || readable_now {
            return Duration::ZERO;
        }
        // A full ring's receiver wakes us when it has room again (bus docs): no spinning.
        let next = Duration::from_nanos(self.wheel.next_tick() * TICK.as_nanos() as u64);
        next.saturating_sub(self.start.elapsed())
            .max(Duration::from_millis(1))
            .min(TICK)
    }

    #[inline]
    fn is_current(&self, key: u32, generation: u32) -> bool {
        self.conns
            .get(key as usize)
            .is_some_and(|c| c.generation == generation)
    }
}
