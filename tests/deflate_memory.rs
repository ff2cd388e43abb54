//! Heap figures of the permessage-deflate codec, by a counting allocator (`allocation_counter`
//! replaces the global allocator in this test binary and counts per thread): what a connection
//! holds with and without context takeover, what the shared compressor holds, and that a zip
//! bomb never makes the inflater allocate past the message bound.

use allocation_counter::measure;
use megasock::deflate::{Compressor, InflateError, Inflater, InflaterPool, MessageInflate};

#[allow(dead_code)]
#[path = "../src/deflate/reference.rs"]
mod reference;

const MAX: usize = 1 << 20;

fn chat(n: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < n {
        s.push_str(&format!(
            r#"{{"type":"message","room":"general","id":{i},"text":"hello number {i}"}},"#
        ));
        i += 1;
    }
    s.truncate(n);
    s.into_bytes()
}

fn compressed(msg: &[u8], bits: u8) -> Vec<u8> {
    let mut out = Vec::new();
    Compressor::new(6).compress(msg, bits, &mut out).unwrap();
    out
}

#[test]
fn inflater_heap_matches_the_published_figure() {
    let msg = chat(4000);
    let payload = compressed(&msg, 15);
    let mut out = Vec::with_capacity(msg.len());
    let mut kept = None;
    let held = measure(|| {
        let mut inf = Box::new(Inflater::new());
        inf.feed(&payload, &mut out, MAX).unwrap();
        inf.finish(&mut out, MAX).unwrap();
        kept = Some(inf);
    });
    assert_eq!(out, msg);
    assert_eq!(held.bytes_current as usize, Inflater::HEAP_BYTES);
    assert_eq!(
        out.capacity(),
        msg.len(),
        "a buffer of the exact size is not grown"
    );
    // It stays that size across messages (no growth with context takeover).
    let mut inf = kept.unwrap();
    let again = measure(|| {
        for _ in 0..10 {
            out.clear();
            inf.feed(&payload, &mut out, MAX).unwrap();
            inf.finish(&mut out, MAX).unwrap();
        }
    });
    assert_eq!(again.bytes_current, 0);
    assert_eq!(again.count_total, 0, "no allocation per message");
}

#[test]
fn connection_without_takeover_holds_nothing_between_messages() {
    let msg = chat(2000);
    let payload = compressed(&msg, 15);
    let mut pool = InflaterPool::new(0); // keeps nothing: every state is freed
    let mut conn = MessageInflate::default();
    let mut out = Vec::with_capacity(msg.len());
    let during = measure(|| {
        conn.feed(&mut pool, &payload[..50], &mut out, MAX).unwrap();
    });
    assert_eq!(during.bytes_current as usize, Inflater::HEAP_BYTES);
    let after = measure(|| {
        conn.feed(&mut pool, &payload[50..], &mut out, MAX).unwrap();
        conn.finish(&mut pool, false, &mut out, MAX).unwrap();
    });
    assert_eq!(out, msg);
    assert_eq!(after.bytes_current, -(Inflater::HEAP_BYTES as i64));
    assert_eq!(conn.heap_bytes(), 0);

    // With a pool, the state is reused: no allocation per message at all.
    let mut pool = InflaterPool::new(4);
    let warm = pool.take();
    pool.put(warm);
    let steady = measure(|| {
        for _ in 0..10 {
            out.clear();
            conn.feed(&mut pool, &payload, &mut out, MAX).unwrap();
            conn.finish(&mut pool, false, &mut out, MAX).unwrap();
        }
    });
    assert_eq!(steady.count_total, 0);
}

#[test]
fn compressor_heap() {
    let msg = chat(1024);
    let mut c = Compressor::new(6);
    let mut out = Vec::with_capacity(4096);
    let mut held = Vec::new();
    for bits in [15, 12, 9] {
        let m = measure(|| c.compress(&msg, bits, &mut out).unwrap());
        held.push(m.bytes_current);
        out.clear();
    }
    println!("compress stream heap, windows 15 / 12 / 9: {held:?}");
    // Documented in src/deflate/codec.rs: one stream per window in use, about 380 KB at 15.
    assert_eq!(held, [380_032, 265_344, 251_008]);
    // Once made, compressing allocates nothing.
    let steady = measure(|| {
        for _ in 0..10 {
            out.clear();
            c.compress(&msg, 15, &mut out).unwrap();
        }
    });
    assert_eq!(steady.count_total, 0);
}

#[test]
fn zip_bomb_allocates_no_more_than_the_bound() {
    // ~99 KiB of deflate that would inflate to 100 MiB.
    let bomb = reference::zip_bomb((100 << 20) / 258);
    assert!(bomb.len() < 100 << 10);
    let bound = 1 << 20;
    let mut pool = InflaterPool::new(1);
    let mut conn = MessageInflate::default();
    let mut result = Ok(());
    let mut out = Vec::new();
    let m = measure(|| {
        for frame in bomb.chunks(4096) {
            result = conn.feed(&mut pool, frame, &mut out, bound);
            if result.is_err() {
                break;
            }
        }
        drop(std::mem::take(&mut out));
    });
    assert_eq!(result, Err(InflateError::TooBig));
    // Peak: the message buffer (at most the bound, plus the half-size buffer it was copied
    // from on its last growth) and one inflate state; nowhere near 100 MiB.
    let peak = m.bytes_max as usize;
    assert!(
        peak <= bound + bound / 2 + Inflater::HEAP_BYTES,
        "peak {peak} B for a {bound} B bound"
    );
    println!("zip bomb: peak heap {peak} B for a {bound} B bound");
}

/// The worker's side of a session, for the session-level figures below.
#[derive(Default)]
struct Host {
    inflating: megasock::session::Inflating,
    messages: Vec<Vec<u8>>,
    closes: Vec<u16>,
}

impl megasock::session::Host for Host {
    fn upgraded(
        &mut self,
        _: megasock::handshake::Route<'_>,
        _: Option<megasock::deflate::Agreement>,
    ) {
    }
    fn message(&mut self, _: megasock::codec::Kind, payload: &[u8]) {
        self.messages.push(payload.to_vec());
    }
    fn send(&mut self, bytes: bytes::Bytes) {
        if bytes.first() == Some(&0x88) {
            self.closes.push(u16::from_be_bytes([bytes[2], bytes[3]]));
        }
    }
    fn before_close(&mut self) {}
    fn ended(&mut self, _: megasock::metrics::Disconnect) {}
    fn http_status(&mut self, _: u16) {}
    fn inflating(&mut self) -> &mut megasock::session::Inflating {
        &mut self.inflating
    }
}

/// An open session that negotiated permessage-deflate (as a browser offers it).
fn deflate_session(lim: &megasock::session::Limits, host: &mut Host) -> megasock::session::Session {
    let mut s = megasock::session::Session::new(0);
    let mut req = b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        .to_vec();
    s.receive(&mut req, lim, 1, host);
    assert!(s.deflate().is_some());
    s
}

/// A masked, final client frame with RSV1 (compressed).
fn compressed_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0xC0 | opcode];
    if payload.len() < 126 {
        v.push(0x80 | payload.len() as u8);
    } else if payload.len() < 65536 {
        v.push(0x80 | 126);
        v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    } else {
        v.push(0x80 | 127);
        v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    }
    v.extend_from_slice(&[0; 4]); // mask 0: the payload as it is
    v.extend_from_slice(payload);
    v
}

fn limits(max_message: usize) -> megasock::session::Limits {
    megasock::session::Limits {
        max_message,
        handshake: 100,
        ping: 300,
        idle: 750,
        close: 20,
        drain_until: None,
        proxy: false,
        deflate: megasock::deflate::DeflateConfig::default(),
        message_rate: None,
    }
}

#[test]
fn a_session_fed_a_zip_bomb_peaks_at_the_inflater_and_the_bound() {
    let max = 64 << 10;
    let lim = limits(max);
    let mut host = Host::default();
    let mut s = deflate_session(&lim, &mut host);
    // 16 KiB that would inflate to 16 MiB, in one frame.
    let mut frame = compressed_frame(2, &reference::zip_bomb((16 << 20) / 258));
    let m = measure(|| s.receive(&mut frame, &lim, 2, &mut host));
    assert_eq!(host.closes, [1009]);
    assert!(host.messages.is_empty());
    // The inflater, the output buffer grown to the bound (with its last smaller step while
    // copying) and a close frame; nothing near 16 MiB.
    let peak = m.bytes_max as usize;
    println!("zip bomb through a session: peak heap {peak} B (bound {max} B)");
    assert!(
        peak <= Inflater::HEAP_BYTES + max + max / 2 + 1024,
        "peak {peak}"
    );
}

#[test]
fn a_deflate_session_holds_nothing_between_messages() {
    let lim = limits(1 << 20);
    let mut host = Host::default();
    let mut s = deflate_session(&lim, &mut host);
    let msg = chat(2000);
    let frame = compressed_frame(1, &compressed(&msg, 15));
    // The first message warms the worker's pool and buffer.
    s.receive(&mut frame.clone(), &lim, 2, &mut host);
    let m = measure(|| {
        for _ in 0..10 {
            s.receive(&mut frame.clone(), &lim, 2, &mut host);
        }
    });
    assert_eq!(host.messages.len(), 11);
    assert!(host.messages.iter().all(|m| *m == msg));
    // What stays allocated after each message: only the recorded messages themselves (and
    // the frame copies, freed), nothing held by the session or taken from the pool.
    let recorded = 10 * msg.len() as i64;
    assert!(
        m.bytes_current <= recorded + 64 * 10,
        "{} B left after 10 messages",
        m.bytes_current
    );
    assert!(!s.holds_inflater());
    assert_eq!(s.buffered_capacity(), 0);
}
