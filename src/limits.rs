//! Operating-system limits the server depends on: the fd limit it raises at start, and the
//! kernel settings that silently cap connections or the accept backlog.
//!
//! Each shortfall becomes one warning that names the setting, its value, what it limits, and
//! the tuning-kit command that fixes it.

use std::path::Path;

/// File descriptors kept out of `--max-connections`: listeners, epoll, eventfds, the metrics
/// endpoint, log files, and the short-lived sockets that get a 503.
pub fn fd_reserve(nofile: u64, workers: usize) -> u64 {
    64 + 8 * workers as u64 + (nofile / 16).min(4096)
}

/// RLIMIT_NOFILE before and after raising the soft limit to the hard one.
#[derive(Debug, Clone, Copy)]
pub struct FdLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft fd limit to the hard limit.
pub fn raise_nofile() -> FdLimit {
    let (soft_before, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    let soft = rlimit::increase_nofile_limit(hard).unwrap_or(soft_before);
    FdLimit {
        soft_before,
        soft,
        hard,
    }
}

/// The connection limit when `--max-connections` is not given.
pub fn default_max_connections(nofile: u64, workers: usize) -> usize {
    nofile.saturating_sub(fd_reserve(nofile, workers)).max(1) as usize
}

fn read_sysctl(root: &Path, name: &str) -> Option<u64> {
    let path = root.join("proc/sys").join(name.replace('.', "/"));
    let text = std::fs::read_to_string(path).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Kernel and process settings that limit `max_connections` or `backlog`, as warnings.
/// `root` is `/` except in tests.
pub fn kernel_warnings(
    root: &Path,
    max_connections: usize,
    backlog: u32,
    fd: FdLimit,
    workers: usize,
) -> Vec<String> {
    let fix = format!("fix: sudo scripts/tune.sh apply --connections {max_connections}");
    let mut out = Vec::new();
    let needed_fds = max_connections as u64 + fd_reserve(fd.soft, workers);
    if fd.soft < needed_fds {
        out.push(format!(
            "RLIMIT_NOFILE is {} (hard limit {}): room for about {} connections, not {max_connections}; \
             raise LimitNOFILE (tuning/megasock.service) or nofile (tuning/limits.d); {fix}",
            fd.soft,
            fd.hard,
            default_max_connections(fd.soft, workers)
        ));
    }
    let checks: [(&str, u64, &str); 5] = [
        (
            "net.core.somaxconn",
            backlog as u64,
            "caps the listen backlog (--backlog)",
        ),
        (
            "net.ipv4.tcp_max_syn_backlog",
            backlog as u64,
            "caps half-open connections per listener",
        ),
        (
            "fs.file-max",
            max_connections as u64,
            "caps open files system-wide",
        ),
        (
            "fs.nr_open",
            max_connections as u64,
            "caps RLIMIT_NOFILE of any process",
        ),
        (
            "fs.epoll.max_user_watches",
            max_connections as u64,
            "caps sockets in epoll for this user",
        ),
    ];
    for (name, needed, what) in checks {
        if let Some(v) = read_sysctl(root, name) {
            if v < needed {
                out.push(format!("{name} is {v}, below {needed}: it {what}; {fix}"));
            }
        }
    }
    out
}

/// The standard `process_*` metrics (resident memory, open and maximum fds, CPU time, start
/// time), read from /proc at scrape time.
pub fn process_metrics(out: &mut String) {
    use std::fmt::Write as _;
    let mut gauge = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    gauge(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        rss_kib * 1024.0,
    );
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    gauge(
        "process_open_fds",
        "gauge",
        "Open file descriptors.",
        fds as f64,
    );
    let max = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft);
    gauge(
        "process_max_fds",
        "gauge",
        "Maximum open file descriptors (RLIMIT_NOFILE soft limit).",
        max as f64,
    );
    // /proc/self/stat: fields after the command name; utime and stime are fields 14 and 15,
    // starttime 22 (clock ticks; since boot).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    gauge(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent, in seconds.",
        (field(14) + field(15)) / hz,
    );
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    gauge(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch, in seconds.",
        boot + field(22) / hz,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_for_each_short_setting() {
        let root = std::env::temp_dir().join(format!("megasock-limits-{}", std::process::id()));
        let sys = root.join("proc/sys");
        std::fs::create_dir_all(sys.join("net/core")).unwrap();
        std::fs::create_dir_all(sys.join("net/ipv4")).unwrap();
        std::fs::create_dir_all(sys.join("fs/epoll")).unwrap();
        std::fs::write(sys.join("net/core/somaxconn"), "128\n").unwrap();
        std::fs::write(sys.join("net/ipv4/tcp_max_syn_backlog"), "8192\n").unwrap();
        std::fs::write(sys.join("fs/file-max"), "9223372036854775807\n").unwrap();
        std::fs::write(sys.join("fs/epoll/max_user_watches"), "1000\n").unwrap();
        let fd = FdLimit {
            soft_before: 1024,
            soft: 1024,
            hard: 1024,
        };
        let w = kernel_warnings(&root, 5000, 4096, fd, 2);
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(w[0].starts_with("RLIMIT_NOFILE is 1024"));
        assert!(w[1].starts_with("net.core.somaxconn is 128"));
        assert!(w[2].starts_with("fs.epoll.max_user_watches is 1000"));
        assert!(w
            .iter()
            .all(|m| m.contains("scripts/tune.sh apply --connections 5000")));
    }
}
