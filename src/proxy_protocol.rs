//! The PROXY protocol (`--proxy-protocol`, versions 1 and 2), so that behind HAProxy's
//! `send-proxy-v2` megasock sees the client's address rather than the proxy's. Every connection
//! must then start with the header; what follows it is the HTTP upgrade as usual.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line (the specification's bound).
const MAX_V1: usize = 107;
/// Longest v2 header accepted: the addresses (at most 216 bytes) and TLVs (TLS details, unique
/// ids, authority...), which are skipped.
const MAX_V2: usize = 16 + 4096;

/// What the front of a connection holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    /// Not all of it yet.
    Incomplete,
    /// A header of this many bytes, naming the client (None: a LOCAL or UNKNOWN connection,
    /// e.g. the proxy's own health check).
    Complete(usize, Option<SocketAddr>),
    /// Not a PROXY header.
    Invalid(&'static str),
}

pub fn parse(buf: &[u8]) -> Header {
    if buf.starts_with(b"PROXY ") && buf.windows(2).any(|w| w == b"\r\n") {
        return v1(buf); // a complete v1 line, however short
    }
    if buf.len() < V2_SIGNATURE.len() {
        let v1 = b"PROXY ".starts_with(&buf[..buf.len().min(6)]);
        let v2 = V2_SIGNATURE.starts_with(buf);
        return if v1 || v2 {
            Header::Incomplete
        } else {
            Header::Invalid("expected a PROXY protocol header (--proxy-protocol is on)")
        };
    }
    if buf.starts_with(V2_SIGNATURE) {
        v2(buf)
    } else if buf.starts_with(b"PROXY ") {
        v1(buf)
    } else {
        Header::Invalid("expected a PROXY protocol header (--proxy-protocol is on)")
    }
}

fn v2(buf: &[u8]) -> Header {
    if buf.len() < 16 {
        return Header::Incomplete;
    }
    let (ver_cmd, family) = (buf[12], buf[13]);
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if ver_cmd >> 4 != 2 || 16 + len > MAX_V2 {
        return Header::Invalid("bad PROXY v2 header");
    }
    if buf.len() < 16 + len {
        return Header::Incomplete;
    }
    let a = &buf[16..16 + len];
    let addr = match (ver_cmd & 0x0f, family >> 4) {
        (0, _) => None, // LOCAL: the proxy itself
        (1, 1) if a.len() >= 12 => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            u16::from_be_bytes([a[8], a[9]]),
        )),
        (1, 2) if a.len() >= 36 => {
            let ip: [u8; 16] = a[..16].try_into().expect("16 bytes");
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(ip)),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        // UNSPEC, AF_UNIX, or an address family we do not read: keep the socket's own.
        (1, _) => None,
        _ => return Header::Invalid("bad PROXY v2 header"),
    };
    Header::Complete(16 + len, addr)
}

fn v1(buf: &[u8]) -> Header {
    let Some(end) = buf.windows(2).take(MAX_V1).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_V1 {
            Header::Invalid("PROXY v1 line too long")
        } else {
            Header::Incomplete
        };
    };
    let Ok(line) = std::str::from_utf8(&buf[6..end]) else {
        return Header::Invalid("bad PROXY v1 header");
    };
    let f: Vec<&str> = line.split(' ').collect();
    let addr = match f.as_slice() {
        ["UNKNOWN", ..] => None,
        [proto @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            match (src.parse::<IpAddr>(), sport.parse::<u16>()) {
                (Ok(ip), Ok(port)) if ip.is_ipv4() == (*proto == "TCP4") => {
                    Some(SocketAddr::new(ip, port))
                }
                _ => return Header::Invalid("bad PROXY v1 header"),
            }
        }
        _ => return Header::Invalid("bad PROXY v1 header"),
    };
    Header::Complete(end + 2, addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_one_and_two() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 8080\r\nGET /";
        let want = Some("203.0.113.7:4242".parse().unwrap());
        assert_eq!(parse(line), Header::Complete(line.len() - 5, want));
        for cut in 0..line.len() - 5 {
            assert_eq!(parse(&line[..cut]), Header::Incomplete, "cut {cut}");
        }
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend([
            0x21, 0x11, 0, 12, 203, 0, 113, 7, 10, 0, 0, 1, 0x10, 0x92, 0x1f, 0x90,
        ]);
        assert_eq!(parse(&v2), Header::Complete(28, want));
        for cut in 0..v2.len() {
            assert_eq!(parse(&v2[..cut]), Header::Incomplete, "cut {cut}");
        }
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Header::Complete(16, None));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Header::Complete(15, None));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Header::Invalid(_)));
        assert!(matches!(
            parse(b"PROXY TCP4 nonsense\r\n"),
            Header::Invalid(_)
        ));
        assert!(matches!(
            parse(b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n"),
            Header::Invalid(_)
        ));
    }
}
