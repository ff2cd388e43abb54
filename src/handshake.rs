//! The HTTP/1.1 upgrade: parse a request head, route it, and produce the 101 response or a
//! clear HTTP error.
//!
//! Parsing is `httparse` on a stack array of headers and allocates nothing. The answers are a
//! contract (tests and clients rely on them):
//! - version other than 13 -> 426 with `Sec-WebSocket-Version: 13` and `Upgrade: websocket`;
//! - malformed request, missing Host, HTTP/1.0, not an upgrade, bad key or room name -> 400;
//! - method other than GET -> 405; unknown path -> 404; head over [`MAX_HEAD`] -> 431;
//! - a `Sec-WebSocket-Extensions` header that breaks RFC 6455 §9.1 syntax -> 400 (a
//!   well-formed permessage-deflate offer the server cannot accept is declined instead: the
//!   connection goes uncompressed, see [`crate::deflate::negotiate`]).
//!
//! Every error response carries `Connection: close`.

use bytes::Bytes;
use tungstenite::handshake::derive_accept_key;

use crate::deflate::{self, Agreement, DeflateConfig};

/// Largest request head accepted (request line + headers + blank line).
pub const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 64;

/// Where an upgraded connection goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/echo`: every message comes back to the sender.
    Echo,
    /// `/ws/{room}`: every message goes to every member of the room.
    Room(&'a str),
}

/// A plain HTTP page on the WebSocket listener (answered, then the connection closes).
#[derive(Debug, PartialEq, Eq)]
pub enum Page<'a> {
    /// `GET /`: the browser demo.
    Demo,
    /// `GET /rooms/{room}`: the room's member count as JSON.
    RoomInfo(&'a str),
}

/// Outcome of looking at the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade<'a> {
    /// The head is not complete yet (and is still under [`MAX_HEAD`]).
    Incomplete,
    /// Answer with this HTTP error and close.
    Reject(Rejection),
    /// Answer with a page and close.
    Page(Page<'a>),
    /// Switch protocols: send `response`, then treat `buf[consumed..]` as frames.
    Accept {
        route: Route<'a>,
        response: Bytes,
        consumed: usize,
        /// permessage-deflate was agreed (the response says so).
        deflate: Option<Agreement>,
    },
}

/// An HTTP error the handshake answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: &'static str,
}

const fn reject(status: u16, reason: &'static str) -> Upgrade<'static> {
    Upgrade::Reject(Rejection { status, reason })
}

/// Looks at the request bytes received so far. `deflate` is what permessage-deflate
/// negotiation may agree to.
pub fn parse<'a>(buf: &'a [u8], deflate: &DeflateConfig) -> Upgrade<'a> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD {
                reject(431, "request head over 8 KiB")
            } else {
                Upgrade::Incomplete
            };
        }
        Err(httparse::Error::TooManyHeaders) => return reject(431, "too many headers"),
        Err(_) => return reject(400, "malformed HTTP request"),
    };
    if consumed > MAX_HEAD {
        return reject(431, "request head over 8 KiB");
    }
    if req.version != Some(1) {
        return reject(400, "HTTP/1.1 is required for a WebSocket upgrade");
    }
    let method = req.method.unwrap_or("");
    let raw_path = req.path.unwrap_or("");
    let path = origin_form(raw_path).split('?').next().unwrap_or("");
    const BAD_ROOM: &str = "room names are 1-128 bytes of A-Za-z0-9._:- and not . or ..";
    let page = if path == "/" {
        Some(Page::Demo)
    } else if let Some(room) = path.strip_prefix("/rooms/") {
        if !valid_room(room) {
            return reject(400, BAD_ROOM);
        }
        Some(Page::RoomInfo(room))
    } else {
        None
    };
    if let Some(page) = page {
        if method != "GET" {
            return reject(405, "only GET is served here");
        }
        return Upgrade::Page(page);
    }
    let route = if path == "/echo" {
        Route::Echo
    } else if let Some(room) = path.strip_prefix("/ws/") {
        if !valid_room(room) {
            return reject(400, BAD_ROOM);
        }
        Route::Room(room)
    } else {
        return reject(404, "unknown path; use /echo or /ws/{room}");
    };
    if method != "GET" {
        return reject(405, "only GET can upgrade to WebSocket");
    }

    let mut host: Option<&[u8]> = None;
    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut version: Option<&[u8]> = None;
    let mut key: Option<&[u8]> = None;
    let mut content_length: Option<&[u8]> = None;
    let mut transfer_encoding = false;
    // A header that must appear once, seen twice: which value counts is ambiguous, and two
    // parsers (a proxy in front, this server) could pick differently. Refuse.
    fn once<'h>(slot: &mut Option<&'h [u8]>, value: &'h [u8]) -> bool {
        slot.replace(trim(value)).is_none()
    }
    for h in req.headers.iter() {
        let name = h.name;
        let unique = if name.eq_ignore_ascii_case("host") {
            once(&mut host, h.value)
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(h.value, b"websocket");
            true
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= has_token(h.value, b"upgrade");
            true
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            once(&mut version, h.value)
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            once(&mut key, h.value)
        } else if name.eq_ignore_ascii_case("content-length") {
            // RFC 9112 6.3: repeated identical lengths may be merged; different ones may not.
            let v = trim(h.value);
            let same = content_length.is_none_or(|c| c == v);
            content_length = Some(v);
            same
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            true
        } else {
            true
        };
        if !unique {
            return reject(400, "duplicate header (Host, Sec-WebSocket-Key, Sec-WebSocket-Version or Content-Length)");
        }
    }
    if transfer_encoding && content_length.is_some() {
        return reject(
            400,
            "both Transfer-Encoding and Content-Length (RFC 9112 6.3)",
        );
    }
    if host.is_none_or(|h| h.is_empty()) {
        return reject(400, "missing or empty Host header");
    }
    if !upgrade || !connection_upgrade {
        return reject(
            400,
            "not a WebSocket upgrade (needs Upgrade: websocket and Connection: Upgrade)",
        );
    }
    match version {
        Some(b"13") => {}
        Some(_) => return reject(426, "only WebSocket version 13 is supported"),
        None => return reject(426, "missing Sec-WebSocket-Version (use 13)"),
    }
    let Some(key) = key.filter(|k| valid_key(k)) else {
        return reject(400, "missing or malformed Sec-WebSocket-Key");
    };
    // Every Sec-WebSocket-Extensions line, in order: their lists concatenate (RFC 6455 §9.1).
    let offers = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|h| h.value);
    let Ok(agreement) = deflate::negotiate(offers, deflate) else {
        return reject(
            400,
            "malformed Sec-WebSocket-Extensions header (RFC 6455 section 9.1 syntax)",
        );
    };
    Upgrade::Accept {
        route,
        response: switching_protocols(key, agreement),
        consumed,
        deflate: agreement,
    }
}

/// The path of a request target: an absolute-form target (`http://host/ws/x`, as some
/// proxies send) is routed by its path, like the origin form (`/ws/x`).
fn origin_form(target: &str) -> &str {
    let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
        .or_else(|| target.strip_prefix("ws://"))
        .or_else(|| target.strip_prefix("wss://"))
    else {
        return target;
    };
    rest.find('/').map_or("/", |i| &rest[i..])
}

/// `1-128 bytes of A-Za-z0-9._:-, not . or ..`, on the raw path (no percent-decoding).
pub fn valid_room(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= 128
        && room != "."
        && room != ".."
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The key is 16 random bytes in base64: 24 characters ending in `==`.
fn valid_key(k: &[u8]) -> bool {
    k.len() == 24
        && k.ends_with(b"==")
        && k[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

/// True if the comma-separated header value contains `token` (case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim(t).eq_ignore_ascii_case(token))
}

fn switching_protocols(key: &[u8], deflate: Option<Agreement>) -> Bytes {
    let accept = derive_accept_key(key);
    let mut out = Vec::with_capacity(if deflate.is_some() { 256 } else { 130 });
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(a) = deflate {
        a.write_response_header(&mut out);
    }
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

/// The full HTTP error response for a rejection.
pub fn error_response(r: Rejection) -> Bytes {
    let title = match r.status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let extra = match r.status {
        426 => "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n",
        405 => "Allow: GET\r\n",
        503 | 429 => "Retry-After: 1\r\n",
        // RFC 6750 3: the scheme a client should answer with.
        401 => "WWW-Authenticate: Bearer realm=\"megasock\"\r\n",
        _ => "",
    };
    let body = format!("{} {}: {}\n", r.status, title, r.reason);
    Bytes::from(format!(
        "HTTP/1.1 {} {}\r\n{}Connection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{}",
        r.status,
        title,
        extra,
        body.len(),
        body
    ))
}

/// A complete `200 OK` response that closes the connection.
pub fn ok_response(content_type: &str, body: &[u8]) -> Bytes {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nCache-Control: no-store\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// The answer when the server is at `--max-connections`.
pub fn over_capacity() -> Bytes {
    error_response(Rejection {
        status: 503,
        reason: "server at its connection limit, retry later",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /ws/lobby HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    fn status(req: &str) -> u16 {
        match parse(req.as_bytes(), &DeflateConfig::default()) {
            Upgrade::Reject(r) => r.status,
            Upgrade::Page(_) => 200,
            Upgrade::Accept { .. } => 101,
            Upgrade::Incomplete => 0,
        }
    }

    #[test]
    fn accepts_rfc_example_key() {
        let Upgrade::Accept {
            route,
            response,
            consumed,
            deflate,
        } = parse(GOOD.as_bytes(), &DeflateConfig::default())
        else {
            panic!("should accept")
        };
        assert_eq!(route, Route::Room("lobby"));
        assert_eq!(consumed, GOOD.len());
        let text = std::str::from_utf8(&response).unwrap();
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        assert_eq!(deflate, None, "nothing offered, nothing agreed");
        assert!(!text.contains("Extensions"));
    }

    /// The 101 for `GOOD` plus these extra header lines.
    fn upgrade_with(extra: &str, cfg: &DeflateConfig) -> Result<(String, Option<Agreement>), u16> {
        let req = GOOD.replace("\r\n\r\n", &format!("\r\n{extra}\r\n\r\n"));
        match parse(req.as_bytes(), cfg) {
            Upgrade::Accept {
                response, deflate, ..
            } => Ok((String::from_utf8(response.to_vec()).unwrap(), deflate)),
            Upgrade::Reject(r) => Err(r.status),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn permessage_deflate_is_negotiated_in_the_101() {
        let on = DeflateConfig::default();
        let (text, agreed) = upgrade_with(
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
            &on,
        )
        .unwrap();
        assert!(agreed.is_some());
        assert!(
            text.ends_with(
                "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
                 client_no_context_takeover\r\n\r\n"
            ),
            "{text}"
        );
        // Offers spread over two header lines: the first acceptable one wins.
        let (text, agreed) = upgrade_with(
            "Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10",
            &on,
        )
        .unwrap();
        assert_eq!(agreed.unwrap().server_max_window_bits(), 10);
        assert!(text.contains("; server_max_window_bits=10\r\n"), "{text}");
        // A bad offer is declined, not fatal.
        let (text, agreed) = upgrade_with(
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=16",
            &on,
        )
        .unwrap();
        assert_eq!(agreed, None);
        assert!(!text.contains("Extensions"), "{text}");
        // A header that breaks the grammar is a 400.
        assert_eq!(
            upgrade_with("Sec-WebSocket-Extensions: permessage-deflate;;", &on),
            Err(400)
        );
        // Off: offers are not even read.
        let off = DeflateConfig {
            enabled: false,
            ..on
        };
        let (text, agreed) =
            upgrade_with("Sec-WebSocket-Extensions: permessage-deflate;;", &off).unwrap();
        assert_eq!(agreed, None);
        assert!(!text.contains("Extensions"));
    }

    #[test]
    fn errors() {
        assert_eq!(status(&GOOD.replace("/ws/lobby", "/nope")), 404);
        assert_eq!(status(&GOOD.replace("/ws/lobby", "/ws/..")), 400);
        assert_eq!(status(&GOOD.replace("/ws/lobby", "/ws/a%20b")), 400);
        assert_eq!(status(&GOOD.replace("/ws/lobby", "/ws/a/b")), 400);
        assert_eq!(status(&GOOD.replace("HTTP/1.1", "HTTP/1.0")), 400);
        assert_eq!(status(&GOOD.replace("Host: x\r\n", "")), 400);
        assert_eq!(status(&GOOD.replace("Version: 13", "Version: 8")), 426);
        assert_eq!(status(&GOOD.replace("Upgrade: websocket\r\n", "")), 400);
        assert_eq!(status(&GOOD.replace("GET", "POST")), 405);
        assert_eq!(status("GARBAGE\r\n\r\n"), 400);
        assert_eq!(status("GET /echo HTTP/1.1\r\nHost: x\r\n"), 0);
        let huge = format!("GET /echo HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert_eq!(status(&huge), 431);
    }

    #[test]
    fn ambiguous_heads_are_refused() {
        let dup = |h: &str| GOOD.replace("\r\n\r\n", &format!("\r\n{h}\r\n\r\n"));
        assert_eq!(status(&dup("Host: y")), 400);
        assert_eq!(
            status(&dup("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")),
            400
        );
        assert_eq!(status(&dup("Sec-WebSocket-Version: 13")), 400);
        assert_eq!(status(&GOOD.replace("Host: x", "Host: ")), 400);
        assert_eq!(
            status(&dup("Content-Length: 0\r\nTransfer-Encoding: chunked")),
            400
        );
        assert_eq!(status(&dup("Content-Length: 0\r\nContent-Length: 5")), 400);
        assert_eq!(status(&dup("Content-Length: 0\r\nContent-Length: 0")), 101);
        assert_eq!(status(&dup("X-Other: 1\r\nX-Other: 2")), 101);
    }

    #[test]
    fn absolute_form_targets_route_by_path() {
        for target in ["http://example.com/ws/lobby", "ws://h:8080/ws/lobby?x=1"] {
            let req = GOOD.replace("/ws/lobby", target);
            let Upgrade::Accept { route, .. } = parse(req.as_bytes(), &DeflateConfig::default())
            else {
                panic!("{target} should upgrade")
            };
            assert_eq!(route, Route::Room("lobby"));
        }
        assert_eq!(
            status(&GOOD.replace("/ws/lobby", "http://example.com/nope")),
            404
        );
        assert_eq!(
            status(&GOOD.replace("/ws/lobby", "http://example.com")),
            200,
            "the demo page"
        );
    }
}
