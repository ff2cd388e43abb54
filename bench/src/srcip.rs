//! Source addresses: parsing `--source-ips` and spreading connections over them.

use std::net::{IpAddr, Ipv4Addr};

/// Most addresses a spec may expand to (a /16 of aliases is already far more than needed).
const MAX_ADDRS: usize = 65_536;

/// Parse a comma-separated list of items, each one of
/// - `A.B.C.D` (one address, IPv4 or IPv6),
/// - `A.B.C.D-E.F.G.H` (an inclusive IPv4 range),
/// - `A.B.C.D-N` (inclusive range where N replaces the last octet),
/// - `A.B.C.D/L` (every host address of an IPv4 prefix; /31 and /32 keep all addresses).
///
/// Duplicates are an error (they would skew the spreading).
pub fn parse(spec: &str) -> Result<Vec<IpAddr>, String> {
    let mut out: Vec<IpAddr> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some((a, b)) = item.split_once('-') {
            let start: Ipv4Addr = a
                .trim()
                .parse()
                .map_err(|_| format!("--source-ips: bad range start {a:?} in {item:?}"))?;
            let b = b.trim();
            let end: Ipv4Addr = if let Ok(ip) = b.parse::<Ipv4Addr>() {
                ip
            } else if let Ok(last) = b.parse::<u8>() {
                let o = start.octets();
                Ipv4Addr::new(o[0], o[1], o[2], last)
            } else {
                return Err(format!("--source-ips: bad range end {b:?} in {item:?}"));
            };
            let (s, e) = (u32::from(start), u32::from(end));
            if e < s {
                return Err(format!(
                    "--source-ips: range {item:?} ends before it starts"
                ));
            }
            if (e - s) as usize >= MAX_ADDRS {
                return Err(format!(
                    "--source-ips: range {item:?} is larger than {MAX_ADDRS} addresses"
                ));
            }
            out.extend((s..=e).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else if let Some((a, l)) = item.split_once('/') {
            let base: Ipv4Addr = a
                .trim()
                .parse()
                .map_err(|_| format!("--source-ips: bad prefix address {a:?}"))?;
            let len: u32 = l
                .trim()
                .parse()
                .ok()
                .filter(|&l| l <= 32)
                .ok_or_else(|| format!("--source-ips: bad prefix length {l:?}"))?;
            if len < 16 {
                return Err(format!(
                    "--source-ips: prefix {item:?} is larger than a /16"
                ));
            }
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let net = u32::from(base) & mask;
            let size = 1u64 << (32 - len);
            let (first, last) = if size > 2 {
                (net + 1, net + size as u32 - 2) // skip network and broadcast addresses
            } else {
                (net, net + size as u32 - 1)
            };
            out.extend((first..=last).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            let ip: IpAddr = item
                .parse()
                .map_err(|_| format!("--source-ips: bad address {item:?}"))?;
            out.push(ip);
        }
        if out.len() > MAX_ADDRS {
            return Err(format!("--source-ips: more than {MAX_ADDRS} addresses"));
        }
    }
    if out.is_empty() {
        return Err("--source-ips: no address given".into());
    }
    let mut sorted = out.clone();
    sorted.sort();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("--source-ips: {} is listed twice", w[0]));
    }
    Ok(out)
}

/// The global index of connection number `local` of worker `worker` out of `workers`:
/// connections are numbered round-robin over the workers so that every worker's connections
/// spread over all source addresses whatever its share.
pub fn global_index(local: u64, worker: usize, workers: usize) -> u64 {
    local * workers as u64 + worker as u64
}

/// Source address for the connection with global index `idx`.
pub fn pick(ips: &[IpAddr], idx: u64) -> Option<IpAddr> {
    if ips.is_empty() {
        None
    } else {
        Some(ips[(idx % ips.len() as u64) as usize])
    }
}

/// Connections one source address must carry when `conns` are spread over `addrs` of them.
pub fn per_address(conns: u64, addrs: usize) -> u64 {
    conns.div_ceil(addrs.max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_ranges_lists_and_prefixes() {
        let r = parse("127.0.0.2-127.0.0.50").unwrap();
        assert_eq!(r.len(), 49);
        assert_eq!(r[0], v4("127.0.0.2"));
        assert_eq!(r[48], v4("127.0.0.50"));
        assert_eq!(parse("127.0.0.2-50").unwrap(), r);
        assert_eq!(parse("10.0.0.255-10.0.1.1").unwrap().len(), 3);
        assert_eq!(
            parse("127.0.0.2, 127.0.0.3").unwrap(),
            vec![v4("127.0.0.2"), v4("127.0.0.3")]
        );
        let p = parse("10.1.2.0/24").unwrap();
        assert_eq!(p.len(), 254);
        assert_eq!(p[0], v4("10.1.2.1"));
        assert_eq!(parse("10.1.2.7/32").unwrap(), vec![v4("10.1.2.7")]);
        assert_eq!(parse("::1").unwrap(), vec![v4("::1")]);
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "",
            "127.0.0.50-127.0.0.2",
            "1.2.3",
            "1.2.3.4-x",
            "1.2.3.4/33",
            "10.0.0.0/8",
            "127.0.0.2,127.0.0.2",
            "127.0.0.2-5,127.0.0.4",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn spreading_is_even_over_addresses_whatever_the_worker_split() {
        let ips = parse("127.0.0.2-127.0.0.50").unwrap();
        // 3 processes x 2 threads = 6 workers with uneven shares of 10,007 connections.
        let workers = 6;
        let total = 10_007u64;
        let mut count: HashMap<IpAddr, u64> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for w in 0..workers {
            for local in 0..crate::util::share(total, w, workers) {
                let g = global_index(local, w, workers);
                assert!(seen.insert(g), "global index {g} used twice");
                *count.entry(pick(&ips, g).unwrap()).or_default() += 1;
            }
        }
        assert_eq!(seen.len() as u64, total);
        assert_eq!(count.len(), ips.len());
        let max = *count.values().max().unwrap();
        let min = *count.values().min().unwrap();
        assert!(max - min <= 1, "uneven spread: min {min} max {max}");
        assert_eq!(max, per_address(total, ips.len()));
        assert_eq!(pick(&[], 5), None);
    }
}
