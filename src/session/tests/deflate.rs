//! permessage-deflate through the session: negotiation at the upgrade, then compressed
//! messages (whole, fragmented, split across reads), and every way one can fail.

use super::*;
use crate::deflate::reference::zip_bomb;
use crate::deflate::Compressor;

/// The upgrade request with a permessage-deflate offer, as browsers send it.
fn request_with(extensions: &str) -> Vec<u8> {
    let head = std::str::from_utf8(REQUEST).unwrap();
    head.replace(
        "\r\n\r\n",
        &format!("\r\nSec-WebSocket-Extensions: {extensions}\r\n\r\n"),
    )
    .into_bytes()
}

const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// An open session that negotiated permessage-deflate under `lim`.
fn open_deflate(lim: &Limits, offer: &str) -> (Session, Rec) {
    let mut s = Session::new(0);
    let mut rec = Rec::default();
    s.receive(&mut request_with(offer), lim, 1, &mut rec);
    assert_eq!(s.phase(), Phase::Open);
    let Ev::Http(response) = &rec.0[2] else {
        panic!("{:?}", rec.0)
    };
    let response = String::from_utf8(response.clone()).unwrap();
    assert!(
        response.contains("\r\nSec-WebSocket-Extensions: permessage-deflate; "),
        "{response}"
    );
    assert!(s.deflate().is_some());
    rec.0.clear();
    (s, rec)
}

fn feed_with(s: &mut Session, bytes: &[u8], lim: &Limits, rec: &mut Rec) {
    let mut copy = bytes.to_vec();
    s.receive(&mut copy, lim, 1, rec);
}

fn compress(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Compressor::new(6).compress(msg, 15, &mut out).unwrap();
    out
}

fn chat(n: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < n {
        s.push_str(&format!(
            r#"{{"id":{i},"user":"ann","text":"hello hello"}},"#
        ));
        i += 1;
    }
    s.truncate(n);
    s.into_bytes()
}

#[test]
fn compressed_text_and_binary_are_inflated() {
    let lim = limits();
    let (mut s, mut rec) = open_deflate(&lim, OFFER);
    let text = chat(900);
    let binary: Vec<u8> = (0..1000u32).map(|i| (i % 7) as u8).collect();
    let mut bytes = masked(0xC1, &compress(&text)); // FIN + RSV1 + text
    bytes.extend(masked(0xC2, &compress(&binary)));
    bytes.extend(masked(0x81, b"plain")); // RSV1 is per message: this one is not compressed
    bytes.extend(masked(0xC1, &compress(b""))); // an empty compressed message
    feed_with(&mut s, &bytes, &lim, &mut rec);
    assert_eq!(
        rec.0,
        vec![
            Ev::Message(Kind::Text, text),
            Ev::Message(Kind::Binary, binary),
            Ev::Message(Kind::Text, b"plain".to_vec()),
            Ev::Message(Kind::Text, Vec::new()),
        ]
    );
    // Between messages the connection holds nothing; the inflater went back to the pool.
    assert_eq!(s.buffered_capacity(), 0);
    assert!(!s.holds_inflater());
    assert!(
        s.inbound.is_none(),
        "no inbound state allocated for whole messages"
    );
    assert_eq!(rec.1.pool.len(), 1);
}

#[test]
fn fragmented_compressed_message_in_any_split() {
    let lim = limits();
    let text = chat(1000);
    let payload = compress(&text);
    let (a, rest) = payload.split_at(payload.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut bytes = masked(0x41, a); // RSV1 + text, not final
    bytes.extend(masked(0x89, b"mid")); // a ping between fragments
    bytes.extend(masked(0x00, b)); // continuation: no RSV1
    bytes.extend(masked(0x00, &[])); // an empty one
    bytes.extend(masked(0x80, c));
    for step in [bytes.len(), 1, 7] {
        let (mut s, mut rec) = open_deflate(&lim, OFFER);
        let mut in_flight = false;
        for piece in bytes.chunks(step) {
            feed_with(&mut s, piece, &lim, &mut rec);
            in_flight |= s.holds_inflater();
        }
        assert_eq!(
            rec.0,
            vec![
                Ev::Pong(b"mid".to_vec()),
                Ev::Message(Kind::Text, text.clone())
            ],
            "step {step}"
        );
        if step < bytes.len() {
            assert!(
                in_flight,
                "an inflater is held while the message is in flight"
            );
        }
        assert!(!s.holds_inflater(), "and given back at its end");
        assert_eq!(s.buffered_capacity(), 0);
    }
}

#[test]
fn rsv1_on_a_continuation_or_control_frame_is_1002() {
    let lim = limits();
    let payload = compress(&chat(500));
    for bad in [
        masked(0xC0, &payload[10..]), // RSV1 on the continuation
        masked(0xC9, b"ping"),        // RSV1 on a ping, mid-message
    ] {
        let (mut s, mut rec) = open_deflate(&lim, OFFER);
        let mut bytes = masked(0x41, &payload[..10]);
        bytes.extend(bad);
        feed_with(&mut s, &bytes, &lim, &mut rec);
        assert_eq!(
            rec.0,
            vec![
                Ev::BeforeClose,
                Ev::Ended(Disconnect::ProtocolError),
                Ev::Close(Some(1002))
            ]
        );
        assert_eq!(s.phase(), Phase::Lingering);
    }
}

#[test]
fn rsv1_without_an_agreement_is_1002() {
    let compressed = masked(0xC1, &compress(b"hello"));
    // No offer.
    let (mut s, mut rec) = open();
    feed(&mut s, &compressed, &mut rec);
    assert_eq!(rec.0.last(), Some(&Ev::Close(Some(1002))));
    // An offer, but the server has deflate off (--no-deflate): no agreement either.
    let off = Limits {
        deflate: DeflateConfig {
            enabled: false,
            ..DeflateConfig::default()
        },
        ..limits()
    };
    let mut s = Session::new(0);
    let mut rec = Rec::default();
    s.receive(&mut request_with(OFFER), &off, 1, &mut rec);
    let Ev::Http(response) = &rec.0[2] else {
        panic!()
    };
    assert!(!String::from_utf8_lossy(response).contains("Extensions"));
    assert_eq!(s.deflate(), None);
    feed_with(&mut s, &compressed, &off, &mut rec);
    assert_eq!(rec.0.last(), Some(&Ev::Close(Some(1002))));
}

#[test]
fn malformed_extensions_header_is_400() {
    let mut s = Session::new(0);
    let mut rec = Rec::default();
    s.receive(
        &mut request_with("permessage-deflate; x=\"a b\""),
        &limits(),
        1,
        &mut rec,
    );
    assert_eq!(rec.0[0], Ev::Status(400));
    assert_eq!(rec.0[1], Ev::Ended(Disconnect::HttpRejected));
    assert_eq!(s.phase(), Phase::Lingering);
}

#[test]
fn zip_bomb_is_closed_1009_without_a_big_allocation() {
    let max = 64 * 1024;
    let lim = Limits {
        max_message: max,
        ..limits()
    };
    // 16 KiB that inflate to 16 MiB.
    let bomb = zip_bomb((16 << 20) / 258);
    assert!(bomb.len() < 17 * 1024);
    for fragmented in [false, true] {
        let (mut s, mut rec) = open_deflate(&lim, OFFER);
        let mut bytes = if fragmented {
            let mut b = masked(0x42, &bomb[..4096]);
            b.extend(masked(0x80, &bomb[4096..]));
            b
        } else {
            masked(0xC2, &bomb)
        };
        bytes.extend(masked(0x89, b"after")); // never answered: nothing is read after
        feed_with(&mut s, &bytes, &lim, &mut rec);
        assert_eq!(
            rec.0,
            vec![
                Ev::BeforeClose,
                Ev::Ended(Disconnect::MessageTooBig),
                Ev::Close(Some(1009))
            ],
            "fragmented: {fragmented}"
        );
        assert_eq!(rec.2, [InflateError::TooBig]);
        // Nothing past the bound was ever allocated for the output, and nothing is held.
        assert!(rec.1.out.capacity() <= max, "{}", rec.1.out.capacity());
        assert_eq!(s.buffered_capacity(), 0);
        assert!(!s.holds_inflater());
        assert_eq!(rec.1.pool.len(), 1, "the inflater went back to the pool");
    }
    // tests/deflate_memory.rs measures the peak heap of the same case with a counting
    // allocator.
}

#[test]
fn inflated_size_is_bounded_exactly() {
    let lim = limits();
    for (len, verdict) in [(MAX, None), (MAX + 1, Some(1009))] {
        let (mut s, mut rec) = open_deflate(&lim, OFFER);
        let msg = vec![b'a'; len];
        let compressed = compress(&msg);
        assert!(compressed.len() < 64, "it compresses well");
        feed_with(&mut s, &masked(0xC1, &compressed), &lim, &mut rec);
        match verdict {
            None => assert_eq!(rec.0, vec![Ev::Message(Kind::Text, msg)]),
            Some(code) => assert_eq!(rec.0.last(), Some(&Ev::Close(Some(code)))),
        }
    }
}

#[test]
fn corrupt_data_is_1007() {
    let lim = limits();
    for corrupt in [
        masked(0xC1, &[0xff, 0xff, 0xff]),             // BTYPE 11
        masked(0xC2, &[0xf2, 0x00, 0x11, 0x00, 0x00]), // a reference before the start
    ] {
        let (mut s, mut rec) = open_deflate(&lim, OFFER);
        feed_with(&mut s, &corrupt, &lim, &mut rec);
        assert_eq!(
            rec.0,
            vec![
                Ev::BeforeClose,
                Ev::Ended(Disconnect::InvalidCompressed),
                Ev::Close(Some(1007))
            ]
        );
        assert_eq!(rec.2, [InflateError::Corrupt]);
    }
    // Valid deflate of text that is not UTF-8: 1007 as for any text, counted as such.
    let (mut s, mut rec) = open_deflate(&lim, OFFER);
    feed_with(&mut s, &masked(0xC1, &compress(b"ok \xff")), &lim, &mut rec);
    assert_eq!(rec.0[1], Ev::Ended(Disconnect::InvalidUtf8));
    assert_eq!(rec.0[2], Ev::Close(Some(1007)));
    // Fragmented: the bad byte fails the frame that inflates it, before the message ends.
    let (mut s, mut rec) = open_deflate(&lim, OFFER);
    let mut msg = chat(600);
    msg[300] = 0xff;
    let payload = compress(&msg);
    let mut bytes = masked(0x41, &payload);
    bytes.extend(masked(0x89, b"never answered"));
    bytes.extend(masked(0x80, &[]));
    feed_with(&mut s, &bytes, &lim, &mut rec);
    assert_eq!(rec.0.last(), Some(&Ev::Close(Some(1007))));
    assert!(!rec.0.iter().any(|e| matches!(e, Ev::Pong(_))));
}

/// RFC 7692 §7.2.3.2: the second "Hello" refers back into the first message.
const HELLO: [u8; 7] = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
const HELLO_AGAIN: [u8; 5] = [0xf2, 0x00, 0x11, 0x00, 0x00];

#[test]
fn without_client_context_takeover_each_message_stands_alone() {
    // The default: the server answers client_no_context_takeover, so a client that still
    // refers to an earlier message sends corrupt data.
    let lim = limits();
    let (mut s, mut rec) = open_deflate(&lim, "permessage-deflate");
    let a = s.deflate().unwrap();
    assert!(!a.client_context_takeover());
    let mut bytes = masked(0xC1, &HELLO);
    bytes.extend(masked(0xC1, &HELLO_AGAIN));
    feed_with(&mut s, &bytes, &lim, &mut rec);
    assert_eq!(rec.0[0], Ev::Message(Kind::Text, b"Hello".to_vec()));
    assert_eq!(rec.0.last(), Some(&Ev::Close(Some(1007))));
}

#[test]
fn with_client_context_takeover_the_window_is_kept() {
    let lim = Limits {
        deflate: DeflateConfig {
            allow_client_context_takeover: true,
            ..DeflateConfig::default()
        },
        ..limits()
    };
    let (mut s, mut rec) = open_deflate(&lim, "permessage-deflate");
    assert!(s.deflate().unwrap().client_context_takeover());
    feed_with(&mut s, &masked(0xC1, &HELLO), &lim, &mut rec);
    assert!(s.holds_inflater(), "the window stays with the connection");
    // The next message refers to the first, and arrives in pieces, one of them fragmented.
    let mut bytes = masked(0x41, &HELLO_AGAIN[..2]);
    bytes.extend(masked(0x80, &HELLO_AGAIN[2..]));
    for piece in bytes.chunks(3) {
        feed_with(&mut s, piece, &lim, &mut rec);
    }
    assert_eq!(
        rec.0,
        vec![
            Ev::Message(Kind::Text, b"Hello".to_vec()),
            Ev::Message(Kind::Text, b"Hello".to_vec())
        ]
    );
    assert!(s.holds_inflater());
    assert_eq!(s.buffered_capacity(), 0, "only the inflater is held");
    // A client that declines takeover gets none, even from a server that allows it.
    let (s, _) = open_deflate(&lim, "permessage-deflate; client_no_context_takeover");
    assert!(!s.deflate().unwrap().client_context_takeover());
    // Closing frees it with the rest of the inbound state.
    let mut close = masked(0x88, &1000u16.to_be_bytes());
    let (mut s, mut rec) = open_deflate(&lim, "permessage-deflate");
    feed_with(&mut s, &masked(0xC1, &HELLO), &lim, &mut rec);
    assert!(s.holds_inflater());
    s.receive(&mut close, &lim, 1, &mut rec);
    assert_eq!(s.phase(), Phase::Lingering);
    assert!(!s.holds_inflater());
}

#[test]
fn a_paused_connection_answers_no_ping_behind_a_compressed_frame() {
    // While the room's ring is full, pings behind plain data are answered early; behind a
    // compressed message nothing is judged before it is inflated, so they wait.
    let lim = limits();
    let (mut s, mut rec) = open_deflate(&lim, OFFER);
    let mut bytes = masked(0x89, b"first");
    bytes.extend(masked(0xC1, &compress(b"hello")));
    bytes.extend(masked(0x89, b"second"));
    s.receive_held(&bytes, &lim, 1, &mut rec);
    assert_eq!(rec.0, vec![Ev::Pong(b"first".to_vec())]);
    s.receive(&mut [], &lim, 1, &mut rec);
    assert_eq!(
        rec.0,
        vec![
            Ev::Pong(b"first".to_vec()),
            Ev::Message(Kind::Text, b"hello".to_vec()),
            Ev::Pong(b"second".to_vec())
        ]
    );
}

#[test]
fn the_agreement_fits_in_the_sessions_padding() {
    // 24 B: 16 of protocol state and 8 of access state (token expiry, message bucket); the
    // agreement adds nothing.
    assert_eq!(std::mem::size_of::<Session>(), 24);
    assert_eq!(std::mem::size_of::<Option<Agreement>>(), 2);
}
