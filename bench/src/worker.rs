//! What one worker thread does in each scenario: its share of the connections, the stage
//! protocol with its process runner (ready -> go -> done), and the scenario's behavior.

use crate::cli::{BroadcastArgs, ConnectArgs, EchoArgs, LadderArgs, Scenario};
use crate::engine::{go, prep, Behavior, Control, Engine, EngineConfig, Idle, Progress, STOP};
use crate::hist::Hist;
use crate::payload::{self, Header};
use crate::result::{RoundStat, StageResult};
use crate::runner::RunnerMsg;
use crate::seqtrack::{Seen, SeqTracker};
use crate::util::{mono_ns, share, thread_cpu_ns};
use crate::ws::{self, Target};
use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

/// Facts shared by every worker of a run, the same in every process.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: Target,
    /// Broadcast `--members-url`: where the members that do not publish connect.
    pub members_target: Option<Target>,
    pub source_ips: Arc<Vec<IpAddr>>,
    pub procs: usize,
    pub threads: usize,
    /// procs x threads
    pub workers: usize,
    pub proc_index: usize,
    pub run_id: u32,
}

pub struct WorkerCtx {
    pub scenario: Arc<Scenario>,
    pub plan: Arc<Plan>,
    /// Global worker index (proc_index x threads + thread).
    pub g: usize,
    pub ctl: Arc<Control>,
    pub progress: Arc<Progress>,
    pub tx: Sender<RunnerMsg>,
}

const TICK: Duration = Duration::from_millis(100);

impl WorkerCtx {
    fn send(&self, m: RunnerMsg) {
        let _ = self.tx.send(m);
    }

    /// Serve the sockets until the command reaches `want`. False if told to stop first.
    fn wait_cmd<B: Behavior>(&self, eng: &mut Engine, b: &mut B, want: u64) -> io::Result<bool> {
        loop {
            let c = eng.cmd();
            if c == STOP {
                return Ok(want == STOP);
            }
            if c >= want {
                return Ok(true);
            }
            eng.turn(b, TICK)?;
        }
    }

    fn engine(&self) -> io::Result<Engine> {
        let c = self.scenario.common();
        let rate = if c.rate > 0.0 {
            c.rate / self.plan.workers as f64
        } else {
            0.0
        };
        Engine::new(
            EngineConfig {
                target: self.plan.target.clone(),
                // Publishers are each worker's first local connections (see `broadcast`).
                alt_target: self.plan.members_target.clone().map(|t| {
                    let pubs = match &*self.scenario {
                        Scenario::Broadcast(a) => a.pubs,
                        _ => 0,
                    };
                    let wt = self.plan.workers as u64;
                    let mine = (pubs + wt - 1 - self.g as u64) / wt; // publishers p ≡ g (mod wt)
                    (t, mine)
                }),
                source_ips: self.plan.source_ips.clone(),
                worker: self.g,
                workers: self.plan.workers,
                rate,
                max_pending: c.max_pending.max(1),
                connect_timeout_ns: (c.connect_timeout * 1e9) as u64,
                deflate: c.deflate,
            },
            self.ctl.clone(),
            self.progress.clone(),
        )
    }

    /// The shape of this run's messages, `size` bytes of payload each.
    fn wire(&self, size: usize) -> Wire {
        let style = self.scenario.common().style();
        Wire {
            op: if style.text() {
                ws::OP_TEXT
            } else {
                ws::OP_BINARY
            },
            style,
            size,
            run: self.plan.run_id,
        }
    }

    /// Open this worker's share of `total` connections. Their figures, or None if told to stop
    /// first.
    fn ramp<B: Behavior>(
        &self,
        eng: &mut Engine,
        b: &mut B,
        total: u64,
    ) -> io::Result<Option<StageResult>> {
        if !eng.ramp(b, share(total, self.g, self.plan.workers))? {
            return Ok(None);
        }
        Ok(Some(eng.take_conn_stats()))
    }

    /// Tell the runner this worker is ready for `stage` and wait for its go. False if told to
    /// stop first.
    fn ready_go<B: Behavior>(&self, eng: &mut Engine, b: &mut B, stage: u64) -> io::Result<bool> {
        self.send(RunnerMsg::Ready(stage));
        self.wait_cmd(eng, b, go(stage))
    }
}

/// How this run's messages look: opcode, payload size and run id in the header.
#[derive(Clone, Copy)]
struct Wire {
    op: u8,
    style: payload::Style,
    size: usize,
    run: u32,
}

impl Wire {
    fn header(&self, src: u32, seq: u32, send_ns: u64) -> Header {
        Header {
            run: self.run,
            src,
            seq,
            send_ns,
        }
    }

    /// Build one message with [`Engine::frame`].
    fn frame(&self, eng: &mut Engine, src: u32, seq: u32, send_ns: u64) {
        let (h, style) = (self.header(src, seq, send_ns), self.style);
        eng.frame(self.op, self.size, |p| payload::write(p, &h, style));
    }

    /// The header of a received message, None unless it has this run's opcode and size.
    fn read(&self, opcode: u8, payload: &[u8]) -> Option<Header> {
        let h = payload::read(payload, self.style)?;
        (opcode == self.op && payload.len() == self.size).then_some(h)
    }
}

/// When a stage's measured run began: monotonic time and this thread's CPU time.
struct RunClock {
    start: u64,
    cpu0: u64,
}

impl RunClock {
    fn start() -> RunClock {
        RunClock {
            start: mono_ns(),
            cpu0: thread_cpu_ns(),
        }
    }

    /// What every stage reports at its end, the run having ended at `end`: the connection
    /// figures since the ramp, what is still open, the run's span and CPU time.
    fn end(&self, eng: &mut Engine, r: &mut StageResult, end: u64) {
        r.merge(&eng.take_conn_stats());
        r.workers = 1;
        r.open_at_end = eng.open_count() as u64;
        r.run_start_ns = self.start;
        r.run_end_ns = end;
        r.cpu_ns = thread_cpu_ns() - self.cpu0;
    }
}

/// Thread entry point: run the scenario, report errors, always report the exit.
pub fn run_worker(ctx: WorkerCtx) {
    let res = match &*ctx.scenario.clone() {
        Scenario::Connect(a) => connect(&ctx, a),
        Scenario::Echo(a) => echo(&ctx, a),
        Scenario::Broadcast(a) => broadcast(&ctx, a),
        Scenario::Ladder(a) => ladder(&ctx, a),
    };
    let fin = match res {
        Ok(r) => r,
        Err(e) => {
            ctx.send(RunnerMsg::Error(format!("worker {}: {e}", ctx.g)));
            StageResult::default()
        }
    };
    ctx.send(RunnerMsg::Exited(Box::new(fin)));
}

/// Stop: close everything, and return what happened while closing.
fn finish<B: Behavior>(ctx: &WorkerCtx, eng: &mut Engine, b: &mut B) -> io::Result<StageResult> {
    ctx.wait_cmd(eng, b, STOP)?;
    eng.close_all(b, Duration::from_secs(3))?;
    let mut r = eng.take_conn_stats();
    r.workers = 1;
    r.max_turn_gap_ns = eng.max_turn_gap_ns;
    Ok(r)
}

// ---------------------------------------------------------------- connect

fn connect(ctx: &WorkerCtx, a: &ConnectArgs) -> io::Result<StageResult> {
    let mut eng = ctx.engine()?;
    let mut b = Idle;
    let Some(mut r) = ctx.ramp(&mut eng, &mut b, a.conns)? else {
        return finish(ctx, &mut eng, &mut b);
    };
    if !ctx.ready_go(&mut eng, &mut b, 0)? {
        return finish(ctx, &mut eng, &mut b);
    }
    let clock = RunClock::start();
    let end = clock.start + (a.hold * 1e9) as u64;
    let pings_before_hold = eng.pings_answered;
    loop {
        let now = mono_ns();
        if now >= end || eng.cmd() == STOP {
            break;
        }
        eng.turn(&mut b, Duration::from_nanos(end - now).min(TICK))?;
    }
    // Drops during the hold join the connect figures.
    clock.end(&mut eng, &mut r, mono_ns());
    r.pings_answered = eng.pings_answered - pings_before_hold;
    r.conns_ponged = eng.conns_ponged;
    ctx.send(RunnerMsg::Done(0, Box::new(r)));
    finish(ctx, &mut eng, &mut b)
}

// ---------------------------------------------------------------- echo

struct EchoConn {
    gid: u32,
    next_send: u32,
    next_recv: u32,
    times: VecDeque<u64>,
}

struct Echo {
    wire: Wire,
    g: usize,
    workers: usize,
    conns: Vec<Option<EchoConn>>,
    sending: bool,
    stop_at: u64,
    outstanding: u64,
    hist: Hist,
    sent: u64,
    received: u64,
    in_window: u64,
    corrupt: u64,
    unanswered: u64,
    expect: Vec<u8>,
}

impl Echo {
    fn queue_one(&mut self, eng: &mut Engine, id: usize, now: u64) {
        let Some(Some(ec)) = self.conns.get_mut(id) else {
            return;
        };
        self.wire.frame(eng, ec.gid, ec.next_send, now);
        ec.next_send = ec.next_send.wrapping_add(1);
        ec.times.push_back(now);
        self.sent += 1;
        self.outstanding += 1;
        eng.msgs_sent += 1;
    }
}

impl Behavior for Echo {
    fn on_open(&mut self, _eng: &mut Engine, id: usize, _now: u64) {
        if self.conns.len() <= id {
            self.conns.resize_with(id + 1, || None);
        }
        let gid = crate::srcip::global_index(id as u64, self.g, self.workers) as u32;
        self.conns[id] = Some(EchoConn {
            gid,
            next_send: 0,
            next_recv: 0,
            times: VecDeque::new(),
        });
    }

    fn on_message(&mut self, eng: &mut Engine, id: usize, opcode: u8, payload: &[u8], now: u64) {
        let Some(Some(ec)) = self.conns.get_mut(id) else {
            return;
        };
        eng.msgs_received += 1;
        let Some(t) = ec.times.pop_front() else {
            self.corrupt += 1; // an echo of something never sent
            return;
        };
        self.outstanding -= 1;
        let h = self.wire.header(ec.gid, ec.next_recv, t);
        ec.next_recv = ec.next_recv.wrapping_add(1);
        self.expect.resize(self.wire.size, 0);
        payload::write(&mut self.expect, &h, self.wire.style);
        if opcode != self.wire.op || payload != &self.expect[..] {
            self.corrupt += 1;
        }
        self.hist.record(now - t);
        self.received += 1;
        if now <= self.stop_at {
            self.in_window += 1;
        }
        if self.sending && now < self.stop_at {
            // Written by the engine once every frame of this read is handled.
            self.queue_one(eng, id, now);
        }
    }

    fn on_closed(&mut self, id: usize) {
        if let Some(Some(ec)) = self.conns.get_mut(id) {
            let n = ec.times.len() as u64;
            self.outstanding -= n;
            self.unanswered += n;
            ec.times.clear();
        }
    }
}

fn echo(ctx: &WorkerCtx, a: &EchoArgs) -> io::Result<StageResult> {
    let mut eng = ctx.engine()?;
    let mut b = Echo {
        wire: ctx.wire(a.size),
        g: ctx.g,
        workers: ctx.plan.workers,
        conns: Vec::new(),
        sending: false,
        stop_at: u64::MAX,
        outstanding: 0,
        hist: Hist::new(),
        sent: 0,
        received: 0,
        in_window: 0,
        corrupt: 0,
        unanswered: 0,
        expect: Vec::new(),
    };
    let Some(mut r) = ctx.ramp(&mut eng, &mut b, a.conns)? else {
        return finish(ctx, &mut eng, &mut b);
    };
    if !ctx.ready_go(&mut eng, &mut b, 0)? {
        return finish(ctx, &mut eng, &mut b);
    }
    let clock = RunClock::start();
    let start = clock.start;
    b.stop_at = start + (a.secs * 1e9) as u64;
    b.sending = true;
    for id in 0..eng.conns.len() {
        if eng.is_open(id) {
            for _ in 0..a.inflight {
                b.queue_one(&mut eng, id, start);
            }
            eng.send_out(id);
        }
    }
    let drain_end = b.stop_at + (a.drain_timeout * 1e9) as u64;
    loop {
        let now = mono_ns();
        if now >= b.stop_at {
            b.sending = false;
            if b.outstanding == 0 || now >= drain_end {
                break;
            }
        }
        if eng.cmd() == STOP {
            break;
        }
        let until = if b.sending { b.stop_at } else { drain_end };
        eng.turn(
            &mut b,
            Duration::from_nanos(until.saturating_sub(now)).min(TICK),
        )?;
    }
    let end = mono_ns();
    clock.end(&mut eng, &mut r, end);
    r.sent = b.sent;
    r.received = b.received;
    r.in_window = b.in_window;
    r.window_ns = b.stop_at - start;
    r.corrupt = b.corrupt;
    r.unanswered = b.unanswered + b.outstanding;
    r.first_send_ns = start;
    r.last_recv_ns = end;
    r.hists.insert("rtt".into(), std::mem::take(&mut b.hist));
    ctx.send(RunnerMsg::Done(0, Box::new(r)));
    finish(ctx, &mut eng, &mut b)
}

// ---------------------------------------------------------------- broadcast

struct Publisher {
    id: usize,
    pub_id: u32,
    next: u32,
}

struct Bcast {
    wire: Wire,
    pubs: u32,
    msgs: u32,
    rate: f64,
    go_ns: u64,
    running: bool,
    publishers: Vec<Publisher>,
    /// conn id * pubs + publisher id
    trackers: Vec<SeqTracker>,
    hist: Hist,
    received: u64,
    unique: u64,
    corrupt: u64,
    stale: u64,
    sent: u64,
    first_send: u64,
    last_send: u64,
    last_recv: u64,
    /// Frames per write when publishing as fast as possible.
    batch: usize,
}

impl Bcast {
    /// Send what is due; returns true if a publisher could send more right away.
    fn pump(&mut self, eng: &mut Engine) -> bool {
        if !self.running {
            return false;
        }
        let mut more = false;
        let now = mono_ns();
        for p in &mut self.publishers {
            if p.next >= self.msgs || !eng.is_open(p.id) || eng.queued(p.id) > 0 {
                continue;
            }
            let due = if self.rate > 0.0 {
                let due_count = ((now - self.go_ns) as f64 * self.rate / 1e9) as u64 + 1;
                (due_count.min(u64::from(self.msgs)) as u32).saturating_sub(p.next)
            } else {
                (self.msgs - p.next).min(self.batch as u32)
            };
            if due == 0 {
                continue;
            }
            for _ in 0..due {
                self.wire.frame(eng, p.pub_id, p.next, now);
                p.next += 1;
            }
            eng.send_out(p.id);
            self.sent += u64::from(due);
            eng.msgs_sent += u64::from(due);
            if self.first_send == 0 {
                self.first_send = now;
            }
            self.last_send = now;
            if self.rate <= 0.0 && p.next < self.msgs && eng.queued(p.id) == 0 {
                more = true;
            }
        }
        more
    }

    /// When the next rate-limited message is due.
    fn next_due(&self) -> Option<u64> {
        if self.rate <= 0.0 || !self.running {
            return None;
        }
        self.publishers
            .iter()
            .filter(|p| p.next < self.msgs)
            .map(|p| self.go_ns + (f64::from(p.next) * 1e9 / self.rate) as u64)
            .min()
    }
}

impl Behavior for Bcast {
    fn on_message(&mut self, eng: &mut Engine, id: usize, opcode: u8, payload: &[u8], now: u64) {
        eng.msgs_received += 1;
        let Some(h) = self
            .wire
            .read(opcode, payload)
            .filter(|h| h.src < self.pubs)
        else {
            self.corrupt += 1;
            return;
        };
        if h.run != self.wire.run {
            self.stale += 1;
            return;
        }
        let Some(tr) = self
            .trackers
            .get_mut(id * self.pubs as usize + h.src as usize)
        else {
            self.stale += 1; // not a member at the start of the stage
            return;
        };
        match tr.see(h.seq, self.msgs) {
            Seen::Invalid => {
                self.corrupt += 1;
                return;
            }
            Seen::Duplicate => {}
            _ => self.unique += 1,
        }
        self.received += 1;
        self.last_recv = now;
        self.hist.record(now.saturating_sub(h.send_ns));
    }

    fn on_drained(&mut self, eng: &mut Engine, _id: usize, _now: u64) {
        self.pump(eng);
    }
}

fn broadcast(ctx: &WorkerCtx, a: &BroadcastArgs) -> io::Result<StageResult> {
    let wt = ctx.plan.workers;
    let mut eng = ctx.engine()?;
    let frame_len = a.size + 14;
    let mut b = Bcast {
        wire: ctx.wire(a.size),
        pubs: a.pubs as u32,
        msgs: a.msgs as u32,
        rate: a.msg_rate,
        go_ns: 0,
        running: false,
        publishers: Vec::new(),
        trackers: Vec::new(),
        hist: Hist::new(),
        received: 0,
        unique: 0,
        corrupt: 0,
        stale: 0,
        sent: 0,
        first_send: 0,
        last_send: 0,
        last_recv: 0,
        batch: (64 * 1024 / frame_len).max(1),
    };
    let Some(mut r) = ctx.ramp(&mut eng, &mut b, a.subs)? else {
        return finish(ctx, &mut eng, &mut b);
    };
    let pings_before_hold = eng.pings_answered;
    if a.settle > 0.0 {
        // Before the go: every worker settles before any publishes, still answering the
        // server's pings (a hold long enough for a ping interval checks every connection).
        let end = mono_ns() + (a.settle * 1e9) as u64;
        loop {
            let now = mono_ns();
            if now >= end || eng.cmd() == STOP {
                break;
            }
            eng.turn(&mut b, Duration::from_nanos(end - now).min(TICK))?;
        }
    }
    r.pings_answered = eng.pings_answered - pings_before_hold;
    r.conns_ponged = eng.conns_ponged;
    // Publisher p lives on worker p % workers, as its local connection p / workers.
    let mut notes = Vec::new();
    for p in (ctx.g as u64..a.pubs).step_by(wt) {
        let id = (p / wt as u64) as usize;
        if eng.is_open(id) {
            b.publishers.push(Publisher {
                id,
                pub_id: p as u32,
                next: 0,
            });
        } else {
            notes.push(format!(
                "publisher {p} is not connected; its messages count as lost"
            ));
        }
    }
    // Track deliveries from now on: other workers may start publishing (and this worker's
    // members receiving) before this worker sees the go command.
    let members: Vec<usize> = (0..eng.conns.len()).filter(|&id| eng.is_open(id)).collect();
    b.trackers = vec![SeqTracker::new(); eng.conns.len() * a.pubs as usize];
    let expected_unique = members.len() as u64 * a.pubs * a.msgs;
    if !ctx.ready_go(&mut eng, &mut b, 0)? {
        return finish(ctx, &mut eng, &mut b);
    }
    let clock = RunClock::start();
    let start = clock.start;
    b.go_ns = start;
    b.running = true;
    let bytes_at_go = eng.bytes_read;
    let idle_ns = (a.idle_timeout * 1e9) as u64;
    let hard_end = start + (a.timeout * 1e9) as u64;
    loop {
        let more = b.pump(&mut eng);
        let now = mono_ns();
        let active = start.max(b.last_recv).max(b.last_send);
        if b.unique >= expected_unique && b.publishers.iter().all(|p| p.next >= b.msgs) {
            break;
        }
        if now >= hard_end || now >= active + idle_ns || eng.cmd() == STOP {
            notes.push(if now >= hard_end {
                "stopped by --timeout".to_string()
            } else {
                "stopped after --idle-timeout without deliveries".to_string()
            });
            break;
        }
        let mut wait = if more { 0 } else { TICK.as_nanos() as u64 };
        if let Some(due) = b.next_due() {
            wait = wait.min(due.saturating_sub(now));
        }
        eng.turn(&mut b, Duration::from_nanos(wait))?;
    }
    b.running = false;
    clock.end(&mut eng, &mut r, mono_ns());
    r.members = members.len() as u64;
    r.expected = expected_unique;
    for &id in &members {
        for p in 0..a.pubs as usize {
            let c = b.trackers[id * a.pubs as usize + p].finish(b.msgs);
            r.lost += c.lost;
            r.duplicated += c.duplicated;
            r.reordered += c.reordered;
        }
    }
    r.sent = b.sent;
    r.received = b.received;
    r.corrupt = b.corrupt;
    r.stale = b.stale;
    r.first_send_ns = b.first_send;
    r.last_send_ns = b.last_send;
    r.last_recv_ns = b.last_recv;
    r.notes = notes;
    r.hists
        .insert("delivery".into(), std::mem::take(&mut b.hist));
    r.max_turn_gap_ns = eng.max_turn_gap_ns;
    eng.max_turn_gap_ns = 0;
    r.wire_bytes_received = eng.bytes_read - bytes_at_go;
    ctx.send(RunnerMsg::Done(0, Box::new(r)));
    finish(ctx, &mut eng, &mut b)
}

// ---------------------------------------------------------------- ladder

struct Ladder {
    wire: Wire,
    step: u32,
    rounds: u32,
    full: u64,
    /// Bit r set = round r arrived; per connection id; only members at the stage start.
    bits: Vec<Option<u64>>,
    full_members: u64,
    stats: Vec<RoundStat>,
    hist: Hist,
    received: u64,
    duplicated: u64,
    stale: u64,
    corrupt: u64,
    // publishing (worker 0 only)
    pub_conn: Option<usize>,
    go_ns: u64,
    interval_ns: u64,
    next_round: u32,
    running: bool,
}

impl Behavior for Ladder {
    fn on_message(&mut self, eng: &mut Engine, id: usize, opcode: u8, payload: &[u8], now: u64) {
        eng.msgs_received += 1;
        let Some(h) = self.wire.read(opcode, payload) else {
            self.corrupt += 1;
            return;
        };
        if h.run != self.wire.run || h.src != self.step {
            self.stale += 1; // late message of an earlier step
            return;
        }
        if h.seq >= self.rounds {
            self.corrupt += 1;
            return;
        }
        let Some(Some(bits)) = self.bits.get_mut(id) else {
            self.stale += 1;
            return;
        };
        let bit = 1u64 << h.seq;
        if *bits & bit != 0 {
            self.duplicated += 1;
            return;
        }
        *bits |= bit;
        if *bits == self.full {
            self.full_members += 1;
        }
        let lat = now.saturating_sub(h.send_ns);
        let s = &mut self.stats[h.seq as usize];
        s.received += 1;
        s.max_latency_ns = s.max_latency_ns.max(lat);
        self.received += 1;
        self.hist.record(lat);
    }

    fn after_turn(&mut self, eng: &mut Engine, _now: u64) {
        let Some(id) = self.pub_conn else { return };
        if !self.running {
            return;
        }
        let now = mono_ns();
        while self.next_round < self.rounds
            && self.go_ns + u64::from(self.next_round) * self.interval_ns <= now
        {
            self.wire.frame(eng, self.step, self.next_round, now);
            eng.send_out(id);
            eng.msgs_sent += 1;
            self.stats[self.next_round as usize].sent_ns = now;
            self.next_round += 1;
        }
    }
}

fn ladder(ctx: &WorkerCtx, a: &LadderArgs) -> io::Result<StageResult> {
    let mut eng = ctx.engine()?;
    let rounds = a.rounds;
    let mut b = Ladder {
        wire: ctx.wire(a.size),
        step: 0,
        rounds,
        full: if rounds >= 64 {
            u64::MAX
        } else {
            (1u64 << rounds) - 1
        },
        bits: Vec::new(),
        full_members: 0,
        stats: Vec::new(),
        hist: Hist::new(),
        received: 0,
        duplicated: 0,
        stale: 0,
        corrupt: 0,
        pub_conn: None,
        go_ns: 0,
        interval_ns: (a.interval * 1e9) as u64,
        next_round: 0,
        running: false,
    };
    let grace = ((4.0 * a.bound).max(2.0) * 1e9) as u64;
    for (k, &size) in a.steps.iter().enumerate() {
        let stage = k as u64;
        if !ctx.wait_cmd(&mut eng, &mut b, prep(stage))? {
            break;
        }
        let Some(mut r) = ctx.ramp(&mut eng, &mut b, size)? else {
            break;
        };
        let mut notes = Vec::new();
        if ctx.g == 0 {
            b.pub_conn = (0..eng.conns.len()).find(|&id| eng.is_open(id));
            if b.pub_conn.is_none() {
                notes.push(
                    "the publisher (first connection of worker 0) is not connected".to_string(),
                );
            }
        }
        // Ready to count this step's deliveries before saying so: the publisher's worker may
        // start before this one sees the go command.
        let members: Vec<usize> = (0..eng.conns.len()).filter(|&id| eng.is_open(id)).collect();
        b.bits = vec![None; eng.conns.len()];
        for &id in &members {
            b.bits[id] = Some(0);
        }
        b.step = stage as u32;
        b.full_members = 0;
        b.stats = vec![RoundStat::default(); rounds as usize];
        b.hist = Hist::new();
        b.received = 0;
        b.duplicated = 0;
        b.stale = 0;
        b.corrupt = 0;
        b.next_round = 0;
        if !ctx.ready_go(&mut eng, &mut b, stage)? {
            break;
        }
        let clock = RunClock::start();
        let start = clock.start;
        b.go_ns = start;
        b.running = true;
        let end = start + u64::from(rounds) * b.interval_ns + grace;
        loop {
            let now = mono_ns();
            let published = b.pub_conn.is_none() || b.next_round >= rounds;
            if published && b.full_members >= members.len() as u64 {
                break;
            }
            if now >= end || eng.cmd() == STOP {
                break;
            }
            let mut wait = TICK.as_nanos() as u64;
            if b.pub_conn.is_some() && b.next_round < rounds {
                let due = start + u64::from(b.next_round) * b.interval_ns;
                wait = wait.min(due.saturating_sub(now));
            }
            eng.turn(&mut b, Duration::from_nanos(wait))?;
        }
        b.running = false;
        clock.end(&mut eng, &mut r, mono_ns());
        r.members = members.len() as u64;
        r.expected = members.len() as u64 * u64::from(rounds);
        r.received = b.received;
        r.lost = r.expected.saturating_sub(b.received);
        r.duplicated = b.duplicated;
        r.stale = b.stale;
        r.corrupt = b.corrupt;
        r.sent = u64::from(if ctx.g == 0 { b.next_round } else { 0 });
        r.rounds = std::mem::take(&mut b.stats);
        r.notes = notes;
        r.hists
            .insert("delivery".into(), std::mem::take(&mut b.hist));
        ctx.send(RunnerMsg::Done(stage, Box::new(r)));
    }
    finish(ctx, &mut eng, &mut b)
}
