//! A small RFC 1951 decoder and a bit writer, for tests only: an implementation independent of
//! zlib-rs to check what the codec produces, which also reports the farthest back-reference (so
//! a window limit can be checked) and can hand-build streams (a zip bomb).
//!
//! `tests/deflate_memory.rs` includes this file too (`#[path]`), so it uses only std.

/// Output of [`inflate`]: the bytes, the farthest distance used, and whether a final block
/// was seen.
pub struct Decoded {
    pub bytes: Vec<u8>,
    pub max_distance: usize,
    pub final_block: bool,
}

struct Bits<'a> {
    data: &'a [u8],
    pos: usize, // in bits
}

impl Bits<'_> {
    fn bit(&mut self) -> Option<u32> {
        let byte = *self.data.get(self.pos / 8)?;
        let b = (byte >> (self.pos % 8)) & 1;
        self.pos += 1;
        Some(u32::from(b))
    }

    fn bits(&mut self, n: u32) -> Option<u32> {
        let mut v = 0;
        for i in 0..n {
            v |= self.bit()? << i;
        }
        Some(v)
    }

    fn align(&mut self) {
        self.pos = self.pos.div_ceil(8) * 8;
    }
}

/// A canonical Huffman code, decoded as in zlib's puff.c: codes of each length are
/// consecutive, so one comparison per bit finds the symbol.
struct Huffman {
    counts: [u16; 16],
    /// Symbols ordered by code length, then value.
    symbols: Vec<u16>,
}

impl Huffman {
    fn new(lengths: &[u8]) -> Huffman {
        let mut counts = [0u16; 16];
        for &l in lengths {
            counts[usize::from(l)] += 1;
        }
        counts[0] = 0;
        let mut symbols = Vec::new();
        for len in 1..=15u8 {
            for (sym, &l) in lengths.iter().enumerate() {
                if l == len {
                    symbols.push(sym as u16);
                }
            }
        }
        Huffman { counts, symbols }
    }

    fn decode(&self, bits: &mut Bits<'_>) -> Option<u16> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..=15 {
            code |= bits.bit()? as i32;
            let count = i32::from(self.counts[len]);
            if code - first < count {
                return self.symbols.get((index + code - first) as usize).copied();
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        None
    }
}

const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
const CL_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// Decodes raw deflate until a final block or the end of the data (a sync-flushed stream has
/// no final block; the data must then end on a block boundary). `history` is the window
/// carried over from earlier messages (context takeover), not part of the output.
pub fn inflate(data: &[u8], history: &[u8]) -> Option<Decoded> {
    let mut bits = Bits { data, pos: 0 };
    let mut out = history.to_vec();
    let mut max_distance = 0;
    let mut final_block = false;
    while bits.pos + 3 <= data.len() * 8 && !final_block {
        final_block = bits.bit()? == 1;
        match bits.bits(2)? {
            0 => {
                bits.align();
                let len = bits.bits(16)?;
                let nlen = bits.bits(16)?;
                if len != !nlen & 0xffff {
                    return None;
                }
                for _ in 0..len {
                    out.push(bits.bits(8)? as u8);
                }
            }
            t @ (1 | 2) => {
                let (lit, dist) =
                    if t == 1 {
                        let mut l = [8u8; 288];
                        l[144..256].fill(9);
                        l[256..280].fill(7);
                        (Huffman::new(&l), Huffman::new(&[5; 30]))
                    } else {
                        let hlit = bits.bits(5)? as usize + 257;
                        let hdist = bits.bits(5)? as usize + 1;
                        let hclen = bits.bits(4)? as usize + 4;
                        let mut cl = [0u8; 19];
                        for &i in &CL_ORDER[..hclen] {
                            cl[i] = bits.bits(3)? as u8;
                        }
                        let cl = Huffman::new(&cl);
                        let mut lengths = Vec::new();
                        while lengths.len() < hlit + hdist {
                            match cl.decode(&mut bits)? {
                                s @ 0..=15 => lengths.push(s as u8),
                                16 => {
                                    let prev = *lengths.last()?;
                                    for _ in 0..3 + bits.bits(2)? {
                                        lengths.push(prev);
                                    }
                                }
                                17 => lengths
                                    .extend(std::iter::repeat_n(0, 3 + bits.bits(3)? as usize)),
                                _ => lengths
                                    .extend(std::iter::repeat_n(0, 11 + bits.bits(7)? as usize)),
                            }
                        }
                        (
                            Huffman::new(&lengths[..hlit]),
                            Huffman::new(&lengths[hlit..hlit + hdist]),
                        )
                    };
                loop {
                    let sym = lit.decode(&mut bits)? as usize;
                    match sym {
                        0..=255 => out.push(sym as u8),
                        256 => break,
                        _ => {
                            let i = sym - 257;
                            let len = *LEN_BASE.get(i)? as usize
                                + bits.bits(u32::from(LEN_EXTRA[i]))? as usize;
                            let d = dist.decode(&mut bits)? as usize;
                            let distance = *DIST_BASE.get(d)? as usize
                                + bits.bits(u32::from(DIST_EXTRA[d]))? as usize;
                            if distance > out.len() {
                                return None;
                            }
                            max_distance = max_distance.max(distance);
                            for _ in 0..len {
                                out.push(out[out.len() - distance]);
                            }
                        }
                    }
                }
            }
            _ => return None,
        }
    }
    out.drain(..history.len());
    Some(Decoded {
        bytes: out,
        max_distance,
        final_block,
    })
}

/// Writes a deflate bit stream.
#[derive(Default)]
pub struct BitWriter {
    pub bytes: Vec<u8>,
    used: u32, // bits used in the last byte
}

impl BitWriter {
    /// `n` bits of `v`, least significant first (header fields, extra bits).
    pub fn bits(&mut self, v: u32, n: u32) {
        for i in 0..n {
            if self.used % 8 == 0 {
                self.bytes.push(0);
                self.used = 0;
            }
            *self.bytes.last_mut().unwrap() |= (((v >> i) & 1) as u8) << self.used;
            self.used += 1;
        }
    }

    /// A Huffman code of `len` bits, most significant first.
    pub fn code(&mut self, code: u32, len: u32) {
        for i in (0..len).rev() {
            self.bits((code >> i) & 1, 1);
        }
    }
}

/// A hand-built dynamic-Huffman block: one literal 0, then `matches` copies of 258 bytes
/// at distance 1, each coded in 2 bits (the best deflate can do: 1032:1).
pub fn zip_bomb(matches: usize) -> Vec<u8> {
    let mut w = BitWriter::default();
    w.bits(0, 1); // not final
    w.bits(2, 2); // dynamic
    w.bits(29, 5); // 286 literal/length codes
    w.bits(0, 5); // 1 distance code
    w.bits(14, 4); // 18 code-length codes
                   // Code-length code: 18 -> 1 bit ("0"), 1 -> "10", 2 -> "11".
    for sym in [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1] {
        w.bits(
            match sym {
                18 => 1,
                1 | 2 => 2,
                _ => 0,
            },
            3,
        );
    }
    let (cl_18, cl_1, cl_2) = ((0, 1), (2, 2), (3, 2));
    // Literal/length lengths: 0 -> 2, 1..=255 -> 0, 256 -> 2, 257..=284 -> 0, 285 -> 1;
    // distance: 0 -> 1.
    w.code(cl_2.0, cl_2.1);
    w.code(cl_18.0, cl_18.1);
    w.bits(138 - 11, 7);
    w.code(cl_18.0, cl_18.1);
    w.bits(117 - 11, 7);
    w.code(cl_2.0, cl_2.1);
    w.code(cl_18.0, cl_18.1);
    w.bits(28 - 11, 7);
    w.code(cl_1.0, cl_1.1);
    w.code(cl_1.0, cl_1.1);
    // Codes: 285 -> "0", literal 0 -> "10", end of block -> "11"; distance 0 -> "0".
    w.code(0b10, 2);
    for _ in 0..matches {
        w.code(0, 1);
        w.code(0, 1);
    }
    w.code(0b11, 2);
    w.bits(0, 3); // the empty stored block's header; the receiver appends its 00 00 ff ff
    w.bytes
}
