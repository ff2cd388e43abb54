//! Just enough HTTP/1.1 for the admin routes: one request parsed out of a buffer (bounded
//! head, bounded body, `Content-Length` only), and responses with keep-alive.

use std::fmt::Write as _;

/// Largest request head.
pub const MAX_HEAD: usize = 8 * 1024;

/// A complete request, borrowed from the connection's buffer.
pub struct Request<'a> {
    pub method: &'a str,
    /// The path without its query.
    pub path: &'a str,
    pub bearer: Option<&'a [u8]>,
    pub content_type: &'a [u8],
    pub keep_alive: bool,
    pub body: &'a [u8],
}

/// What the front of the buffer holds.
pub enum Parsed<'a> {
    /// Not complete yet.
    Partial,
    /// A request, and the bytes it took (head and body).
    Request(Request<'a>, usize),
    /// Answer this and close.
    Error(Response),
}

/// Parses the request at the front of `buf`; bodies over `max_body(path)` are refused with
/// 413 before they are read.
pub fn parse(buf: &[u8], max_body: impl FnOnce(&str) -> usize) -> Parsed<'_> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Parsed::Partial,
        Ok(_) | Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Error(Response::text(431, "request head too large\n"))
        }
        Err(_) => return Parsed::Error(Response::text(400, "malformed HTTP request\n")),
    };
    let mut length: Option<usize> = None;
    let mut bearer = None;
    let mut content_type: &[u8] = b"";
    let mut close = req.version == Some(0);
    for h in req.headers.iter() {
        let v = h.value.trim_ascii();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(v).ok().and_then(|t| t.parse().ok());
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(prev)) if n == prev => {}
                _ => return Parsed::Error(Response::text(400, "bad Content-Length\n")),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Error(Response::text(
                411,
                "send the body with Content-Length (chunked is not accepted)\n",
            ));
        } else if h.name.eq_ignore_ascii_case("authorization") {
            bearer = v.strip_prefix(b"Bearer ").map(|t| t.trim_ascii());
        } else if h.name.eq_ignore_ascii_case("content-type") {
            content_type = v;
        } else if h.name.eq_ignore_ascii_case("connection") {
            if v.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if v.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        }
    }
    let length = length.unwrap_or(0);
    let path = req.path.unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let max_body = max_body(path);
    if length > max_body {
        return Parsed::Error(Response::text(
            413,
            &format!("body of {length} bytes is over the limit of {max_body}\n"),
        ));
    }
    if buf.len() < head + length {
        return Parsed::Partial;
    }
    Parsed::Request(
        Request {
            method: req.method.unwrap_or(""),
            path,
            bearer,
            content_type,
            keep_alive: !close,
            body: &buf[head..head + length],
        },
        head + length,
    )
}

/// A response to write.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub extra: &'static str,
}

impl Response {
    pub fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            extra: "",
        }
    }

    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: body.into_bytes(),
            extra: "",
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self, keep_alive: bool, out: &mut Vec<u8>) {
        let mut head = String::with_capacity(160);
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: {}\r\n\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            self.extra,
            if keep_alive { "keep-alive" } else { "close" }
        );
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&self.body);
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Compares a presented token with the configured one in time that does not depend on where
/// they differ.
pub fn token_matches(presented: &[u8], expected: &[u8]) -> bool {
    let mut diff = presented.len() ^ expected.len();
    for (i, &e) in expected.iter().enumerate() {
        diff |= (presented.get(i).copied().unwrap_or(0) ^ e) as usize;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_bodies_and_errors() {
        let raw = b"POST /publish/lobby HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Type: text/plain\r\nAuthorization: Bearer s3cret\r\n\r\nhelloGET /next";
        let Parsed::Request(r, used) = parse(raw, |_| 100) else {
            panic!("complete")
        };
        assert_eq!(
            (r.method, r.path, r.body),
            ("POST", "/publish/lobby", &b"hello"[..])
        );
        assert_eq!(r.bearer, Some(&b"s3cret"[..]));
        assert!(r.keep_alive);
        assert_eq!(&raw[used..], b"GET /next");
        assert!(matches!(parse(&raw[..60], |_| 100), Parsed::Partial));
        let Parsed::Error(e) = parse(raw, |_| 4) else {
            panic!("413")
        };
        assert_eq!(e.status, 413);
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(
            parse(chunked, |_| 10),
            Parsed::Error(Response { status: 411, .. })
        ));
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc") && !token_matches(b"ab", b"abc"));
        assert!(!token_matches(b"abcd", b"abc"));
    }
}
