//! Clocks, limits and /proc readers.

use std::io;

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process on the machine, so a
/// send time written by one process can be subtracted from a receive time in another.
pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CPU time (user + system) consumed by the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time (user + system) consumed by this process, in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock ids used here always exist on Linux,
    // so the call cannot fail (if it did, ts stays zero).
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Raise the soft RLIMIT_NOFILE to the hard limit. Returns (soft, hard) after the change.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit struct for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if rl.rlim_cur < rl.rlim_max {
        let want = libc::rlimit {
            rlim_cur: rl.rlim_max,
            rlim_max: rl.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit; raising the soft limit up to the hard one is allowed
        // for an unprivileged process.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            rl.rlim_cur = rl.rlim_max;
        }
    }
    Ok((rl.rlim_cur, rl.rlim_max))
}

/// net.ipv4.ip_local_port_range as (low, high).
pub fn local_port_range() -> Option<(u32, u32)> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<u32>());
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) if b >= a => Some((a, b)),
        _ => None,
    }
}

/// VmRSS of a process in bytes.
pub fn proc_rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kb(&s, "VmRSS:").map(|kb| kb * 1024)
}

fn parse_status_kb(s: &str, key: &str) -> Option<u64> {
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of a process (all its threads) in nanoseconds, from /proc/PID/stat.
pub fn proc_cpu_ns(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some((utime + stime) * 1_000_000_000 / hz)
}

/// Kernel-wide socket figures.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct KernelMem {
    /// /proc/net/sockstat "TCP: inuse"
    pub tcp_inuse: u64,
    /// /proc/net/sockstat "TCP: alloc"
    pub tcp_alloc: u64,
    /// /proc/net/sockstat "TCP: tw"
    pub tcp_tw: u64,
    /// /proc/net/sockstat "TCP: mem" (pages of socket buffer memory) in bytes
    pub tcp_mem_bytes: u64,
    /// /proc/meminfo Slab in bytes (all kernel slab caches: tcp_sock, inodes, files, epitems...)
    pub slab_bytes: u64,
}

pub fn kernel_mem() -> KernelMem {
    let mut k = KernelMem::default();
    if let Ok(s) = std::fs::read_to_string("/proc/net/sockstat") {
        for line in s.lines() {
            if let Some(rest) = line.strip_prefix("TCP:") {
                let f: Vec<&str> = rest.split_whitespace().collect();
                for pair in f.chunks(2) {
                    if let [name, val] = pair {
                        let v: u64 = val.parse().unwrap_or(0);
                        match *name {
                            "inuse" => k.tcp_inuse = v,
                            "alloc" => k.tcp_alloc = v,
                            "tw" => k.tcp_tw = v,
                            "mem" => k.tcp_mem_bytes = v * page_size(),
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    if let Ok(s) = std::fs::read_to_string("/proc/meminfo") {
        k.slab_bytes = parse_status_kb(&s, "Slab:").unwrap_or(0) * 1024;
    }
    k
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Split `total` items over `parts` workers: worker `k` gets this many (the first ones get
/// one more when it does not divide evenly).
pub fn share(total: u64, k: usize, parts: usize) -> u64 {
    let parts = parts.max(1) as u64;
    let k = k as u64;
    total / parts + u64::from(k < total % parts)
}

/// Small fast PRNG (xorshift64*) for masks and handshake keys. Not cryptographic, which a
/// load generator does not need.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn seeded(salt: u64) -> Rng {
        Rng::new(
            mono_ns()
                ^ (u64::from(std::process::id()) << 32)
                ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_spreads_evenly() {
        for total in [0u64, 1, 7, 100, 1001] {
            for parts in 1..6 {
                let v: Vec<u64> = (0..parts).map(|k| share(total, k, parts)).collect();
                assert_eq!(v.iter().sum::<u64>(), total);
                assert!(v.iter().max().unwrap() - v.iter().min().unwrap() <= 1);
            }
        }
    }

    #[test]
    fn proc_readers_work_on_self() {
        let pid = std::process::id();
        assert!(proc_rss_bytes(pid).unwrap() > 0);
        assert!(proc_cpu_ns(pid).is_some());
        assert!(mono_ns() > 0);
        let k = kernel_mem();
        assert!(k.slab_bytes > 0);
    }
}
