//! A subscriber connection without a client library: RESP2 commands out, and a sans-IO reader
//! for what comes back (arrays of bulk strings, integers, simple strings, errors). Partial input
//! stays buffered, so a read that times out loses nothing (a general-purpose client cannot
//! assume that of a reply, which is why the subscriber does not use one).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One parsed RESP value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Resp>),
}

/// Parses one value from the front of `buf`: the value and the bytes it took, or None if
/// incomplete. Malformed input is an error.
pub fn parse(buf: &[u8]) -> io::Result<Option<(Resp, usize)>> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let (tag, line) = (buf.first().copied(), &buf[1..line_end]);
    let after = line_end + 2;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed RESP from redis");
    let int = || -> io::Result<i64> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)
    };
    match tag {
        Some(b'+') => Ok(Some((Resp::Simple(line.to_vec()), after))),
        Some(b'-') => Ok(Some((Resp::Error(line.to_vec()), after))),
        Some(b':') => Ok(Some((Resp::Int(int()?), after))),
        Some(b'$') => {
            let n = int()?;
            if n < 0 {
                return Ok(Some((Resp::Bulk(None), after)));
            }
            let n = n as usize;
            if buf.len() < after + n + 2 {
                return Ok(None);
            }
            Ok(Some((
                Resp::Bulk(Some(buf[after..after + n].to_vec())),
                after + n + 2,
            )))
        }
        Some(b'*') => {
            let n = int()?;
            let mut items = Vec::with_capacity(n.max(0) as usize);
            let mut at = after;
            for _ in 0..n.max(0) {
                match parse(&buf[at..])? {
                    Some((v, used)) => {
                        items.push(v);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Resp::Array(items), at)))
        }
        _ => Err(bad()),
    }
}

/// `%XX` escapes in a URL's user or password.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|&c| hex(c)),
            b.get(i + 2).and_then(|&c| hex(c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `(channel, payload)` of a pushed `message` or `smessage`.
pub fn message(v: &Resp) -> Option<(&[u8], &[u8])> {
    let Resp::Array(items) = v else { return None };
    match items.as_slice() {
        [Resp::Bulk(Some(kind)), Resp::Bulk(Some(ch)), Resp::Bulk(Some(payload))]
            if kind == b"message" || kind == b"smessage" =>
        {
            Some((ch, payload))
        }
        _ => None,
    }
}

/// A connection in pub/sub mode.
pub struct SubConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl SubConn {
    /// Connects to `redis://[[user]:password@]host:port[/db]` and authenticates.
    pub fn connect(url: &str, read_timeout: Duration) -> io::Result<SubConn> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| io::Error::other(format!("{url}: expected redis://HOST:PORT")))?;
        let rest = rest.split(['/', '?']).next().unwrap_or(rest);
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        // The port defaults to 6379, as for every Redis client ("host", "[::1]" or "h:p").
        let has_port = match hostport.rsplit_once(':') {
            Some((h, p)) => {
                !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':')
            }
            None => false,
        } && !(hostport.starts_with('[') && hostport.ends_with(']'));
        let target = if has_port {
            hostport.to_string()
        } else {
            format!("{hostport}:6379")
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&target)?
            .next()
            .ok_or_else(|| io::Error::other(format!("{target}: no address")))?;
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(read_timeout))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut c = SubConn {
            stream,
            buf: Vec::new(),
        };
        if let Some(auth) = auth {
            let (user, pass) = auth.split_once(':').unwrap_or(("", auth));
            let (user, pass) = (percent_decode(user), percent_decode(pass));
            let mut cmd = redis::cmd("AUTH");
            if !user.is_empty() {
                cmd.arg(user);
            }
            cmd.arg(pass);
            c.send(&cmd.get_packed_command())?;
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            loop {
                match c.read_value()? {
                    Some(Resp::Error(e)) => {
                        return Err(io::Error::other(format!(
                            "AUTH: {}",
                            String::from_utf8_lossy(&e)
                        )))
                    }
                    Some(_) => break,
                    None if std::time::Instant::now() > deadline => {
                        return Err(io::Error::other("AUTH: no answer"))
                    }
                    None => {}
                }
            }
        }
        Ok(c)
    }

    pub fn send(&mut self, packed: &[u8]) -> io::Result<()> {
        self.stream.write_all(packed)
    }

    /// The next value, or None if none arrived within the read timeout.
    pub fn read_value(&mut self) -> io::Result<Option<Resp>> {
        loop {
            if let Some((v, used)) = parse(&self.buf)? {
                self.buf.drain(..used);
                if let Resp::Error(e) = &v {
                    // A refused (S)SUBSCRIBE, a MOVED slot: start over with a fresh topology.
                    return Err(io::Error::other(format!(
                        "redis: {}",
                        String::from_utf8_lossy(e)
                    )));
                }
                return Ok(Some(v));
            }
            let mut tmp = [0u8; 64 * 1024];
            match self.stream.read(&mut tmp) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pushes_across_any_split() {
        let wire = b"*3\r\n$7\r\nmessage\r\n$3\r\nabc\r\n$5\r\nhe\r\nl\r\n:7\r\n+PONG\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:1\r\n";
        for cut in 0..wire.len() {
            let mut buf = wire[..cut].to_vec();
            let mut got = Vec::new();
            let mut rest = &wire[cut..];
            loop {
                while let Some((v, used)) = parse(&buf).unwrap() {
                    buf.drain(..used);
                    got.push(v);
                }
                if rest.is_empty() {
                    break;
                }
                buf.push(rest[0]);
                rest = &rest[1..];
            }
            assert_eq!(got.len(), 4, "cut {cut}");
            assert_eq!(message(&got[0]), Some((&b"abc"[..], &b"he\r\nl"[..])));
            assert_eq!(got[1], Resp::Int(7));
            assert_eq!(
                message(&got[3]),
                None,
                "a subscribe confirmation is no message"
            );
        }
        assert!(parse(b"?what\r\n").is_err());
    }
}
