//! Which deflate codec for permessage-deflate: flate2 + zlib-rs (what `megasock::deflate`
//! uses), miniz_oxide (what flate2's default `rust_backend` wraps), and libdeflate (one-shot
//! only), on a 64 B and a 1 KiB JSON chat message, the way the server uses them: a message
//! compressed alone (no context takeover, state reset in between) and inflated alone.
//!
//! Run: `cargo run --release --example deflate_codec` (about 30 s on a quiet machine). Results are in
//! docs/PERFORMANCE.md, "permessage-deflate codec".

use std::hint::black_box;
use std::time::Instant;

use megasock::deflate::{Compressor, Inflater};
use miniz_oxide::deflate::core::{create_comp_flags_from_zip_params, CompressorOxide};
use miniz_oxide::inflate::stream::{InflateState, MinReset};
use miniz_oxide::{DataFormat, MZFlush};

const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
const ROUNDS: usize = 300;

/// A chat message as a web client would send it: 64 B.
fn small_message() -> Vec<u8> {
    let m = br#"{"type":"msg","room":"lobby","from":"alice","text":"hi all! :)"}"#.to_vec();
    assert_eq!(m.len(), 64, "{}", m.len());
    m
}

/// A richer chat event (user, text, mentions, reactions, an embed): 1 KiB.
fn large_message() -> Vec<u8> {
    let mut m = String::from(
        r#"{"type":"message","room":"general","id":"01HZX3K9V7Q2M8N4P6R5T1W0YB","ts":1764672000123,"#,
    );
    m.push_str(r#""user":{"id":48213,"name":"Alice Martin","handle":"alice","avatar":"https://cdn.example.com/avatars/48213/128.png","roles":["member","moderator"]},"#);
    m.push_str(r#""text":"Morning everyone! The deploy of the new search backend went out at 09:00 and so far the p99 latency is down from 840 ms to 210 ms. If you see anything odd in the results, please reply in this thread with the query and a screenshot.","#);
    m.push_str(r#""mentions":[{"id":48214,"handle":"bob"},{"id":48215,"handle":"carol"}],"#);
    m.push_str(r#""reactions":[{"emoji":"tada","count":12,"me":false},{"emoji":"rocket","count":7,"me":true},{"emoji":"eyes","count":2,"me":false}],"#);
    m.push_str(r#""embed":{"url":"https://status.example.com/incidents/2025-12-02","title":"Search backend migration","description":"Planned migration of the search cluster; no downtime expected.","#);
    m.push_str(r#""thumbnail":"https://status.example.com/img/search.png"},"thread":{"id":"01HZX3K9V7Q2M8N4P6R5T1W0YA","replies":3}"#);
    while m.len() < 1023 {
        m.push(' ');
    }
    m.push('}');
    assert_eq!(m.len(), 1024);
    m.into_bytes()
}

/// ns per call of `f`: the best of up to ROUNDS rounds of about 2 ms each (at most 3 s in
/// all). The best, not the median, because this box is shared: a round that was preempted or
/// shared its core only reads slower, never faster, and short rounds often fit in one time
/// slice.
fn time(mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    let mut calib = 0u64;
    while t.elapsed().as_micros() < 2000 {
        f();
        calib += 1;
    }
    let start = Instant::now();
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..calib {
            f();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / calib as f64);
        if start.elapsed().as_secs() >= 3 {
            break;
        }
    }
    best
}

struct Row {
    codec: &'static str,
    level: u32,
    size: usize,
    compress_ns: f64,
    inflate_ns: f64,
}

fn zlib_rs(msg: &[u8], level: u32) -> Row {
    let mut c = Compressor::new(level);
    let mut out = Vec::with_capacity(2 * msg.len() + 64);
    let compress_ns = time(|| {
        out.clear();
        c.compress(black_box(msg), 15, &mut out).unwrap();
    });
    let payload = out.clone();
    let mut inf = Inflater::new();
    let mut plain = Vec::with_capacity(msg.len());
    let inflate_ns = time(|| {
        plain.clear();
        inf.feed(black_box(&payload), &mut plain, 1 << 20).unwrap();
        inf.finish(&mut plain, 1 << 20).unwrap();
        inf.reset();
    });
    assert_eq!(plain, msg);
    Row {
        codec: "flate2 + zlib-rs",
        level,
        size: payload.len(),
        compress_ns,
        inflate_ns,
    }
}

fn miniz(msg: &[u8], level: u32) -> Row {
    // What flate2's rust_backend does: raw deflate, sync flush, reset between messages.
    let mut c = Box::new(CompressorOxide::new(create_comp_flags_from_zip_params(
        level as i32,
        -15,
        0,
    )));
    let mut buf = vec![0u8; 2 * msg.len() + 64];
    let mut n = 0;
    let compress_ns = time(|| {
        c.reset();
        let r =
            miniz_oxide::deflate::stream::deflate(&mut c, black_box(msg), &mut buf, MZFlush::Sync);
        assert!(r.status.is_ok() && r.bytes_consumed == msg.len());
        n = r.bytes_written - 4;
    });
    assert_eq!(buf[n..n + 4], TAIL);
    let mut payload = buf[..n].to_vec();
    let size = payload.len();
    payload.extend_from_slice(&TAIL);
    let mut inf = InflateState::new_boxed(DataFormat::Raw);
    let mut plain = vec![0u8; msg.len() + 16];
    let mut got = 0;
    let inflate_ns = time(|| {
        inf.reset_as(MinReset);
        let r = miniz_oxide::inflate::stream::inflate(
            &mut inf,
            black_box(&payload),
            &mut plain,
            MZFlush::None,
        );
        assert!(r.status.is_ok());
        got = r.bytes_written;
    });
    assert_eq!(&plain[..got], msg);
    Row {
        codec: "miniz_oxide (flate2 rust_backend)",
        level,
        size,
        compress_ns,
        inflate_ns,
    }
}

fn libdeflate(msg: &[u8], level: u32) -> Row {
    let mut c =
        libdeflater::Compressor::new(libdeflater::CompressionLvl::new(level as i32).unwrap());
    let mut buf = vec![0u8; c.deflate_compress_bound(msg.len()) + 1];
    let mut n = 0;
    let compress_ns = time(|| {
        n = c.deflate_compress(black_box(msg), &mut buf).unwrap();
    });
    // One final (BFINAL) block; RFC 7692 §7.2.3.4: add an empty stored-block header byte so
    // the receiver's 00 00 ff ff completes a block.
    let mut payload = buf[..n].to_vec();
    payload.push(0);
    let size = payload.len();
    // libdeflate only inflates a whole stream into a buffer sized up front: fine for a
    // one-shot message ending in BFINAL, but a client's sync-flushed message has no final
    // block, and there is no streaming or context takeover.
    let mut d = libdeflater::Decompressor::new();
    let mut plain = vec![0u8; msg.len()];
    let inflate_ns = time(|| {
        let got = d
            .deflate_decompress(black_box(&payload), &mut plain)
            .unwrap();
        assert_eq!(got, msg.len());
    });
    assert_eq!(plain, msg);
    Row {
        codec: "libdeflate (libdeflater)",
        level,
        size,
        compress_ns,
        inflate_ns,
    }
}

/// Heap held after one message, by a counting allocator (`allocation_counter`).
fn heap() {
    let msg = large_message();
    println!("\nheap held after one 1 KiB message (counting allocator):");
    for bits in [15u8, 12, 9] {
        let mut c = Compressor::new(6);
        let mut out = Vec::with_capacity(4096);
        let held = allocation_counter::measure(|| c.compress(&msg, bits, &mut out).unwrap());
        println!(
            "  flate2 + zlib-rs compress stream, window {bits}: {} B",
            held.bytes_current
        );
    }
    for bits in [15u8, 12, 9] {
        let mut payload = Vec::new();
        Compressor::new(6)
            .compress(&msg, bits, &mut payload)
            .unwrap();
        payload.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(2048);
        let mut state = None;
        let held = allocation_counter::measure(|| {
            let mut d = flate2::Decompress::new_with_window_bits(false, bits);
            d.decompress_vec(&payload, &mut out, flate2::FlushDecompress::None)
                .unwrap();
            state = Some(d);
        });
        assert_eq!(out, msg);
        println!(
            "  flate2 + zlib-rs inflate state, window {bits}: {} B",
            held.bytes_current
        );
    }
    let mut payload = Vec::new();
    Compressor::new(6).compress(&msg, 15, &mut payload).unwrap();
    let mut out = Vec::with_capacity(2048);
    let mut kept = None;
    let held = allocation_counter::measure(|| {
        let mut inf = Box::new(Inflater::new());
        inf.feed(&payload, &mut out, 1 << 20).unwrap();
        inf.finish(&mut out, 1 << 20).unwrap();
        kept = Some(inf);
    });
    println!(
        "  megasock Inflater in its Box (context takeover): {} B (Inflater::HEAP_BYTES = {})",
        held.bytes_current,
        Inflater::HEAP_BYTES
    );
    let mut kept_c = None;
    let held = allocation_counter::measure(|| {
        kept_c = Some(Box::new(CompressorOxide::new(
            create_comp_flags_from_zip_params(6, -15, 0),
        )));
    });
    println!("  miniz_oxide compressor: {} B", held.bytes_current);
    let mut kept_i = None;
    let held =
        allocation_counter::measure(|| kept_i = Some(InflateState::new_boxed(DataFormat::Raw)));
    println!("  miniz_oxide inflate state: {} B", held.bytes_current);
}

fn main() {
    let small = small_message();
    let large = large_message();
    println!("| message | codec | level | compressed B | compress ns | inflate ns |");
    println!("|---|---|---|---|---|---|");
    for (name, msg) in [("64 B", &small), ("1 KiB", &large)] {
        for level in [1, 2, 3, 6] {
            for row in [
                zlib_rs(msg, level),
                miniz(msg, level),
                libdeflate(msg, level),
            ] {
                println!(
                    "| {name} | {} | {} | {} | {:.0} | {:.0} |",
                    row.codec, row.level, row.size, row.compress_ns, row.inflate_ns
                );
            }
        }
    }
    // Where the time goes for small messages: the reset between messages clears the 64 Ki-entry
    // hash table (128 KiB) whatever the message size.
    let mut z = flate2::Compress::new_with_window_bits(flate2::Compression::new(1), false, 15);
    let reset_ns = time(|| z.reset());
    println!("\nflate2 + zlib-rs reset alone: {reset_ns:.0} ns");
    heap();
}
