//! Random frame sequences cut at random byte positions, against a reference interpreter that
//! reads the RFC's rules off whole frames.
//!
//! Half the cases negotiate permessage-deflate and then also send compressed messages (whole
//! or fragmented, valid, corrupt, bombs, RSV1 where it is not allowed). The reference inflates
//! with the same `Inflater` (the codec is checked against independent decoders in
//! `deflate/codec.rs`); what is checked here is the session's framing around it: which frame
//! carries RSV1, budgets, where a message fails, and that any split of the reads gives the
//! same events.
//!
//! `MEGASOCK_PROPERTY_CASES` sets the number of random cases (default 20,000; CI runs
//! 1,000,000 in release mode: `scripts/test.sh`).

use super::*;
use crate::deflate::reference::zip_bomb;
use crate::deflate::{compressed_bound, Compressor, Inflater};

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

/// A permessage-deflate message: usually valid, sometimes corrupt, a bomb, or with RSV1 on
/// a continuation too; split into 1-3 fragments like any message.
fn compressed_message(rng: &mut Rng, comp: &mut Compressor, out: &mut Vec<Gen>) {
    let text = rng.chance(50);
    let plain = if text {
        text_payload(rng)
    } else {
        binary_payload(rng)
    };
    let mut payload = match rng.below(20) {
        0 => zip_bomb(4 + rng.below(8)), // 1,033 to 3,097 bytes inflated: over MAX mostly
        1 => (0..1 + rng.below(30))
            .map(|_| rng.below(256) as u8)
            .collect(),
        _ => {
            let mut v = Vec::new();
            comp.compress(&plain, 9 + rng.below(7) as u8, &mut v)
                .unwrap();
            v
        }
    };
    if rng.chance(5) && !payload.is_empty() {
        let i = rng.below(payload.len());
        payload[i] ^= 1 << rng.below(8); // one flipped bit
    }
    let rsv1_again = rng.chance(5);
    split(rng, text, &payload, true, rsv1_again, out);
}

/// A message split into 1-3 fragments (cut anywhere, also inside a character).
fn message(rng: &mut Rng, out: &mut Vec<Gen>) {
    let text = rng.chance(50);
    let payload = if text {
        text_payload(rng)
    } else {
        binary_payload(rng)
    };
    split(rng, text, &payload, false, false, out);
}

/// Cuts a message's payload into 1-3 frames (RSV1 on the first if `compressed`, and on the
/// others too if `rsv1_everywhere`), with a ping between them now and then.
fn split(
    rng: &mut Rng,
    text: bool,
    payload: &[u8],
    compressed: bool,
    rsv1_everywhere: bool,
    out: &mut Vec<Gen>,
) {
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
        let mut g = Gen::data(opcode, i + 1 == cuts.len(), payload[start..end].to_vec());
        if compressed && (i == 0 || rsv1_everywhere) {
            g.rsv = 4; // RSV1
        }
        out.push(g);
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

fn frames(rng: &mut Rng, deflate: bool, comp: &mut Compressor) -> Vec<Gen> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(6) {
        match rng.below(10) {
            0..=5 if deflate && rng.chance(50) => compressed_message(rng, comp, &mut out),
            0..=5 => message(rng, &mut out),
            6..=8 => out.push(control(rng)),
            _ => out.push(wild(rng)),
        }
    }
    out
}

/// A message being reassembled by the reference: its opcode, its (inflated) bytes, and its
/// inflater if it is compressed.
type Partial = (u8, Vec<u8>, Option<Inflater>);

/// RFC 6455 (and RFC 7692 if `deflate` was negotiated) read off whole frames, in the
/// simplest possible way: what the session must do.
fn reference(frames: &[Gen], deflate: bool) -> Vec<Ev> {
    let mut ev = vec![
        Ev::Status(101),
        Ev::Upgraded("lobby".into()),
        Ev::Http(Vec::new()), // compared by kind only
    ];
    let fail = |ev: &mut Vec<Ev>, code: u16, why: Disconnect| {
        ev.push(Ev::BeforeClose);
        ev.push(Ev::Ended(why));
        ev.push(Ev::Close(Some(code)));
    };
    let why = |code: u16| match code {
        1007 => Disconnect::InvalidUtf8,
        1009 => Disconnect::MessageTooBig,
        _ => Disconnect::ProtocolError,
    };
    let mut fragments: Option<Partial> = None;
    for f in frames {
        let control = f.opcode >= 8;
        let len = f.payload.len();
        let in_progress = fragments.as_ref().map_or(0, |(_, d, _)| d.len());
        // RSV1 marks a compressed message's first frame, and only that (RFC 7692 §6).
        let compressed_first = deflate && f.rsv == 4 && (f.opcode == 1 || f.opcode == 2);
        let compressed_more =
            f.opcode == 0 && fragments.as_ref().is_some_and(|(_, _, inf)| inf.is_some());
        let budget = if compressed_first || compressed_more {
            compressed_bound(MAX - in_progress)
        } else {
            MAX - in_progress
        };
        let bad_header = (f.rsv != 0 && !compressed_first)
            || !f.masked
            || ![0, 1, 2, 8, 9, 10].contains(&f.opcode);
        let verdict = if bad_header || (control && (!f.fin || len > 125)) {
            Some(1002)
        } else if !control && len > budget {
            Some(1009)
        } else if (f.opcode == 0 && fragments.is_none())
            || ((f.opcode == 1 || f.opcode == 2) && fragments.is_some())
        {
            Some(1002)
        } else {
            None
        };
        if let Some(code) = verdict {
            fail(&mut ev, code, why(code));
            return ev;
        }
        match f.opcode {
            9 => ev.push(Ev::Pong(f.payload.clone())),
            10 => {}
            8 => {
                let p = &f.payload;
                let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                if p.len() == 1 || code.is_some_and(|c| !codec::close_code_allowed(c)) {
                    fail(&mut ev, 1002, why(1002));
                } else if p.len() > 2 && std::str::from_utf8(&p[2..]).is_err() {
                    fail(&mut ev, 1007, why(1007));
                } else {
                    ev.push(Ev::BeforeClose);
                    ev.push(Ev::Ended(Disconnect::ClientClose));
                    ev.push(Ev::Close(code));
                }
                return ev;
            }
            op => {
                let (kind, mut data, mut inflater) = match fragments.take() {
                    Some(prior) => prior,
                    None => (op, Vec::new(), compressed_first.then(Inflater::new)),
                };
                match inflater.as_mut() {
                    // The inflated size is bounded; corrupt data is 1007 of its own kind.
                    Some(inf) => {
                        let r = inf.feed(&f.payload, &mut data, MAX).and_then(|()| {
                            if f.fin {
                                inf.finish(&mut data, MAX)
                            } else {
                                Ok(())
                            }
                        });
                        if let Err(e) = r {
                            let why = match e {
                                InflateError::TooBig => Disconnect::MessageTooBig,
                                InflateError::Corrupt => Disconnect::InvalidCompressed,
                            };
                            fail(&mut ev, e.close_code(), why);
                            return ev;
                        }
                    }
                    None => data.extend_from_slice(&f.payload),
                }
                // Text fails at the first byte that cannot start valid UTF-8, whole or not.
                if kind == 1 {
                    let bad = match std::str::from_utf8(&data) {
                        Ok(_) => false,
                        Err(e) => e.error_len().is_some() || f.fin,
                    };
                    if bad {
                        fail(&mut ev, 1007, why(1007));
                        return ev;
                    }
                }
                if f.fin {
                    let k = if kind == 1 { Kind::Text } else { Kind::Binary };
                    ev.push(Ev::Message(k, data));
                } else {
                    fragments = Some((kind, data, inflater));
                }
            }
        }
    }
    ev
}

fn split_pongs(ev: &[Ev]) -> (Vec<Ev>, Vec<Ev>) {
    ev.iter().cloned().partition(|e| matches!(e, Ev::Pong(_)))
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
    let mut comp = Compressor::new(6);
    let offer = {
        let head = std::str::from_utf8(REQUEST).unwrap();
        head.replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
        )
    };
    // Compressed messages delivered, and inflate failures seen, over all cases.
    let (mut rsv1_frames, mut failures) = (0u64, std::collections::BTreeMap::new());
    let mut stream = Vec::new();
    // How each case ended, so the generator is seen to reach every outcome.
    let mut outcomes = std::collections::BTreeMap::<String, u64>::new();
    for case in 0..cases {
        let deflate = rng.chance(50);
        let request = if deflate { offer.as_bytes() } else { REQUEST };
        let gens = frames(&mut rng, deflate, &mut comp);
        stream.clear();
        stream.extend_from_slice(request);
        for g in &gens {
            stream.extend(g.bytes(&mut rng));
        }
        let expected = reference(&gens, deflate);

        let mut s = Session::new(0);
        let mut rec = Rec::default();
        let mut at = 0;
        // One case in four is paused (its room's ring full) for a while after the upgrade:
        // its reads go to `receive_held` until a random point.
        let paused_until = if rng.chance(25) {
            request.len() + rng.below(stream.len() - request.len() + 1)
        } else {
            0
        };
        let mut paused = false;
        while at < stream.len() {
            let n = match rng.below(4) {
                0 => 1,
                1 => 1 + rng.below(8),
                2 => 1 + rng.below(200),
                _ => stream.len() - at,
            }
            .min(stream.len() - at);
            let mut read = stream[at..at + n].to_vec();
            if at >= request.len() && at < paused_until && s.phase() == Phase::Open {
                paused = true;
                s.receive_held(&read, &lim, 1, &mut rec);
            } else {
                if std::mem::take(&mut paused) {
                    s.receive(&mut [], &lim, 1, &mut rec); // the pause ends
                }
                s.receive(&mut read, &lim, 1, &mut rec);
            }
            at += n;
            assert!(
                s.buffered_capacity() <= 4 * (MAX + 64) + handshake::MAX_HEAD,
                "case {case}: holds {} bytes",
                s.buffered_capacity()
            );
        }
        if paused {
            s.receive(&mut [], &lim, 1, &mut rec);
        }
        for e in &rec.2 {
            *failures.entry(format!("{e:?}")).or_insert(0u64) += 1;
        }
        if deflate {
            rsv1_frames += gens.iter().filter(|g| g.rsv == 4).count() as u64;
        }
        let got = normalized(rec.0);
        if paused_until == 0 {
            assert_eq!(got, expected, "case {case}: frames {gens:?}");
        } else {
            // Paused: pings may be answered ahead of the data before them; nothing else
            // moves, and no ping behind a frame that fails is answered.
            let (got_pongs, got_rest) = split_pongs(&got);
            let (want_pongs, want_rest) = split_pongs(&expected);
            assert_eq!(got_rest, want_rest, "case {case} (paused): frames {gens:?}");
            assert_eq!(
                got_pongs, want_pongs,
                "case {case} (paused): frames {gens:?}"
            );
        }
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
    eprintln!("{cases} cases: {outcomes:?}; RSV1 frames sent with deflate {rsv1_frames}, inflate failures {failures:?}");
    if cases >= 10_000 {
        assert!(failures.contains_key("TooBig") && failures.contains_key("Corrupt"));
        assert!(rsv1_frames > cases / 10);
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
