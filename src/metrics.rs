//! Counters every worker bumps, and their Prometheus text rendering.
//!
//! Each worker owns one cache-line-padded [`WorkerStats`] and is its only writer (relaxed atomic
//! adds: no lock, no shared cache line on the hot path). The metrics endpoint sums them when it
//! is scraped. Every disconnect and every dropped message is counted under a reason, so nothing
//! leaves the server without a trace.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::bus::RingState;

/// Why a connection ended. Each variant is one `reason` label of
/// `megasock_disconnects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The client sent a close frame and the close handshake completed.
    ClientClose,
    /// The client closed TCP (or reset it) without a close frame.
    PeerGone,
    /// A read or write failed with an I/O error.
    IoError,
    /// The client broke RFC 6455 (close 1002).
    ProtocolError,
    /// A text message or close reason was not UTF-8 (close 1007).
    InvalidUtf8,
    /// A message exceeded `--max-message-size` (close 1009); for a compressed message, its
    /// inflated size did (a zip bomb ends here too).
    MessageTooBig,
    /// A permessage-deflate compressed message was not valid deflate data (close 1007).
    InvalidCompressed,
    /// Queued output exceeded `--max-backpressure` (close 1008).
    SlowConsumer,
    /// Nothing received for `--idle-timeout` (close 1001).
    IdleTimeout,
    /// The upgrade did not complete within `--handshake-timeout`.
    HandshakeTimeout,
    /// The upgrade request was refused with an HTTP error status.
    HttpRejected,
    /// Over `--max-connections`: answered 503.
    OverCapacity,
    /// The server was shutting down (close 1001).
    Shutdown,
    /// A plain HTTP page was served (`GET /`, `GET /rooms/{room}`), then the socket closed.
    PageServed,
    /// The client's token expired on the open connection (close 1008 "token expired").
    TokenExpired,
    /// The client went over `--max-message-rate` (close 1008 "message rate").
    MessageRate,
    /// The TLS handshake failed (not TLS, no shared version or cipher, a bad record).
    TlsHandshakeFailed,
}

impl Disconnect {
    pub const ALL: [Disconnect; 17] = [
        Disconnect::ClientClose,
        Disconnect::PeerGone,
        Disconnect::IoError,
        Disconnect::ProtocolError,
        Disconnect::InvalidUtf8,
        Disconnect::MessageTooBig,
        Disconnect::InvalidCompressed,
        Disconnect::SlowConsumer,
        Disconnect::IdleTimeout,
        Disconnect::HandshakeTimeout,
        Disconnect::HttpRejected,
        Disconnect::OverCapacity,
        Disconnect::Shutdown,
        Disconnect::PageServed,
        Disconnect::TokenExpired,
        Disconnect::MessageRate,
        Disconnect::TlsHandshakeFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Disconnect::ClientClose => "client_close",
            Disconnect::PeerGone => "peer_gone",
            Disconnect::IoError => "io_error",
            Disconnect::ProtocolError => "protocol_error",
            Disconnect::InvalidUtf8 => "invalid_utf8",
            Disconnect::MessageTooBig => "message_too_big",
            Disconnect::InvalidCompressed => "invalid_compressed_data",
            Disconnect::SlowConsumer => "slow_consumer",
            Disconnect::IdleTimeout => "idle_timeout",
            Disconnect::HandshakeTimeout => "handshake_timeout",
            Disconnect::HttpRejected => "http_rejected",
            Disconnect::OverCapacity => "over_capacity",
            Disconnect::Shutdown => "shutdown",
            Disconnect::PageServed => "http_page_served",
            Disconnect::TokenExpired => "token_expired",
            Disconnect::MessageRate => "message_rate",
            Disconnect::TlsHandshakeFailed => "tls_handshake_failed",
        }
    }
}

/// Why a message was not delivered to one recipient (`megasock_messages_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// `--slow-consumer=drop`: the recipient's queue was over `--max-backpressure`.
    SlowConsumer,
    /// The recipient was already closing (slow consumer closed, protocol error, shutdown).
    RecipientClosing,
}

impl DropReason {
    pub const ALL: [DropReason; 2] = [DropReason::SlowConsumer, DropReason::RecipientClosing];
    pub fn label(self) -> &'static str {
        match self {
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::RecipientClosing => "recipient_closing",
        }
    }
}

/// HTTP statuses the upgrade path answers with (`megasock_http_responses_total`).
pub const HTTP_STATUSES: [u16; 11] = [400, 401, 403, 404, 405, 426, 429, 431, 503, 101, 200];

fn status_index(status: u16) -> usize {
    HTTP_STATUSES.iter().position(|&s| s == status).unwrap_or(0)
}

/// Upper bounds of the delivery latency histogram's buckets, in microseconds (exported in
/// seconds as `le` labels).
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// One worker's counters. Written only by that worker.
#[derive(Default)]
pub struct WorkerStats {
    pub connections: AtomicI64,
    pub accepted: AtomicU64,
    pub accept_errors: AtomicU64,
    pub handshakes: AtomicU64,
    /// TLS handshakes completed (wss:// listeners).
    pub tls_handshakes: AtomicU64,
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Frames handed to the kernel (one per recipient per message).
    pub frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub write_syscalls: AtomicU64,
    pub published: AtomicU64,
    pub bus_sent: AtomicU64,
    pub bus_received: AtomicU64,
    /// Messages that found the destination ring full and waited in the sender's overflow.
    pub bus_overflowed: AtomicU64,
    /// Times this worker paused reading its publishers because a ring was full.
    pub publisher_pauses: AtomicU64,
    pub wakeups_sent: AtomicU64,
    pub pings_sent: AtomicU64,
    /// Upgrades refused by the token, room grant or Origin checks, by reason.
    pub access: crate::access::AccessStats,
    /// Connections refused by a per-address limit, by limit.
    pub limits: crate::abuse::LimitStats,
    /// Loop turn durations over the last second (microseconds).
    pub turn_p50_us: AtomicU64,
    pub turn_p99_us: AtomicU64,
    pub turn_max_us: AtomicU64,
    /// Every loop turn: how many, and their total duration (microseconds).
    pub turn_count: AtomicU64,
    pub turn_sum_us: AtomicU64,
    /// When the worker last finished a turn (milliseconds since the server started).
    pub last_turn_ms: AtomicU64,
    /// Delivery latency samples (one per batch) per bucket of [`LATENCY_BUCKETS_US`], the
    /// last one past every bound; their count and sum (microseconds).
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    pub latency_count: AtomicU64,
    pub latency_sum_us: AtomicU64,
    /// p99 of the delivery latency samples of the last second (microseconds).
    pub latency_p99_us: AtomicU64,
    /// permessage-deflate: upgrades that agreed to it.
    pub deflate_negotiated: AtomicU64,
    /// Messages compressed (once per batch and window size, whatever the number of members).
    pub deflate_compressed: AtomicU64,
    /// Their payload bytes before and after compression.
    pub deflate_bytes_in: AtomicU64,
    pub deflate_bytes_out: AtomicU64,
    /// Messages that went uncompressed to members with deflate (under --deflate-min-size, or
    /// no smaller compressed), counted like `deflate_compressed`.
    pub deflate_plain: AtomicU64,
    /// Client messages inflated, and their inflated bytes.
    pub deflate_inflated: AtomicU64,
    pub deflate_inflated_bytes: AtomicU64,
    /// Compressed client messages refused: [too big once inflated, corrupt].
    pub inflate_failures: [AtomicU64; 2],
    /// Connections holding an inflate state between messages (client context takeover).
    pub inflaters_held: AtomicI64,
    pub disconnects: [AtomicU64; Disconnect::ALL.len()],
    pub dropped: [AtomicU64; DropReason::ALL.len()],
    pub http: [AtomicU64; HTTP_STATUSES.len()],
}

impl WorkerStats {
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
    pub fn disconnect(&self, reason: Disconnect) {
        self.disconnects[reason as usize].fetch_add(1, Relaxed);
    }
    pub fn drop_message(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Relaxed);
    }
    pub fn http_status(&self, status: u16) {
        self.http[status_index(status)].fetch_add(1, Relaxed);
    }
}

/// Microseconds as seconds, for the exposition format.
fn micros(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Picks one counter out of a worker's stats.
type Field = fn(&WorkerStats) -> &AtomicU64;

/// The counters of all workers.
pub struct Metrics {
    pub workers: Box<[CachePadded<WorkerStats>]>,
    /// Each worker's inbound cross-core ring (bytes queued), shared with the bus.
    pub rings: Arc<[RingState]>,
}

impl Metrics {
    pub fn new(workers: usize) -> Metrics {
        Metrics {
            workers: (0..workers).map(|_| CachePadded::default()).collect(),
            rings: crate::bus::ring_states(workers),
        }
    }

    pub fn open_connections(&self) -> i64 {
        self.workers
            .iter()
            .map(|w| w.connections.load(Relaxed))
            .sum()
    }

    fn sum(&self, f: impl Fn(&WorkerStats) -> &AtomicU64) -> u64 {
        self.workers.iter().map(|w| f(w).load(Relaxed)).sum()
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP megasock_connections Open sockets (handshaking, open or closing).\n");
        out.push_str("# TYPE megasock_connections gauge\n");
        for (i, w) in self.workers.iter().enumerate() {
            let _ = writeln!(
                out,
                "megasock_connections{{worker=\"{i}\"}} {}",
                w.connections.load(Relaxed)
            );
        }
        out.push_str(
            "# HELP megasock_bus_queued_bytes Bytes waiting in each worker's inbound cross-core ring.\n",
        );
        out.push_str("# TYPE megasock_bus_queued_bytes gauge\n");
        for (i, r) in self.rings.iter().enumerate() {
            let _ = writeln!(
                out,
                "megasock_bus_queued_bytes{{worker=\"{i}\"}} {}",
                r.queued()
            );
        }
        out.push_str(
            "# HELP megasock_loop_turn_seconds Event-loop turn durations (quantiles over the last second).\n",
        );
        out.push_str("# TYPE megasock_loop_turn_seconds summary\n");
        for (i, w) in self.workers.iter().enumerate() {
            for (q, v) in [
                ("0.5", &w.turn_p50_us),
                ("0.99", &w.turn_p99_us),
                ("1", &w.turn_max_us),
            ] {
                let _ = writeln!(
                    out,
                    "megasock_loop_turn_seconds{{worker=\"{i}\",quantile=\"{q}\"}} {}",
                    micros(v.load(Relaxed))
                );
            }
            let _ = writeln!(
                out,
                "megasock_loop_turn_seconds_sum{{worker=\"{i}\"}} {}",
                micros(w.turn_sum_us.load(Relaxed))
            );
            let _ = writeln!(
                out,
                "megasock_loop_turn_seconds_count{{worker=\"{i}\"}} {}",
                w.turn_count.load(Relaxed)
            );
        }
        out.push_str(
            "# HELP megasock_delivery_latency_seconds From a message's arrival (client read or publish API) to its write into recipients' sockets, one sample per batch.\n",
        );
        out.push_str("# TYPE megasock_delivery_latency_seconds histogram\n");
        let mut cumulative = 0;
        for (b, ub) in LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += self.sum(|w| &w.latency_buckets[b]);
            let _ = writeln!(
                out,
                "megasock_delivery_latency_seconds_bucket{{le=\"{}\"}} {cumulative}",
                micros(*ub)
            );
        }
        cumulative += self.sum(|w| &w.latency_buckets[LATENCY_BUCKETS_US.len()]);
        let _ = writeln!(
            out,
            "megasock_delivery_latency_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "megasock_delivery_latency_seconds_sum {}",
            micros(self.sum(|w| &w.latency_sum_us))
        );
        let _ = writeln!(
            out,
            "megasock_delivery_latency_seconds_count {}",
            self.sum(|w| &w.latency_count)
        );
        let counters: [(&str, &str, Field); 15] = [
            ("accepted_total", "Sockets accepted.", |w| &w.accepted),
            (
                "accept_errors_total",
                "accept(2) failures (EMFILE/ENFILE back off and retry).",
                |w| &w.accept_errors,
            ),
            ("handshakes_total", "Completed WebSocket upgrades.", |w| {
                &w.handshakes
            }),
            (
                "tls_handshakes_total",
                "Completed TLS handshakes (failures: megasock_disconnects_total{reason=\"tls_handshake_failed\"}).",
                |w| &w.tls_handshakes,
            ),
            ("messages_received_total", "Messages received.", |w| {
                &w.messages_in
            }),
            ("bytes_received_total", "Bytes read from sockets.", |w| {
                &w.bytes_in
            }),
            (
                "messages_sent_total",
                "Messages written to recipients (one per recipient).",
                |w| &w.frames_out,
            ),
            ("bytes_sent_total", "Bytes written to sockets.", |w| {
                &w.bytes_out
            }),
            ("write_syscalls_total", "write/writev calls.", |w| {
                &w.write_syscalls
            }),
            ("published_total", "Messages published to rooms.", |w| {
                &w.published
            }),
            ("bus_sent_total", "Messages handed to other workers.", |w| {
                &w.bus_sent
            }),
            (
                "bus_overflowed_total",
                "Messages held back because a cross-core ring was full.",
                |w| &w.bus_overflowed,
            ),
            (
                "publisher_pauses_total",
                "Times reading from publishers paused on a full ring.",
                |w| &w.publisher_pauses,
            ),
            (
                "wakeups_total",
                "Waker calls made to sleeping workers.",
                |w| &w.wakeups_sent,
            ),
            (
                "pings_sent_total",
                "Pings sent to quiet connections.",
                |w| &w.pings_sent,
            ),
        ];
        for (name, help, f) in counters {
            let _ = writeln!(out, "# HELP megasock_{name} {help}");
            let _ = writeln!(out, "# TYPE megasock_{name} counter");
            let _ = writeln!(out, "megasock_{name} {}", self.sum(f));
        }
        let deflate: [(&str, &str, Field); 7] = [
            (
                "deflate_negotiated_total",
                "Upgrades that agreed to permessage-deflate.",
                |w| &w.deflate_negotiated,
            ),
            (
                "deflate_messages_compressed_total",
                "Messages compressed for permessage-deflate members (once per batch and window size, not per member).",
                |w| &w.deflate_compressed,
            ),
            (
                "deflate_compress_in_bytes_total",
                "Payload bytes of the compressed messages before compression.",
                |w| &w.deflate_bytes_in,
            ),
            (
                "deflate_compress_out_bytes_total",
                "Payload bytes of the compressed messages after compression (out/in is the ratio).",
                |w| &w.deflate_bytes_out,
            ),
            (
                "deflate_messages_uncompressed_total",
                "Messages sent uncompressed to permessage-deflate members: under --deflate-min-size or not smaller compressed.",
                |w| &w.deflate_plain,
            ),
            (
                "deflate_messages_inflated_total",
                "Compressed client messages inflated.",
                |w| &w.deflate_inflated,
            ),
            (
                "deflate_inflated_bytes_total",
                "Bytes of the client messages once inflated.",
                |w| &w.deflate_inflated_bytes,
            ),
        ];
        for (name, help, f) in deflate {
            let _ = writeln!(out, "# HELP megasock_{name} {help}");
            let _ = writeln!(out, "# TYPE megasock_{name} counter");
            let _ = writeln!(out, "megasock_{name} {}", self.sum(f));
        }
        out.push_str(
            "# HELP megasock_deflate_inflate_failures_total Compressed client messages refused: too_big (inflated past --max-message-size, close 1009) or corrupt (close 1007).\n",
        );
        out.push_str("# TYPE megasock_deflate_inflate_failures_total counter\n");
        for (i, reason) in ["too_big", "corrupt"].iter().enumerate() {
            let _ = writeln!(
                out,
                "megasock_deflate_inflate_failures_total{{reason=\"{reason}\"}} {}",
                self.sum(|w| &w.inflate_failures[i])
            );
        }
        out.push_str(
            "# HELP megasock_deflate_inflaters_held Connections holding an inflate state (47,712 B) between messages for client context takeover.\n",
        );
        out.push_str("# TYPE megasock_deflate_inflaters_held gauge\n");
        let held: i64 = self
            .workers
            .iter()
            .map(|w| w.inflaters_held.load(Relaxed))
            .sum();
        let _ = writeln!(out, "megasock_deflate_inflaters_held {held}");
        out.push_str("# HELP megasock_disconnects_total Connections ended, by reason.\n");
        out.push_str("# TYPE megasock_disconnects_total counter\n");
        for r in Disconnect::ALL {
            let _ = writeln!(
                out,
                "megasock_disconnects_total{{reason=\"{}\"}} {}",
                r.label(),
                self.sum(|w| &w.disconnects[r as usize])
            );
        }
        out.push_str("# HELP megasock_messages_dropped_total Deliveries not made, by reason.\n");
        out.push_str("# TYPE megasock_messages_dropped_total counter\n");
        for r in DropReason::ALL {
            let _ = writeln!(
                out,
                "megasock_messages_dropped_total{{reason=\"{}\"}} {}",
                r.label(),
                self.sum(|w| &w.dropped[r as usize])
            );
        }
        out.push_str("# HELP megasock_http_responses_total Upgrade responses, by status.\n");
        out.push_str("# TYPE megasock_http_responses_total counter\n");
        for (i, s) in HTTP_STATUSES.iter().enumerate() {
            let _ = writeln!(
                out,
                "megasock_http_responses_total{{status=\"{s}\"}} {}",
                self.sum(|w| &w.http[i])
            );
        }
        out
    }
}
