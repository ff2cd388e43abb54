//! permessage-deflate negotiation (RFC 7692 §7): read the client's `Sec-WebSocket-Extensions`
//! offers, pick the first one this server accepts, and write the answer.
//!
//! The header grammar is RFC 6455 §9.1: comma-separated extensions, each a token followed by
//! `;`-separated parameters, a parameter value being a token or a quoted string whose unescaped
//! text is a token, with optional whitespace between the parts. A request may carry several
//! such headers; their lists concatenate in order, and the client lists offers by preference.
//!
//! Two kinds of "no" are kept apart, because the caller answers them differently:
//! - the header breaks that grammar -> [`Malformed`] (the handshake answers 400);
//! - a `permessage-deflate` offer that is well-formed but unacceptable (unknown or repeated
//!   parameter, bad value; RFC 7692 §7 says the server MUST decline it) is skipped in silence,
//!   as are other extensions; if no offer is left, the connection is simply uncompressed.
//!
//! Policy, fixed here because the fan-out depends on it: the server always answers
//! `server_no_context_takeover`, so a message compresses to the same bytes whoever receives it
//! and one frame serves a whole room.

use std::fmt::Write as _;

/// The `Sec-WebSocket-Extensions` header is not valid RFC 6455 §9.1 syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// What the server is willing to agree to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Negotiate permessage-deflate at all. Off: offers are not even parsed (no 400 either).
    pub enabled: bool,
    /// Let a client compress each message with the previous ones as context. That costs an
    /// inflate state held by the connection between messages (about 40 KiB, see
    /// [`Inflater::heap_bytes`](super::Inflater::heap_bytes)); otherwise the server answers
    /// `client_no_context_takeover` and an idle connection holds nothing.
    pub allow_client_context_takeover: bool,
    /// Largest LZ77 window the server compresses with, 9..=15 (other values are clamped).
    pub server_max_window_bits: u8,
    /// Largest window a client keeping context takeover may use, 9..=15 (clamped). Asked for
    /// only from clients that offer `client_max_window_bits`; others get no context takeover
    /// unless this is 15. (With zlib-rs the inflate state is the same size for every window,
    /// so this saves no memory today; it is kept for the protocol.)
    pub client_max_window_bits: u8,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            enabled: true,
            allow_client_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        }
    }
}

/// The parameters agreed for one connection, packed in one byte (it is stored per connection).
///
/// `server_no_context_takeover` is implied: the server always asks for it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Agreement(u8);

// Layout of the byte.
const SERVER_BITS: u8 = 0b0000_0111; // server window bits - 8
const ANSWER_SERVER_BITS: u8 = 0b0000_1000; // the offer had server_max_window_bits
const CLIENT_BITS: u8 = 0b0111_0000; // client window bits - 8 (answered when < 15)
const CLIENT_NO_TAKEOVER: u8 = 0b1000_0000;

impl Agreement {
    fn new(server_bits: u8, answer_server_bits: bool, client_bits: u8, takeover: bool) -> Self {
        let mut b = (server_bits - 8) | ((client_bits - 8) << 4);
        if answer_server_bits {
            b |= ANSWER_SERVER_BITS;
        }
        if !takeover {
            b |= CLIENT_NO_TAKEOVER;
        }
        Agreement(b)
    }

    /// The server's window limit as agreed (8..=15): what the client was told.
    pub fn server_max_window_bits(self) -> u8 {
        (self.0 & SERVER_BITS) + 8
    }

    /// The window to give the compressor (9..=15). zlib cannot make a raw deflate stream with a
    /// 256-byte window (8); with a 512-byte window (9) it never emits a distance over
    /// 512 - 262 = 250, which fits the 256 bytes the client allowed. Node (`ws`) and zlib's own
    /// zlib-wrapper mode do the same.
    pub fn compress_window_bits(self) -> u8 {
        self.server_max_window_bits().max(9)
    }

    /// The client's window limit (8..=15; 15 when nothing was asked).
    pub fn client_max_window_bits(self) -> u8 {
        ((self.0 & CLIENT_BITS) >> 4) + 8
    }

    /// True if the client may compress with the previous messages as context, so its inflate
    /// state must stay with the connection.
    pub fn client_context_takeover(self) -> bool {
        self.0 & CLIENT_NO_TAKEOVER == 0
    }

    /// Appends `Sec-WebSocket-Extensions: permessage-deflate; ...\r\n` for the 101 response.
    pub fn write_response_header(self, out: &mut Vec<u8>) {
        let mut line = String::with_capacity(120);
        line.push_str("Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover");
        if !self.client_context_takeover() {
            line.push_str("; client_no_context_takeover");
        }
        if self.0 & ANSWER_SERVER_BITS != 0 {
            let _ = write!(
                line,
                "; server_max_window_bits={}",
                self.server_max_window_bits()
            );
        }
        // Only ever below 15 if the offer had client_max_window_bits (RFC 7692 §7.1.2.2 forbids
        // it in the answer otherwise).
        if self.client_max_window_bits() < 15 {
            let _ = write!(
                line,
                "; client_max_window_bits={}",
                self.client_max_window_bits()
            );
        }
        line.push_str("\r\n");
        out.extend_from_slice(line.as_bytes());
    }
}

impl std::fmt::Debug for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agreement")
            .field("server_max_window_bits", &self.server_max_window_bits())
            .field("answer_server_bits", &(self.0 & ANSWER_SERVER_BITS != 0))
            .field("client_max_window_bits", &self.client_max_window_bits())
            .field("client_context_takeover", &self.client_context_takeover())
            .finish()
    }
}

/// Reads every `Sec-WebSocket-Extensions` value of a request, in order, and returns the first
/// `permessage-deflate` offer the server accepts under `config`, or `None`.
///
/// The whole header is checked even after an offer is accepted, so the answer does not depend
/// on where the broken part is.
pub fn negotiate<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
    config: &DeflateConfig,
) -> Result<Option<Agreement>, Malformed> {
    if !config.enabled {
        return Ok(None);
    }
    let mut chosen = None;
    for value in values {
        parse_value(value, |offer| {
            if chosen.is_none() {
                chosen = offer.accept(config);
            }
        })?;
    }
    Ok(chosen)
}

/// One `permessage-deflate` offer, as far as it was read.
#[derive(Default)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// Some(None): present without a value.
    client_max_window_bits: Option<Option<u8>>,
    /// Unknown or repeated parameter, or a bad value: the offer must be declined.
    declined: bool,
}

impl Offer {
    fn param(&mut self, name: &[u8], value: Option<Value<'_>>) {
        let ok = if name.eq_ignore_ascii_case(b"server_no_context_takeover") {
            value.is_none() && !std::mem::replace(&mut self.server_no_context_takeover, true)
        } else if name.eq_ignore_ascii_case(b"client_no_context_takeover") {
            value.is_none() && !std::mem::replace(&mut self.client_no_context_takeover, true)
        } else if name.eq_ignore_ascii_case(b"server_max_window_bits") {
            // A value is required here (only the client's may be bare).
            match value.and_then(|v| window_bits(&v)) {
                Some(bits) => self.server_max_window_bits.replace(bits).is_none(),
                None => false,
            }
        } else if name.eq_ignore_ascii_case(b"client_max_window_bits") {
            match value.map(|v| window_bits(&v)) {
                Some(None) => false,
                bits => self
                    .client_max_window_bits
                    .replace(bits.flatten())
                    .is_none(),
            }
        } else {
            false
        };
        self.declined |= !ok;
    }

    fn accept(&self, config: &DeflateConfig) -> Option<Agreement> {
        if self.declined {
            return None;
        }
        let server_cap = config.server_max_window_bits.clamp(9, 15);
        let client_cap = config.client_max_window_bits.clamp(9, 15);
        let server_bits = self.server_max_window_bits.unwrap_or(15).min(server_cap);
        // The client's window only matters if its context is kept; without that, a pooled
        // 32 KiB inflater handles any window and the client is left free.
        let client_bits = match self.client_max_window_bits {
            None => 15,
            Some(None) => client_cap,
            Some(Some(bits)) => bits.min(client_cap),
        };
        let takeover = config.allow_client_context_takeover
            && !self.client_no_context_takeover
            && client_bits <= client_cap;
        Some(Agreement::new(
            server_bits,
            self.server_max_window_bits.is_some(),
            if takeover { client_bits } else { 15 },
            takeover,
        ))
    }
}

/// `1*DIGIT` without leading zeroes, 8..=15 (RFC 7692 §7.1.2).
fn window_bits(v: &Value<'_>) -> Option<u8> {
    let mut digits = v.unescaped();
    let bits = match (digits.next(), digits.next(), digits.next()) {
        (Some(d @ b'8'..=b'9'), None, None) => d - b'0',
        (Some(b'1'), Some(d @ b'0'..=b'5'), None) => 10 + d - b'0',
        _ => return None,
    };
    Some(bits)
}

/// A parameter value as written: a token, or the inside of a quoted string.
#[derive(Clone, Copy)]
struct Value<'a> {
    raw: &'a [u8],
    quoted: bool,
}

impl<'a> Value<'a> {
    /// The value's bytes with quoted-pair escapes undone.
    fn unescaped(&self) -> impl Iterator<Item = u8> + 'a {
        let quoted = self.quoted;
        let mut escaped = false;
        self.raw.iter().filter_map(move |&b| {
            if quoted && !escaped && b == b'\\' {
                escaped = true;
                return None;
            }
            escaped = false;
            Some(b)
        })
    }
}

/// RFC 9110 tchar.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn token(&mut self) -> Result<&'a [u8], Malformed> {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        if self.i == start {
            return Err(Malformed);
        }
        Ok(&self.s[start..self.i])
    }

    fn value(&mut self) -> Result<Value<'a>, Malformed> {
        if self.peek() != Some(b'"') {
            return Ok(Value {
                raw: self.token()?,
                quoted: false,
            });
        }
        self.i += 1;
        let start = self.i;
        loop {
            match self.peek().ok_or(Malformed)? {
                b'"' => break,
                b'\\' => {
                    // quoted-pair: HTAB / SP / VCHAR / obs-text
                    self.i += 1;
                    match self.peek().ok_or(Malformed)? {
                        b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => self.i += 1,
                        _ => return Err(Malformed),
                    }
                }
                // qdtext
                b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => self.i += 1,
                _ => return Err(Malformed),
            }
        }
        let v = Value {
            raw: &self.s[start..self.i],
            quoted: true,
        };
        self.i += 1; // closing quote
                     // RFC 6455 §9.1: the unescaped text of a quoted value must be a token.
        let mut chars = v.unescaped().peekable();
        if chars.peek().is_none() || !chars.all(is_tchar) {
            return Err(Malformed);
        }
        Ok(v)
    }
}

/// Parses one header value, calling `on_offer` for each `permessage-deflate` element.
fn parse_value(s: &[u8], mut on_offer: impl FnMut(&Offer)) -> Result<(), Malformed> {
    let mut c = Cursor { s, i: 0 };
    loop {
        c.skip_ows();
        match c.peek() {
            None => return Ok(()),
            // Empty list elements are allowed and ignored (RFC 9110 §5.6.1).
            Some(b',') => {
                c.i += 1;
                continue;
            }
            Some(_) => {}
        }
        let is_deflate = c.token()?.eq_ignore_ascii_case(b"permessage-deflate");
        let mut offer = Offer::default();
        loop {
            c.skip_ows();
            match c.peek() {
                None => break,
                Some(b',') => {
                    c.i += 1;
                    break;
                }
                Some(b';') => {
                    c.i += 1;
                    c.skip_ows();
                    let name = c.token()?;
                    c.skip_ows();
                    let value = if c.peek() == Some(b'=') {
                        c.i += 1;
                        c.skip_ows();
                        Some(c.value()?)
                    } else {
                        None
                    };
                    offer.param(name, value);
                }
                Some(_) => return Err(Malformed),
            }
        }
        if is_deflate {
            on_offer(&offer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeflateConfig {
        DeflateConfig::default()
    }

    fn neg(values: &[&str], config: &DeflateConfig) -> Result<Option<Agreement>, Malformed> {
        negotiate(values.iter().map(|v| v.as_bytes()), config)
    }

    fn answer(values: &[&str], config: &DeflateConfig) -> Option<String> {
        neg(values, config).unwrap().map(|a| {
            let mut out = Vec::new();
            a.write_response_header(&mut out);
            String::from_utf8(out).unwrap()
        })
    }

    const PLAIN: &str =
        "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n";

    #[test]
    fn agreement_is_one_byte() {
        assert_eq!(std::mem::size_of::<Agreement>(), 1);
        assert_eq!(std::mem::size_of::<Option<Agreement>>(), 2);
    }

    #[test]
    fn browser_offer() {
        // What Chromium and Firefox send.
        let a = neg(&["permessage-deflate; client_max_window_bits"], &cfg())
            .unwrap()
            .unwrap();
        assert_eq!(a.server_max_window_bits(), 15);
        assert_eq!(a.compress_window_bits(), 15);
        assert_eq!(a.client_max_window_bits(), 15);
        assert!(!a.client_context_takeover());
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"], &cfg()).unwrap(),
            PLAIN
        );
        assert_eq!(answer(&["permessage-deflate"], &cfg()).unwrap(), PLAIN);
    }

    #[test]
    fn disabled_or_absent() {
        let off = DeflateConfig {
            enabled: false,
            ..cfg()
        };
        assert_eq!(neg(&["permessage-deflate"], &off), Ok(None));
        // Off means not looked at: a broken header is not our business then.
        assert_eq!(neg(&["permessage-deflate; ="], &off), Ok(None));
        assert_eq!(neg(&[], &cfg()), Ok(None));
        assert_eq!(neg(&["x-webkit-deflate-frame"], &cfg()), Ok(None));
        assert_eq!(neg(&["", " , ,"], &cfg()), Ok(None));
    }

    #[test]
    fn first_acceptable_offer_wins() {
        // The client's preferred offer asks for a smaller server window, the fallback does
        // not; both are acceptable here, so the first is taken.
        let a = neg(
            &["permessage-deflate; client_max_window_bits; server_max_window_bits=10, permessage-deflate; client_max_window_bits"],
            &cfg(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.server_max_window_bits(), 10);

        // The first offer is unacceptable (unknown parameter): the second is taken.
        let a = neg(
            &["permessage-deflate; foo=1, permessage-deflate; server_max_window_bits=12"],
            &cfg(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.server_max_window_bits(), 12);

        // Offers spread over several headers, other extensions in between.
        let a = neg(
            &[
                "x-foo; a=b",
                "permessage-deflate; server_max_window_bits=99",
                "mux, permessage-deflate; server_max_window_bits=9, permessage-deflate",
            ],
            &cfg(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.server_max_window_bits(), 9);
    }

    #[test]
    fn unacceptable_offers_are_declined() {
        for bad in [
            "permessage-deflate; foo",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover=\"x\"",
            // server_max_window_bits needs a value; only the client's may be bare.
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; server_max_window_bits=0",
            "permessage-deflate; server_max_window_bits=abc",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=015",
            "permessage-deflate; client_max_window_bits=\"16\"",
            "permessage-deflate; client_max_window_bits=100000000000000000000000000000008",
        ] {
            assert_eq!(neg(&[bad], &cfg()), Ok(None), "{bad}");
        }
    }

    #[test]
    fn malformed_headers() {
        for bad in [
            "permessage-deflate;",
            "permessage-deflate; ",
            "; server_no_context_takeover",
            "permessage-deflate; =10",
            "permessage-deflate; server_max_window_bits=",
            "permessage-deflate; server_max_window_bits=\"10",
            "permessage-deflate; server_max_window_bits=\"\"",
            "permessage-deflate; server_max_window_bits=\"1 0\"",
            "permessage-deflate; server_max_window_bits=\"1,0\"",
            "permessage-deflate server_no_context_takeover",
            "permessage-deflate; a b",
            "permessage-deflate; a=b c",
            "permessage@deflate",
            "permessage-deflate; a=\"\\",
            "permessage-deflate; a=\"x\"y",
            "permessage-deflate;; a",
            "perméssage-deflate",
            "permessage-deflate; a=\u{7f}",
            // A broken later extension still makes the header malformed.
            "permessage-deflate, x-foo; =",
        ] {
            assert_eq!(neg(&[bad], &cfg()), Err(Malformed), "{bad:?}");
        }
        // Also when the broken part is in a second header after an accepted offer.
        assert_eq!(
            neg(&["permessage-deflate", "x; y=\""], &cfg()),
            Err(Malformed)
        );
    }

    #[test]
    fn quoting_whitespace_and_case() {
        for ok in [
            "permessage-deflate; server_max_window_bits=\"10\"",
            "permessage-deflate;server_max_window_bits=10",
            "  permessage-deflate \t;\tserver_max_window_bits = 10  ",
            "PerMessage-Deflate; Server_Max_Window_Bits=10",
            "permessage-deflate; server_max_window_bits=\"1\\0\"",
            ",permessage-deflate; server_max_window_bits=10,",
        ] {
            let a = neg(&[ok], &cfg())
                .unwrap()
                .unwrap_or_else(|| panic!("{ok}"));
            assert_eq!(a.server_max_window_bits(), 10, "{ok}");
        }
        // Other extensions' parameters are checked for syntax only, then ignored.
        assert_eq!(neg(&["x-foo; a=\"b\"; c=d"], &cfg()), Ok(None));
    }

    #[test]
    fn server_window_bits() {
        // Offered: answered with min(offer, our cap).
        let small = DeflateConfig {
            server_max_window_bits: 12,
            ..cfg()
        };
        let a = neg(&["permessage-deflate; server_max_window_bits=14"], &small)
            .unwrap()
            .unwrap();
        assert_eq!(a.server_max_window_bits(), 12);
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=14"], &small).unwrap(),
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12\r\n"
        );
        // Offered 15: must still be echoed (accepting means including it, §7.1.2.1).
        assert!(
            answer(&["permessage-deflate; server_max_window_bits=15"], &cfg())
                .unwrap()
                .contains("; server_max_window_bits=15")
        );
        // Not offered: our smaller window is used but not announced (some clients fail on an
        // unsolicited server_max_window_bits, and a smaller window needs no announcement).
        let a = neg(&["permessage-deflate"], &small).unwrap().unwrap();
        assert_eq!(a.compress_window_bits(), 12);
        assert_eq!(answer(&["permessage-deflate"], &small).unwrap(), PLAIN);
        // Out-of-range configuration is clamped.
        let silly = DeflateConfig {
            server_max_window_bits: 3,
            ..cfg()
        };
        assert_eq!(
            neg(&["permessage-deflate"], &silly)
                .unwrap()
                .unwrap()
                .compress_window_bits(),
            9
        );
    }

    #[test]
    fn server_window_bits_8_is_accepted_and_compressed_with_9() {
        // Autobahn 13.3 and 13.5 offer this; declining them would mark those cases
        // "unimplemented".
        let a = neg(
            &["permessage-deflate; client_no_context_takeover; client_max_window_bits; server_max_window_bits=8"],
            &cfg(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.server_max_window_bits(), 8);
        assert_eq!(a.compress_window_bits(), 9);
        let mut out = Vec::new();
        a.write_response_header(&mut out);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("; server_max_window_bits=8\r\n"));
    }

    #[test]
    fn client_context_takeover() {
        let allow = DeflateConfig {
            allow_client_context_takeover: true,
            ..cfg()
        };
        // Allowed and not refused by the client: no client_no_context_takeover.
        let a = neg(&["permessage-deflate; client_max_window_bits"], &allow)
            .unwrap()
            .unwrap();
        assert!(a.client_context_takeover());
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"], &allow).unwrap(),
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n"
        );
        // The client said it will not keep context: answered (it may be, §7.1.1.2).
        let a = neg(&["permessage-deflate; client_no_context_takeover"], &allow)
            .unwrap()
            .unwrap();
        assert!(!a.client_context_takeover());
        // Not allowed: answered even if the client did not offer it.
        let a = neg(&["permessage-deflate"], &cfg()).unwrap().unwrap();
        assert!(!a.client_context_takeover());
    }

    #[test]
    fn client_window_bits() {
        let allow = DeflateConfig {
            allow_client_context_takeover: true,
            client_max_window_bits: 10,
            ..cfg()
        };
        // Bare offer: we pick our cap.
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"], &allow).unwrap(),
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_max_window_bits=10\r\n"
        );
        // A value: min(value, cap).
        let a = neg(&["permessage-deflate; client_max_window_bits=9"], &allow)
            .unwrap()
            .unwrap();
        assert_eq!(a.client_max_window_bits(), 9);
        assert!(a.client_context_takeover());
        let a = neg(&["permessage-deflate; client_max_window_bits=8"], &allow)
            .unwrap()
            .unwrap();
        assert_eq!(a.client_max_window_bits(), 8);
        // Not offered: we may not limit the client's window (§7.1.2.2), so no takeover.
        let a = neg(&["permessage-deflate"], &allow).unwrap().unwrap();
        assert!(!a.client_context_takeover());
        assert_eq!(a.client_max_window_bits(), 15);
        assert_eq!(answer(&["permessage-deflate"], &allow).unwrap(), PLAIN);
        // Without takeover the client's window is left alone (a pooled inflater takes any).
        let a = neg(&["permessage-deflate; client_max_window_bits=12"], &cfg())
            .unwrap()
            .unwrap();
        assert_eq!(a.client_max_window_bits(), 15);
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits=12"], &cfg()).unwrap(),
            PLAIN
        );
    }

    #[test]
    fn rfc_7692_examples() {
        // Offers of the kind RFC 7692 §7.1.3 shows.
        for (offer, server_bits) in [
            ("permessage-deflate", 15),
            ("permessage-deflate; client_max_window_bits", 15),
            (
                "permessage-deflate; client_no_context_takeover; server_no_context_takeover",
                15,
            ),
            (
                "permessage-deflate; server_max_window_bits=10, permessage-deflate",
                10,
            ),
            (
                "permessage-deflate; client_max_window_bits; server_max_window_bits=10, permessage-deflate; client_max_window_bits",
                10,
            ),
        ] {
            let a = neg(&[offer], &cfg()).unwrap().unwrap();
            assert_eq!(a.server_max_window_bits(), server_bits, "{offer}");
        }
    }

    #[test]
    fn every_agreement_round_trips_through_its_byte() {
        for server in 8..=15 {
            for client in 8..=15 {
                for answer_server in [false, true] {
                    for takeover in [false, true] {
                        let a = Agreement::new(server, answer_server, client, takeover);
                        assert_eq!(a.server_max_window_bits(), server);
                        assert_eq!(a.compress_window_bits(), server.max(9));
                        assert_eq!(a.client_max_window_bits(), client);
                        assert_eq!(a.client_context_takeover(), takeover);
                    }
                }
            }
        }
    }
}
