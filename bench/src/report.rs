//! Turning a run's merged results into the JSON document, the human summary, `.hgrm` files
//! and plots.

use crate::cli::{BroadcastArgs, ConnectArgs, EchoArgs, LadderArgs, Scenario};
use crate::driver::{RunOutcome, StageOutcome};
use crate::hist::{Hist, Percentiles};
use crate::result::StageResult;
use crate::worker::Plan;
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::sync::LazyLock;

pub struct Report {
    pub json: Map<String, Value>,
    pub summary: String,
    pub hists: Vec<(String, Hist)>,
    /// Problems that make the exit status 1.
    pub problems: Vec<String>,
    pub plots: Vec<PlotSpec>,
}

pub enum PlotSpec {
    Latency {
        name: String,
        title: String,
        series: Vec<String>,
    },
    Timeline {
        name: String,
    },
    Ladder {
        name: String,
        points: Vec<(u64, f64, f64)>,
        bound_ms: f64,
    },
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn per_s(count: u64, ns: u64) -> f64 {
    if ns == 0 {
        0.0
    } else {
        count as f64 / secs(ns)
    }
}

fn pct(h: Option<&Hist>) -> Percentiles {
    h.map(Hist::summary).unwrap_or_default()
}

fn fmt_pct(p: &Percentiles) -> String {
    format!(
        "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1} µs  (n={})",
        p.p50, p.p90, p.p99, p.p99_9, p.max, p.count
    )
}

fn fmt_map(m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        "none".into()
    } else {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Nearest-rank quantile of a small sample (infinite values sort last).
pub fn small_quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn finite_or_null(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// Figures every scenario has: configuration, connections, handshakes, CPU, server; and the
/// run's errors as the first problems.
fn base(
    sc: &Scenario,
    plan: &Plan,
    out: &RunOutcome,
    conn: &StageResult,
    requested: u64,
) -> (Map<String, Value>, String, Vec<String>) {
    let c = sc.common();
    let mut m = Map::new();
    m.insert("scenario".into(), json!(sc.name()));
    m.insert("target".into(), json!(c.url));
    let mut config = serde_json::to_value(sc).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut config {
        o.remove("child_index");
        o.insert("threads_per_process".into(), json!(plan.threads));
        o.insert("procs".into(), json!(plan.procs));
        o.insert("workers_total".into(), json!(plan.workers));
        o.insert("run_id".into(), json!(plan.run_id));
        o.insert("source_addresses".into(), json!(plan.source_ips.len()));
        o.insert(
            "resolved_target".into(),
            json!(plan.target.addr.to_string()),
        );
        o.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    }
    m.insert("config".into(), config);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() - secs(out.end_ns - out.start_ns))
        .unwrap_or(0.0);
    m.insert("started_unix_s".into(), json!(started));
    m.insert("duration_s".into(), json!(secs(out.end_ns - out.start_ns)));
    let ramp_ns = conn.last_open_ns.saturating_sub(conn.first_attempt_ns);
    let rate = per_s(conn.opened, ramp_ns);
    let failed = conn.failed() + conn.dropped();
    m.insert("failed".into(), json!(failed));
    m.insert("connect_rate_per_s".into(), json!(rate));
    m.insert(
        "connections".into(),
        json!({
            "requested": requested,
            "attempted": conn.attempted,
            "opened": conn.opened,
            "failed_to_open": conn.failed(),
            "failures": conn.failures,
            "dropped": conn.dropped(),
            "drops": conn.drops,
            "ramp_s": secs(ramp_ns),
        }),
    );
    let hs = pct(conn.hists.get("handshake"));
    m.insert("handshake_latency_us".into(), json!(hs));
    m.insert(
        "tcp_connect_latency_us".into(),
        json!(pct(conn.hists.get("tcp_connect"))),
    );
    m.insert("errors".into(), json!(out.errors));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "megasock-bench {} -> {} ({} procs x {} threads{})",
        sc.name(),
        c.url,
        plan.procs,
        plan.threads,
        if plan.source_ips.is_empty() {
            String::new()
        } else {
            format!(", {} source addresses", plan.source_ips.len())
        }
    );
    let _ = writeln!(
        s,
        "  connections: {} of {} opened in {:.2}s ({:.0}/s); failed {} ({}); dropped {} ({})",
        conn.opened,
        requested,
        secs(ramp_ns),
        rate,
        conn.failed(),
        fmt_map(&conn.failures),
        conn.dropped(),
        fmt_map(&conn.drops)
    );
    let _ = writeln!(s, "  handshake:   {}", fmt_pct(&hs));
    (m, s, out.errors.clone())
}

/// Load generator and server CPU while the stage ran.
fn cpu_figures(
    m: &mut Map<String, Value>,
    s: &mut String,
    out: &RunOutcome,
    st: &StageOutcome,
    work: u64,
    what: &str,
) {
    let r = &st.result;
    let wall = r.run_end_ns.saturating_sub(r.run_start_ns);
    let util = if wall > 0 && r.workers > 0 {
        r.cpu_ns as f64 / (wall as f64 * r.workers as f64)
    } else {
        0.0
    };
    m.insert(
        "loadgen".into(),
        json!({
            "run_cpu_s": secs(r.cpu_ns),
            "run_cpu_utilization_per_thread": util,
            format!("{what}_per_cpu_s"): per_s(work, r.cpu_ns),
            "total_cpu_s": secs(out.loadgen_cpu_ns),
            "rss_bytes_connected": st.loadgen_rss_bytes,
        }),
    );
    let _ = writeln!(
        s,
        "  load generator: {:.2} CPU-s during the run ({:.0}% of its {} threads), {:.0} {what}/CPU-s",
        secs(r.cpu_ns),
        util * 100.0,
        r.workers,
        per_s(work, r.cpu_ns)
    );
    if let (Some(a), Some(b)) = (st.server_at_ready, st.server_at_done) {
        let cpu = b.cpu_ns.saturating_sub(a.cpu_ns);
        let wall = ((b.t_s - a.t_s) * 1e9) as u64;
        m.insert(
            "server".into(),
            json!({
                "run_cpu_s": secs(cpu),
                "run_cpu_utilization": if wall > 0 { cpu as f64 / wall as f64 } else { 0.0 },
                format!("{what}_per_cpu_s"): per_s(work, cpu),
                "rss_bytes_at_ready": a.rss_bytes,
                "rss_bytes_at_done": b.rss_bytes,
            }),
        );
        let _ = writeln!(
            s,
            "  server: {:.2} CPU-s during the run ({:.0}% of one core), {:.0} {what}/CPU-s, RSS {:.1} MiB",
            secs(cpu),
            if wall > 0 { 100.0 * cpu as f64 / wall as f64 } else { 0.0 },
            per_s(work, cpu),
            b.rss_bytes as f64 / 1048576.0
        );
    }
}

static NO_RESULT: LazyLock<StageResult> = LazyLock::new(StageResult::default);

/// The single stage of connect, echo and broadcast, and its result (empty if it never ran).
fn first_stage(out: &RunOutcome) -> (Option<&StageOutcome>, &StageResult) {
    let st = out.stages.first();
    (st, st.map_or(&NO_RESULT, |s| &s.result))
}

/// The histogram `name` of `r` as written to its `.hgrm` file (empty if it was never recorded).
fn hist_file(r: &StageResult, name: &str) -> (String, Hist) {
    (name.into(), r.hists.get(name).cloned().unwrap_or_default())
}

fn connection_problems(r: &StageResult, problems: &mut Vec<String>) {
    let failed = r.failed() + r.dropped();
    if failed > 0 {
        problems.push(format!("{failed} connections failed or dropped"));
    }
}

/// The report of a scenario measuring one latency: its histogram and the handshakes' as
/// `.hgrm` files, and a plot of it.
fn one_latency_report(
    json: Map<String, Value>,
    summary: String,
    problems: Vec<String>,
    r: &StageResult,
    latency: &str,
    title: String,
) -> Report {
    Report {
        json,
        summary,
        hists: vec![hist_file(r, latency), hist_file(r, "handshake")],
        problems,
        plots: vec![PlotSpec::Latency {
            name: "latency".into(),
            title,
            series: vec![latency.into()],
        }],
    }
}

pub fn connect(sc: &Scenario, a: &ConnectArgs, plan: &Plan, out: &RunOutcome) -> Report {
    let (st, r) = first_stage(out);
    let (mut m, mut s, mut problems) = base(sc, plan, out, r, a.conns);
    m.insert("connected".into(), json!(r.opened));
    m.insert("open_at_end_of_hold".into(), json!(r.open_at_end));
    m.insert("hold_s".into(), json!(a.hold));
    m.insert("latency_us".into(), json!(pct(r.hists.get("handshake"))));
    if !a.allow_failures {
        connection_problems(r, &mut problems);
    }
    if r.opened == 0 {
        problems.push("no connection opened".into());
    }
    server_figures(&mut m, &mut s, sc, out, st, r);
    let _ = writeln!(
        s,
        "  held {} open for {:.1}s; {} still open at the end",
        r.opened, a.hold, r.open_at_end
    );
    if let Some(st) = st {
        m.insert(
            "loadgen".into(),
            json!({
                "rss_bytes_connected": st.loadgen_rss_bytes,
                "rss_per_conn_bytes": st.loadgen_rss_bytes as f64 / r.opened.max(1) as f64,
                "total_cpu_s": secs(out.loadgen_cpu_ns),
            }),
        );
        let _ = writeln!(
            s,
            "  load generator RSS once connected: {:.1} MiB ({:.0} bytes/connection, including its fixed buffers)",
            st.loadgen_rss_bytes as f64 / 1048576.0,
            st.loadgen_rss_bytes as f64 / r.opened.max(1) as f64
        );
    }
    m.insert("timeline".into(), json!(out.timeline));
    let hists = vec![hist_file(r, "handshake"), hist_file(r, "tcp_connect")];
    Report {
        json: m,
        summary: s,
        hists,
        problems,
        plots: vec![
            PlotSpec::Latency {
                name: "latency".into(),
                title: format!(
                    "connect: {} connections, handshake and TCP connect latency",
                    a.conns
                ),
                series: vec!["handshake".into(), "tcp_connect".into()],
            },
            PlotSpec::Timeline {
                name: "timeline".into(),
            },
        ],
    }
}

/// The server's memory per connection (summed over the `--server-pid` processes) and the
/// kernel's (system-wide), from before the run to when all connected; and its CPU while the
/// connections were held idle (from all open to the go), with the pings answered then.
fn server_figures(
    m: &mut Map<String, Value>,
    s: &mut String,
    sc: &Scenario,
    out: &RunOutcome,
    st: Option<&StageOutcome>,
    r: &StageResult,
) {
    let (Some(before), Some(after)) = (out.server_before, st.and_then(|s| s.server_at_ready))
    else {
        return;
    };
    let n = r.opened.max(1) as f64;
    let rss_delta = after.rss_bytes as f64 - before.rss_bytes as f64;
    let slab_delta = after.kernel.slab_bytes as f64 - before.kernel.slab_bytes as f64;
    let tcpmem_delta = after.kernel.tcp_mem_bytes as f64 - before.kernel.tcp_mem_bytes as f64;
    let mut server = json!({
        "pid": sc.common().server_pid,
        "rss_before_bytes": before.rss_bytes,
        "rss_after_bytes": after.rss_bytes,
        "rss_at_end_bytes": out.server_after.map(|x| x.rss_bytes),
        "rss_per_conn_bytes": rss_delta / n,
        "kernel_before": before.kernel,
        "kernel_after": after.kernel,
        "kernel_slab_per_conn_bytes": slab_delta / n,
        "kernel_tcp_mem_per_conn_bytes": tcpmem_delta / n,
        "kernel_note": "system-wide: on loopback, both ends of every connection (client and server sockets) are included",
        "cpu_s_connecting": secs(after.cpu_ns.saturating_sub(before.cpu_ns)),
    });
    let _ = writeln!(
        s,
        "  server RSS: {:.1} -> {:.1} MiB = {:.0} bytes/connection; kernel slab {:.0} bytes/connection (both ends), TCP buffer mem {:.0} bytes/connection",
        before.rss_bytes as f64 / 1048576.0,
        after.rss_bytes as f64 / 1048576.0,
        rss_delta / n,
        slab_delta / n,
        tcpmem_delta / n
    );
    if let Some(open) = st.and_then(|s| s.server_at_all_open) {
        let dt = (after.t_s - open.t_s).max(0.0);
        let cpu_ns = after.cpu_ns.saturating_sub(open.cpu_ns);
        if dt >= 0.5 {
            let cores = cpu_ns as f64 / 1e9 / dt;
            server["hold"] = json!({
                "seconds": dt,
                "cpu_s": secs(cpu_ns),
                "cpu_cores": cores,
                "pings_answered": r.pings_answered,
                "connections_that_answered_a_ping": r.conns_ponged,
                "note": "pings counted while held; connections counted over the whole run",
                "cpu_us_per_ping": (r.pings_answered > 0)
                    .then(|| cpu_ns as f64 / 1e3 / r.pings_answered as f64),
            });
            let _ = writeln!(
                s,
                "  hold: {dt:.1}s idle, server CPU {cores:.3} cores; {} pings answered by {} connections",
                r.pings_answered, r.conns_ponged
            );
        }
    }
    // Joins what cpu_figures put there (the CPU per delivery of the run).
    match (m.get_mut("server"), server) {
        (Some(Value::Object(old)), Value::Object(new)) => old.extend(new),
        (_, server) => {
            m.insert("server".into(), server);
        }
    }
}

pub fn echo(sc: &Scenario, a: &EchoArgs, plan: &Plan, out: &RunOutcome) -> Report {
    let (st, r) = first_stage(out);
    let (mut m, mut s, mut problems) = base(sc, plan, out, r, a.conns);
    let rate = per_s(r.in_window, r.window_ns);
    let rtt = pct(r.hists.get("rtt"));
    m.insert("msgs_per_s".into(), json!(rate));
    m.insert("round_trips".into(), json!(r.received));
    m.insert("round_trips_in_window".into(), json!(r.in_window));
    m.insert("window_s".into(), json!(secs(r.window_ns)));
    m.insert("sent".into(), json!(r.sent));
    m.insert("mismatched".into(), json!(r.corrupt));
    m.insert("unanswered".into(), json!(r.unanswered));
    m.insert("latency_us".into(), json!(rtt));
    let _ = writeln!(
        s,
        "  echo: {:.0} round trips/s ({} in {:.1}s; {} conns x {} in flight, {} B); mismatched {}, unanswered {}",
        rate,
        r.in_window,
        secs(r.window_ns),
        r.opened,
        a.inflight,
        a.size,
        r.corrupt,
        r.unanswered
    );
    let _ = writeln!(s, "  rtt:         {}", fmt_pct(&rtt));
    if let Some(st) = st {
        cpu_figures(&mut m, &mut s, out, st, r.received, "round_trips");
    }
    if r.corrupt > 0 {
        problems.push(format!("{} echoes did not match what was sent", r.corrupt));
    }
    if r.unanswered > 0 {
        problems.push(format!("{} messages were never echoed", r.unanswered));
    }
    connection_problems(r, &mut problems);
    if r.received == 0 {
        problems.push("no echo received".into());
    }
    let title = format!(
        "echo: {} conns x {} in flight, {} B: round-trip time",
        a.conns, a.inflight, a.size
    );
    one_latency_report(m, s, problems, r, "rtt", title)
}

pub fn broadcast(sc: &Scenario, a: &BroadcastArgs, plan: &Plan, out: &RunOutcome) -> Report {
    let (st, r) = first_stage(out);
    let (mut m, mut s, mut problems) = base(sc, plan, out, r, a.subs);
    let span = r.last_recv_ns.saturating_sub(r.first_send_ns);
    let rate = per_s(r.received, span);
    let lat = pct(r.hists.get("delivery"));
    m.insert("deliveries_per_s".into(), json!(rate));
    m.insert("deliveries".into(), json!(r.received));
    m.insert("expected_deliveries".into(), json!(r.expected));
    m.insert("lost".into(), json!(r.lost));
    m.insert("duplicated".into(), json!(r.duplicated));
    m.insert("reordered".into(), json!(r.reordered));
    m.insert("corrupt".into(), json!(r.corrupt));
    m.insert("stale".into(), json!(r.stale));
    m.insert("members".into(), json!(r.members));
    m.insert("publishers".into(), json!(a.pubs));
    m.insert("messages_per_publisher".into(), json!(a.msgs));
    m.insert("published".into(), json!(r.sent));
    m.insert(
        "publish_s".into(),
        json!(secs(r.last_send_ns.saturating_sub(r.first_send_ns))),
    );
    m.insert("delivery_s".into(), json!(secs(span)));
    m.insert("latency_us".into(), json!(lat));
    m.insert("notes".into(), json!(r.notes));
    let wire_per_delivery = r.wire_bytes_received as f64 / r.received.max(1) as f64;
    m.insert("wire_bytes_received".into(), json!(r.wire_bytes_received));
    m.insert("wire_bytes_per_delivery".into(), json!(wire_per_delivery));
    m.insert("deflate_offered".into(), json!(sc.common().deflate));
    let _ = writeln!(
        s,
        "  wire: {wire_per_delivery:.1} bytes per delivery received ({} payload bytes{})",
        a.size,
        if sc.common().deflate {
            ", permessage-deflate offered"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "  broadcast: {:.0} deliveries/s ({} of {} expected in {:.3}s; {} members, {} publishers x {} msgs of {} B)",
        rate, r.received, r.expected, secs(span), r.members, a.pubs, a.msgs, a.size
    );
    let _ = writeln!(
        s,
        "  lost {}  duplicated {}  reordered {}  corrupt {}",
        r.lost, r.duplicated, r.reordered, r.corrupt
    );
    let _ = writeln!(s, "  delivery:    {}", fmt_pct(&lat));
    for n in &r.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    if let Some(st) = st {
        cpu_figures(&mut m, &mut s, out, st, r.received, "deliveries");
    }
    server_figures(&mut m, &mut s, sc, out, st, r);
    m.insert("timeline".into(), json!(out.timeline));
    m.insert(
        "loadgen_longest_busy_ms".into(),
        json!({"run": r.max_turn_gap_ns as f64 / 1e6, "closing": out.closing.max_turn_gap_ns as f64 / 1e6}),
    );
    let _ = writeln!(
        s,
        "  load generator: longest span without polling {:.0} ms while running, {:.0} ms while closing",
        r.max_turn_gap_ns as f64 / 1e6,
        out.closing.max_turn_gap_ns as f64 / 1e6
    );
    for (what, n) in [
        ("lost", r.lost),
        ("duplicated", r.duplicated),
        ("reordered", r.reordered),
        ("corrupt", r.corrupt),
    ] {
        if n > 0 {
            problems.push(format!("{n} messages {what}"));
        }
    }
    connection_problems(r, &mut problems);
    if r.expected == 0 {
        problems.push("nothing to deliver (no member connected)".into());
    }
    let title = format!(
        "broadcast: {} members, {} x {} msgs of {} B: delivery latency",
        a.subs, a.pubs, a.msgs, a.size
    );
    let mut report = one_latency_report(m, s, problems, r, "delivery", title);
    report.plots.push(PlotSpec::Timeline {
        name: "timeline".into(),
    });
    report
}

/// Per-step verdict of the ladder.
pub struct StepVerdict {
    pub members: u64,
    /// ms until the last member had the message, per round (infinite if someone never got it)
    pub last_member_ms: Vec<f64>,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub pass: bool,
}

pub fn ladder_step(r: &StageResult, bound_s: f64) -> StepVerdict {
    let last: Vec<f64> = r
        .rounds
        .iter()
        .map(|x| {
            if x.received >= r.members && r.members > 0 {
                x.max_latency_ns as f64 / 1e6
            } else {
                f64::INFINITY
            }
        })
        .collect();
    let p50 = small_quantile(&last, 0.50);
    let p95 = small_quantile(&last, 0.95);
    let pass = !last.is_empty()
        && p95 <= bound_s * 1e3
        && r.lost == 0
        && r.duplicated == 0
        && r.corrupt == 0;
    StepVerdict {
        members: r.members,
        last_member_ms: last,
        p50_ms: p50,
        p95_ms: p95,
        pass,
    }
}

pub fn ladder(sc: &Scenario, a: &LadderArgs, plan: &Plan, out: &RunOutcome) -> Report {
    let mut conn = StageResult::default();
    for st in &out.stages {
        conn.attempted += st.result.attempted;
        conn.opened += st.result.opened;
        for (k, v) in &st.result.failures {
            *conn.failures.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &st.result.drops {
            *conn.drops.entry(k.clone()).or_default() += v;
        }
        if conn.first_attempt_ns == 0 {
            conn.first_attempt_ns = st.result.first_attempt_ns;
        }
        conn.last_open_ns = conn.last_open_ns.max(st.result.last_open_ns);
        for k in ["handshake", "tcp_connect"] {
            if let Some(h) = st.result.hists.get(k) {
                conn.hists.entry(k.into()).or_default().merge(h);
            }
        }
    }
    let requested = a.steps.last().copied().unwrap_or(0);
    let (mut m, mut s, mut problems) = base(sc, plan, out, &conn, requested);
    let mut steps = Vec::new();
    let mut all = Hist::new();
    let mut best: Option<u64> = None;
    let mut failed_once = false;
    let mut hists = Vec::new();
    let mut points = Vec::new();
    let (mut lost, mut dup) = (0, 0);
    for (k, st) in out.stages.iter().enumerate() {
        let r = &st.result;
        let v = ladder_step(r, a.bound);
        let lat = pct(r.hists.get("delivery"));
        if let Some(h) = r.hists.get("delivery") {
            all.merge(h);
            hists.push((format!("delivery-{}", r.members), h.clone()));
        }
        lost += r.lost;
        dup += r.duplicated;
        if v.pass && !failed_once {
            best = Some(v.members);
        }
        failed_once |= !v.pass;
        points.push((v.members, v.p50_ms, v.p95_ms));
        steps.push(json!({
            "step": k,
            "requested_members": a.steps.get(k),
            "members": r.members,
            "rounds": a.rounds,
            "expected": r.expected,
            "received": r.received,
            "lost": r.lost,
            "duplicated": r.duplicated,
            "corrupt": r.corrupt,
            "last_member_ms": {
                "p50": finite_or_null(v.p50_ms),
                "p95": finite_or_null(v.p95_ms),
                "max": finite_or_null(v.last_member_ms.iter().copied().fold(0.0, f64::max)),
                "per_round": v.last_member_ms.iter().map(|&x| finite_or_null(x)).collect::<Vec<_>>(),
            },
            "latency_us": lat,
            "pass": v.pass,
            "notes": r.notes,
        }));
        let _ = writeln!(
            s,
            "  {:>8} members: last member has it after p50 {:.2} ms, p95 {:.2} ms; lost {} dup {} -> {}",
            r.members,
            v.p50_ms,
            v.p95_ms,
            r.lost,
            r.duplicated,
            if v.pass { "ok" } else { "OVER" }
        );
    }
    m.insert("steps".into(), json!(steps));
    m.insert("bound_ms".into(), json!(a.bound * 1e3));
    m.insert("max_members_under_bound".into(), json!(best));
    m.insert("lost".into(), json!(lost));
    m.insert("duplicated".into(), json!(dup));
    m.insert("latency_us".into(), json!(all.summary()));
    let _ = writeln!(
        s,
        "  largest room with p95 under {:.0} ms: {}",
        a.bound * 1e3,
        best.map_or("none".to_string(), |b| b.to_string())
    );
    if lost + dup > 0 {
        problems.push(format!("{lost} deliveries lost, {dup} duplicated"));
    }
    connection_problems(&conn, &mut problems);
    if out.stages.is_empty() {
        problems.push("no step completed".into());
    }
    let mut series: Vec<String> = hists.iter().map(|h| h.0.clone()).collect();
    hists.push(("delivery".into(), all));
    hists.push(hist_file(&conn, "handshake"));
    series.truncate(8);
    Report {
        json: m,
        summary: s,
        hists,
        problems,
        plots: vec![
            PlotSpec::Latency {
                name: "latency".into(),
                title: "ladder: delivery latency by room size".into(),
                series,
            },
            PlotSpec::Ladder {
                name: "ladder".into(),
                points,
                bound_ms: a.bound * 1e3,
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::RoundStat;

    #[test]
    fn quantiles_of_rounds() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(small_quantile(&v, 0.5), 3.0);
        assert_eq!(small_quantile(&v, 0.95), 5.0);
        assert!(small_quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn ladder_step_verdicts() {
        let mut r = StageResult {
            members: 10,
            ..Default::default()
        };
        r.rounds = (0..20)
            .map(|i| RoundStat {
                sent_ns: 1,
                received: 10,
                max_latency_ns: (i + 1) * 1_000_000,
            })
            .collect();
        let v = ladder_step(&r, 0.250);
        assert!(v.pass);
        assert_eq!(v.p95_ms, 19.0);
        assert!(!ladder_step(&r, 0.010).pass);
        // One member missing one round: that round never completed -> infinite, step fails.
        r.rounds[3].received = 9;
        r.lost = 1;
        let v = ladder_step(&r, 0.250);
        assert!(v.last_member_ms[3].is_infinite());
        assert!(!v.pass);
    }
}
