//! The top of a run: starts the client processes (this one, or `--procs` children that re-exec
//! this binary), moves every one of them through the stages together (all ready -> go -> all
//! done), samples the server and the totals over time, shows progress, and merges the results.

use crate::cli::Scenario;
use crate::engine::{go, prep, STOP};
use crate::result::StageResult;
use crate::runner::{run_process, Counters, GroupEvent, RunnerMsg};
use crate::util::{kernel_mem, mono_ns, proc_cpu_ns, proc_rss_bytes, KernelMem};
use crate::worker::Plan;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ServerSample {
    pub t_s: f64,
    pub rss_bytes: u64,
    pub cpu_ns: u64,
    pub kernel: KernelMem,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub attempted: u64,
    pub open: u64,
    pub failed: u64,
    pub sent: u64,
    pub received: u64,
    /// Summed over the `--server-pid` processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_ns: Option<u64>,
    /// System-wide kernel memory (/proc/meminfo Slab, /proc/net/sockstat TCP mem).
    pub kernel_slab_bytes: u64,
    pub kernel_tcp_mem_bytes: u64,
}

#[derive(Debug, Default)]
pub struct StageOutcome {
    pub result: StageResult,
    pub prep_ns: u64,
    pub ready_ns: u64,
    pub go_ns: u64,
    pub done_ns: u64,
    /// When every connection of the stage had opened or failed (the start of a hold).
    pub server_at_all_open: Option<ServerSample>,
    pub server_at_ready: Option<ServerSample>,
    pub server_at_done: Option<ServerSample>,
    /// Resident memory of all client processes once connected (summed).
    pub loadgen_rss_bytes: u64,
}

#[derive(Debug, Default)]
pub struct RunOutcome {
    pub stages: Vec<StageOutcome>,
    /// What happened while closing (merged over processes).
    pub closing: StageResult,
    pub timeline: Vec<Sample>,
    pub errors: Vec<String>,
    pub server_before: Option<ServerSample>,
    pub server_after: Option<ServerSample>,
    /// CPU time of all client processes (whole processes, every thread).
    pub loadgen_cpu_ns: u64,
    pub start_ns: u64,
    pub end_ns: u64,
}

enum Group {
    Local(Sender<RunnerMsg>, Option<std::thread::JoinHandle<()>>),
    Child(Option<ChildStdin>, Child),
}

impl Group {
    fn cmd(&mut self, v: u64) {
        match self {
            Group::Local(tx, _) => {
                let _ = tx.send(RunnerMsg::Cmd(v));
            }
            Group::Child(stdin, _) => {
                if let Some(s) = stdin.as_mut() {
                    let _ = writeln!(s, "cmd {v}");
                    let _ = s.flush();
                }
            }
        }
    }
}

/// Read commands for a child process from stdin (`cmd N` per line); EOF means stop.
pub fn child_stdin_commands(tx: Sender<RunnerMsg>) {
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if let Some(v) = line
                .strip_prefix("cmd ")
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                if tx.send(RunnerMsg::Cmd(v)).is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(RunnerMsg::Cmd(STOP));
    });
}

struct Display {
    bar: Option<ProgressBar>,
    lines: bool,
    last_line_ns: u64,
}

impl Display {
    fn new(mode: &str) -> Display {
        let tty = std::io::stderr().is_terminal();
        let (bar, lines) = match mode {
            "none" => (false, false),
            "bar" => (true, false),
            "lines" => (false, true),
            _ => (tty, !tty),
        };
        let bar = bar.then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} open {wide_msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b
        });
        Display {
            bar,
            lines,
            last_line_ns: 0,
        }
    }

    fn update(
        &mut self,
        now: u64,
        t_s: f64,
        phase: &str,
        c: &Counters,
        want_open: u64,
        timeline: &[Sample],
    ) {
        let vitals = vitals(timeline);
        let msg = format!(
            "{phase}: open {} failed {} dropped {} sent {} received {}{vitals}",
            c.open, c.failed, c.dropped, c.sent, c.received
        );
        if let Some(b) = &self.bar {
            b.set_length(want_open);
            b.set_message(format!(
                "| {phase} | failed {} dropped {} sent {} recv {}{vitals}",
                c.failed, c.dropped, c.sent, c.received
            ));
            b.set_position(c.open.min(want_open));
        } else if self.lines && now >= self.last_line_ns + 1_000_000_000 {
            self.last_line_ns = now;
            eprintln!("[{t_s:7.1}s] {msg} (want {want_open})");
        }
    }

    fn note(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None if self.lines => eprintln!("{s}"),
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Connect rate, server memory and CPU, and kernel memory over the last second of samples,
/// for the progress line.
fn vitals(timeline: &[Sample]) -> String {
    let (Some(last), Some(first)) = (timeline.last(), timeline.iter().rev().nth(10)) else {
        return String::new();
    };
    let dt = (last.t_s - first.t_s).max(1e-3);
    let rate = (last.open as f64 - first.open as f64) / dt;
    let mib = |b: u64| b as f64 / 1048576.0;
    let mut v = format!(
        " | {rate:.0} conn/s | kernel slab {:.0} MiB tcp {:.0} MiB",
        mib(last.kernel_slab_bytes),
        mib(last.kernel_tcp_mem_bytes)
    );
    if let (Some(rss), Some(c1), Some(c0)) = (
        last.server_rss_bytes,
        last.server_cpu_ns,
        first.server_cpu_ns,
    ) {
        let cores = c1.saturating_sub(c0) as f64 / 1e9 / dt;
        v += &format!(" | server RSS {:.0} MiB cpu {cores:.2} cores", mib(rss));
    }
    v
}

/// RSS and CPU time summed over the server processes still alive, with the kernel's memory.
fn server_sample(pids: &[u32], start_ns: u64) -> Option<ServerSample> {
    if pids.is_empty() {
        return None;
    }
    let now = mono_ns();
    let mut sample = ServerSample {
        t_s: (now - start_ns) as f64 / 1e9,
        kernel: kernel_mem(),
        ..Default::default()
    };
    let mut alive = 0;
    for &pid in pids {
        if let Some(rss) = proc_rss_bytes(pid) {
            alive += 1;
            sample.rss_bytes += rss;
            sample.cpu_ns += proc_cpu_ns(pid).unwrap_or(0);
        }
    }
    (alive > 0).then_some(sample)
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Phase {
    Preparing,
    Running,
    Stopping,
}

/// Run the scenario over all processes. `want_open(stage)` is the connection count aimed at
/// (for the progress bar); `next(stage, merged result)` says whether to run another stage.
pub fn drive(
    scenario: &Scenario,
    plan: &Plan,
    want_open: &dyn Fn(u64) -> u64,
    next: &mut dyn FnMut(u64, &StageResult) -> bool,
) -> Result<RunOutcome, String> {
    let common = scenario.common();
    let (ev_tx, ev_rx) = mpsc::channel::<(usize, GroupEvent)>();
    let mut out = RunOutcome {
        start_ns: mono_ns(),
        ..Default::default()
    };
    let pid = &common.server_pid[..];
    out.server_before = server_sample(pid, out.start_ns);
    if let Some(gone) = pid.iter().find(|&&p| proc_rss_bytes(p).is_none()) {
        return Err(format!(
            "--server-pid {gone}: no such process (or /proc not readable)"
        ));
    }
    let mut groups = start_groups(scenario, plan, &ev_tx)?;
    drop(ev_tx);
    let n = groups.len();
    let mut display = Display::new(&common.progress);
    let deadline = out.start_ns + (common.deadline * 1e9) as u64;
    let mut latest = vec![Counters::default(); n];
    let mut ready = vec![false; n];
    let mut done: Vec<Option<StageResult>> = (0..n).map(|_| None).collect();
    let mut exited = vec![false; n];
    let mut stage = 0u64;
    let mut phase = Phase::Preparing;
    let mut current = StageOutcome {
        prep_ns: out.start_ns,
        ..Default::default()
    };
    let mut last_sample = 0u64;
    let mut stop_sent_ns = 0u64;
    loop {
        let ev = ev_rx.recv_timeout(Duration::from_millis(50));
        let now = mono_ns();
        match ev {
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
            Ok((i, ev)) => match ev {
                GroupEvent::Progress { counters } => latest[i] = counters,
                GroupEvent::Error { message } => {
                    let m = if n > 1 {
                        format!("process {i}: {message}")
                    } else {
                        message
                    };
                    display.note(&format!("error: {m}"));
                    out.errors.push(m);
                    send_stop(&mut groups, &mut phase, &mut stop_sent_ns);
                }
                GroupEvent::Ready {
                    stage: s,
                    rss_bytes,
                } if s == stage && phase == Phase::Preparing => {
                    ready[i] = true;
                    current.loadgen_rss_bytes += rss_bytes;
                    if ready.iter().all(|&r| r) {
                        current.ready_ns = now;
                        current.server_at_ready = server_sample(pid, out.start_ns);
                        current.go_ns = mono_ns();
                        for g in groups.iter_mut() {
                            g.cmd(go(stage));
                        }
                        phase = Phase::Running;
                    }
                }
                GroupEvent::Done { stage: s, result } if s == stage && phase == Phase::Running => {
                    done[i] = Some(*result);
                    if done.iter().all(Option::is_some) {
                        let mut merged = StageResult::default();
                        for r in done.iter_mut() {
                            merged.merge(&r.take().expect("done"));
                        }
                        current.done_ns = now;
                        current.server_at_done = server_sample(pid, out.start_ns);
                        current.result = merged;
                        let go_on = next(stage, &current.result);
                        out.stages.push(std::mem::take(&mut current));
                        ready.iter_mut().for_each(|r| *r = false);
                        if go_on {
                            stage += 1;
                            current.prep_ns = mono_ns();
                            for g in groups.iter_mut() {
                                g.cmd(prep(stage));
                            }
                            phase = Phase::Preparing;
                        } else {
                            send_stop(&mut groups, &mut phase, &mut stop_sent_ns);
                        }
                    }
                }
                GroupEvent::Exited { result, cpu_ns } => {
                    exited[i] = true;
                    out.closing.merge(&result);
                    out.loadgen_cpu_ns += cpu_ns;
                    if phase != Phase::Stopping {
                        out.errors
                            .push(format!("process {i} exited before the run ended"));
                        send_stop(&mut groups, &mut phase, &mut stop_sent_ns);
                    }
                    if exited.iter().all(|&e| e) {
                        break;
                    }
                }
                _ => {}
            },
        }
        if now >= deadline && phase != Phase::Stopping {
            let m = format!("--deadline of {}s reached; stopping", common.deadline);
            display.note(&m);
            out.errors.push(m);
            send_stop(&mut groups, &mut phase, &mut stop_sent_ns);
        }
        // Closing is a close handshake per connection, all at once: on a box shared with the
        // servers a million of them took more than 30 s (seen on 2 cores), so the grace
        // grows by a second per 10,000 connections.
        let grace_s = 30 + want_open(stage) / 10_000;
        if stop_sent_ns != 0 && now > stop_sent_ns + grace_s * 1_000_000_000 {
            out.errors.push(format!(
                "client processes did not exit within {grace_s} s of stop; killed"
            ));
            break;
        }
        if now >= last_sample + 100_000_000 {
            last_sample = now;
            let mut c = Counters::default();
            for l in &latest {
                c.add(l);
            }
            let t_s = (now - out.start_ns) as f64 / 1e9;
            let server = server_sample(pid, out.start_ns);
            let kernel = server.map(|x| x.kernel).unwrap_or_else(kernel_mem);
            out.timeline.push(Sample {
                t_s,
                attempted: c.attempted,
                open: c.open,
                failed: c.failed,
                sent: c.sent,
                received: c.received,
                server_rss_bytes: server.map(|x| x.rss_bytes),
                server_cpu_ns: server.map(|x| x.cpu_ns),
                kernel_slab_bytes: kernel.slab_bytes,
                kernel_tcp_mem_bytes: kernel.tcp_mem_bytes,
            });
            if phase == Phase::Preparing
                && current.server_at_all_open.is_none()
                && c.open + c.failed >= want_open(stage)
            {
                current.server_at_all_open = server;
            }
            let label = match phase {
                Phase::Preparing => format!("stage {stage} connecting"),
                Phase::Running => format!("stage {stage} running"),
                Phase::Stopping => "closing".to_string(),
            };
            display.update(now, t_s, &label, &c, want_open(stage), &out.timeline);
        }
    }
    display.finish();
    for g in groups.iter_mut() {
        match g {
            Group::Local(_, h) => {
                if stop_sent_ns != 0 && exited.iter().all(|&e| e) {
                    if let Some(h) = h.take() {
                        let _ = h.join();
                    }
                }
            }
            Group::Child(stdin, child) => {
                drop(stdin.take());
                if !exited.iter().all(|&e| e) {
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
        }
    }
    out.end_ns = mono_ns();
    out.server_after = server_sample(pid, out.start_ns);
    Ok(out)
}

fn send_stop(groups: &mut [Group], phase: &mut Phase, stop_sent_ns: &mut u64) {
    if *stop_sent_ns == 0 {
        for g in groups.iter_mut() {
            g.cmd(STOP);
        }
        *stop_sent_ns = mono_ns();
    }
    *phase = Phase::Stopping;
}

fn start_groups(
    scenario: &Scenario,
    plan: &Plan,
    ev_tx: &Sender<(usize, GroupEvent)>,
) -> Result<Vec<Group>, String> {
    let mut groups = Vec::new();
    if plan.procs <= 1 {
        let (tx, rx) = mpsc::channel();
        let (sc, pl, etx, tx2) = (
            Arc::new(scenario.clone()),
            Arc::new(plan.clone()),
            ev_tx.clone(),
            tx.clone(),
        );
        let h = std::thread::Builder::new()
            .name("bench-runner".into())
            .spawn(move || {
                run_process(sc, pl, tx2, rx, &mut |ev| {
                    let _ = etx.send((0, ev));
                })
            })
            .map_err(|e| format!("cannot start the runner thread: {e}"))?;
        groups.push(Group::Local(tx, Some(h)));
        return Ok(groups);
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    for i in 0..plan.procs {
        let mut cmd = Command::new(&exe);
        cmd.args(&args).arg("--child-index").arg(i.to_string());
        if scenario.common().run_id.is_none() {
            cmd.arg("--run-id").arg(plan.run_id.to_string());
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start client process {i}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let etx = ev_tx.clone();
        std::thread::spawn(move || read_child(i, stdout, etx));
        groups.push(Group::Child(stdin, child));
    }
    Ok(groups)
}

fn read_child(i: usize, stdout: std::process::ChildStdout, tx: Sender<(usize, GroupEvent)>) {
    let mut exited = false;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<GroupEvent>(&line) {
            Ok(ev) => {
                exited |= matches!(ev, GroupEvent::Exited { .. });
                if tx.send((i, ev)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send((
                    i,
                    GroupEvent::Error {
                        message: format!("unreadable line from child: {e}"),
                    },
                ));
            }
        }
    }
    if !exited {
        let _ = tx.send((
            i,
            GroupEvent::Error {
                message: "client process died".into(),
            },
        ));
        let _ = tx.send((
            i,
            GroupEvent::Exited {
                result: Box::default(),
                cpu_ns: 0,
            },
        ));
    }
}

/// Child process main: run this process's share, events as JSON lines on stdout.
pub fn child_main(scenario: Scenario, plan: Plan) {
    let (tx, rx) = mpsc::channel();
    child_stdin_commands(tx.clone());
    let stdout = std::io::stdout();
    run_process(Arc::new(scenario), Arc::new(plan), tx, rx, &mut |ev| {
        let mut out = stdout.lock();
        let _ = serde_json::to_writer(&mut out, &ev);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    });
}
