//! permessage-deflate payloads (RFC 7692 §7.2): compress a whole message once for every
//! recipient, and inflate a client's message frame by frame without ever holding more than the
//! message bound.
//!
//! Outbound, the server never keeps context between messages (it always negotiates
//! `server_no_context_takeover`), so a message compresses to the same bytes for everyone with
//! the same window: one [`Compressor`] per worker, reset after each message, serves every
//! connection. Inbound, a connection holds an [`Inflater`] only while a compressed message is
//! in flight ([`MessageInflate`] takes it from and returns it to the worker's [`InflaterPool`]),
//! unless the client keeps context takeover, in which case the state (and its window) must stay
//! with the connection between messages.
//!
//! Heap, measured with a counting allocator by `tests/deflate_memory.rs` (zlib-rs 0.6.8):
//! - an inflater is [`Inflater::HEAP_BYTES`] = 47,712 B (state and 32 KiB window in one block,
//!   plus its `Box`), for every window size: zlib-rs allocates the full 32 KiB window up front,
//!   so a `client_max_window_bits` below 15 saves nothing;
//! - a compress stream is 380,032 B at window 15, 265,344 B at 12 and 251,008 B at 9 (its hash
//!   table is 128 KiB whatever the window); the [`Compressor`] makes one per window size in
//!   use, so a worker normally holds one.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::codec::{CLOSE_INVALID_DATA, CLOSE_TOO_BIG};

/// What a sync flush ends with; the sender strips it (§7.2.1), the receiver puts it back
/// (§7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Compression failed inside the codec (it should not). Sending the message uncompressed is
/// always allowed (RSV1 is per message), so that is the fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressFailed;

/// A worker's compressor: one raw deflate stream per window size in use, reset after every
/// message, so it carries nothing from one message to the next.
pub struct Compressor {
    level: Compression,
    /// Index: window bits - 9. Made on first use: most servers only ever see 15.
    streams: [Option<Compress>; 7],
}

impl Compressor {
    /// `level` is zlib's 0..=9 (clamped): 1 is fastest, 6 zlib's default.
    pub fn new(level: u32) -> Compressor {
        Compressor {
            level: Compression::new(level.min(9)),
            streams: Default::default(),
        }
    }

    /// Appends the permessage-deflate payload of `message` to `out`: raw deflate with a window
    /// of `window_bits` (clamped to 9..=15; pass
    /// [`Agreement::compress_window_bits`](super::Agreement::compress_window_bits)), sync-flushed,
    /// without the final `00 00 ff ff`.
    ///
    /// The result can be longer than `message` (a few bytes for incompressible or tiny input);
    /// the caller may then send the message uncompressed instead. On error `out` is as it was.
    pub fn compress(
        &mut self,
        message: &[u8],
        window_bits: u8,
        out: &mut Vec<u8>,
    ) -> Result<(), CompressFailed> {
        let bits = window_bits.clamp(9, 15);
        let level = self.level;
        let stream = self.streams[usize::from(bits - 9)]
            .get_or_insert_with(|| Compress::new_with_window_bits(level, false, bits));
        let start = out.len();
        let result = deflate_sync(stream, message, out);
        // Reset after rather than before: the next message starts clean even if this one failed.
        stream.reset();
        if result.is_ok() && out[start..].ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
            return Ok(());
        }
        out.truncate(start);
        Err(CompressFailed)
    }

    /// Window sizes (9..=15) that have a stream allocated.
    pub fn windows_in_use(&self) -> impl Iterator<Item = u8> + '_ {
        (9u8..=15).filter(|&b| self.streams[usize::from(b - 9)].is_some())
    }
}

/// Deflates all of `input` into `out` with a sync flush.
fn deflate_sync(
    stream: &mut Compress,
    mut input: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CompressFailed> {
    // deflate can exceed its input by 5 bytes per stored block, plus the flush marker.
    out.reserve(input.len() + input.len() / 1024 + 32);
    loop {
        // zlib: keep more than 6 bytes free on a sync flush, or the marker may repeat.
        if out.capacity() - out.len() < 16 {
            out.reserve(out.capacity() / 2 + 16);
        }
        let (in_before, len_before) = (stream.total_in(), out.len());
        stream
            .compress_vec(input, out, FlushCompress::Sync)
            .map_err(|_| CompressFailed)?;
        let used = (stream.total_in() - in_before) as usize;
        input = input.get(used..).ok_or(CompressFailed)?;
        // Done once all input is taken and the output was not cut short.
        if input.is_empty() && out.len() < out.capacity() {
            return Ok(());
        }
        if used == 0 && out.len() == len_before && out.len() < out.capacity() {
            return Err(CompressFailed); // no progress is possible
        }
    }
}

/// Why a compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// The inflated message would exceed the bound (a zip bomb, or just too big): 1009.
    TooBig,
    /// Not valid deflate data.
    Corrupt,
}

impl InflateError {
    /// The close code to fail the connection with.
    ///
    /// Corrupt data gets 1007 (invalid payload data): the frames were valid WebSocket and the
    /// extension was negotiated, but the payload is not what its (compressed) type promises,
    /// as for bad UTF-8 in a text message. RFC 7692 names no code; Node `ws` and Jetty send
    /// 1007, Python `websockets` 1002; Autobahn 12/13 only send valid data.
    pub fn close_code(self) -> u16 {
        match self {
            InflateError::TooBig => CLOSE_TOO_BIG,
            InflateError::Corrupt => CLOSE_INVALID_DATA,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            InflateError::TooBig => "message too big",
            InflateError::Corrupt => "invalid compressed data",
        }
    }
}

/// Inflates permessage-deflate messages, fed one frame payload (or part of one) at a time.
///
/// It always uses a 32 KiB window: that decodes data compressed with any smaller one and, with
/// zlib-rs, costs no more memory.
pub struct Inflater {
    stream: Decompress,
    /// The sender ended its deflate stream (BFINAL, RFC 7692 §7.2.3.4): the rest of the message
    /// is ignored, and the next one starts a new stream.
    ended: bool,
}

impl Default for Inflater {
    fn default() -> Self {
        Inflater::new()
    }
}

impl Inflater {
    /// Heap held by one inflater (zlib-rs state and its 32 KiB window, plus the `Box` a
    /// connection keeps it in), whatever the window bits; checked by `tests/deflate_memory.rs`.
    pub const HEAP_BYTES: usize = 47_712;

    pub fn new() -> Inflater {
        Inflater {
            stream: Decompress::new(false),
            ended: false,
        }
    }

    /// Heap this inflater holds (for a metric of context-takeover connections).
    pub fn heap_bytes(&self) -> usize {
        Self::HEAP_BYTES
    }

    /// Inflates the next piece of the current message's payload, appending to `out`.
    ///
    /// `max` bounds `out.len()`: the call fails with [`InflateError::TooBig`] as soon as one
    /// more byte would pass it, and never grows `out` beyond `max` bytes of capacity, however
    /// small the input (deflate inflates up to 1032:1). While `out` is reallocated, the old and
    /// new buffers briefly coexist: at most 1.5 × `max` in all, since the growth steps are
    /// chosen to end with max / 2 -> max (unless the caller's own buffer started larger).
    pub fn feed(
        &mut self,
        piece: &[u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<(), InflateError> {
        self.inflate(piece, out, max)
    }

    /// Ends the message: inflates the `00 00 ff ff` the sender removed. The state is then
    /// ready for the next message, keeping the window (context takeover) unless [`reset`] is
    /// called.
    ///
    /// [`reset`]: Inflater::reset
    pub fn finish(&mut self, out: &mut Vec<u8>, max: usize) -> Result<(), InflateError> {
        let result = self.inflate(&TAIL, out, max);
        if self.ended {
            self.reset();
        }
        result
    }

    /// Forgets the window and any message in progress.
    pub fn reset(&mut self) {
        self.stream.reset(false);
        self.ended = false;
    }

    fn inflate(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<(), InflateError> {
        while !self.ended {
            if out.len() > max {
                return Err(InflateError::TooBig); // the caller's buffer was already past it
            }
            if out.len() == out.capacity() {
                // Full: ask for one byte before growing, so a message that fits exactly
                // costs no reallocation and one at the bound is refused without any.
                let mut probe = [0u8; 1];
                let (used, made) = self.step(input, &mut probe)?;
                input = input.get(used..).unwrap_or_default();
                if made == 1 {
                    if out.len() >= max {
                        return Err(InflateError::TooBig);
                    }
                    // Grow at least twofold, to a capacity of max / 2^k: the last growth is
                    // then from max / 2 to max, so old and new buffers together never pass
                    // 1.5 × max while the allocator copies.
                    let need = (out.capacity() * 2)
                        .max(out.len() + input.len() * 4)
                        .max(256)
                        .min(max);
                    let mut want = max;
                    while want / 2 >= need {
                        want /= 2;
                    }
                    out.reserve_exact(want - out.len());
                    out.push(probe[0]);
                } else if used == 0 || input.is_empty() {
                    break; // wants the next piece
                }
                continue;
            }
            let (in_before, len_before) = (self.stream.total_in(), out.len());
            let status = self
                .stream
                .decompress_vec(input, out, FlushDecompress::None)
                .map_err(|_| InflateError::Corrupt)?;
            let used = (self.stream.total_in() - in_before) as usize;
            input = input.get(used..).unwrap_or_default();
            self.ended = status == Status::StreamEnd;
            if out.len() > max {
                return Err(InflateError::TooBig); // only if the caller's buffer was larger
            }
            // All input taken and the output not cut short: inflate needs the next piece.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            if used == 0 && out.len() == len_before && out.len() < out.capacity() {
                break; // no progress possible with this input
            }
        }
        Ok(())
    }

    /// One inflate call into `buf`: (input bytes used, output bytes made).
    fn step(&mut self, input: &[u8], buf: &mut [u8]) -> Result<(usize, usize), InflateError> {
        let (in_before, out_before) = (self.stream.total_in(), self.stream.total_out());
        let status = self
            .stream
            .decompress(input, buf, FlushDecompress::None)
            .map_err(|_| InflateError::Corrupt)?;
        self.ended = status == Status::StreamEnd;
        Ok((
            (self.stream.total_in() - in_before) as usize,
            (self.stream.total_out() - out_before) as usize,
        ))
    }
}

/// Per-worker spare inflaters for connections without context takeover: a message in flight
/// takes one, and gives it back when it ends, so an idle connection holds none.
pub struct InflaterPool {
    // Boxed because they are handed out as is: a connection holds 8 bytes, not the stream.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<Inflater>>,
    keep: usize,
}

impl InflaterPool {
    /// Keeps at most `keep` spare inflaters (each [`Inflater::HEAP_BYTES`]).
    pub fn new(keep: usize) -> InflaterPool {
        InflaterPool {
            spare: Vec::new(),
            keep,
        }
    }

    pub fn take(&mut self) -> Box<Inflater> {
        self.spare.pop().unwrap_or_default()
    }

    /// Returns an inflater, reset; dropped if the pool is full.
    pub fn put(&mut self, mut inflater: Box<Inflater>) {
        if self.spare.len() < self.keep {
            inflater.reset();
            self.spare.push(inflater);
        }
    }

    /// Spare inflaters held now.
    pub fn len(&self) -> usize {
        self.spare.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spare.is_empty()
    }
}

/// One connection's inbound decompression state: empty (8 bytes, no heap) between messages,
/// unless the client keeps context takeover.
#[derive(Default)]
pub struct MessageInflate {
    held: Option<Box<Inflater>>,
}

impl MessageInflate {
    /// Inflates a piece of a compressed message's payload (see [`Inflater::feed`]). On error
    /// the state is released: the caller closes the connection.
    pub fn feed(
        &mut self,
        pool: &mut InflaterPool,
        piece: &[u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<(), InflateError> {
        let inflater = self.held.get_or_insert_with(|| pool.take());
        let result = inflater.feed(piece, out, max);
        if result.is_err() {
            self.release(pool);
        }
        result
    }

    /// Ends a compressed message (see [`Inflater::finish`]). Without context takeover the
    /// inflater goes back to the pool; with it, it stays (and keeps the window).
    pub fn finish(
        &mut self,
        pool: &mut InflaterPool,
        context_takeover: bool,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<(), InflateError> {
        let inflater = self.held.get_or_insert_with(|| pool.take());
        let result = inflater.finish(out, max);
        if result.is_err() || !context_takeover {
            self.release(pool);
        }
        result
    }

    /// Gives the state back (connection closing, or message abandoned).
    pub fn release(&mut self, pool: &mut InflaterPool) {
        if let Some(inflater) = self.held.take() {
            pool.put(inflater);
        }
    }

    /// Heap held by this connection for decompression (0 when idle without takeover).
    pub fn heap_bytes(&self) -> usize {
        self.held.as_ref().map_or(0, |i| i.heap_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deflate::reference::{self, zip_bomb};

    const MAX: usize = 1 << 20;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Inflates one message fed in pieces of `piece` bytes, with a fresh inflater.
    fn inflate_pieces(payload: &[u8], piece: usize) -> Result<Vec<u8>, InflateError> {
        let mut inf = Inflater::new();
        let mut out = Vec::new();
        for p in payload.chunks(piece.max(1)) {
            inf.feed(p, &mut out, MAX)?;
        }
        inf.finish(&mut out, MAX)?;
        Ok(out)
    }

    /// Decodes with miniz_oxide (an independent implementation): payload + tail + an empty
    /// final block makes a complete raw deflate stream.
    fn miniz_inflate(payload: &[u8]) -> Vec<u8> {
        let mut stream = payload.to_vec();
        stream.extend_from_slice(&[0x00, 0x00, 0xff, 0xff, 0x03, 0x00]);
        miniz_oxide::inflate::decompress_to_vec(&stream).expect("miniz_oxide inflates it")
    }

    fn chat_json(n: usize) -> Vec<u8> {
        let mut s = String::new();
        let mut i = 0;
        while s.len() < n {
            s.push_str(&format!(
                r#"{{"type":"message","room":"general","id":{i},"user":"user{}","text":"message number {i} says hello"}},"#,
                i % 7
            ));
            i += 1;
        }
        s.truncate(n);
        s.into_bytes()
    }

    /// Incompressible bytes (xorshift).
    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn rfc_7692_hello() {
        // §7.2.3.1: "Hello" in one compressed block.
        let mut c = Compressor::new(6);
        let mut out = Vec::new();
        c.compress(b"Hello", 15, &mut out).unwrap();
        assert_eq!(out, [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
        // Every level and window gives something that decodes to it.
        for level in 0..=9 {
            for bits in 8..=15 {
                let mut out = Vec::new();
                Compressor::new(level)
                    .compress(b"Hello", bits, &mut out)
                    .unwrap();
                assert_eq!(miniz_inflate(&out), b"Hello", "level {level} bits {bits}");
            }
        }
    }

    #[test]
    fn rfc_7692_examples_inflate() {
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        // §7.2.3.1, also split over two frames.
        assert_eq!(inflate_pieces(&hello, 7).unwrap(), b"Hello");
        assert_eq!(inflate_pieces(&hello, 3).unwrap(), b"Hello");
        // §7.2.3.3: a stored block.
        let stored = [
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ];
        assert_eq!(inflate_pieces(&stored, 1).unwrap(), b"Hello");
        // §7.2.3.4: BFINAL set, then the empty block's header byte.
        let bfinal = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        assert_eq!(inflate_pieces(&bfinal, 8).unwrap(), b"Hello");
        // §7.2.3.5: two blocks in one message.
        // "He" and a sync flush, then "llo".
        let two = hex("f24805000000ffffcac9c90700");
        assert_eq!(inflate_pieces(&two, 2).unwrap(), b"Hello");
        // An empty message is one byte.
        let mut out = Vec::new();
        Compressor::new(6).compress(b"", 15, &mut out).unwrap();
        assert_eq!(out, [0x00]);
        assert_eq!(inflate_pieces(&out, 1).unwrap(), b"");
    }

    #[test]
    fn rfc_7692_context_takeover() {
        // §7.2.3.2: the second "Hello" refers to the first.
        let mut inf = Inflater::new();
        let mut out = Vec::new();
        inf.feed(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], &mut out, MAX)
            .unwrap();
        inf.finish(&mut out, MAX).unwrap();
        assert_eq!(out, b"Hello");
        out.clear();
        inf.feed(&[0xf2, 0x00, 0x11, 0x00, 0x00], &mut out, MAX)
            .unwrap();
        inf.finish(&mut out, MAX).unwrap();
        assert_eq!(out, b"Hello");
        // Without the first message's window it is corrupt.
        assert_eq!(
            inflate_pieces(&[0xf2, 0x00, 0x11, 0x00, 0x00], 5),
            Err(InflateError::Corrupt)
        );
    }

    #[test]
    fn zlib_fixture_from_python() {
        // Python 3.11 zlib 1.2.13: compressobj(9, DEFLATED, -15), Z_SYNC_FLUSH, tail removed;
        // the second message with context takeover.
        let m1 = br#"{"type":"msg","room":"lobby","from":"alice","text":"hello hello hello, is anyone here?"}"#;
        let m2 =
            br#"{"type":"msg","room":"lobby","from":"bob","text":"hello alice, yes: hello hello"}"#;
        let p1 = hex("aa562aa92c4855b252ca2d4e57d2512acacfcf057272f293922a81dcb42230373127333915c82d49ad28017233527372f21590481d85cc6285c4bccafcbc54a04051aabd522d00");
        let p2 = hex("aa26c6dca4fc247453c156e92854a6165b21dba0540b00");
        for piece in [1, 5, 1000] {
            assert_eq!(inflate_pieces(&p1, piece).unwrap(), m1);
        }
        let mut inf = Inflater::new();
        let mut out = Vec::new();
        for (p, m) in [(&p1, &m1[..]), (&p2, &m2[..])] {
            out.clear();
            for piece in p.chunks(3) {
                inf.feed(piece, &mut out, MAX).unwrap();
            }
            inf.finish(&mut out, MAX).unwrap();
            assert_eq!(out, m);
        }
    }

    #[test]
    fn round_trip_against_independent_decoders() {
        let mut c = Compressor::new(6);
        let mut fast = Compressor::new(1);
        for msg in [
            Vec::new(),
            b"x".to_vec(),
            chat_json(64),
            chat_json(1024),
            chat_json(100_000),
            noise(70_000),
            vec![0u8; 300_000],
        ] {
            for bits in [8, 9, 12, 15] {
                for comp in [&mut c, &mut fast] {
                    let mut out = vec![0xaa]; // appends after what is there
                    comp.compress(&msg, bits, &mut out).unwrap();
                    let payload = &out[1..];
                    assert_eq!(miniz_inflate(payload), msg);
                    let mut full = payload.to_vec();
                    full.extend_from_slice(&TAIL);
                    let decoded = reference::inflate(&full, &[]).unwrap();
                    assert_eq!(decoded.bytes, msg);
                    assert!(!decoded.final_block);
                    // The window limit holds; for 8 (compressed with 9) too.
                    let window = 1usize << bits.max(9);
                    assert!(decoded.max_distance <= window - 262, "bits {bits}");
                    assert_eq!(inflate_pieces(payload, 4096).unwrap(), msg);
                }
            }
        }
        // The same message compresses to the same bytes every time: no context is kept.
        let msg = chat_json(1024);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        c.compress(&msg, 15, &mut a).unwrap();
        c.compress(&chat_json(5000), 15, &mut Vec::new()).unwrap();
        c.compress(&msg, 15, &mut b).unwrap();
        assert_eq!(a, b);
        assert!(a.len() < msg.len() / 3, "{}", a.len());
        assert_eq!(c.windows_in_use().collect::<Vec<_>>(), [9, 12, 15]);
    }

    #[test]
    fn window_8_offer_is_honoured() {
        // A client that asked for server_max_window_bits=8 may inflate with a 256-byte window:
        // no distance may exceed 256. Text that repeats at every distance is the hard case.
        let mut msg = Vec::new();
        for i in 0..4000u32 {
            msg.extend_from_slice(format!("{} ", i % 300).as_bytes());
        }
        for level in [1, 6, 9] {
            let mut out = Vec::new();
            Compressor::new(level).compress(&msg, 8, &mut out).unwrap();
            out.extend_from_slice(&TAIL);
            let d = reference::inflate(&out, &[]).unwrap();
            assert_eq!(d.bytes, msg);
            assert!(d.max_distance <= 256, "level {level}: {}", d.max_distance);
            assert!(d.max_distance > 0);
        }
        // With a 32 KiB window the same text does use farther references.
        let mut out = Vec::new();
        Compressor::new(6).compress(&msg, 15, &mut out).unwrap();
        out.extend_from_slice(&TAIL);
        assert!(reference::inflate(&out, &[]).unwrap().max_distance > 256);
    }

    #[test]
    fn inflates_what_independent_compressors_make() {
        use miniz_oxide::deflate::core::{create_comp_flags_from_zip_params, CompressorOxide};
        use miniz_oxide::MZFlush;
        // miniz_oxide with a sync flush and context kept across messages, fed in odd pieces.
        let mut comp = Box::new(CompressorOxide::new(create_comp_flags_from_zip_params(
            6, -15, 0,
        )));
        let mut inf = Inflater::new();
        for i in 0..20 {
            let msg = chat_json(200 + i * 97);
            let mut buf = vec![0u8; msg.len() + 64];
            let r = miniz_oxide::deflate::stream::deflate(&mut comp, &msg, &mut buf, MZFlush::Sync);
            assert!(r.status.is_ok());
            assert_eq!(r.bytes_consumed, msg.len());
            let payload = &buf[..r.bytes_written - 4];
            let mut out = Vec::new();
            for piece in payload.chunks(1 + i * 3) {
                inf.feed(piece, &mut out, MAX).unwrap();
            }
            inf.finish(&mut out, MAX).unwrap();
            assert_eq!(out, msg);
        }
        // One-shot streams that end in BFINAL (libdeflate-style, §7.2.3.4).
        let msg = chat_json(3000);
        let mut payload = miniz_oxide::deflate::compress_to_vec(&msg, 6);
        payload.push(0x00);
        assert_eq!(inflate_pieces(&payload, 100).unwrap(), msg);
    }

    #[test]
    fn corrupt_data() {
        for bad in [
            &[0xff, 0xff, 0xff][..],               // BTYPE 11
            &[0x00, 0x05, 0x00, 0x00, 0x00, 0x48], // stored block with a bad NLEN
            &[0xf2, 0x00, 0x11, 0x00, 0x00],       // distance before the start
        ] {
            assert_eq!(
                inflate_pieces(bad, 2),
                Err(InflateError::Corrupt),
                "{bad:02x?}"
            );
        }
        assert_eq!(InflateError::Corrupt.close_code(), 1007);
        assert_eq!(InflateError::TooBig.close_code(), 1009);
    }

    #[test]
    fn bound_is_exact() {
        let msg = chat_json(10_000);
        let mut payload = Vec::new();
        Compressor::new(6).compress(&msg, 15, &mut payload).unwrap();
        for start_capacity in [0, 10_000, 20_000] {
            // Exactly the bound: fine.
            let mut inf = Inflater::new();
            let mut out = Vec::with_capacity(start_capacity);
            inf.feed(&payload, &mut out, 10_000).unwrap();
            inf.finish(&mut out, 10_000).unwrap();
            assert_eq!(out, msg);
            // One byte under: too big, whether the excess shows up in feed or in finish.
            let mut inf = Inflater::new();
            let mut out = Vec::with_capacity(start_capacity);
            let r = inf
                .feed(&payload, &mut out, 9_999)
                .and_then(|()| inf.finish(&mut out, 9_999));
            assert_eq!(r, Err(InflateError::TooBig), "capacity {start_capacity}");
            assert!(out.capacity() <= start_capacity.max(9_999));
        }
    }

    #[test]
    fn zip_bomb_is_stopped_at_the_bound() {
        // The generator makes valid data: a small one inflates fully, here and in miniz_oxide.
        let small = zip_bomb(1000);
        let expect = vec![0u8; 1 + 258 * 1000];
        assert_eq!(inflate_pieces(&small, 64).unwrap(), expect);
        assert_eq!(miniz_inflate(&small), expect);

        // ~99 KiB that inflates to 100 MiB.
        let matches = (100 << 20) / 258;
        let bomb = zip_bomb(matches);
        assert!(bomb.len() < 100 << 10, "{}", bomb.len());
        let bound = 1 << 20;
        let started = std::time::Instant::now();
        let mut pool = InflaterPool::new(4);
        let mut msg = MessageInflate::default();
        let mut out = Vec::new();
        let mut fed = 0;
        let mut result = Ok(());
        for frame in bomb.chunks(16 << 10) {
            fed += frame.len();
            result = msg.feed(&mut pool, frame, &mut out, bound);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(InflateError::TooBig));
        assert_eq!(fed, 16 << 10, "stops in the first frame");
        assert!(out.capacity() <= bound, "{}", out.capacity());
        assert_eq!(out.len(), bound);
        // Fast: well under a second in a debug build (loose bound: the box is shared).
        assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());
        // The state went back to the pool; the connection holds nothing.
        assert_eq!(msg.heap_bytes(), 0);
        assert_eq!(pool.len(), 1);
    }

    #[test]
    fn idle_connections_hold_nothing() {
        assert_eq!(std::mem::size_of::<MessageInflate>(), 8);
        let mut pool = InflaterPool::new(1);
        let mut payload = Vec::new();
        Compressor::new(6)
            .compress(&chat_json(2000), 15, &mut payload)
            .unwrap();
        let (first, rest) = payload.split_at(100);

        // No context takeover: held only while the message is in flight.
        let mut conn = MessageInflate::default();
        let mut out = Vec::new();
        conn.feed(&mut pool, first, &mut out, MAX).unwrap();
        assert_eq!(conn.heap_bytes(), Inflater::HEAP_BYTES);
        conn.feed(&mut pool, rest, &mut out, MAX).unwrap();
        conn.finish(&mut pool, false, &mut out, MAX).unwrap();
        assert_eq!(out, chat_json(2000));
        assert_eq!(conn.heap_bytes(), 0);
        assert_eq!(pool.len(), 1);

        // A second connection reuses the pooled state (reset: no window leaks across).
        let mut other = MessageInflate::default();
        out.clear();
        other
            .feed(&mut pool, &[0xf2, 0x00, 0x11, 0x00, 0x00], &mut out, MAX)
            .unwrap_err();
        assert_eq!(pool.len(), 1);

        // Context takeover: the state stays between messages, and is counted.
        let mut keeper = MessageInflate::default();
        for _ in 0..2 {
            out.clear();
            keeper.feed(&mut pool, &payload, &mut out, MAX).unwrap();
            keeper.finish(&mut pool, true, &mut out, MAX).unwrap();
            assert_eq!(out, chat_json(2000));
            assert_eq!(keeper.heap_bytes(), Inflater::HEAP_BYTES);
        }
        keeper.release(&mut pool);
        assert_eq!(keeper.heap_bytes(), 0);
        // The pool keeps at most what it was told to.
        assert_eq!(pool.len(), 1);
    }
}
