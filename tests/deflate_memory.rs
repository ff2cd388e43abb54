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
