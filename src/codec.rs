//! The WebSocket frame codec: parse and check client frames, unmask them in place, validate
//! text incrementally, and encode server frames once into shared buffers.
//!
//! This module knows RFC 6455 framing and nothing about sockets or connections. Parsing works on
//! a byte slice and returns how far it got, so the caller decides what to keep: the connection
//! layer keeps only a trailing partial frame. Header decoding and close-code classification come
//! from tungstenite; the checks tungstenite leaves to its own state machine (mask, reserved bits,
//! control-frame rules, sizes) are here.

use std::io::Cursor;

use bytes::{BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Longest possible frame header (2 + 8 length bytes + 4 mask bytes).
pub const MAX_HEADER: usize = 14;

/// A close code and the reason the server gives when it fails a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

impl Violation {
    pub const fn protocol(reason: &'static str) -> Violation {
        Violation { code: 1002, reason }
    }
}

pub const CLOSE_PROTOCOL: u16 = 1002;
pub const CLOSE_INVALID_DATA: u16 = 1007;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_NORMAL: u16 = 1000;

/// The kinds of frame a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
    Continuation,
    Close,
    Ping,
    Pong,
}

impl Kind {
    pub fn is_control(self) -> bool {
        matches!(self, Kind::Close | Kind::Ping | Kind::Pong)
    }
}

/// A parsed, checked client frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub fin: bool,
    pub mask: [u8; 4],
    /// Bytes of header (including the mask).
    pub header_len: usize,
    pub payload_len: usize,
    /// RSV1 set: the first frame of a permessage-deflate compressed message (RFC 7692 §6).
    pub compressed: bool,
}

/// Result of looking at the front of a byte buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not even the header is complete.
    NeedMore,
    /// A checked header; the payload may or may not be complete yet.
    Frame(Header),
}

/// Parses and checks the header at the front of `buf`.
///
/// `max_payload` bounds data frames (the caller passes what is left of the message budget), so
/// an oversized frame is refused as soon as its header arrives, before any payload is buffered.
/// `deflate` says the connection negotiated permessage-deflate: RSV1 may then mark the first
/// frame of a message as compressed (RFC 7692 §6), and such a frame may exceed `max_payload`
/// by [`crate::deflate::compressed_bound`]'s slack (incompressible data grows a little; the
/// inflated size is what the bound is about). RSV1 anywhere else, and RSV2/RSV3 always, are
/// protocol errors.
pub fn parse_header(buf: &[u8], max_payload: usize, deflate: bool) -> Result<Parsed, Violation> {
    let mut cur = Cursor::new(buf);
    let (h, len) = match FrameHeader::parse(&mut cur) {
        Ok(Some(v)) => v,
        Ok(None) => return Ok(Parsed::NeedMore),
        Err(_) => return Err(Violation::protocol("reserved opcode")),
    };
    if h.rsv2 || h.rsv3 || (h.rsv1 && !deflate) {
        return Err(Violation::protocol("reserved bits set"));
    }
    let Some(mask) = h.mask else {
        return Err(Violation::protocol("client frames must be masked"));
    };
    let kind = match h.opcode {
        OpCode::Data(Data::Text) => Kind::Text,
        OpCode::Data(Data::Binary) => Kind::Binary,
        OpCode::Data(Data::Continue) => Kind::Continuation,
        OpCode::Control(Control::Close) => Kind::Close,
        OpCode::Control(Control::Ping) => Kind::Ping,
        OpCode::Control(Control::Pong) => Kind::Pong,
        _ => return Err(Violation::protocol("reserved opcode")),
    };
    let compressed = h.rsv1;
    if compressed && !matches!(kind, Kind::Text | Kind::Binary) {
        // RFC 7692 §6.1: only the first frame of a data message carries RSV1.
        return Err(Violation::protocol(
            "RSV1 on a continuation or control frame",
        ));
    }
    let max_payload = if compressed {
        crate::deflate::compressed_bound(max_payload)
    } else {
        max_payload
    };
    if kind.is_control() {
        if !h.is_final {
            return Err(Violation::protocol("fragmented control frame"));
        }
        if len > 125 {
            return Err(Violation::protocol("control frame over 125 bytes"));
        }
    } else if len > max_payload as u64 {
        return Err(Violation {
            code: CLOSE_TOO_BIG,
            reason: "message too big",
        });
    }
    Ok(Parsed::Frame(Header {
        kind,
        fin: h.is_final,
        mask,
        header_len: cur.position() as usize,
        payload_len: len as usize,
        compressed,
    }))
}

/// XORs `buf` with the 4-byte client mask, eight bytes at a time.
#[inline]
pub fn unmask(buf: &mut [u8], m: [u8; 4]) {
    let m8 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ m8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the mask phase is 0 again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// XORs `buf`, which starts `offset` bytes into a payload, with the client mask.
#[inline]
pub fn unmask_from(buf: &mut [u8], m: [u8; 4], offset: usize) {
    let o = offset % 4;
    unmask(
        &mut buf[..],
        [m[o], m[(o + 1) % 4], m[(o + 2) % 4], m[(o + 3) % 4]],
    );
}

/// Validates UTF-8 arriving in pieces of any size (fragments, or a frame's bytes as they come
/// off the socket): an invalid byte is reported in the piece that holds it, and only the up
/// to three bytes of a character split between pieces are kept.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Utf8Stream {
    pending: [u8; 4],
    len: u8,
}

impl Utf8Stream {
    /// Feeds the next piece; false on a definite error.
    pub fn feed(&mut self, mut piece: &[u8]) -> bool {
        // Finish a character split across pieces, one byte at a time (at most 3).
        while self.len > 0 {
            let Some((&b, rest)) = piece.split_first() else {
                return true; // still incomplete; wait for more
            };
            self.pending[self.len as usize] = b;
            self.len += 1;
            piece = rest;
            match simdutf8::compat::from_utf8(&self.pending[..self.len as usize]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_some() || self.len == 4 => {
                    self.len = 0; // the text is invalid; forget the bytes, stay usable
                    return false;
                }
                Err(_) => {}
            }
        }
        match simdutf8::compat::from_utf8(piece) {
            Ok(_) => true,
            Err(e) if e.error_len().is_some() => false,
            Err(e) => {
                // An incomplete character at the end: keep it for the next piece.
                let tail = &piece[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.len = tail.len() as u8;
                true
            }
        }
    }

    /// True if the text so far ends on a character boundary.
    pub fn is_complete(&self) -> bool {
        self.len == 0
    }
}

/// Progress through a text frame whose payload has not fully arrived.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PartialText {
    /// Payload bytes already unmasked in place (and checked).
    pub unmasked: u32,
    /// The UTF-8 state after them.
    pub utf8: Utf8Stream,
}

/// Unmasks and checks the payload bytes of a partial text frame (or text continuation) that
/// arrived since `done`, so invalid UTF-8 fails the connection before the rest arrives.
pub fn check_partial_text(
    available: &mut [u8],
    mask: [u8; 4],
    mut done: PartialText,
) -> Result<PartialText, Violation> {
    let from = done.unmasked as usize;
    unmask_from(&mut available[from..], mask, from);
    if !done.utf8.feed(&available[from..]) {
        return Err(Violation {
            code: CLOSE_INVALID_DATA,
            reason: "text is not valid UTF-8",
        });
    }
    done.unmasked = available.len() as u32;
    Ok(done)
}

/// Checks a close frame's payload. Returns the code to echo (None for an empty payload).
pub fn check_close_payload(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(Violation::protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(Violation::protocol("invalid close code"));
            }
            if simdutf8::basic::from_utf8(&payload[2..]).is_err() {
                return Err(Violation {
                    code: CLOSE_INVALID_DATA,
                    reason: "close reason is not UTF-8",
                });
            }
            Ok(Some(code))
        }
    }
}

/// Close codes a peer may send: the RFC 6455 ones, 1012-1014 from the IANA registry
/// (service restart, try again later, bad gateway), and the 3000-4999 application range.
/// 1004-1006 and 1015 are reserved for local use and never appear on the wire.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Server opcodes (server frames are never masked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OutKind {
    fn opcode(self) -> OpCode {
        match self {
            OutKind::Text => OpCode::Data(Data::Text),
            OutKind::Binary => OpCode::Data(Data::Binary),
            OutKind::Close => OpCode::Control(Control::Close),
            OutKind::Ping => OpCode::Control(Control::Ping),
            OutKind::Pong => OpCode::Control(Control::Pong),
        }
    }
}

fn header_bytes(kind: OutKind, len: usize, rsv1: bool) -> ([u8; MAX_HEADER], usize) {
    let header = FrameHeader {
        is_final: true,
        rsv1,
        rsv2: false,
        rsv3: false,
        opcode: kind.opcode(),
        mask: None,
    };
    let mut out = [0u8; MAX_HEADER];
    let mut w: &mut [u8] = &mut out;
    header
        .format(len as u64, &mut w)
        .expect("an unmasked header fits in 14 bytes");
    let n = MAX_HEADER - w.len();
    (out, n)
}

/// Encodes one unmasked frame into a shared buffer: built once, cloned (a refcount increment)
/// into every recipient's outbox.
pub fn encode(kind: OutKind, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(MAX_HEADER + payload.len());
    encode_into(&mut buf, kind, payload);
    buf.freeze()
}

/// Appends one unmasked frame to `buf` (several frames in one buffer go out in one write).
pub fn encode_into(buf: &mut BytesMut, kind: OutKind, payload: &[u8]) {
    let (hdr, n) = header_bytes(kind, payload.len(), false);
    buf.reserve(n + payload.len());
    buf.put_slice(&hdr[..n]);
    buf.put_slice(payload);
}

/// Appends the header of one unmasked data frame whose payload (`len` bytes) is
/// permessage-deflate compressed: RSV1 set (RFC 7692 §6). The caller appends the payload.
pub fn encode_compressed_header(buf: &mut BytesMut, kind: OutKind, len: usize) {
    let (hdr, n) = header_bytes(kind, len, true);
    buf.put_slice(&hdr[..n]);
}

/// Encodes a close frame with `code` and a short reason.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut payload = [0u8; 125];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    let r = &reason.as_bytes()[..reason.len().min(123)];
    payload[2..2 + r.len()].copy_from_slice(r);
    encode(OutKind::Close, &payload[..2 + r.len()])
}

/// A client frame with every field under the caller's control (for the tests here and in
/// the session).
#[cfg(test)]
pub(crate) fn client_frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut v = vec![first];
    let m = if mask.is_some() { 0x80 } else { 0 };
    if payload.len() < 126 {
        v.push(m | payload.len() as u8);
    } else if payload.len() < 65536 {
        v.push(m | 126);
        v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    } else {
        v.push(m | 127);
        v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    }
    if let Some(k) = mask {
        v.extend_from_slice(&k);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
    } else {
        v.extend_from_slice(payload);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_masked_text_and_unmasks() {
        let key = [1, 2, 3, 4];
        let mut f = client_frame(0x81, b"hello, world!", Some(key));
        let Parsed::Frame(h) = parse_header(&f, 1000, false).unwrap() else {
            panic!("complete header")
        };
        assert_eq!(
            (h.kind, h.fin, h.header_len, h.payload_len),
            (Kind::Text, true, 6, 13)
        );
        let p = &mut f[h.header_len..];
        unmask(p, h.mask);
        assert_eq!(p, b"hello, world!");
    }

    #[test]
    fn partial_header_needs_more() {
        let f = client_frame(0x82, &[0u8; 300], Some([9, 9, 9, 9]));
        for cut in 0..8 {
            assert_eq!(
                parse_header(&f[..cut], 1000, false),
                Ok(Parsed::NeedMore),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn violations_have_the_right_codes() {
        let unmasked = client_frame(0x81, b"x", None);
        assert_eq!(parse_header(&unmasked, 10, false).unwrap_err().code, 1002);
        let rsv = client_frame(0xC1, b"x", Some([0; 4]));
        assert_eq!(parse_header(&rsv, 10, false).unwrap_err().code, 1002);
        let bad_op = client_frame(0x83, b"x", Some([0; 4]));
        assert_eq!(parse_header(&bad_op, 10, false).unwrap_err().code, 1002);
        let frag_ping = client_frame(0x09, b"x", Some([0; 4]));
        assert_eq!(parse_header(&frag_ping, 10, false).unwrap_err().code, 1002);
        let big_ping = client_frame(0x89, &[0; 126], Some([0; 4]));
        assert_eq!(parse_header(&big_ping, 1000, false).unwrap_err().code, 1002);
        let big = client_frame(0x82, &[0; 11], Some([0; 4]));
        assert_eq!(parse_header(&big, 10, false).unwrap_err().code, 1009);
    }

    #[test]
    fn rsv1_marks_a_compressed_first_frame_only_with_deflate() {
        let text = client_frame(0xC1, b"x", Some([0; 4]));
        assert_eq!(parse_header(&text, 10, false).unwrap_err().code, 1002);
        let Parsed::Frame(h) = parse_header(&text, 10, true).unwrap() else {
            panic!("complete header")
        };
        assert!(h.compressed && h.kind == Kind::Text);
        // Never on a continuation or a control frame, negotiated or not.
        for first in [0xC0u8, 0xC9, 0xC8, 0xCA] {
            let f = client_frame(first, b"x", Some([0; 4]));
            let v = parse_header(&f, 10, true).unwrap_err();
            assert_eq!(v.code, 1002, "{first:#x}");
        }
        // RSV2 and RSV3 stay reserved.
        for first in [0xA1u8, 0x91] {
            let f = client_frame(first, b"x", Some([0; 4]));
            assert_eq!(parse_header(&f, 10, true).unwrap_err().code, 1002);
        }
        // A compressed frame may be a little over the inflated bound, not more.
        let slack = crate::deflate::compressed_bound(1000);
        let ok = client_frame(0xC2, &vec![0; slack], Some([0; 4]));
        assert!(parse_header(&ok, 1000, true).is_ok());
        let over = client_frame(0xC2, &vec![0; slack + 1], Some([0; 4]));
        assert_eq!(parse_header(&over, 1000, true).unwrap_err().code, 1009);
        let plain = client_frame(0x82, &[0; 1001], Some([0; 4]));
        assert_eq!(parse_header(&plain, 1000, true).unwrap_err().code, 1009);
    }

    #[test]
    fn partial_text_is_unmasked_once_and_checked_as_it_arrives() {
        let key = [7, 1, 9, 200];
        let text = "h€llo wörld".as_bytes();
        let mut frame = client_frame(0x81, text, Some(key));
        let hl = 6;
        let mut done = PartialText::default();
        for cut in [hl + 1, hl + 2, hl + 5, hl + 9] {
            done = check_partial_text(&mut frame[hl..cut], key, done).unwrap();
            assert_eq!(done.unmasked as usize, cut - hl);
        }
        unmask_from(
            &mut frame[hl + done.unmasked as usize..],
            key,
            done.unmasked as usize,
        );
        assert_eq!(&frame[hl..], text);
        let mut bad = client_frame(0x81, &[b'o', b'k', 0xff, b'x', b'y'], Some(key));
        assert!(check_partial_text(&mut bad[hl..hl + 3], key, PartialText::default()).is_err());
    }

    /// A small deterministic generator, so the randomized tests below repeat exactly.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn utf8_stream_agrees_with_std_on_random_input_and_splits() {
        // Bytes biased toward the interesting ones: ASCII, continuation bytes, lead bytes of
        // every length, and the bytes that make overlongs, surrogates and out-of-range points.
        const PICKS: [u8; 16] = [
            b'a', 0x80, 0x9f, 0xa0, 0xbf, 0xc0, 0xc2, 0xdf, 0xe0, 0xed, 0xef, 0xf0, 0xf4, 0xf5,
            0xff, b' ',
        ];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let len = (xorshift(&mut rng) % 12) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let r = xorshift(&mut rng);
                    if r % 3 == 0 {
                        (r >> 8) as u8
                    } else {
                        PICKS[(r >> 8) as usize % PICKS.len()]
                    }
                })
                .collect();
            let valid = std::str::from_utf8(&bytes).is_ok();
            let mut s = Utf8Stream::default();
            let mut rest = &bytes[..];
            let mut ok = true;
            while !rest.is_empty() {
                let cut = 1 + (xorshift(&mut rng) as usize % rest.len());
                ok &= s.feed(&rest[..cut]);
                rest = &rest[cut..];
            }
            assert_eq!(ok && s.is_complete(), valid, "{bytes:x?}");
        }
    }

    #[test]
    fn header_parser_never_panics_on_random_bytes() {
        let mut rng = 42u64;
        for _ in 0..50_000 {
            let len = (xorshift(&mut rng) % 16) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| xorshift(&mut rng) as u8).collect();
            if let Ok(Parsed::Frame(h)) = parse_header(&bytes, 1 << 20, xorshift(&mut rng) % 2 == 0)
            {
                assert!(h.header_len <= bytes.len() && h.header_len <= MAX_HEADER);
            }
        }
    }

    #[test]
    fn utf8_stream_any_split() {
        let text = "a€b𝄞c ünïcødé".as_bytes();
        // Every way of cutting the text in two, and byte by byte.
        for cut in 0..=text.len() {
            let mut s = Utf8Stream::default();
            assert!(s.feed(&text[..cut]) && s.feed(&text[cut..]), "cut {cut}");
            assert!(s.is_complete());
        }
        let mut s = Utf8Stream::default();
        for b in text {
            assert!(s.feed(std::slice::from_ref(b)));
        }
        assert!(s.is_complete());
        // A truncated character is incomplete; a bad continuation fails in its own piece.
        let mut s = Utf8Stream::default();
        assert!(s.feed(&"€".as_bytes()[..2]));
        assert!(!s.is_complete());
        assert!(!s.feed(b"x"), "E2 82 then x is invalid");
        let mut s = Utf8Stream::default();
        assert!(s.feed(b"ok"));
        assert!(!s.feed(&[0xff]));
        // Surrogates, overlongs and code points past U+10FFFF are invalid even when split.
        for bad in [
            &[0xed, 0xa0, 0x80][..],
            &[0xc0, 0xaf],
            &[0xf4, 0x90, 0x80, 0x80],
        ] {
            let mut s = Utf8Stream::default();
            let ok = s.feed(&bad[..1]) && s.feed(&bad[1..]);
            assert!(!ok, "{bad:x?}");
        }
    }

    #[test]
    fn close_payload_rules() {
        assert_eq!(check_close_payload(b""), Ok(None));
        assert_eq!(check_close_payload(&[3]).unwrap_err().code, 1002);
        assert_eq!(check_close_payload(&1000u16.to_be_bytes()), Ok(Some(1000)));
        assert_eq!(
            check_close_payload(&1005u16.to_be_bytes())
                .unwrap_err()
                .code,
            1002
        );
        assert_eq!(
            check_close_payload(&999u16.to_be_bytes()).unwrap_err().code,
            1002
        );
        assert_eq!(check_close_payload(&4000u16.to_be_bytes()), Ok(Some(4000)));
        for code in [1012u16, 1013, 1014] {
            assert_eq!(check_close_payload(&code.to_be_bytes()), Ok(Some(code)));
        }
        for code in [1004u16, 1006, 1015, 1016, 2999, 5000] {
            assert!(check_close_payload(&code.to_be_bytes()).is_err(), "{code}");
        }
        let mut bad = 1000u16.to_be_bytes().to_vec();
        bad.push(0xff);
        assert_eq!(check_close_payload(&bad).unwrap_err().code, 1007);
    }

    #[test]
    fn encodes_unmasked_frames() {
        assert_eq!(&encode(OutKind::Text, b"hi")[..], &[0x81, 2, b'h', b'i']);
        let big = encode(OutKind::Binary, &[7u8; 70000]);
        assert_eq!(&big[..2], &[0x82, 127]);
        assert_eq!(big.len(), 10 + 70000);
        assert_eq!(
            &encode_close(1008, "slow")[..],
            &[0x88, 6, 0x03, 0xF0, b's', b'l', b'o', b'w']
        );
    }
}
