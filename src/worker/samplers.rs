//! What a worker measures about itself, in HdrHistograms it alone writes, published to the
//! shared counters about once a second: how long its loop turns take, and how long a message
//! takes from its arrival (a client's read, or the publish API) to its write into recipients'
//! sockets. Latency is sampled once per batch, not per delivery, so the hot path pays nothing
//! per recipient.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::metrics::{WorkerStats, LATENCY_BUCKETS_US};

fn histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2)
        .expect("static histogram bounds are valid")
}

/// Loop-turn durations (microseconds) and delivery latencies (microseconds).
pub(super) struct Samplers {
    turns: hdrhistogram::Histogram<u64>,
    latency: hdrhistogram::Histogram<u64>,
    published_at: Instant,
}

impl Samplers {
    pub(super) fn new() -> Samplers {
        Samplers {
            turns: histogram(),
            latency: histogram(),
            published_at: Instant::now(),
        }
    }

    /// One loop turn ended after `turn`.
    pub(super) fn turn(&mut self, turn: Duration, s: &WorkerStats) {
        let us = turn.as_micros().max(1) as u64;
        self.turns.saturating_record(us);
        WorkerStats::add(&s.turn_count, 1);
        WorkerStats::add(&s.turn_sum_us, us);
    }

    /// Batches born at `births` were written out at `done`.
    pub(super) fn delivered(&mut self, births: &mut Vec<Instant>, done: Instant) {
        for born in births.drain(..) {
            let us = done.saturating_duration_since(born).as_micros().max(1) as u64;
            self.latency.saturating_record(us);
        }
    }

    /// About once a second: turn quantiles to gauges, latencies into the shared buckets.
    pub(super) fn publish(&mut self, now: Instant, s: &WorkerStats) {
        if now.duration_since(self.published_at) < Duration::from_secs(1) {
            return;
        }
        self.published_at = now;
        let t = &self.turns;
        s.turn_p50_us
            .store(t.value_at_quantile(0.5), Ordering::Relaxed);
        s.turn_p99_us
            .store(t.value_at_quantile(0.99), Ordering::Relaxed);
        s.turn_max_us.store(t.max(), Ordering::Relaxed);
        self.turns.reset();
        if self.latency.is_empty() {
            return;
        }
        let mut sum = 0u64;
        for v in self.latency.iter_recorded() {
            let value = self.latency.highest_equivalent(v.value_iterated_to());
            sum += value * v.count_at_value();
            let bucket = LATENCY_BUCKETS_US
                .iter()
                .position(|&ub| value <= ub)
                .unwrap_or(LATENCY_BUCKETS_US.len());
            WorkerStats::add(&s.latency_buckets[bucket], v.count_at_value());
        }
        WorkerStats::add(&s.latency_count, self.latency.len());
        WorkerStats::add(&s.latency_sum_us, sum);
        s.latency_p99_us
            .store(self.latency.value_at_quantile(0.99), Ordering::Relaxed);
        self.latency.reset();
    }
}
