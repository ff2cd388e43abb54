//! The session without sockets: every path by hand (here), then random frame sequences cut at
//! random byte positions against a reference interpreter (`tests/property.rs`).

mod deflate;
mod property;

mod policy;

use super::parse::head_end;
use super::*;
use crate::codec::{client_frame as frame, CLOSE_GOING_AWAY, CLOSE_POLICY};

const MAX: usize = 1024;

fn limits() -> Limits {
    Limits {
        max_message: MAX,
        handshake: 100,
        ping: 300,
        idle: 750,
        close: 20,
        message_rate: None,
        drain_until: None,
        proxy: false,
        deflate: DeflateConfig::default(),
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

/// The events, and the worker's side of inflating (pool and buffer; failures counted).
#[derive(Default)]
struct Rec(Vec<Ev>, Inflating, Vec<InflateError>);

impl Host for Rec {
    fn inflating(&mut self) -> &mut Inflating {
        &mut self.1
    }
    fn inflate_failed(&mut self, why: InflateError) {
        self.2.push(why);
    }
    fn upgraded(&mut self, route: Route<'_>, _deflate: Option<Agreement>) {
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
fn a_paused_publisher_gets_its_pings_answered_and_nothing_else_moves() {
    let mut bytes = masked(0x81, b"first");
    bytes.extend(masked(0x89, b"p1"));
    bytes.extend(masked(0x82, &[1, 2, 3]));
    bytes.extend(masked(0x8A, b"pong"));
    bytes.extend(masked(0x89, b"p2"));
    bytes.extend(masked(0x88, &1000u16.to_be_bytes()));
    bytes.extend(masked(0x89, b"after the close"));
    for piece in [1, 3, bytes.len()] {
        let (mut s, mut rec) = open();
        for chunk in bytes.chunks(piece) {
            s.receive_held(chunk, &limits(), 2, &mut rec);
        }
        assert_eq!(
            rec.0,
            vec![Ev::Pong(b"p1".to_vec()), Ev::Pong(b"p2".to_vec())],
            "pieces of {piece}: only the pings are answered while paused"
        );
        assert_eq!(
            s.phase(),
            Phase::Open,
            "the close waits for the messages before it"
        );
        rec.0.clear();
        s.receive(&mut [], &limits(), 3, &mut rec);
        assert_eq!(
            rec.0,
            vec![
                Ev::Message(Kind::Text, b"first".to_vec()),
                Ev::Message(Kind::Binary, vec![1, 2, 3]),
                Ev::BeforeClose,
                Ev::Ended(Disconnect::ClientClose),
                Ev::Close(Some(1000)),
            ]
        );
        assert_eq!(s.held(), 0);
    }
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
    // Mid-upgrade: kept, upgraded, and told 1001 at once.
    let mut s = Session::new(0);
    let mut rec = Rec::default();
    assert_eq!(s.shutdown(5, &mut rec), None);
    assert!(rec.0.is_empty());
    feed(&mut s, REQUEST, &mut rec);
    assert!(matches!(
        &rec.0[..],
        [
            Ev::Status(101),
            Ev::Upgraded(_),
            Ev::Http(_),
            Ev::BeforeClose,
            Ev::Ended(Disconnect::Shutdown),
            Ev::Close(Some(1001))
        ]
    ));
    assert_eq!(s.phase(), Phase::Closing);
}

#[test]
fn blank_lines_before_a_head_are_bounded_too() {
    // httparse skips leading blank lines, so each CR LF pair looks like an early end of head:
    // the search must move past it, and 8 KiB of them is a 431 like any long head.
    let mut s = Session::new(0);
    let mut rec = Rec::default();
    for _ in 0..5000 {
        if s.phase() != Phase::Handshake {
            break;
        }
        feed(&mut s, b"\r\n", &mut rec);
    }
    assert_eq!(rec.0.first(), Some(&Ev::Status(431)));
    assert!(
        s.buffered_capacity() <= 16 * 1024,
        "held {}",
        s.buffered_capacity()
    );
    // Blank lines and then a real request still upgrade.
    let mut s = Session::new(0);
    let mut rec = Rec::default();
    feed(&mut s, b"\r\n\r\n", &mut rec);
    feed(&mut s, REQUEST, &mut rec);
    assert_eq!(s.phase(), Phase::Open);
}

#[test]
fn a_paused_publisher_s_ping_behind_a_bad_frame_is_not_answered() {
    for bad in [
        masked(0x81, &[b'o', b'k', 0xff]), // invalid UTF-8
        masked(0x80, b"continuation without a message"),
        frame(0x82, &vec![0u8; MAX + 1], Some([1, 2, 3, 4])), // over the limit
    ] {
        let (mut s, mut rec) = open();
        let mut bytes = masked(0x89, b"before");
        bytes.extend(bad);
        bytes.extend(masked(0x89, b"after"));
        s.receive_held(&bytes, &limits(), 2, &mut rec);
        assert_eq!(
            rec.0,
            vec![Ev::Pong(b"before".to_vec())],
            "only the ping before it"
        );
        rec.0.clear();
        s.receive(&mut [], &limits(), 3, &mut rec);
        assert!(
            matches!(rec.0.last(), Some(Ev::Close(Some(_)))),
            "{:?}",
            rec.0
        );
        assert!(!rec.0.contains(&Ev::Pong(b"after".to_vec())));
    }
}

#[test]
fn blank_lines_and_a_request_in_one_read_upgrade_at_once() {
    for prefix in [&b"\r\n\r\n"[..], b"\n\n", b"\r\n"] {
        let mut s = Session::new(0);
        let mut rec = Rec::default();
        let mut bytes = prefix.to_vec();
        bytes.extend_from_slice(REQUEST);
        feed(&mut s, &bytes, &mut rec);
        assert_eq!(s.phase(), Phase::Open, "{prefix:?}");
    }
    // A PROXY v2 header without --proxy-protocol (its signature starts with a blank line)
    // is a bad request at once, not a wait for the handshake timeout.
    let mut s = Session::new(0);
    let mut rec = Rec::default();
    let mut bytes = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    bytes.extend([203, 0, 113, 7, 10, 0, 0, 1, 0x10, 0x92, 0x1f, 0x90]);
    bytes.extend_from_slice(REQUEST);
    feed(&mut s, &bytes, &mut rec);
    assert_eq!(rec.0.first(), Some(&Ev::Status(400)));
}
