//! One client process: its worker threads, the stage barrier among them, and the events it
//! reports upward (to the driver in the same process, or as JSON lines to a parent process).

use crate::cli::Scenario;
use crate::engine::{Control, Progress};
use crate::result::StageResult;
use crate::util::{proc_rss_bytes, process_cpu_ns};
use crate::worker::{run_worker, Plan, WorkerCtx};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages into a process runner, from its workers or from above.
pub enum RunnerMsg {
    Ready(u64),
    Done(u64, Box<StageResult>),
    Error(String),
    Exited(Box<StageResult>),
    /// Raise the workers' command (see `engine::prep`, `engine::go`, `engine::STOP`).
    Cmd(u64),
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub attempted: u64,
    pub open: u64,
    pub failed: u64,
    pub dropped: u64,
    pub sent: u64,
    pub received: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.attempted += o.attempted;
        self.open += o.open;
        self.failed += o.failed;
        self.dropped += o.dropped;
        self.sent += o.sent;
        self.received += o.received;
    }
}

/// What a process reports; a child process writes one per line on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum GroupEvent {
    Progress {
        counters: Counters,
    },
    /// Every worker of the process is connected for `stage`; `rss_bytes` is the process's
    /// resident memory at that moment.
    Ready {
        stage: u64,
        #[serde(default)]
        rss_bytes: u64,
    },
    Done {
        stage: u64,
        result: Box<StageResult>,
    },
    Error {
        message: String,
    },
    /// The process is done: what happened while closing, and its total CPU time.
    Exited {
        result: Box<StageResult>,
        cpu_ns: u64,
    },
}

const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Run this process's share of the scenario. `rx` receives the workers' messages and the
/// commands from above (`tx` is its sender, handed to the workers). Returns when every worker
/// has exited.
pub fn run_process(
    scenario: Arc<Scenario>,
    plan: Arc<Plan>,
    tx: Sender<RunnerMsg>,
    rx: Receiver<RunnerMsg>,
    emit: &mut dyn FnMut(GroupEvent),
) {
    let ctl = Arc::new(Control::default());
    let threads = plan.threads;
    let mut progress = Vec::new();
    let mut handles = Vec::new();
    for t in 0..threads {
        let p = Arc::new(Progress::default());
        progress.push(p.clone());
        let ctx = WorkerCtx {
            scenario: scenario.clone(),
            plan: plan.clone(),
            g: plan.proc_index * threads + t,
            ctl: ctl.clone(),
            progress: p,
            tx: tx.clone(),
        };
        let h = std::thread::Builder::new()
            .name(format!("bench-worker-{t}"))
            .spawn(move || {
                let tx = ctx.tx.clone();
                let g = ctx.g;
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_worker(ctx)));
                if r.is_err() {
                    let _ = tx.send(RunnerMsg::Error(format!("worker {g} panicked")));
                    let _ = tx.send(RunnerMsg::Exited(Box::default()));
                }
            });
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                emit(GroupEvent::Error {
                    message: format!("cannot start a worker thread: {e}"),
                });
                ctl.set(crate::engine::STOP);
            }
        }
    }
    drop(tx);
    let started = handles.len();
    let counters = || {
        let mut c = Counters::default();
        for p in &progress {
            c.add(&Counters {
                attempted: p.attempted.load(Ordering::Relaxed),
                open: p.open.load(Ordering::Relaxed),
                failed: p.failed.load(Ordering::Relaxed),
                dropped: p.dropped.load(Ordering::Relaxed),
                sent: p.sent.load(Ordering::Relaxed),
                received: p.received.load(Ordering::Relaxed),
            });
        }
        c
    };
    let mut ready: BTreeMap<u64, usize> = BTreeMap::new();
    let mut done: BTreeMap<u64, (usize, StageResult)> = BTreeMap::new();
    let mut exited = 0;
    let mut fin = StageResult::default();
    let mut last_progress = Instant::now();
    while exited < started {
        let msg = rx.recv_timeout(PROGRESS_EVERY);
        if last_progress.elapsed() >= PROGRESS_EVERY {
            emit(GroupEvent::Progress {
                counters: counters(),
            });
            last_progress = Instant::now();
        }
        match msg {
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
            Ok(RunnerMsg::Cmd(v)) => ctl.set(v),
            Ok(RunnerMsg::Ready(s)) => {
                let n = ready.entry(s).or_default();
                *n += 1;
                if *n == started {
                    emit(GroupEvent::Ready {
                        stage: s,
                        rss_bytes: proc_rss_bytes(std::process::id()).unwrap_or(0),
                    });
                }
            }
            Ok(RunnerMsg::Done(s, r)) => {
                let e = done.entry(s).or_default();
                e.0 += 1;
                e.1.merge(&r);
                if e.0 == started {
                    let r = std::mem::take(&mut e.1);
                    emit(GroupEvent::Progress {
                        counters: counters(),
                    });
                    emit(GroupEvent::Done {
                        stage: s,
                        result: Box::new(r),
                    });
                }
            }
            Ok(RunnerMsg::Error(m)) => {
                emit(GroupEvent::Error { message: m });
                ctl.set(crate::engine::STOP);
            }
            Ok(RunnerMsg::Exited(r)) => {
                exited += 1;
                fin.merge(&r);
            }
        }
    }
    for h in handles {
        let _ = h.join();
    }
    emit(GroupEvent::Progress {
        counters: counters(),
    });
    emit(GroupEvent::Exited {
        result: Box::new(fin),
        cpu_ns: process_cpu_ns(),
    });
}
