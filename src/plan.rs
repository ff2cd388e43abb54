//! `megasock plan`: what N connections need on this machine (memory, fds, kernel settings,
//! CPU for a message rate) and whether this machine has it.
//!
//! The memory formula is the one `scripts/tune.sh check` uses, so the two agree:
//! - kernel per idle socket: 3907 B of slab (measured) + 216 B epoll watch + 8 B fd slot;
//! - megasock per idle connection: [`MEGASOCK_CONN_BYTES`] (measured, docs/PERFORMANCE.md);
//! - busy: plus one `tcp_rmem` and one `tcp_wmem` minimum per socket (buffers in use).

use std::fmt::Write as _;
use std::path::Path;

use clap::Args;

/// Kernel slab per idle ESTABLISHED socket (TCP, inode, file, dentry), measured.
pub const KERNEL_SOCK_BYTES: u64 = 3907;
/// One epoll registration.
pub const EPOLL_WATCH_BYTES: u64 = 216;
/// One fd-table slot.
pub const FD_SLOT_BYTES: u64 = 8;
/// megasock's own memory per idle connection (RSS growth, measured with
/// `scripts/bench.sh connect`; see docs/PERFORMANCE.md). Kept in step with scripts/tune.sh.
pub const MEGASOCK_CONN_BYTES: u64 = 128;
/// Server CPU per delivered 64-byte message (one recipient), measured in the broadcast
/// benchmark; used to estimate cores for a message rate.
pub const NS_PER_DELIVERY: u64 = 25;
/// Server CPU per idle ping (ping written, pong read, timer re-armed), loopback kernel work
/// included, measured while `scripts/million.sh` held its connections (docs/PERFORMANCE.md).
pub const NS_PER_PING: u64 = 10_300;
/// Connections one process holds under a capped RLIMIT_NOFILE: 8 % below the cap's share
/// for headroom, since SO_REUSEPORT spreads connections by hash, not evenly.
fn per_process_under(cap: u64) -> u64 {
    cap.saturating_sub(256) * 92 / 100
}

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// Connections to plan for.
    #[arg(long, value_name = "N")]
    pub connections: u64,
    /// Messages published per second, across all rooms. [default: 0]
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub message_rate: u64,
    /// Members per room (each message goes to this many connections). [default: 1]
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub room_size: u64,
    /// Payload bytes per message. [default: 64]
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub message_size: u64,
    /// The server's --ping-interval, in seconds (idle connections cost a ping each). [default: 30]
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub ping_interval: u64,
}

/// The figures of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub connections: u64,
    pub kernel_bytes_per_conn: u64,
    pub megasock_bytes_per_conn: u64,
    pub idle_bytes: u64,
    pub busy_bytes: u64,
    pub nofile: u64,
    pub file_max: u64,
    pub epoll_watches: u64,
    pub backlog_sysctl: u64,
    pub deliveries_per_s: u64,
    pub egress_bytes_per_s: u64,
    pub cores: f64,
    /// Idle cost: pings per second and the cores they take.
    pub pings_per_s: u64,
    pub ping_cores: f64,
    /// CPU-seconds to deliver one message to every connection (one room of N).
    pub fanout_all_cpu_s: f64,
}

/// Pure arithmetic: the same formula as `scripts/tune.sh check`.
pub fn compute(a: &PlanArgs, rmem_min: u64, wmem_min: u64) -> Plan {
    let n = a.connections;
    let kernel = KERNEL_SOCK_BYTES + EPOLL_WATCH_BYTES + FD_SLOT_BYTES;
    let idle = n * (kernel + MEGASOCK_CONN_BYTES);
    let busy = idle + n * (rmem_min + wmem_min);
    let nofile = n + n / 10 + 1024;
    let deliveries = a.message_rate * a.room_size;
    let frame = a.message_size + if a.message_size < 126 { 2 } else { 4 };
    Plan {
        connections: n,
        kernel_bytes_per_conn: kernel,
        megasock_bytes_per_conn: MEGASOCK_CONN_BYTES,
        idle_bytes: idle,
        busy_bytes: busy,
        nofile,
        file_max: 2 * nofile,
        epoll_watches: nofile,
        backlog_sysctl: if n > 65536 { 65535 } else { 4096 },
        deliveries_per_s: deliveries,
        egress_bytes_per_s: deliveries * frame,
        cores: (deliveries * NS_PER_DELIVERY) as f64 / 1e9,
        pings_per_s: n / a.ping_interval.max(1),
        ping_cores: (n / a.ping_interval.max(1) * NS_PER_PING) as f64 / 1e9,
        fanout_all_cpu_s: (n * NS_PER_DELIVERY) as f64 / 1e9,
    }
}

fn read_first(path: &Path) -> Option<Vec<u64>> {
    let t = std::fs::read_to_string(path).ok()?;
    Some(
        t.split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect(),
    )
}

fn mem_total(root: &Path) -> Option<u64> {
    let t = std::fs::read_to_string(root.join("proc/meminfo")).ok()?;
    let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Runs `plan` against the machine under `root` (`/` outside tests). Returns the report and
/// whether the machine fits.
pub fn report(a: &PlanArgs, root: &Path) -> (String, bool) {
    let sys = root.join("proc/sys");
    let rmem = read_first(&sys.join("net/ipv4/tcp_rmem")).and_then(|v| v.first().copied());
    let wmem = read_first(&sys.join("net/ipv4/tcp_wmem")).and_then(|v| v.first().copied());
    let p = compute(a, rmem.unwrap_or(4096), wmem.unwrap_or(4096));
    let mem = mem_total(root);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let hard = if root == Path::new("/") {
        rlimit::Resource::NOFILE.get().ok().map(|(_, h)| h)
    } else {
        None
    };
    let mut out = String::new();
    let mut fits = true;
    let _ = writeln!(out, "megasock plan for {} connections", p.connections);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "memory per connection: {} B kernel (socket slab + epoll watch + fd slot) + {} B megasock",
        p.kernel_bytes_per_conn, p.megasock_bytes_per_conn
    );
    let _ = writeln!(
        out,
        "memory idle:   {} B ({})",
        p.idle_bytes,
        gib(p.idle_bytes)
    );
    let _ = writeln!(
        out,
        "memory busy:   {} B ({}) with tcp_rmem min {} + tcp_wmem min {} per socket",
        p.busy_bytes,
        gib(p.busy_bytes),
        rmem.unwrap_or(4096),
        wmem.unwrap_or(4096)
    );
    match mem {
        Some(m) => {
            let ok = m >= p.busy_bytes;
            fits &= ok;
            let _ = writeln!(
                out,
                "memory here:   {} B ({}) -> {}",
                m,
                gib(m),
                if ok { "fits" } else { "DOES NOT FIT" }
            );
        }
        None => {
            let _ = writeln!(out, "memory here:   unknown (no /proc/meminfo)");
        }
    }
    let _ = writeln!(
        out,
        "fds (nofile):  {} (connections + 10% + 1024)",
        p.nofile
    );
    if let Some(h) = hard {
        let ok = h >= p.nofile;
        fits &= ok;
        let _ = writeln!(
            out,
            "fds here:      hard RLIMIT_NOFILE {h} -> {}",
            if ok { "fits" } else { "TOO LOW" }
        );
        if !ok {
            let per = per_process_under(h).max(1);
            let procs = p.connections.div_ceil(per);
            let _ = writeln!(
                out,
                "               without raising it: {procs} processes of {per} connections on one port \
                 (SO_REUSEPORT) joined by a Redis bridge, as scripts/million.sh --connections {} --per-process {per} runs them",
                p.connections
            );
        }
    }
    let _ = writeln!(
        out,
        "idle cpu:      {:.2} cores for {} pings/s (--ping-interval {}s, {} ns per ping measured)",
        p.ping_cores, p.pings_per_s, a.ping_interval, NS_PER_PING
    );
    let _ = writeln!(
        out,
        "one message to all {}: {:.3} CPU-s of fan-out ({} ns per delivery), spread over {} cores",
        p.connections, p.fanout_all_cpu_s, NS_PER_DELIVERY, cores
    );
    if p.deliveries_per_s > 0 {
        let ok = p.cores <= cores;
        fits &= ok;
        let _ = writeln!(
            out,
            "deliveries:    {}/s ({} messages/s x {} members), egress {} B/s",
            p.deliveries_per_s, a.message_rate, a.room_size, p.egress_bytes_per_s
        );
        let _ = writeln!(
            out,
            "cpu:           {:.2} cores at {} ns per delivery; {} here -> {}",
            p.cores,
            NS_PER_DELIVERY,
            cores,
            if ok { "fits" } else { "NOT ENOUGH" }
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "settings needed (scripts/tune.sh apply --connections {} writes them):",
        p.connections
    );
    let settings = [
        ("fs.nr_open", p.nofile),
        ("fs.file-max", p.file_max),
        ("fs.epoll.max_user_watches", p.epoll_watches),
        ("net.core.somaxconn", p.backlog_sysctl),
        ("net.ipv4.tcp_max_syn_backlog", p.backlog_sysctl),
    ];
    for (name, needed) in settings {
        let current =
            read_first(&sys.join(name.replace('.', "/"))).and_then(|v| v.first().copied());
        let ok = current.is_some_and(|c| c >= needed);
        fits &= ok || current.is_none();
        let _ = writeln!(
            out,
            "  {name:<30} >= {needed:<12} now {:<20} {}",
            current.map_or("unknown".to_string(), |c| c.to_string()),
            if ok { "ok" } else { "SHORT" }
        );
    }
    let _ = writeln!(
        out,
        "  {:<30} >= {:<12} (LimitNOFILE in tuning/megasock.service)",
        "nofile", p.nofile
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "verdict: {}",
        if fits {
            "this machine fits"
        } else {
            "this machine does not fit as configured; see above and docs/TUNING.md"
        }
    );
    (out, fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_matches_tune_sh_at_a_million() {
        let a = PlanArgs {
            connections: 1_000_000,
            message_rate: 10,
            room_size: 1000,
            message_size: 64,
            ping_interval: 30,
        };
        let p = compute(&a, 4096, 4096);
        // The figures scripts/tune.sh check prints for the same N (see its test suite).
        assert_eq!(p.idle_bytes, 4_259_000_000);
        assert_eq!(p.busy_bytes, 12_451_000_000);
        assert_eq!(p.nofile, 1_101_024);
        assert_eq!(p.deliveries_per_s, 10_000);
        assert_eq!(p.egress_bytes_per_s, 660_000);
        assert_eq!(p.pings_per_s, 33_333);
        assert!((p.fanout_all_cpu_s - 0.025).abs() < 1e-9);
    }
}
