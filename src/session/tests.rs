//! The session without sockets: every path by hand, then random frame sequences cut at random
//! byte positions against a reference interpreter that reads the RFC's rules off whole frames.
//!
//! `MEGASOCK_PROPERTY_CASES` sets the number of random cases (default 20,000; CI runs
//! 1,000,000 in release mode: `scripts/test.sh`).

use super::*;
use crate::codec::{CLOSE_GOING_AWAY, CLOSE_POLICY};

const MAX: usize = 1024;

fn limits() -> Limits {
    Limits {
        max_message: MAX,
        handshake: 100,
        ping: 300,
        idle: 750,
        close: 20,
        drain_until: None,
    }
}

/// What the session asked of its host, normalized so that a reference model can predict it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Upgraded(String),
    Message(Kind, Vec<u8>),
    Pong(Vec<u8>),
    Ping,
    Close(Option<u16>),
    Http(Vec<u8>),
    BeforeClose,
    Ended(Disconnect),
    Status(u16),
}

#[derive(Default)]
struct Rec(Vec<Ev>);

impl Host for Rec {
    fn upgraded(&mut self, route: Route<'_>) {
        self.0.push(Ev::Upgraded(match route {
            Route::Echo => "echo".into(),
            Route::Room(r) => r.into(),
        }));
    }
    fn message(&mut self, kind: Kind, payload: &[u8]) {
        self.0.push(Ev::Message(kind, payload.to_vec()));
    }
    fn send(&mut self, bytes: Bytes) {
        if bytes.starts_with(b"HTTP/") {
            self.0.push(Ev::Http(bytes.to_vec()));
            return;
        }
        // A server frame: unmasked, short (control frames only come this way).
        let (op, len) = (bytes[0] & 0x0f, (bytes[1] & 0x7f) as usize);
        assert_eq!(bytes[1] & 0x80, 0, "server frames are not masked");
        assert_eq!(bytes.len(), 2 + len, "one whole control frame");
        let payload = bytes[2..].to_vec();
        self.0.push(match op {
            0x8 => Ev::Close((len >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))),
            0x9 => Ev::Ping,
            0xA => Ev::Pong(payload),
            _ => panic!("unexpected frame from the session: {bytes:x?}"),
        });
    }
    fn before_close(&mut self) {
        self.0.push(Ev::BeforeClose);
    }
    fn ended(&mut self, why: Disconnect) {
        self.0.push(Ev::Ended(why));
    }
    fn http_status(&mut self, status: u16) {
        self.0.push(Ev::Status(status));
    }
}

const REQUEST: &[u8] = b"GET /ws/lobby HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// A client frame with every field under the caller's control.
fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
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
    match mask {
        Some(k) => {
            v.extend_from_slice(&k);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => v.extend_from_slice(payload),
    }
    v
}

fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    frame(first, payload, Some([0x11, 0x22, 0x33, 0x44]))
}

fn feed(s: &mut Session, bytes: &[u8], rec: &mut Rec) {
    let mut copy = bytes.to_vec();
    s.receive(&mut copy, &limits(), 1, rec);
}

fn open() -> (Session, Rec) {
    let mut s = Session::new(0);
    let mut rec = Rec::default();
    feed(&mut s, REQUEST, &mut rec);
    assert_eq!(s.phase(), Phase::Open);
    rec.0.clear();
    (s, rec)
}

#[test]
fn upgrade_then_frames_in_the_same_read() {
    let mut s = Session::new(0);
    let mut rec = Rec::default();
    let mut bytes = REQUEST.to_vec();
    bytes.extend(masked(0x81, b"hi"));
    feed(&mut s, &bytes, &mut rec);
    assert!(
        matches!(&rec.0[..], [Ev::Status(101), Ev::Upgraded(r), Ev::Http(_), Ev::Message(Kind::Text, m)]
        if r == "lobby" && m == b"hi")
    );
    assert_eq!(s.buffered_capacity(), 0, "nothing kept between frames");
}

#[test]
fn request_head_one_byte_at_a_time_is_searched_once() {
    let mut s = Session::new(0);
    let mut rec = Rec::default();
    for b in REQUEST {
        assert!(rec.0.is_empty(), "upgraded before the head was complete");
        feed(&mut s, std::slice::from_ref(b), &mut rec);
    }
    assert_eq!(s.phase(), Phase::Open);
    // Resuming: the scan position moves with the bytes, so a search never restarts at 0.
    let head = REQUEST;
    let mut from = 0;
    for end in 1..head.len() {
        assert_eq!(head_end(&head[..end], from), None, "{end}");
        from = end;
    }
    assert_eq!(head_end(head, from), Some(head.len()));
    assert_eq!(head_end(b"GET / HTTP/1.1\nHost: x\n\nrest", 0), Some(24));
}

#[test]
fn head_over_8_kib_without_its_end_is_431() {
    let mut s = Session::new(0);
    let mut rec = Rec::default();
    let mut head = b"GET /echo HTTP/1.1\r\nX: ".to_vec();
    head.resize(9000, b'a');
    for piece in head.chunks(1000) {
        feed(&mut s, piece, &mut rec);
    }
    assert_eq!(rec.0[0], Ev::Status(431));
    assert_eq!(s.phase(), Phase::Lingering);
}

#[test]
fn oversized_frame_fails_at_its_header_and_nothing_after_is_read() {
    let (mut s, mut rec) = open();
    let mut bytes = frame(0x82, &vec![0u8; MAX + 1], Some([1, 2, 3, 4]));
    bytes.extend(masked(0x88, &1000u16.to_be_bytes())); // a close after it: never read
    bytes.extend(masked(0x89, b"ping"));
    // Only the header and a few payload bytes have arrived: the verdict is already in.
    feed(&mut s, &bytes[..20], &mut rec);
    assert_eq!(
        rec.0,
        vec![
            Ev::BeforeClose,
            Ev::Ended(Disconnect::MessageTooBig),
            Ev::Close(Some(1009))
        ]
    );
    assert_eq!(s.phase(), Phase::Lingering);
    feed(&mut s, &bytes[20..], &mut rec);
    assert_eq!(rec.0.len(), 3, "input after a failure is discarded unread");
    assert_eq!(s.buffered_capacity(), 0);
}

#[test]
fn fragments_crossing_the_limit_fail_1009() {
    let (mut s, mut rec) = open();
    let part = vec![b'x'; MAX / 2];
    let mut bytes = masked(0x02, &part);
    bytes.extend(masked(0x00, &part));
    bytes.extend(masked(0x80, b"one byte too many"));
    feed(&mut s, &bytes, &mut rec);
    assert_eq!(rec.0.last(), Some(&Ev::Close(Some(1009))));
}

#[test]
fn a_partial_frame_keeps_only_what_arrived() {
    let (mut s, mut rec) = open();
    let big = frame(0x82, &vec![7u8; MAX], Some([9, 9, 9, 9]));
    feed(&mut s, &big[..14], &mut rec); // a header announcing 1 KiB, and 6 payload bytes
    assert!(
        s.buffered_capacity() < 64,
        "stash sized by the header's promise: {}",
        s.buffered_capacity()
    );
    feed(&mut s, &big[14..], &mut rec);
    assert_eq!(rec.0, vec![Ev::Message(Kind::Binary, vec![7u8; MAX])]);
    assert_eq!(s.buffered_capacity(), 0);
}

#[test]
fn one_close_frame_whatever_follows() {
    // A violation, then the client's own close and garbage: one close frame, 1002.
    let (mut s, mut rec) = open();
    let mut bytes = frame(0x81, b"unmasked", None);
    bytes.extend(masked(0x88, &1000u16.to_be_bytes()));
    bytes.extend([0xff; 64]);
    feed(&mut s, &bytes, &mut rec);
    let closes = rec.0.iter().filter(|e| matches!(e, Ev::Close(_))).count();
    assert_eq!(closes, 1);
    assert_eq!(rec.0.last(), Some(&Ev::Close(Some(1002))));

    // The server closes (slow consumer); a bad frame from the client then is no reason for a
    // second close frame, and neither is its close.
    let (mut s, mut rec) = open();
    assert!(s.close(CLOSE_POLICY, "slow consumer", 5).is_some());
    assert!(
        s.close(CLOSE_GOING_AWAY, "again", 6).is_none(),
        "never two closes"
    );
    feed(&mut s, &masked(0x81, b"late data"), &mut rec);
    assert!(rec.0.is_empty(), "data after our close is discarded");
    feed(&mut s, &frame(0x81, b"unmasked", None), &mut rec);
    assert!(rec.0.is_empty());
    assert_eq!(s.phase(), Phase::Lingering);

    // Server close, then the client's answer completes the handshake without a reply.
    let (mut s, mut rec) = open();
    assert!(s.close(CLOSE_GOING_AWAY, "bye", 5).is_some());
    feed(&mut s, &masked(0x88, &1001u16.to_be_bytes()), &mut rec);
    assert!(rec.0.is_empty());
    assert_eq!(s.phase(), Phase::Lingering);
    assert_eq!(s.on_flushed(), AfterFlush::ShutdownWrite);
    assert_eq!(s.on_flushed(), AfterFlush::Nothing, "FIN once");
}

#[test]
fn client_close_is_echoed_including_iana_codes() {
    for code in [1000u16, 1001, 1012, 1013, 1014, 4321] {
        let (mut s, mut rec) = open();
        feed(&mut s, &masked(0x88, &code.to_be_bytes()), &mut rec);
        assert_eq!(
            rec.0,
            vec![
                Ev::BeforeClose,
                Ev::Ended(Disconnect::ClientClose),
                Ev::Close(Some(code))
            ],
            "{code}"
        );
    }
    let (mut s, mut rec) = open();
    feed(&mut s, &masked(0x88, &1015u16.to_be_bytes()), &mut rec);
    assert_eq!(rec.0.last(), Some(&Ev::Close(Some(1002))));
}

#[test]
fn eof_then_flush_drops_and_handshake_eof_drops_at_once() {
    let (mut s, mut rec) = open();
    assert_eq!(s.eof(10, &limits(), &mut rec), Due::At(10 + limits().close));
    assert_eq!(
        rec.0,
        vec![Ev::BeforeClose, Ev::Ended(Disconnect::PeerGone)]
    );
    assert_eq!(s.on_flushed(), AfterFlush::Drop);

    let mut s = Session::new(0);
    let mut rec = Rec::default();
    assert_eq!(s.eof(1, &limits(), &mut rec), Due::Drop);
    assert_eq!(rec.0, vec![Ev::Ended(Disconnect::PeerGone)]);
}

#[test]
fn timers_ping_then_close_idle_connections() {
    let lim = limits();
    let (mut s, mut rec) = open(); // heard at tick 1
    assert_eq!(s.deadline(&lim), 1 + lim.ping);
    assert_eq!(
        s.on_timer(1 + lim.ping, false, &lim, &mut rec),
        Due::At(1 + 2 * lim.ping)
    );
    assert_eq!(rec.0, vec![Ev::Ping]);
    // No pong: at the idle deadline, close 1001 (once).
    let due = s.on_timer(1 + lim.idle, false, &lim, &mut rec);
    assert_eq!(due, Due::At(1 + lim.idle + lim.close));
    assert_eq!(
        &rec.0[1..],
        &[
            Ev::BeforeClose,
            Ev::Ended(Disconnect::IdleTimeout),
            Ev::Close(Some(1001))
        ]
    );
    assert_eq!(
        s.on_timer(1 + lim.idle + lim.close, false, &lim, &mut rec),
        Due::Drop
    );

    // A connection the server itself stopped reading (full ring) is not idle.
    let (mut s, mut rec) = open();
    assert_eq!(
        s.on_timer(1 + lim.idle, true, &lim, &mut rec),
        Due::At(1 + lim.idle + lim.ping)
    );
    assert!(rec.0.is_empty());

    // The handshake has its own deadline.
    let mut s = Session::new(0);
    let mut rec = Rec::default();
    assert_eq!(
        s.on_timer(lim.handshake - 1, false, &lim, &mut rec),
        Due::At(lim.handshake)
    );
    assert_eq!(s.on_timer(lim.handshake, false, &lim, &mut rec), Due::Drop);
    assert_eq!(rec.0, vec![Ev::Ended(Disconnect::HandshakeTimeout)]);
}

#[test]
fn shutdown_closes_open_sessions_and_drops_handshakes() {
    let (mut s, mut rec) = open();
    assert_eq!(s.shutdown(5, &mut rec), None);
    assert_eq!(rec.0.last(), Some(&Ev::Close(Some(1001))));
    let drain = Limits {
        drain_until: Some(500),
        ..limits()
    };
    assert_eq!(
        s.deadline(&drain),
        500,
        "a drain waits longer than --close-timeout"
    );
    let mut s = Session::new(0);
    assert_eq!(s.shutdown(5, &mut Rec::default()), Some(Due::Drop));
}

// ---- the property test ----------------------------------------------------------------------

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (xorshift(&mut self.0) % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// A generated client frame, described the way the reference model reads it.
#[derive(Debug, Clone)]
struct Gen {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    payload: Vec<u8>,
}

impl Gen {
    fn data(opcode: u8, fin: bool, payload: Vec<u8>) -> Gen {
        Gen {
            fin,
            rsv: 0,
            opcode,
            masked: true,
            payload,
        }
    }

    fn bytes(&self, rng: &mut Rng) -> Vec<u8> {
        let first = (self.fin as u8) << 7 | self.rsv << 4 | self.opcode;
        let key = [rng.below(256) as u8, rng.below(256) as u8, 0x5a, 0xa5];
        frame(first, &self.payload, self.masked.then_some(key))
    }
}

fn text_payload(rng: &mut Rng) -> Vec<u8> {
    const PIECES: [&[u8]; 8] = [
        b"hello",
        "\u{fc}ber".as_bytes(),
        "\u{20ac}".as_bytes(),
        "\u{1d11e}".as_bytes(),
        b" ",
        &[0xff],             // never valid
        &[0xed, 0xa0, 0x80], // a surrogate
        &[0xe2, 0x82],       // a character cut short
    ];
    let mut v = Vec::new();
    for _ in 0..rng.below(5) {
        let pick = if rng.chance(85) {
            rng.below(5)
        } else {
            5 + rng.below(3)
        };
        v.extend_from_slice(PIECES[pick]);
    }
    v
}

fn binary_payload(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(10) {
        0 => 126 + rng.below(300),     // the 16-bit length form
        1 => MAX - 10 + rng.below(20), // around the limit
        _ => rng.below(40),
    };
    (0..len).map(|i| i as u8).collect()
}

/// A message split into 1-3 fragments (cut anywhere, also inside a character).
fn message(rng: &mut Rng, out: &mut Vec<Gen>) {
    let text = rng.chance(50);
    let payload = if text {
        text_payload(rng)
    } else {
        binary_payload(rng)
    };
    let pieces = 1 + rng.below(3);
    let mut cuts: Vec<usize> = (1..pieces).map(|_| rng.below(payload.len() + 1)).collect();
    cuts.sort();
    cuts.push(payload.len());
    let mut start = 0;
    for (i, &end) in cuts.iter().enumerate() {
        let opcode = if i == 0 {
            if text {
                1
            } else {
                2
            }
        } else {
            0
        };
        out.push(Gen::data(
            opcode,
            i + 1 == cuts.len(),
            payload[start..end].to_vec(),
        ));
        start = end;
        if rng.chance(15) {
            out.push(Gen::data(0x9, true, b"mid".to_vec())); // a ping between fragments
        }
    }
}

fn control(rng: &mut Rng) -> Gen {
    match rng.below(8) {
        0..=2 => Gen::data(0x9, true, vec![b'p'; rng.below(126)]),
        3 => Gen::data(0xA, true, vec![]),
        4 => Gen::data(0x8, true, vec![]),
        5 => {
            let codes = [
                1000u16, 1001, 1003, 1012, 1014, 3000, 4999, 999, 1005, 1015, 2000,
            ];
            let mut p = codes[rng.below(codes.len())].to_be_bytes().to_vec();
            p.extend(text_payload(rng).into_iter().take(100));
            Gen::data(0x8, true, p)
        }
        6 => Gen::data(0x8, true, vec![3]),
        _ => Gen::data(0x9, true, vec![0; 126]), // too long for a control frame
    }
}

/// Anything at all in a frame header.
fn wild(rng: &mut Rng) -> Gen {
    let opcodes = [0u8, 1, 2, 3, 7, 8, 9, 10, 11, 15];
    Gen {
        fin: rng.chance(70),
        rsv: if rng.chance(85) {
            0
        } else {
            rng.below(8) as u8
        },
        opcode: opcodes[rng.below(opcodes.len())],
        masked: rng.chance(90),
        payload: if rng.chance(50) {
            text_payload(rng)
        } else {
            binary_payload(rng)
        },
    }
}

fn frames(rng: &mut Rng) -> Vec<Gen> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(6) {
        match rng.below(10) {
            0..=5 => message(rng, &mut out),
            6..=8 => out.push(control(rng)),
            _ => out.push(wild(rng)),
        }
    }
    out
}

/// RFC 6455 read off whole frames, in the simplest possible way: what the session must do.
fn reference(frames: &[Gen]) -> Vec<Ev> {
    let mut ev = vec![
        Ev::Status(101),
        Ev::Upgraded("lobby".into()),
        Ev::Http(Vec::new()), // compared by kind only
    ];
    let fail = |ev: &mut Vec<Ev>, code: u16| {
        ev.push(Ev::BeforeClose);
        ev.push(Ev::Ended(match code {
            1007 => Disconnect::InvalidUtf8,
            1009 => Disconnect::MessageTooBig,
            _ => Disconnect::ProtocolError,
        }));
        ev.push(Ev::Close(Some(code)));
    };
    let mut fragments: Option<(u8, Vec<u8>)> = None;
    for f in frames {
        let control = f.opcode >= 8;
        let len = f.payload.len();
        let in_progress = fragments.as_ref().map_or(0, |(_, d)| d.len());
        let bad_header = f.rsv != 0 || !f.masked || ![0, 1, 2, 8, 9, 10].contains(&f.opcode);
        let verdict = if bad_header || (control && (!f.fin || len > 125)) {
            Some(1002)
        } else if !control && len > MAX - in_progress {
            Some(1009)
        } else if (f.opcode == 0 && fragments.is_none())
            || ((f.opcode == 1 || f.opcode == 2) && fragments.is_some())
        {
            Some(1002)
        } else {
            None
        };
        if let Some(code) = verdict {
            fail(&mut ev, code);
            return ev;
        }
        match f.opcode {
            9 => ev.push(Ev::Pong(f.payload.clone())),
            10 => {}
            8 => {
                let p = &f.payload;
                let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                if p.len() == 1 || code.is_some_and(|c| !codec::close_code_allowed(c)) {
                    fail(&mut ev, 1002);
                } else if p.len() > 2 && std::str::from_utf8(&p[2..]).is_err() {
                    fail(&mut ev, 1007);
                } else {
                    ev.push(Ev::BeforeClose);
                    ev.push(Ev::Ended(Disconnect::ClientClose));
                    ev.push(Ev::Close(code));
                }
                return ev;
            }
            op => {
                let (kind, mut data) = match fragments.take() {
                    Some(prior) => prior,
                    None => (op, Vec::new()),
                };
                data.extend_from_slice(&f.payload);
                // Text fails at the first byte that cannot start valid UTF-8, whole or not.
                if kind == 1 {
                    let bad = match std::str::from_utf8(&data) {
                        Ok(_) => false,
                        Err(e) => e.error_len().is_some() || f.fin,
                    };
                    if bad {
                        fail(&mut ev, 1007);
                        return ev;
                    }
                }
                if f.fin {
                    let k = if kind == 1 { Kind::Text } else { Kind::Binary };
                    ev.push(Ev::Message(k, data));
                } else {
                    fragments = Some((kind, data));
                }
            }
        }
    }
    ev
}

fn normalized(mut ev: Vec<Ev>) -> Vec<Ev> {
    for e in &mut ev {
        if let Ev::Http(b) = e {
            b.clear();
        }
    }
    ev
}

/// Random frame sequences, cut into reads at random places (inside headers, masks,
/// characters), must do exactly what the reference says, and keep the session's promises.
#[test]
fn random_frames_and_splits_match_the_reference() {
    let cases: u64 = std::env::var("MEGASOCK_PROPERTY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let lim = limits();
    let mut stream = Vec::new();
    // How each case ended, so the generator is seen to reach every outcome.
    let mut outcomes = std::collections::BTreeMap::<String, u64>::new();
    for case in 0..cases {
        let gens = frames(&mut rng);
        stream.clear();
        stream.extend_from_slice(REQUEST);
        for g in &gens {
            stream.extend(g.bytes(&mut rng));
        }
        let expected = reference(&gens);

        let mut s = Session::new(0);
        let mut rec = Rec::default();
        let mut at = 0;
        while at < stream.len() {
            let n = match rng.below(4) {
                0 => 1,
                1 => 1 + rng.below(8),
                2 => 1 + rng.below(200),
                _ => stream.len() - at,
            }
            .min(stream.len() - at);
            let mut read = stream[at..at + n].to_vec();
            s.receive(&mut read, &lim, 1, &mut rec);
            at += n;
            assert!(
                s.buffered_capacity() <= 4 * (MAX + 64) + handshake::MAX_HEAD,
                "case {case}: holds {} bytes",
                s.buffered_capacity()
            );
        }
        let got = normalized(rec.0);
        assert_eq!(got, expected, "case {case}: frames {gens:?}");
        let outcome = match got.last() {
            Some(Ev::Close(code)) => format!("close {code:?}"),
            Some(Ev::Message(..)) => "message".into(),
            Some(Ev::Pong(..)) => "pong".into(),
            _ => "other".into(),
        };
        *outcomes.entry(outcome).or_default() += 1;
        // Promises: at most one close frame; an end is reported once, and only on leaving.
        let closes = got.iter().filter(|e| matches!(e, Ev::Close(_))).count();
        let ends = got.iter().filter(|e| matches!(e, Ev::Ended(_))).count();
        assert!(closes <= 1 && ends <= 1, "case {case}");
        assert_eq!(ends == 1, s.phase() == Phase::Lingering, "case {case}");
        if s.phase() == Phase::Lingering {
            assert_eq!(
                s.buffered_capacity(),
                0,
                "case {case}: a finished session holds nothing"
            );
        }
    }
    eprintln!("{cases} cases: {outcomes:?}");
    if cases >= 10_000 {
        for needed in [
            "close Some(1002)",
            "close Some(1007)",
            "close Some(1009)",
            "close Some(1000)",
            "close None",
            "message",
            "pong",
        ] {
            assert!(outcomes.contains_key(needed), "never reached {needed}");
        }
    }
}
