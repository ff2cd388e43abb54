//! Outbound permessage-deflate: a chunk of plain server frames (a room's batch, the echoes of
//! one read, a batch that came from another worker or node) re-encoded once for every member
//! that negotiated the same window, as one shared buffer.
//!
//! Plain frames are the one format every source already produces (`FrameBatch`), and server
//! frames are unmasked and whole, so walking them again costs a header read per message; the
//! compression itself is what costs (about 2 µs fixed, plus the bytes). That happens once per
//! batch and window in a worker, never per connection.

use bytes::{BufMut, Bytes, BytesMut};

use super::Compressor;
use crate::codec::{self, OutKind};

/// What [`FrameCompressor::compress_frames`] did, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompressStats {
    /// Messages sent compressed (RSV1).
    pub compressed: u64,
    /// Their payload bytes before and after compression.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Messages left uncompressed: under the size threshold, or not smaller compressed.
    pub plain: u64,
}

impl CompressStats {
    pub fn add(&mut self, o: CompressStats) {
        self.compressed += o.compressed;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.plain += o.plain;
    }
}

/// A worker's outbound compression: its [`Compressor`] (one deflate stream per window size in
/// use, reset after each message) and the size under which messages go uncompressed.
pub struct FrameCompressor {
    compressor: Compressor,
    min_size: usize,
    scratch: Vec<u8>,
}

/// The scratch buffer is kept between batches up to this size (a bigger message's buffer is
/// freed, so one large message does not pin memory in every worker).
const KEEP_SCRATCH: usize = 64 * 1024;

impl FrameCompressor {
    /// `level`: zlib's 1..=9; `min_size`: payloads shorter than this are sent uncompressed
    /// (RSV1 is per message, RFC 7692 §6).
    pub fn new(level: u32, min_size: usize) -> FrameCompressor {
        FrameCompressor {
            compressor: Compressor::new(level),
            min_size,
            scratch: Vec::new(),
        }
    }

    /// Re-encodes `plain` (whole, unmasked, final data frames, as `FrameBatch` makes them)
    /// for recipients whose agreement compresses with `window_bits`: each message of at least
    /// the minimum size goes compressed if that makes it smaller, the others as they were.
    /// If none is compressed, the result is `plain` itself (a refcount, no copy). Anything
    /// that is not such a frame (never produced today) is copied as it is, from there to the
    /// end, so the byte stream stays valid whatever comes in.
    pub fn compress_frames(
        &mut self,
        plain: &Bytes,
        window_bits: u8,
        stats: &mut CompressStats,
    ) -> Bytes {
        // Made at the first message that is compressed, with everything before it.
        let mut out: Option<BytesMut> = None;
        let mut pos = 0;
        while let Some((kind, header_len, len)) = data_frame(&plain[pos..]) {
            let end = pos + header_len + len;
            let payload = &plain[pos + header_len..end];
            self.scratch.clear();
            let smaller = len >= self.min_size
                && self
                    .compressor
                    .compress(payload, window_bits, &mut self.scratch)
                    .is_ok()
                && self.scratch.len() < len;
            if smaller {
                let o = out.get_or_insert_with(|| {
                    let mut o = BytesMut::with_capacity(plain.len());
                    o.put_slice(&plain[..pos]);
                    o
                });
                codec::encode_compressed_header(o, kind, self.scratch.len());
                o.put_slice(&self.scratch);
                stats.compressed += 1;
                stats.bytes_in += len as u64;
                stats.bytes_out += self.scratch.len() as u64;
            } else {
                if let Some(o) = out.as_mut() {
                    o.put_slice(&plain[pos..end]);
                }
                stats.plain += 1;
            }
            pos = end;
        }
        if self.scratch.capacity() > KEEP_SCRATCH {
            self.scratch = Vec::new();
        }
        match out {
            None => plain.clone(),
            Some(mut o) => {
                o.put_slice(&plain[pos..]);
                o.freeze()
            }
        }
    }

    /// Window sizes with a compress stream allocated (each about 250–380 KiB).
    pub fn windows_in_use(&self) -> impl Iterator<Item = u8> + '_ {
        self.compressor.windows_in_use()
    }
}

/// The frame at the front of `buf` if it is a whole, unmasked, final text or binary frame
/// without reserved bits: (kind, header length, payload length).
fn data_frame(buf: &[u8]) -> Option<(OutKind, usize, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let kind = match b0 {
        0x81 => OutKind::Text,
        0x82 => OutKind::Binary,
        _ => return None,
    };
    if b1 & 0x80 != 0 {
        return None; // masked: not a server frame
    }
    let (header_len, len) = match b1 & 0x7f {
        126 => (
            4,
            u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
        ),
        127 => (10, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)),
        n => (2, u64::from(n)),
    };
    let len = usize::try_from(len).ok()?;
    (buf.len() - header_len >= len).then_some((kind, header_len, len))
}

/// Largest compressed payload accepted for a message allowed `inflated` bytes: deflate can
/// make incompressible data larger (by up to 1/8 with fixed Huffman codes, by 5 bytes per
/// 64 KiB stored block), and that must not get a message under the bound refused. The bound
/// that matters is on the inflated bytes, checked while inflating.
pub fn compressed_bound(inflated: usize) -> usize {
    inflated.saturating_add(inflated / 8 + 64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deflate::Inflater;
    use crate::outbox::FrameBatch;

    fn inflate(payload: &[u8]) -> Vec<u8> {
        let mut inf = Inflater::new();
        let mut out = Vec::new();
        inf.feed(payload, &mut out, 1 << 24).unwrap();
        inf.finish(&mut out, 1 << 24).unwrap();
        out
    }

    /// Splits server frames: (first byte, payload).
    fn frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let (hl, len) = match b[1] & 0x7f {
                126 => (4, u16::from_be_bytes([b[2], b[3]]) as usize),
                127 => (
                    10,
                    u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                ),
                n => (2, n as usize),
            };
            v.push((b[0], b[hl..hl + len].to_vec()));
            b = &b[hl + len..];
        }
        v
    }

    #[test]
    fn big_messages_are_compressed_small_ones_left_alone() {
        let json = br#"{"type":"message","room":"general","text":"hello hello hello"}"#.repeat(20);
        let mut batch = FrameBatch::default();
        batch.push(OutKind::Text, b"hi");
        batch.push(OutKind::Text, &json);
        batch.push(OutKind::Binary, &[7u8; 70_000]);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        batch.push(OutKind::Binary, &noise);
        let plain = batch.take().unwrap().bytes;

        let mut c = FrameCompressor::new(3, 128);
        let mut stats = CompressStats::default();
        let out = c.compress_frames(&plain, 15, &mut stats);
        let got = frames(&out);
        assert!(out.len() < plain.len() / 2);
        assert_eq!(got.len(), 4);
        assert_eq!(
            got[0],
            (0x81, b"hi".to_vec()),
            "under the minimum: as it was"
        );
        assert_eq!(got[1].0, 0xC1, "text, RSV1");
        assert_eq!(inflate(&got[1].1), json);
        assert_eq!(got[2].0, 0xC2);
        assert_eq!(inflate(&got[2].1), vec![7u8; 70_000]);
        assert_eq!(
            got[3],
            (0x82, noise.clone()),
            "does not shrink: sent as it was"
        );
        assert_eq!(stats.compressed, 2);
        assert_eq!(stats.plain, 2);
        assert_eq!(stats.bytes_in, (json.len() + 70_000) as u64);
        assert_eq!(stats.bytes_out, (got[1].1.len() + got[2].1.len()) as u64);

        // The same input gives the same bytes (no context kept), and window 9 works too.
        assert_eq!(c.compress_frames(&plain, 15, &mut stats), out);
        let w9 = c.compress_frames(&plain, 9, &mut stats);
        assert_eq!(inflate(&frames(&w9)[1].1), json);
        assert_eq!(c.windows_in_use().collect::<Vec<_>>(), [9, 15]);
    }

    #[test]
    fn anything_else_is_copied_as_it_is() {
        let mut c = FrameCompressor::new(3, 0);
        let mut stats = CompressStats::default();
        // Nothing compressed: the same buffer comes back, not a copy.
        let mut batch = FrameBatch::default();
        batch.push(OutKind::Text, b"tiny");
        batch.push(OutKind::Binary, &[1, 2, 3]);
        let plain = batch.take().unwrap().bytes;
        let out = c.compress_frames(&plain, 15, &mut stats);
        assert_eq!(out.as_ptr(), plain.as_ptr());
        assert_eq!(stats.plain, 2);
        for odd in [
            &[0x89u8, 0x00][..],       // a ping
            &[0x01, 0x01, b'x'],       // not final
            &[0x81, 0x85, 1, 2, 3, 4], // masked
            &[0x81, 0x7e, 0x01],       // a cut header
            &[0x81, 0x05, b'a'],       // a cut payload
        ] {
            let mut plain = codec::encode(OutKind::Text, &[b'a'; 200]).to_vec();
            plain.extend_from_slice(odd);
            let out = c.compress_frames(&Bytes::from(plain), 15, &mut stats);
            assert_eq!(out[0], 0xC1);
            assert!(out.ends_with(odd), "{odd:x?}");
        }
        assert_eq!(compressed_bound(0), 64);
        assert_eq!(compressed_bound(usize::MAX), usize::MAX);
    }
}
