//! The client side of RFC 6455 that the generator needs: URL, upgrade request, response check,
//! masked frame encoding and frame header parsing. tungstenite provides the accept-key
//! derivation and the frame header codec; masking is here (tungstenite's is private).

use std::io::Cursor;
use std::net::{SocketAddr, ToSocketAddrs};
use tungstenite::protocol::frame::coding::OpCode;
use tungstenite::protocol::frame::FrameHeader;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest response head accepted.
pub const MAX_RESPONSE_HEAD: usize = 8192;

#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host` header value
    pub host: String,
    pub path: String,
}

pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = if let Some(r) = url.strip_prefix("ws://") {
        r
    } else if url.starts_with("wss://") {
        return Err(format!("{url}: TLS (wss://) is not supported; use ws://"));
    } else {
        return Err(format!("{url}: the URL must start with ws://"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let with_port = if authority.starts_with('[') {
        if authority.contains("]:") {
            authority.to_string()
        } else {
            format!("{authority}:80")
        }
    } else if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{url}: cannot resolve {with_port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: {with_port} resolves to nothing"))?;
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!("{url}: the path has spaces or control characters"));
    }
    Ok(Target {
        addr,
        host: authority.to_string(),
        path: path.to_string(),
    })
}

/// A fresh Sec-WebSocket-Key: base64 of 16 random bytes (24 characters).
pub fn make_key(r1: u64, r2: u64) -> [u8; 24] {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&r1.to_le_bytes());
    raw[8..].copy_from_slice(&r2.to_le_bytes());
    base64_16(&raw)
}

fn base64_16(raw: &[u8; 16]) -> [u8; 24] {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = [b'='; 24];
    let mut o = 0;
    for chunk in raw.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for k in 0..chars {
            out[o + k] = T[((n >> (18 - 6 * k)) & 63) as usize];
        }
        o += 4;
    }
    out
}

pub fn write_request(t: &Target, key: &[u8; 24], deflate: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(t.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(t.host.as_bytes());
    out.extend_from_slice(
        b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
    );
    out.extend_from_slice(key);
    if deflate {
        // What browsers send: the server may compress, with or without context takeover.
        out.extend_from_slice(
            b"\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        );
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// A 101 the client accepts: its length, and permessage-deflate if the server agreed to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub len: usize,
    pub deflate: Option<Deflate>,
}

/// How the server compresses (RFC 7692 §7.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// `server_no_context_takeover`: every message inflates on its own (one shared inflater
    /// serves every connection); otherwise the connection keeps its inflater.
    pub server_no_context_takeover: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The server answered with another status than 101.
    Status(u16),
    /// Not a valid 101 upgrade response (bad accept key, missing headers, garbage).
    Bad(String),
}

/// Look for a complete response head in `buf`. Ok(None): incomplete, read more.
/// Ok(Some(n)): a valid 101 upgrade of `n` bytes (what follows is already frames).
pub fn parse_response(buf: &[u8], key: &[u8; 24]) -> Result<Option<Accepted>, HandshakeError> {
    let Some(end) = find_head_end(buf) else {
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(HandshakeError::Bad("response head too large".into()));
        }
        // An early status line lets a refusal be classified even if the head never completes.
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end])
        .map_err(|_| HandshakeError::Bad("response head is not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| HandshakeError::Bad(format!("bad status line {status_line:?}")))?;
    if !version.starts_with("HTTP/1.") {
        return Err(HandshakeError::Bad(format!(
            "bad status line {status_line:?}"
        )));
    }
    if code != 101 {
        return Err(HandshakeError::Status(code));
    }
    let (mut upgrade, mut connection, mut accept) = (false, false, false);
    let mut deflate = None;
    let expected = tungstenite::handshake::derive_accept_key(key);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection = value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            let mut params = value.split(';').map(str::trim);
            if params
                .next()
                .is_some_and(|e| e.eq_ignore_ascii_case("permessage-deflate"))
            {
                deflate = Some(Deflate {
                    server_no_context_takeover: params
                        .any(|p| p.eq_ignore_ascii_case("server_no_context_takeover")),
                });
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = value == expected;
            if !accept {
                return Err(HandshakeError::Bad("wrong Sec-WebSocket-Accept".into()));
            }
        }
    }
    if !(upgrade && connection && accept) {
        return Err(HandshakeError::Bad(
            "101 without Upgrade: websocket, Connection: Upgrade and Sec-WebSocket-Accept".into(),
        ));
    }
    Ok(Some(Accepted { len: end, deflate }))
}

/// Index just past the `\r\n\r\n` that ends the head.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Apply (or remove) a WebSocket mask; 8 bytes at a time.
#[inline]
pub fn apply_mask(buf: &mut [u8], m: [u8; 4]) {
    let m8 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8-byte chunk")) ^ m8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so at mask phase 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// Append one final, masked frame to `out`, whose payload is written by `fill` (in clear;
/// it is masked afterwards).
#[inline]
pub fn encode_frame_with(
    out: &mut Vec<u8>,
    opcode: u8,
    len: usize,
    mask: [u8; 4],
    fill: impl FnOnce(&mut [u8]),
) {
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode: OpCode::from(opcode),
        mask: Some(mask),
    };
    header
        .format(len as u64, out)
        .expect("writing a frame header into a Vec cannot fail");
    let start = out.len();
    out.resize(start + len, 0);
    let payload = &mut out[start..];
    fill(payload);
    apply_mask(payload, mask);
}

#[cfg(test)]
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    encode_frame_with(out, opcode, payload.len(), mask, |p| {
        p.copy_from_slice(payload)
    });
}

/// A parsed frame header: where the payload is in the buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameInfo {
    pub fin: bool,
    pub opcode: u8,
    pub masked: bool,
    /// Any reserved bit; `rsv1` alone marks a compressed message (permessage-deflate).
    pub rsv: bool,
    pub rsv1: bool,
    pub header_len: usize,
    pub payload_len: u64,
}

/// Parse the frame header at the start of `buf`. Ok(None): incomplete header.
#[inline]
pub fn parse_frame_header(buf: &[u8]) -> Result<Option<FrameInfo>, String> {
    // The usual server frame (unmasked, RSV clear, known opcode, payload under 126 bytes) has
    // a 2-byte header: decoded here directly; anything else goes to tungstenite's parser.
    if let [b0, b1, ..] = *buf {
        let op = b0 & 0x0f;
        if b0 & 0x70 == 0 && b1 & 0x80 == 0 && b1 < 126 && matches!(op, 0 | 1 | 2 | 8 | 9 | 10) {
            return Ok(Some(FrameInfo {
                fin: b0 & 0x80 != 0,
                opcode: op,
                masked: false,
                rsv: false,
                rsv1: false,
                header_len: 2,
                payload_len: u64::from(b1),
            }));
        }
    }
    parse_frame_header_full(buf)
}

fn parse_frame_header_full(buf: &[u8]) -> Result<Option<FrameInfo>, String> {
    let mut cur = Cursor::new(buf);
    match FrameHeader::parse(&mut cur) {
        Ok(Some((h, len))) => Ok(Some(FrameInfo {
            fin: h.is_final,
            opcode: h.opcode.into(),
            masked: h.mask.is_some(),
            rsv: h.rsv1 || h.rsv2 || h.rsv3,
            rsv1: h.rsv1 && !h.rsv2 && !h.rsv3,
            header_len: cur.position() as usize,
            payload_len: len,
        })),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("bad frame header: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_sample_key() {
        // RFC 6455 §1.3: dGhlIHNhbXBsZSBub25jZQ== -> s3pPLMBiTxaQ9kYGzzhZRbK+xOo=
        let raw = *b"the sample nonce";
        let key = base64_16(&raw);
        assert_eq!(&key, b"dGhlIHNhbXBsZSBub25jZQ==");
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(
            parse_response(resp, &key),
            Ok(Some(Accepted {
                len: resp.len() - 2,
                deflate: None
            }))
        );
        assert_eq!(parse_response(&resp[..40], &key), Ok(None));
        let bad = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAALMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(matches!(
            parse_response(bad, &key),
            Err(HandshakeError::Bad(_))
        ));
        let refused = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n";
        assert_eq!(
            parse_response(refused, &key),
            Err(HandshakeError::Status(503))
        );
    }

    #[test]
    fn urls() {
        let t = parse_url("ws://127.0.0.1:9001/ws/room1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(t.path, "/ws/room1");
        assert_eq!(t.host, "127.0.0.1:9001");
        assert_eq!(parse_url("ws://127.0.0.1").unwrap().path, "/");
        assert_eq!(
            parse_url("ws://[::1]:5/echo").unwrap().addr,
            "[::1]:5".parse().unwrap()
        );
        assert!(parse_url("wss://127.0.0.1/").is_err());
        assert!(parse_url("http://127.0.0.1/").is_err());
        let mut req = Vec::new();
        write_request(&t, &make_key(1, 2), false, &mut req);
        let req = String::from_utf8(req).unwrap();
        assert!(req.starts_with("GET /ws/room1 HTTP/1.1\r\nHost: 127.0.0.1:9001\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
        assert!(!req.contains("Extensions"));
        let mut req = Vec::new();
        write_request(&t, &make_key(1, 2), true, &mut req);
        let req = String::from_utf8(req).unwrap();
        assert!(req.ends_with(
            "\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        ));
    }

    #[test]
    fn response_names_the_agreed_compression() {
        let key = make_key(3, 4);
        let accept = tungstenite::handshake::derive_accept_key(&key);
        let resp = |ext: &str| {
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{ext}\r\n"
            )
        };
        let shared = resp("Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n");
        let got = parse_response(shared.as_bytes(), &key).unwrap().unwrap();
        assert_eq!(
            got.deflate,
            Some(Deflate {
                server_no_context_takeover: true
            })
        );
        let own = resp("Sec-WebSocket-Extensions: permessage-deflate\r\n");
        let got = parse_response(own.as_bytes(), &key).unwrap().unwrap();
        assert_eq!(
            got.deflate,
            Some(Deflate {
                server_no_context_takeover: false
            })
        );
        let none = resp("");
        assert_eq!(
            parse_response(none.as_bytes(), &key)
                .unwrap()
                .unwrap()
                .deflate,
            None
        );
    }

    #[test]
    fn fast_header_path_agrees_with_tungstenite() {
        for b0 in 0..=255u8 {
            for b1 in 0..=255u8 {
                let buf = [b0, b1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                for len in [2, buf.len()] {
                    let fast = parse_frame_header(&buf[..len]);
                    let full = parse_frame_header_full(&buf[..len]);
                    match (fast, full) {
                        (Ok(Some(a)), Ok(Some(b))) => {
                            assert_eq!(
                                (
                                    a.fin,
                                    a.opcode,
                                    a.masked,
                                    a.rsv,
                                    a.header_len,
                                    a.payload_len
                                ),
                                (
                                    b.fin,
                                    b.opcode,
                                    b.masked,
                                    b.rsv,
                                    b.header_len,
                                    b.payload_len
                                ),
                                "{b0:#x} {b1:#x}"
                            );
                        }
                        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
                        (a, b) => panic!("{b0:#x} {b1:#x} len {len}: fast {a:?} full {b:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn masked_frames_round_trip() {
        for len in [0usize, 5, 125, 126, 1000, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut out = Vec::new();
            let mask = [0x12, 0x34, 0x56, 0x78];
            encode_frame(&mut out, OP_BINARY, &payload, mask);
            let fi = parse_frame_header(&out).unwrap().unwrap();
            assert!(fi.fin && fi.masked && !fi.rsv);
            assert_eq!(fi.opcode, OP_BINARY);
            assert_eq!(fi.payload_len as usize, len);
            assert_eq!(fi.header_len + len, out.len());
            let mut body = out[fi.header_len..].to_vec();
            apply_mask(&mut body, mask);
            assert_eq!(body, payload);
            // byte-at-a-time reference
            let mut reference = payload.clone();
            for (i, b) in reference.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            assert_eq!(&out[fi.header_len..], &reference[..]);
            // incomplete headers ask for more
            assert!(parse_frame_header(&out[..1]).unwrap().is_none());
        }
    }
}
