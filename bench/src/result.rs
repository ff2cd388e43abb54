//! What a worker, a process and finally the whole run measured in one stage, and how two of
//! them merge (counts add, first times take the minimum, last times the maximum, histograms
//! add exactly).

use crate::hist::Hist;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct StageResult {
    /// Workers merged into this result.
    pub workers: u64,
    // --- connections
    pub attempted: u64,
    pub opened: u64,
    pub open_at_end: u64,
    /// Connections that never opened, by cause.
    pub failures: BTreeMap<String, u64>,
    /// Open connections lost without us closing them, by cause.
    pub drops: BTreeMap<String, u64>,
    pub first_attempt_ns: u64,
    pub last_open_ns: u64,
    // --- messages
    /// Room members (broadcast, ladder) taking part in this stage.
    pub members: u64,
    pub sent: u64,
    pub received: u64,
    /// Echo: round trips completed inside the measurement window.
    pub in_window: u64,
    pub window_ns: u64,
    pub expected: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Payloads that failed the byte-for-byte check (or carried an impossible header).
    pub corrupt: u64,
    /// Echo: messages sent whose echo never came back.
    pub unanswered: u64,
    /// Messages from an earlier run or stage.
    pub stale: u64,
    pub first_send_ns: u64,
    pub last_send_ns: u64,
    pub last_recv_ns: u64,
    pub run_start_ns: u64,
    pub run_end_ns: u64,
    /// CPU time of the worker threads while the stage ran.
    pub cpu_ns: u64,
    /// Server pings answered while the connections were held (their CPU cost is the hold's),
    /// and connections that answered at least one during the whole run: each of those was
    /// alive end to end.
    #[serde(default)]
    pub pings_answered: u64,
    #[serde(default)]
    pub conns_ponged: u64,
    /// Bytes the members' sockets delivered while the stage ran (frames as sent, compressed
    /// or not, pings included).
    #[serde(default)]
    pub wire_bytes_received: u64,
    /// The longest a worker went without polling its sockets.
    #[serde(default)]
    pub max_turn_gap_ns: u64,
    /// Ladder: per broadcast round.
    pub rounds: Vec<RoundStat>,
    pub notes: Vec<String>,
    pub hists: BTreeMap<String, Hist>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoundStat {
    pub sent_ns: u64,
    pub received: u64,
    /// Time until the last member (of those counted here) had the message.
    pub max_latency_ns: u64,
}

fn min_set(a: &mut u64, b: u64) {
    if b != 0 && (*a == 0 || b < *a) {
        *a = b;
    }
}

fn add_map(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

impl StageResult {
    pub fn merge(&mut self, o: &StageResult) {
        self.workers += o.workers;
        self.attempted += o.attempted;
        self.opened += o.opened;
        self.open_at_end += o.open_at_end;
        add_map(&mut self.failures, &o.failures);
        add_map(&mut self.drops, &o.drops);
        min_set(&mut self.first_attempt_ns, o.first_attempt_ns);
        self.last_open_ns = self.last_open_ns.max(o.last_open_ns);
        self.members += o.members;
        self.sent += o.sent;
        self.received += o.received;
        self.in_window += o.in_window;
        self.window_ns = self.window_ns.max(o.window_ns);
        self.expected += o.expected;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.corrupt += o.corrupt;
        self.unanswered += o.unanswered;
        self.stale += o.stale;
        min_set(&mut self.first_send_ns, o.first_send_ns);
        self.last_send_ns = self.last_send_ns.max(o.last_send_ns);
        self.last_recv_ns = self.last_recv_ns.max(o.last_recv_ns);
        min_set(&mut self.run_start_ns, o.run_start_ns);
        self.run_end_ns = self.run_end_ns.max(o.run_end_ns);
        self.cpu_ns += o.cpu_ns;
        self.pings_answered += o.pings_answered;
        self.conns_ponged += o.conns_ponged;
        self.max_turn_gap_ns = self.max_turn_gap_ns.max(o.max_turn_gap_ns);
        self.wire_bytes_received += o.wire_bytes_received;
        if self.rounds.len() < o.rounds.len() {
            self.rounds.resize(o.rounds.len(), RoundStat::default());
        }
        for (a, b) in self.rounds.iter_mut().zip(&o.rounds) {
            min_set(&mut a.sent_ns, b.sent_ns);
            a.received += b.received;
            a.max_latency_ns = a.max_latency_ns.max(b.max_latency_ns);
        }
        for n in &o.notes {
            if !self.notes.contains(n) {
                self.notes.push(n.clone());
            }
        }
        for (k, h) in &o.hists {
            self.hists.entry(k.clone()).or_default().merge(h);
        }
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    pub fn dropped(&self) -> u64 {
        self.drops.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_through_json_like_child_processes() {
        let mut a = StageResult {
            workers: 1,
            sent: 5,
            received: 10,
            first_send_ns: 100,
            last_recv_ns: 900,
            ..Default::default()
        };
        a.failures.insert("refused".into(), 2);
        a.rounds = vec![RoundStat {
            sent_ns: 50,
            received: 3,
            max_latency_ns: 7,
        }];
        a.hists.entry("delivery".into()).or_default().record(1_000);
        let mut b = StageResult {
            workers: 1,
            sent: 1,
            received: 4,
            first_send_ns: 80,
            last_recv_ns: 950,
            lost: 1,
            ..Default::default()
        };
        b.failures.insert("refused".into(), 1);
        b.failures.insert("http_503".into(), 4);
        b.rounds = vec![
            RoundStat {
                sent_ns: 0,
                received: 2,
                max_latency_ns: 9,
            },
            RoundStat {
                sent_ns: 60,
                received: 1,
                max_latency_ns: 1,
            },
        ];
        b.hists
            .entry("delivery".into())
            .or_default()
            .record(2_000_000);
        let b: StageResult = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        let mut m = StageResult::default();
        m.merge(&a);
        m.merge(&b);
        assert_eq!((m.workers, m.sent, m.received, m.lost), (2, 6, 14, 1));
        assert_eq!((m.first_send_ns, m.last_recv_ns), (80, 950));
        assert_eq!(m.failures["refused"], 3);
        assert_eq!(m.failed(), 7);
        assert_eq!(
            m.rounds[0],
            RoundStat {
                sent_ns: 50,
                received: 5,
                max_latency_ns: 9
            }
        );
        assert_eq!(m.rounds[1].received, 1);
        let h = &m.hists["delivery"];
        assert_eq!(h.len(), 2);
        assert!(h.summary().max >= 1999.0);
    }
}
