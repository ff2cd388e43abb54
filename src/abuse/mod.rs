//! Limits that keep one client address, or one connection, from taking the box: open
//! connections per address ([`per_ip`], `--max-connections-per-ip`, 503), new connections per
//! address per second ([`handshake_rate`], `--max-handshakes-per-ip`, 429), and messages per
//! connection per second ([`message_rate`], `--max-message-rate`, close 1008).
//!
//! The two per-address tables are shared by every worker (`SO_REUSEPORT` spreads one address
//! over all of them) and touched only when a connection is accepted or dropped; both are
//! bounded (entries leave at zero; the rate table has a fixed size). The message rate is a
//! token bucket kept inside the session, refilled from the clock tick when it reads.
//!
//! An address means the client's IP, from the PROXY protocol header with `--proxy-protocol`;
//! an IPv6 client is counted by its /64, since one host usually has a whole /64 to pick from.

pub mod handshake_rate;
pub mod message_rate;
pub mod per_ip;

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::handshake::Rejection;

/// A client address as the limits count it: an IPv4 address, or an IPv6 /64. IPv4 sits
/// under the prefix `ffff:ffff::/32`, which is multicast space and never a TCP peer, so
/// the two cannot collide.
pub fn ip_key(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => 0xffff_ffff_0000_0000 | u32::from(v4) as u64,
        IpAddr::V6(v6) => (u128::from(v6) >> 64) as u64,
    }
}

/// Which limit refused a connection: one `limit` label of `megasock_limit_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    ConnectionsPerIp,
    HandshakesPerIp,
}

impl Limited {
    pub const ALL: [Limited; 2] = [Limited::ConnectionsPerIp, Limited::HandshakesPerIp];

    pub fn label(self) -> &'static str {
        match self {
            Limited::ConnectionsPerIp => "connections_per_ip",
            Limited::HandshakesPerIp => "handshakes_per_ip",
        }
    }

    /// The HTTP answer.
    pub fn rejection(self) -> Rejection {
        match self {
            Limited::ConnectionsPerIp => Rejection {
                status: 503,
                reason: "too many connections from your address (--max-connections-per-ip); \
                         close some or retry later",
            },
            Limited::HandshakesPerIp => Rejection {
                status: 429,
                reason: "too many new connections from your address this second \
                         (--max-handshakes-per-ip); retry after a second",
            },
        }
    }
}

/// The per-address tables, shared by all workers.
#[derive(Default)]
pub struct Guards {
    pub connections: Option<per_ip::ConnectionsPerIp>,
    pub handshakes: Option<handshake_rate::HandshakeRate>,
}

impl Guards {
    pub fn new(max_connections_per_ip: Option<u32>, max_handshakes_per_ip: Option<u32>) -> Guards {
        Guards {
            connections: max_connections_per_ip.map(per_ip::ConnectionsPerIp::new),
            handshakes: max_handshakes_per_ip.map(handshake_rate::HandshakeRate::new),
        }
    }

    pub fn active(&self) -> bool {
        self.connections.is_some() || self.handshakes.is_some()
    }

    /// A new connection from `key` at `second` (since the server started): counted against
    /// both limits. Ok(true): it holds a connection count, to [`Guards::release`] when it
    /// closes; Ok(false): nothing to release.
    pub fn admit(&self, key: u64, second: u32) -> Result<bool, Limited> {
        if let Some(h) = &self.handshakes {
            if !h.admit(key, second) {
                return Err(Limited::HandshakesPerIp);
            }
        }
        match &self.connections {
            Some(c) if !c.acquire(key) => Err(Limited::ConnectionsPerIp),
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }

    /// A connection counted by [`Guards::admit`] closed.
    pub fn release(&self, key: u64) {
        if let Some(c) = &self.connections {
            c.release(key);
        }
    }

    /// The gauges and counters for /metrics.
    pub fn render<'a>(
        &self,
        stats: impl Iterator<Item = &'a LimitStats> + Clone,
        out: &mut String,
    ) {
        out.push_str(
            "# HELP megasock_limit_rejections_total Connections refused by a per-address limit: \
             connections_per_ip (503), handshakes_per_ip (429).\n",
        );
        out.push_str("# TYPE megasock_limit_rejections_total counter\n");
        for l in Limited::ALL {
            let n: u64 = stats
                .clone()
                .map(|s| s.limited[l as usize].load(Relaxed))
                .sum();
            let _ = writeln!(
                out,
                "megasock_limit_rejections_total{{limit=\"{}\"}} {n}",
                l.label()
            );
        }
        out.push_str(
            "# HELP megasock_ip_table_entries Client addresses holding connections in the \
             --max-connections-per-ip table.\n",
        );
        out.push_str("# TYPE megasock_ip_table_entries gauge\n");
        let entries = self.connections.as_ref().map_or(0, |c| c.entries());
        let _ = writeln!(out, "megasock_ip_table_entries {entries}");
    }
}

/// One worker's per-address refusals, written only by that worker.
#[derive(Default)]
pub struct LimitStats {
    limited: [AtomicU64; Limited::ALL.len()],
}

impl LimitStats {
    pub fn limited(&self, l: Limited) {
        self.limited[l as usize].fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_group_ipv6_by_64_and_never_collide_with_ipv4() {
        let k = |s: &str| ip_key(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(
            k("::ffff:10.1.2.3"),
            k("10.1.2.3"),
            "v4-mapped is the v4 address"
        );
        assert_ne!(k("10.1.2.3"), k("10.1.2.4"));
        assert_eq!(k("127.0.0.2") >> 32, 0xffff_ffff);
    }

    #[test]
    fn admit_checks_the_rate_then_the_count() {
        let g = Guards::new(Some(2), Some(3));
        assert_eq!(g.admit(1, 0), Ok(true));
        assert_eq!(g.admit(1, 0), Ok(true));
        assert_eq!(g.admit(1, 0), Err(Limited::ConnectionsPerIp));
        assert_eq!(g.admit(1, 0), Err(Limited::HandshakesPerIp));
        g.release(1);
        assert_eq!(g.admit(1, 1), Ok(true), "a new second, a freed count");
        assert_eq!(g.admit(2, 1), Ok(true), "another address is served");
        assert_eq!(Guards::new(None, Some(1)).admit(1, 0), Ok(false));
    }
}
