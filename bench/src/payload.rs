//! Message payloads: a header (magic, run id, source, sequence number, CLOCK_MONOTONIC send
//! time) followed by a padding pattern derived from the header, so that a receiver can check
//! every byte without keeping a copy of what was sent.
//!
//! Binary layout (24 bytes): `MSB1` | run u32 LE | src u32 LE | seq u32 LE | send_ns u64 LE.
//! Text layout (44 ASCII bytes): `MSB1` + the same four fields as lower-case hex
//! (8 + 8 + 8 + 16 digits), so text frames stay valid UTF-8.
//!
//! The padding is `a..z` repeated, except in the JSON style (`--json-payload`), where it is a slice of
//! realistic chat JSON: `a..z` compresses a hundredfold and would flatter permessage-deflate,
//! chat JSON compresses about as much as real traffic.

/// What a payload looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Binary,
    Text,
    /// Text whose padding is chat JSON (for compression benchmarks).
    Json,
}

impl Style {
    pub fn text(self) -> bool {
        self != Style::Binary
    }
}

pub const MAGIC: &[u8; 4] = b"MSB1";
pub const BIN_HEADER: usize = 24;
pub const TEXT_HEADER: usize = 44;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub run: u32,
    /// Publisher id (broadcast, ladder) or connection id (echo).
    pub src: u32,
    pub seq: u32,
    pub send_ns: u64,
}

pub fn header_len(style: Style) -> usize {
    if style.text() {
        TEXT_HEADER
    } else {
        BIN_HEADER
    }
}

/// The padding is `a..z` repeated, starting at letter (seq + src) mod 26: byte i of the
/// padding is `b'a' + (i + seq + src) % 26`. It has period 26, so it is written and checked
/// against slices of this table, PAD_CHUNK bytes (a multiple of 26) at a time.
const PAD_CHUNK: usize = 26 * 157;
static PAD_TABLE: [u8; PAD_CHUNK + 26] = pad_table();

const fn pad_table() -> [u8; PAD_CHUNK + 26] {
    let mut t = [0u8; PAD_CHUNK + 26];
    let mut i = 0;
    while i < t.len() {
        t[i] = b'a' + (i % 26) as u8;
        i += 1;
    }
    t
}

/// The padding pattern for this header, good for up to PAD_CHUNK bytes.
#[inline]
fn pad_pattern(h: &Header, style: Style) -> &'static [u8] {
    if style == Style::Json {
        let k = json_offset(h);
        return &json_table()[k..k + PAD_CHUNK];
    }
    let k = (h.seq.wrapping_add(h.src) % 26) as usize;
    &PAD_TABLE[k..k + PAD_CHUNK]
}

/// Length of the generated chat JSON the JSON-style padding is cut from. Far larger than
/// deflate's 32 KiB window, and consecutive messages start [`JSON_STRIDE`] apart, so a
/// server that keeps its compression context gains from the shape of chat JSON (keys, names,
/// words) as it would in real traffic, not from seeing the same bytes again.
const JSON_LEN: usize = 1 << 18;
const JSON_STRIDE: usize = 40_009;

/// The padding of a JSON-style payload starts here in the corpus.
fn json_offset(h: &Header) -> usize {
    (h.seq as usize)
        .wrapping_mul(JSON_STRIDE)
        .wrapping_add((h.src as usize).wrapping_mul(65_537))
        % JSON_LEN
}

/// Chat messages as a client would send them, generated once from a fixed seed (the same in
/// every process): message, typing and presence events with names, words, ids and times.
fn json_table() -> &'static [u8] {
    static TABLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        const NAMES: &[&str] = &[
            "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
            "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter",
        ];
        const WORDS: &[&str] = &[
            "the", "deploy", "finished", "and", "dashboards", "look", "fine", "did", "migration",
            "for", "orders", "table", "run", "too", "yes", "rows", "in", "no", "locks", "held",
            "longer", "than", "can", "someone", "review", "before", "lunch", "it", "touches",
            "billing", "webhook", "retries", "on", "will", "leave", "comments", "next", "half",
            "hour", "reminder", "retro", "at", "add", "your", "notes", "to", "board", "please",
            "latency", "spiked", "after", "release", "rollback", "is", "ready", "if", "we",
            "need", "it", "customer", "reported", "login", "page", "slow", "cache", "hit",
            "rate", "dropped", "checking", "now", "thanks", "great", "work", "everyone", "ship",
            "friday", "maybe", "monday", "better", "tests", "green", "red", "flaky", "again",
        ];
        const EMOJI: &[&str] = &["tada", "rocket", "eyes", "thumbsup", "fire", "heart"];
        let mut rng = crate::util::Rng::new(0x6d65_6761_736f_636b);
        let mut pick = |n: usize| (rng.next_u64() % n as u64) as usize;
        let mut out = String::with_capacity(JSON_LEN + PAD_CHUNK + 512);
        let mut id = 48_213u64;
        let mut ts = 1_764_662_400_123u64;
        while out.len() < JSON_LEN + PAD_CHUNK {
            id += 1;
            ts += 200 + pick(9000) as u64;
            let user = pick(NAMES.len());
            let uid = 1000 + user * 97;
            match pick(10) {
                0 => out += &format!(
                    r#"{{"type":"typing","room":"lobby","user":{{"id":{uid},"name":"{}"}},"ts":{ts}}}"#,
                    NAMES[user]
                ),
                1 => out += &format!(
                    r#"{{"type":"presence","room":"lobby","online":[{},{},{}],"ts":{ts}}}"#,
                    1000 + pick(NAMES.len()) * 97,
                    1000 + pick(NAMES.len()) * 97,
                    1000 + pick(NAMES.len()) * 97
                ),
                _ => {
                    let words = 4 + pick(18);
                    let text: Vec<&str> = (0..words).map(|_| WORDS[pick(WORDS.len())]).collect();
                    out += &format!(
                        r#"{{"type":"message","room":"lobby","id":"m-{id}","user":{{"id":{uid},"name":"{}","avatar":"https://cdn.example.com/u/{uid}.png"}},"text":"{}","ts":{ts},"reactions":[{{"emoji":"{}","count":{}}}]}}"#,
                        NAMES[user],
                        text.join(" "),
                        EMOJI[pick(EMOJI.len())],
                        pick(9)
                    );
                }
            }
        }
        out.truncate(JSON_LEN + PAD_CHUNK);
        out.into_bytes()
    })
}

/// Fill `buf` (its whole length is the payload) with header + padding.
pub fn write(buf: &mut [u8], h: &Header, style: Style) {
    let text = style.text();
    let hl = header_len(style);
    debug_assert!(buf.len() >= hl);
    buf[..4].copy_from_slice(MAGIC);
    if text {
        put_hex(&mut buf[4..12], u64::from(h.run));
        put_hex(&mut buf[12..20], u64::from(h.src));
        put_hex(&mut buf[20..28], u64::from(h.seq));
        put_hex(&mut buf[28..44], h.send_ns);
    } else {
        buf[4..8].copy_from_slice(&h.run.to_le_bytes());
        buf[8..12].copy_from_slice(&h.src.to_le_bytes());
        buf[12..16].copy_from_slice(&h.seq.to_le_bytes());
        buf[16..24].copy_from_slice(&h.send_ns.to_le_bytes());
    }
    let pattern = pad_pattern(h, style);
    for chunk in buf[hl..].chunks_mut(PAD_CHUNK) {
        chunk.copy_from_slice(&pattern[..chunk.len()]);
    }
}

/// Parse the header and check the padding; None if the magic, a hex digit or the padding is
/// off. (A changed run id or send time is caught by the caller, which knows what to expect.)
pub fn read(buf: &[u8], style: Style) -> Option<Header> {
    let text = style.text();
    let hl = header_len(style);
    if buf.len() < hl || &buf[..4] != MAGIC {
        return None;
    }
    let h = if text {
        Header {
            run: get_hex(&buf[4..12])? as u32,
            src: get_hex(&buf[12..20])? as u32,
            seq: get_hex(&buf[20..28])? as u32,
            send_ns: get_hex(&buf[28..44])?,
        }
    } else {
        Header {
            run: u32::from_le_bytes(buf[4..8].try_into().ok()?),
            src: u32::from_le_bytes(buf[8..12].try_into().ok()?),
            seq: u32::from_le_bytes(buf[12..16].try_into().ok()?),
            send_ns: u64::from_le_bytes(buf[16..24].try_into().ok()?),
        }
    };
    let pattern = pad_pattern(&h, style);
    if buf[hl..]
        .chunks(PAD_CHUNK)
        .all(|c| c == &pattern[..c.len()])
    {
        Some(h)
    } else {
        None
    }
}

fn put_hex(out: &mut [u8], mut v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = HEX[(v & 15) as usize];
        v >>= 4;
    }
}

fn get_hex(s: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        v = v << 4 | u64::from(d);
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_the_documented_sequence() {
        let h = Header {
            run: 1,
            src: 3,
            seq: 30,
            send_ns: 5,
        };
        let mut b = vec![0u8; BIN_HEADER + 100];
        write(&mut b, &h, Style::Binary);
        for (i, &c) in b[BIN_HEADER..].iter().enumerate() {
            assert_eq!(c, b'a' + ((i as u32 + 30 + 3) % 26) as u8);
        }
    }

    #[test]
    fn round_trip_binary_and_text() {
        let h = Header {
            run: 0xdead_beef,
            src: 7,
            seq: 123_456,
            send_ns: 0x0123_4567_89ab_cdef,
        };
        for style in [Style::Binary, Style::Text, Style::Json] {
            let text = style.text();
            for len in [header_len(style), 64, 1000, 3 * PAD_CHUNK + 7] {
                let mut b = vec![0u8; len];
                write(&mut b, &h, style);
                assert_eq!(read(&b, style), Some(h));
                if text {
                    assert!(std::str::from_utf8(&b).is_ok());
                }
                // any flipped byte is caught
                for i in [0, 5, len - 1] {
                    let mut c = b.clone();
                    c[i] ^= 0x01;
                    assert_ne!(
                        read(&c, style),
                        Some(h),
                        "flip at {i} (len {len}, {style:?})"
                    );
                }
            }
        }
        assert_eq!(read(b"MSB1", Style::Binary), None);
    }
}
