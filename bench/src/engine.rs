//! One worker's event loop: non-blocking connects (optionally from a chosen source address),
//! the upgrade handshake, frame parsing, masked writes, close handshakes and timeouts, on one
//! `mio::Poll`. Scenarios plug in through [`Behavior`] and drive the loop with [`Engine::turn`].
//!
//! Reading: one 64 KiB scratch buffer per worker; only a trailing partial frame is copied
//! into the connection. Writing: frames are built into one per-worker buffer and written
//! straight to the socket; only what the kernel does not take is queued on the connection.

use crate::hist::Hist;
use crate::result::StageResult;
use crate::util::{mono_ns, Rng};
use crate::ws::{self, HandshakeError, Target};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAKE: Token = Token(usize::MAX);
const SCRATCH: usize = 64 * 1024;
/// Largest frame accepted from a server.
const MAX_FRAME: u64 = 64 * 1024 * 1024;
/// How long a close handshake may take before the socket is just dropped.
const CLOSE_WAIT_NS: u64 = 2_000_000_000;

/// Commands from the process runner to its workers (one value, only ever increasing):
/// `2k` = prepare stage k (connect), `2k+1` = run stage k, [`STOP`] = close everything and exit.
pub const STOP: u64 = u64::MAX;
pub const fn prep(stage: u64) -> u64 {
    2 * stage
}
pub const fn go(stage: u64) -> u64 {
    2 * stage + 1
}

/// Shared by the workers of one process: the current command and how to wake them.
#[derive(Default)]
pub struct Control {
    cmd: AtomicU64,
    wakers: Mutex<Vec<Arc<Waker>>>,
}

impl Control {
    pub fn get(&self) -> u64 {
        self.cmd.load(Ordering::SeqCst)
    }
    /// Raise the command (never lowers it) and wake every worker.
    pub fn set(&self, v: u64) {
        self.cmd.fetch_max(v, Ordering::SeqCst);
        for w in self.wakers.lock().expect("wakers lock").iter() {
            let _ = w.wake();
        }
    }
    fn add_waker(&self, w: Arc<Waker>) {
        self.wakers.lock().expect("wakers lock").push(w);
    }
}

/// Live counters of one worker, read by the process runner for progress lines.
#[derive(Default, Debug)]
pub struct Progress {
    pub attempted: AtomicU64,
    pub open: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connecting,
    Handshaking,
    Open,
    /// We or the server started the close handshake; waiting for EOF.
    Closing,
    Closed,
}

pub struct Conn {
    stream: Option<TcpStream>,
    pub state: State,
    started_ns: u64,
    key: [u8; 24],
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    out_pos: usize,
    frag: Option<(u8, Vec<u8>)>,
    /// The close handshake was started by us (a normal end), not by the server.
    closing_by_us: bool,
    /// Connected to `EngineConfig::alt_target`.
    alt: bool,
    /// Answered at least one of the server's pings (proof that it is alive end to end).
    ponged: bool,
    /// permessage-deflate as agreed: None (off), or the connection's own inflater when the
    /// server keeps its compression context (`Some(None)`: no context, the shared one serves).
    inflate: Option<Option<Box<flate2::Decompress>>>,
    /// The message being reassembled from fragments is compressed.
    frag_compressed: bool,
    close_deadline: u64,
}

/// What a scenario does with connections and messages.
pub trait Behavior {
    fn on_open(&mut self, _eng: &mut Engine, _id: usize, _now: u64) {}
    fn on_message(&mut self, eng: &mut Engine, id: usize, opcode: u8, payload: &[u8], now: u64);
    /// The connection's output queue emptied.
    fn on_drained(&mut self, _eng: &mut Engine, _id: usize, _now: u64) {}
    /// An open connection stopped being open (closed by the server, reset, or by us).
    fn on_closed(&mut self, _id: usize) {}
    /// Called at the end of every turn.
    fn after_turn(&mut self, _eng: &mut Engine, _now: u64) {}
}

/// A behavior that ignores messages (the connect scenario).
pub struct Idle;
impl Behavior for Idle {
    fn on_message(&mut self, _: &mut Engine, _: usize, _: u8, _: &[u8], _: u64) {}
}

pub struct EngineConfig {
    pub target: Target,
    /// Another server, and the first local connection index that goes there.
    pub alt_target: Option<(Target, u64)>,
    pub source_ips: Arc<Vec<IpAddr>>,
    /// Global index of this worker and the number of workers over all processes.
    pub worker: usize,
    pub workers: usize,
    /// Connections per second for this worker; 0 = unlimited.
    pub rate: f64,
    pub max_pending: usize,
    pub connect_timeout_ns: u64,
    /// Offer permessage-deflate.
    pub deflate: bool,
}

/// Connection statistics accumulated since the last [`Engine::take_conn_stats`].
#[derive(Default)]
struct ConnStats {
    attempted: u64,
    opened: u64,
    failures: BTreeMap<String, u64>,
    drops: BTreeMap<String, u64>,
    first_attempt_ns: u64,
    last_open_ns: u64,
    tcp: Hist,
    handshake: Hist,
}

pub struct Engine {
    poll: Poll,
    events: Events,
    pub conns: Vec<Conn>,
    cfg: EngineConfig,
    scratch: Vec<u8>,
    out: Vec<u8>,
    rng: Rng,
    pending: VecDeque<usize>,
    closing: VecDeque<usize>,
    closed_q: Vec<usize>,
    open: usize,
    stats: ConnStats,
    ctl: Arc<Control>,
    progress: Arc<Progress>,
    total_attempted: u64,
    total_failed: u64,
    total_dropped: u64,
    /// Messages counters kept by the behaviors, published with the progress.
    pub msgs_sent: u64,
    pub msgs_received: u64,
    /// Server pings answered, and connections that answered at least one.
    pub pings_answered: u64,
    pub conns_ponged: u64,
    /// Bytes read from open connections' sockets (what the wire carried to us).
    pub bytes_read: u64,
    /// Inflates messages of connections whose server does not keep a context, one at a time.
    shared_inflater: flate2::Decompress,
    inflated: Vec<u8>,
    /// Longest busy span, from one poll's return to the next poll (a starved or overloaded
    /// load generator answers the server's pings that late).
    pub max_turn_gap_ns: u64,
    last_turn_ns: u64,
}

fn classify(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => return "fd_limit".into(),
        Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => return "no_source_port".into(),
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => return "unreachable".into(),
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => return "no_memory".into(),
        _ => {}
    }
    match e.kind() {
        ConnectionRefused => "refused".into(),
        TimedOut => "timeout".into(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => "reset".into(),
        _ => match e.raw_os_error() {
            Some(n) => format!("os_error_{n}"),
            None => "other".into(),
        },
    }
}

impl Engine {
    pub fn new(
        cfg: EngineConfig,
        ctl: Arc<Control>,
        progress: Arc<Progress>,
    ) -> io::Result<Engine> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        ctl.add_waker(waker);
        let salt = cfg.worker as u64;
        Ok(Engine {
            poll,
            events: Events::with_capacity(1024),
            conns: Vec::new(),
            cfg,
            scratch: vec![0; SCRATCH],
            out: Vec::with_capacity(SCRATCH),
            rng: Rng::seeded(salt),
            pending: VecDeque::new(),
            closing: VecDeque::new(),
            closed_q: Vec::new(),
            open: 0,
            stats: ConnStats::default(),
            ctl,
            progress,
            total_attempted: 0,
            total_failed: 0,
            total_dropped: 0,
            msgs_sent: 0,
            msgs_received: 0,
            pings_answered: 0,
            conns_ponged: 0,
            max_turn_gap_ns: 0,
            last_turn_ns: 0,
            bytes_read: 0,
            shared_inflater: flate2::Decompress::new(false),
            inflated: Vec::new(),
        })
    }

    pub fn cmd(&self) -> u64 {
        self.ctl.get()
    }

    pub fn open_count(&self) -> usize {
        self.open
    }

    pub fn is_open(&self, id: usize) -> bool {
        self.conns.get(id).is_some_and(|c| c.state == State::Open)
    }

    /// Bytes queued on the connection (not yet taken by the kernel).
    pub fn queued(&self, id: usize) -> usize {
        let c = &self.conns[id];
        c.outbuf.len() - c.out_pos
    }

    /// One turn: wait for events (at most `timeout`), handle them, expire timeouts, then let
    /// the behavior act.
    pub fn turn<B: Behavior>(&mut self, b: &mut B, timeout: Duration) -> io::Result<()> {
        let start = mono_ns();
        if self.last_turn_ns != 0 {
            self.max_turn_gap_ns = self.max_turn_gap_ns.max(start - self.last_turn_ns);
        }
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        // From here to the next poll the worker is busy: that span is how late it can be.
        self.last_turn_ns = mono_ns();
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        for ev in events.iter() {
            let t = ev.token();
            if t == WAKE {
                continue;
            }
            let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
            let writable = ev.is_writable() || ev.is_error();
            let hup = ev.is_read_closed() || ev.is_error();
            self.handle(t.0, readable, writable, hup, b);
            self.dispatch_closed(b);
        }
        self.events = events;
        let now = mono_ns();
        self.expire(now);
        self.dispatch_closed(b);
        b.after_turn(self, now);
        self.dispatch_closed(b);
        self.publish_progress();
        Ok(())
    }

    fn dispatch_closed<B: Behavior>(&mut self, b: &mut B) {
        while let Some(id) = self.closed_q.pop() {
            b.on_closed(id);
        }
    }

    pub fn publish_progress(&self) {
        let p = &self.progress;
        p.attempted.store(self.total_attempted, Ordering::Relaxed);
        p.open.store(self.open as u64, Ordering::Relaxed);
        p.failed.store(self.total_failed, Ordering::Relaxed);
        p.dropped.store(self.total_dropped, Ordering::Relaxed);
        p.sent.store(self.msgs_sent, Ordering::Relaxed);
        p.received.store(self.msgs_received, Ordering::Relaxed);
    }

    /// Attempt connections until `target` attempts were made in total by this worker, at the
    /// configured rate, and wait until none is pending. Returns false if told to stop.
    pub fn ramp<B: Behavior>(&mut self, b: &mut B, target: u64) -> io::Result<bool> {
        let t0 = mono_ns();
        let base = self.total_attempted;
        let rate = self.cfg.rate;
        loop {
            if self.cmd() == STOP {
                return Ok(false);
            }
            let now = mono_ns();
            let mut allowed = target.saturating_sub(self.total_attempted);
            if rate > 0.0 {
                let budget = ((now - t0) as f64 * rate / 1e9) as u64 + 1;
                allowed = allowed.min((base + budget).saturating_sub(self.total_attempted));
            }
            let room = self.cfg.max_pending.saturating_sub(self.pending.len()) as u64;
            for i in 0..allowed.min(room) {
                self.start_connect(now);
                // connect() on loopback runs the server's SYN handling too, and near a
                // million sockets it took milliseconds (port search, established-hash
                // walks): a long batch left answers unread for 17 s and connects timed out.
                // So go back to polling every 5 ms of connecting.
                if i % 16 == 15 && mono_ns() - now > 5_000_000 {
                    break;
                }
            }
            if self.total_attempted >= target && self.pending.is_empty() {
                self.publish_progress();
                return Ok(true);
            }
            // Sleep until the next token, the next timeout, or 100 ms.
            let mut wait = 100_000_000u64;
            if rate > 0.0 && self.total_attempted < target && room > allowed {
                let next = base + ((now - t0) as f64 * rate / 1e9) as u64 + 1;
                let due = t0 + ((next - base) as f64 * 1e9 / rate) as u64;
                wait = wait.min(due.saturating_sub(now).max(100_000));
            }
            if let Some(&front) = self.pending.front() {
                let dl = self.conns[front].started_ns + self.cfg.connect_timeout_ns;
                wait = wait.min(dl.saturating_sub(now) + 1_000_000);
            }
            self.turn(b, Duration::from_nanos(wait))?;
        }
    }

    fn start_connect(&mut self, now: u64) {
        let local = self.total_attempted;
        self.total_attempted += 1;
        self.stats.attempted += 1;
        if self.stats.first_attempt_ns == 0 {
            self.stats.first_attempt_ns = now;
        }
        let gidx = crate::srcip::global_index(local, self.cfg.worker, self.cfg.workers);
        let src = crate::srcip::pick(&self.cfg.source_ips, gidx);
        let alt = matches!(&self.cfg.alt_target, Some((_, from)) if local >= *from);
        let target = match &self.cfg.alt_target {
            Some((t, _)) if alt => t,
            _ => &self.cfg.target,
        };
        let mut stream = match open_socket(target.addr, src) {
            Ok(s) => s,
            Err(e) => {
                self.count_failure(classify(&e));
                return;
            }
        };
        let id = self.conns.len();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(id),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.count_failure(classify(&e));
            return;
        }
        let key = ws::make_key(self.rng.next_u64(), self.rng.next_u64());
        self.conns.push(Conn {
            stream: Some(stream),
            state: State::Connecting,
            started_ns: now,
            key,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            out_pos: 0,
            frag: None,
            closing_by_us: false,
            alt,
            ponged: false,
            inflate: None,
            frag_compressed: false,
            close_deadline: 0,
        });
        self.pending.push_back(id);
    }

    fn count_failure(&mut self, cause: String) {
        self.total_failed += 1;
        *self.stats.failures.entry(cause).or_default() += 1;
    }

    /// Drop the socket. A connection that never opened counts as a failure with `cause`; an
    /// open one that we did not close counts as dropped with `cause`.
    fn finish(&mut self, id: usize, cause: &str) {
        let c = &mut self.conns[id];
        let prev = c.state;
        if prev == State::Closed {
            return;
        }
        c.state = State::Closed;
        c.stream = None;
        c.inbuf = Vec::new();
        c.outbuf = Vec::new();
        c.out_pos = 0;
        c.frag = None;
        match prev {
            State::Connecting | State::Handshaking => self.count_failure(cause.to_string()),
            State::Open => {
                self.open -= 1;
                self.total_dropped += 1;
                *self.stats.drops.entry(cause.to_string()).or_default() += 1;
                self.closed_q.push(id);
            }
            State::Closing | State::Closed => {}
        }
    }

    fn handle<B: Behavior>(
        &mut self,
        id: usize,
        readable: bool,
        writable: bool,
        hup: bool,
        b: &mut B,
    ) {
        let Some(c) = self.conns.get(id) else { return };
        match c.state {
            State::Connecting => {
                if readable || writable {
                    self.finish_connect(id, hup);
                }
            }
            State::Handshaking => {
                if writable {
                    self.flush_conn(id, b);
                }
                if readable {
                    self.read_handshake(id, b);
                }
            }
            State::Open | State::Closing => {
                if writable {
                    self.flush_conn(id, b);
                }
                if readable && self.conns[id].state != State::Closed {
                    self.read_frames(id, hup, b);
                }
            }
            State::Closed => {}
        }
    }

    fn finish_connect(&mut self, id: usize, hup: bool) {
        let c = &mut self.conns[id];
        let stream = c.stream.as_ref().expect("connecting stream");
        // A reset here is the kernel's answer to the SYN (no listener, or a full queue with
        // tcp_abort_on_overflow): named apart from a reset after the request was sent.
        let connect_cause = |e: &io::Error| match classify(e) {
            c if c == "reset" => "connect_reset".to_string(),
            c => c,
        };
        match stream.take_error() {
            Ok(Some(e)) | Err(e) => return self.finish(id, &connect_cause(&e)),
            Ok(None) => {}
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                if hup {
                    self.finish(id, "connect_reset");
                }
                return; // spurious wake-up; still connecting
            }
            Err(e) => return self.finish(id, &connect_cause(&e)),
        }
        let now = mono_ns();
        self.stats.tcp.record(now - c.started_ns);
        c.state = State::Handshaking;
        let key = c.key;
        let target = match &self.cfg.alt_target {
            Some((t, _)) if c.alt => t,
            _ => &self.cfg.target,
        };
        ws::write_request(target, &key, self.cfg.deflate, &mut self.out);
        self.send_out(id);
    }

    fn read_handshake<B: Behavior>(&mut self, id: usize, b: &mut B) {
        let mut eof = false;
        loop {
            let c = &mut self.conns[id];
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            match stream.read(&mut self.scratch) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => c.inbuf.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let cause = match classify(&e) {
                        c if c == "reset" => "reset_before_response".to_string(),
                        c => c,
                    };
                    return self.finish(id, &cause);
                }
            }
        }
        let c = &mut self.conns[id];
        match ws::parse_response(&c.inbuf, &c.key) {
            Ok(None) => {
                if eof {
                    // The server closed before answering the upgrade (e.g. its handshake
                    // timeout passed before it read the request).
                    self.finish(id, "closed_before_response");
                }
            }
            Err(HandshakeError::Status(code)) => self.finish(id, &format!("http_{code}")),
            Err(HandshakeError::Bad(_)) => self.finish(id, "bad_handshake"),
            Ok(Some(accepted)) => {
                let now = mono_ns();
                let n = accepted.len;
                c.state = State::Open;
                c.inflate = accepted.deflate.map(|d| {
                    (!d.server_no_context_takeover)
                        .then(|| Box::new(flate2::Decompress::new(false)))
                });
                let rest = c.inbuf.split_off(n);
                c.inbuf = Vec::new();
                self.open += 1;
                self.stats.opened += 1;
                self.stats.last_open_ns = self.stats.last_open_ns.max(now);
                self.stats.handshake.record(now - c.started_ns);
                b.on_open(self, id, now);
                if !rest.is_empty() && self.conns[id].state == State::Open {
                    match self.process(id, &rest, b, now) {
                        Ok(used) => {
                            if used < rest.len() && self.conns[id].state != State::Closed {
                                self.conns[id].inbuf.extend_from_slice(&rest[used..]);
                            }
                        }
                        Err(cause) => self.protocol_error(id, &cause),
                    }
                }
                if eof {
                    self.on_eof(id);
                }
            }
        }
    }

    fn read_frames<B: Behavior>(&mut self, id: usize, hup: bool, b: &mut B) {
        let mut scratch = std::mem::take(&mut self.scratch);
        loop {
            let c = &mut self.conns[id];
            if c.state == State::Closed {
                break;
            }
            // A short partial frame left by the previous read goes in front of the new bytes,
            // so that everything is parsed in place; a long one (a big frame arriving in
            // pieces) keeps growing in the connection's own buffer.
            let carried = if !c.inbuf.is_empty() && c.inbuf.len() <= SCRATCH / 4 {
                let tail = std::mem::take(&mut c.inbuf);
                scratch[..tail.len()].copy_from_slice(&tail);
                tail.len()
            } else {
                0
            };
            let Some(stream) = c.stream.as_mut() else {
                break;
            };
            let n = match stream.read(&mut scratch[carried..]) {
                Ok(0) => {
                    self.on_eof(id);
                    break;
                }
                Ok(n) => {
                    self.bytes_read += n as u64;
                    n
                }
                Err(e) => {
                    if carried > 0 {
                        c.inbuf.extend_from_slice(&scratch[..carried]);
                    }
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ => {
                            self.finish(id, &classify(&e));
                            break;
                        }
                    }
                }
            };
            let now = mono_ns();
            let room = scratch.len() - carried;
            if c.inbuf.is_empty() {
                let len = carried + n;
                match self.process(id, &scratch[..len], b, now) {
                    Ok(used) => {
                        let c = &mut self.conns[id];
                        if used < len && c.state != State::Closed {
                            c.inbuf.extend_from_slice(&scratch[used..len]);
                        }
                    }
                    Err(cause) => {
                        self.protocol_error(id, &cause);
                        break;
                    }
                }
            } else {
                c.inbuf.extend_from_slice(&scratch[..n]);
                let mut buf = std::mem::take(&mut c.inbuf);
                match self.process(id, &buf, b, now) {
                    Ok(used) => {
                        let c = &mut self.conns[id];
                        if c.state != State::Closed {
                            buf.drain(..used);
                            if buf.is_empty() {
                                buf = Vec::new();
                            }
                            c.inbuf = buf;
                        }
                    }
                    Err(cause) => {
                        self.protocol_error(id, &cause);
                        break;
                    }
                }
            }
            // A short read drained the socket (epoll(7)); a new edge comes with new data.
            // After a hang-up, read on until EOF.
            if n < room && !hup {
                break;
            }
        }
        self.scratch = scratch;
    }

    /// A compressed message's payload, inflated (RFC 7692 §7.2.2: the sender removed the
    /// final `00 00 ff ff`). Returns the engine's reusable buffer; give it back after use.
    fn inflate(&mut self, id: usize, payload: &[u8]) -> Result<Vec<u8>, String> {
        const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
        let mut out = std::mem::take(&mut self.inflated);
        out.clear();
        let own = self.conns[id].inflate.as_mut().and_then(Option::as_mut);
        let z: &mut flate2::Decompress = match own {
            Some(z) => z,
            None => {
                self.shared_inflater.reset(false);
                &mut self.shared_inflater
            }
        };
        for input in [payload, &TAIL[..]] {
            let mut input = input;
            while !input.is_empty() {
                if out.len() as u64 >= MAX_FRAME {
                    return Err("protocol_message_too_large".into());
                }
                out.reserve(input.len() * 4 + 256);
                let before = z.total_in();
                z.decompress_vec(input, &mut out, flate2::FlushDecompress::Sync)
                    .map_err(|_| "protocol_bad_deflate".to_string())?;
                let used = (z.total_in() - before) as usize;
                input = &input[used..];
                if used == 0 && out.len() < out.capacity() {
                    break; // nothing more it can take: the stream ended (BFINAL)
                }
            }
        }
        Ok(out)
    }

    fn protocol_error(&mut self, id: usize, cause: &str) {
        self.finish(id, cause);
    }

    fn on_eof(&mut self, id: usize) {
        match self.conns[id].state {
            State::Closing => self.finish(id, "closed"),
            State::Open => self.finish(id, "eof"),
            _ => self.finish(id, "reset"),
        }
    }

    /// Parse and dispatch every complete frame in `data`; returns the bytes used. Frames the
    /// behavior built while handling them (with [`Engine::frame`]) are written in one go.
    fn process<B: Behavior>(
        &mut self,
        id: usize,
        data: &[u8],
        b: &mut B,
        now: u64,
    ) -> Result<usize, String> {
        debug_assert!(self.out.is_empty());
        let r = self.process_frames(id, data, b, now);
        if !self.out.is_empty() {
            if r.is_ok() {
                self.send_out(id);
            } else {
                self.out.clear();
            }
        }
        r
    }

    fn process_frames<B: Behavior>(
        &mut self,
        id: usize,
        data: &[u8],
        b: &mut B,
        now: u64,
    ) -> Result<usize, String> {
        let mut pos = 0;
        while pos < data.len() {
            let Some(fi) = ws::parse_frame_header(&data[pos..])
                .map_err(|_| "protocol_bad_header".to_string())?
            else {
                break;
            };
            if fi.payload_len > MAX_FRAME {
                return Err("protocol_frame_too_large".into());
            }
            let total = fi.header_len + fi.payload_len as usize;
            if data.len() - pos < total {
                break;
            }
            if fi.masked {
                return Err("protocol_masked_server_frame".into());
            }
            // RSV1 alone, on the first frame of a data message, of a connection that agreed
            // to permessage-deflate: a compressed message. Any other reserved bit is an error.
            let compressed = fi.rsv1
                && matches!(fi.opcode, ws::OP_TEXT | ws::OP_BINARY)
                && self.conns[id].inflate.is_some();
            if fi.rsv && !compressed {
                return Err("protocol_reserved_bits".into());
            }
            let payload = &data[pos + fi.header_len..pos + total];
            pos += total;
            let state = self.conns[id].state;
            match fi.opcode {
                ws::OP_TEXT | ws::OP_BINARY => {
                    if self.conns[id].frag.is_some() {
                        return Err("protocol_interleaved_message".into());
                    }
                    if fi.fin {
                        if state == State::Open {
                            if compressed {
                                let msg = self.inflate(id, payload)?;
                                b.on_message(self, id, fi.opcode, &msg, now);
                                self.inflated = msg;
                            } else {
                                b.on_message(self, id, fi.opcode, payload, now);
                            }
                        }
                    } else {
                        self.conns[id].frag = Some((fi.opcode, payload.to_vec()));
                        self.conns[id].frag_compressed = compressed;
                    }
                }
                ws::OP_CONT => {
                    let c = &mut self.conns[id];
                    let Some((_, buf)) = c.frag.as_mut() else {
                        return Err("protocol_stray_continuation".into());
                    };
                    if buf.len() as u64 + payload.len() as u64 > MAX_FRAME {
                        return Err("protocol_message_too_large".into());
                    }
                    buf.extend_from_slice(payload);
                    if fi.fin {
                        let (op, mut msg) = c.frag.take().expect("fragment");
                        if std::mem::take(&mut c.frag_compressed) {
                            msg = self.inflate(id, &msg)?;
                        }
                        if state == State::Open {
                            b.on_message(self, id, op, &msg, now);
                        }
                    }
                }
                ws::OP_PING => {
                    if payload.len() > 125 || !fi.fin {
                        return Err("protocol_bad_control".into());
                    }
                    if state == State::Open {
                        self.frame(ws::OP_PONG, payload.len(), |p| p.copy_from_slice(payload));
                        self.send_out(id);
                        self.pings_answered += 1;
                        let c = &mut self.conns[id];
                        if !c.ponged {
                            c.ponged = true;
                            self.conns_ponged += 1;
                        }
                    }
                }
                ws::OP_PONG => {}
                ws::OP_CLOSE => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    self.on_close_frame(id, code, now);
                }
                _ => return Err("protocol_bad_opcode".into()),
            }
            if self.conns[id].state == State::Closed {
                break;
            }
        }
        Ok(pos)
    }

    fn on_close_frame(&mut self, id: usize, code: u16, now: u64) {
        match self.conns[id].state {
            State::Open => {
                // The server closes: count it, answer, wait for its EOF.
                let cause = format!("server_close_{code}");
                self.open -= 1;
                self.total_dropped += 1;
                *self.stats.drops.entry(cause).or_default() += 1;
                self.closed_q.push(id);
                let c = &mut self.conns[id];
                c.state = State::Closing;
                c.close_deadline = now + CLOSE_WAIT_NS;
                self.closing.push_back(id);
                let echo = if code == 1005 {
                    Vec::new()
                } else {
                    code.to_be_bytes().to_vec()
                };
                self.frame(ws::OP_CLOSE, echo.len(), |p| p.copy_from_slice(&echo));
                self.send_out(id);
            }
            _ => {
                // The answer to our close: the server should close TCP now; wait for EOF.
            }
        }
    }

    /// Start the close handshake (code 1000) on an open connection.
    pub fn close(&mut self, id: usize) {
        let c = &mut self.conns[id];
        if c.state != State::Open {
            return;
        }
        c.state = State::Closing;
        c.closing_by_us = true;
        c.close_deadline = mono_ns() + CLOSE_WAIT_NS;
        self.open -= 1;
        self.closed_q.push(id);
        self.closing.push_back(id);
        self.frame(ws::OP_CLOSE, 2, |p| {
            p.copy_from_slice(&1000u16.to_be_bytes())
        });
        self.send_out(id);
    }

    /// Close every connection (close handshake for the open ones), waiting at most `timeout`.
    pub fn close_all<B: Behavior>(&mut self, b: &mut B, timeout: Duration) -> io::Result<()> {
        for id in 0..self.conns.len() {
            match self.conns[id].state {
                State::Open => self.close(id),
                State::Connecting | State::Handshaking => self.finish(id, "aborted"),
                _ => {}
            }
        }
        let deadline = mono_ns() + timeout.as_nanos() as u64;
        loop {
            self.closing
                .retain(|&id| self.conns[id].state == State::Closing);
            let now = mono_ns();
            if self.closing.is_empty() || now >= deadline {
                break;
            }
            self.turn(b, Duration::from_nanos((deadline - now).min(50_000_000)))?;
        }
        for id in 0..self.conns.len() {
            if self.conns[id].state != State::Closed {
                self.finish(id, "close_timeout");
            }
        }
        self.dispatch_closed(b);
        self.publish_progress();
        Ok(())
    }

    /// Fail connections whose connect/upgrade took too long; drop sockets whose close
    /// handshake took too long.
    fn expire(&mut self, now: u64) {
        while let Some(&id) = self.pending.front() {
            let c = &self.conns[id];
            if !matches!(c.state, State::Connecting | State::Handshaking) {
                self.pending.pop_front();
            } else if now >= c.started_ns + self.cfg.connect_timeout_ns {
                self.pending.pop_front();
                self.finish(id, "timeout");
            } else {
                break;
            }
        }
        while let Some(&id) = self.closing.front() {
            let c = &self.conns[id];
            if c.state != State::Closing {
                self.closing.pop_front();
            } else if now >= c.close_deadline {
                self.closing.pop_front();
                let by_us = c.closing_by_us;
                self.finish(
                    id,
                    if by_us {
                        "close_timeout"
                    } else {
                        "server_close_timeout"
                    },
                );
            } else {
                break;
            }
        }
    }

    /// Append one masked frame whose payload `fill` writes, to the per-worker output buffer.
    /// Follow with [`Engine::send_out`].
    #[inline]
    pub fn frame(&mut self, opcode: u8, len: usize, fill: impl FnOnce(&mut [u8])) {
        let m = self.rng.next_u64().to_le_bytes();
        ws::encode_frame_with(&mut self.out, opcode, len, [m[0], m[1], m[2], m[3]], fill);
    }

    /// Write what [`Engine::frame`] built to connection `id`: straight to the socket if nothing
    /// is queued, the rest queued until the socket is writable.
    pub fn send_out(&mut self, id: usize) {
        let c = &mut self.conns[id];
        let Some(stream) = c.stream.as_mut() else {
            self.out.clear();
            return;
        };
        if c.out_pos < c.outbuf.len() {
            c.outbuf.extend_from_slice(&self.out);
            self.out.clear();
            return;
        }
        c.outbuf.clear();
        c.out_pos = 0;
        let mut written = 0;
        while written < self.out.len() {
            match stream.write(&self.out[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.out.clear();
                    return self.finish(id, &classify(&e));
                }
            }
        }
        if written < self.out.len() {
            c.outbuf.extend_from_slice(&self.out[written..]);
        }
        self.out.clear();
    }

    fn flush_conn<B: Behavior>(&mut self, id: usize, b: &mut B) {
        let c = &mut self.conns[id];
        if c.out_pos >= c.outbuf.len() {
            return;
        }
        let Some(stream) = c.stream.as_mut() else {
            return;
        };
        while c.out_pos < c.outbuf.len() {
            match stream.write(&c.outbuf[c.out_pos..]) {
                Ok(0) => break,
                Ok(n) => c.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.finish(id, &classify(&e)),
            }
        }
        if c.out_pos >= c.outbuf.len() {
            c.outbuf.clear();
            c.out_pos = 0;
            if c.outbuf.capacity() > 4 * SCRATCH {
                c.outbuf = Vec::new();
            }
            if c.state == State::Open {
                b.on_drained(self, id, mono_ns());
            }
        }
    }

    /// Connection figures since the last call, as a partial stage result.
    pub fn take_conn_stats(&mut self) -> StageResult {
        let s = std::mem::take(&mut self.stats);
        let mut r = StageResult {
            attempted: s.attempted,
            opened: s.opened,
            failures: s.failures,
            drops: s.drops,
            first_attempt_ns: s.first_attempt_ns,
            last_open_ns: s.last_open_ns,
            open_at_end: self.open as u64,
            workers: 1,
            ..Default::default()
        };
        if !s.tcp.is_empty() {
            r.hists.insert("tcp_connect".into(), s.tcp);
        }
        if !s.handshake.is_empty() {
            r.hists.insert("handshake".into(), s.handshake);
        }
        r
    }
}

fn open_socket(addr: SocketAddr, src: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if let Some(src) = src {
        if src.is_ipv4() {
            let one: libc::c_int = 1;
            // SAFETY: the fd is a live socket owned by `sock`; the option value points to a
            // c_int that outlives the call, and its size is passed. Failure (old kernels) only
            // means the port is picked at bind time instead of at connect time.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        sock.bind(&SocketAddr::new(src, 0).into())?;
    }
    sock.set_tcp_nodelay(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(sock.into()))
}
