//! Reading a session's input: the request head (its end searched from where the last read
//! stopped), then frames, parsed in place, unmasked, checked, and routed through the host.
//! Every failure ends in `Session::fail`: one close frame, and nothing read after it.

use super::*;
use crate::deflate::{self, MessageInflate};

/// Bytes kept between reads, allocated only while needed.
#[derive(Default)]
pub(super) struct Inbound {
    /// Raw bytes of an incomplete request head or frame. Grows with what arrives, never with
    /// what a header announces.
    pub(super) stash: Vec<u8>,
    /// A fragmented message being reassembled.
    pub(super) fragments: Option<Fragments>,
    /// How much of the partial frame at the start of `stash` was already unmasked and checked.
    partial: PartialText,
    /// Handshake: bytes of the head already searched for its end.
    scanned: u32,
    /// permessage-deflate: the inflate state of a compressed message in flight, or kept
    /// between messages when the client has context takeover. Empty otherwise.
    pub(super) inflate: MessageInflate,
}

pub(super) struct Fragments {
    kind: Kind,
    /// The message so far; inflated, if it is compressed.
    pub(super) data: Vec<u8>,
    utf8: Utf8Stream,
    /// The message is permessage-deflate compressed (RSV1 on its first frame).
    compressed: bool,
}

impl Inbound {
    pub(super) fn is_idle(&self) -> bool {
        self.stash.is_empty() && self.fragments.is_none() && self.inflate.heap_bytes() == 0
    }
}

/// How the client's input fails the connection: the close frame, and the reason counted.
pub(super) struct Failure {
    v: Violation,
    why: Disconnect,
}

impl From<Violation> for Failure {
    fn from(v: Violation) -> Failure {
        let why = match v.code {
            codec::CLOSE_INVALID_DATA => Disconnect::InvalidUtf8,
            codec::CLOSE_TOO_BIG => Disconnect::MessageTooBig,
            _ => Disconnect::ProtocolError,
        };
        Failure { v, why }
    }
}

impl Failure {
    /// A compressed message that could not be inflated; the host counts it first.
    fn inflate<H: Host>(e: deflate::InflateError, host: &mut H) -> Failure {
        host.inflate_failed(e);
        Failure {
            v: Violation {
                code: e.close_code(),
                reason: e.reason(),
            },
            why: match e {
                deflate::InflateError::TooBig => Disconnect::MessageTooBig,
                deflate::InflateError::Corrupt => Disconnect::InvalidCompressed,
            },
        }
    }
}

impl Session {
    /// Takes bytes while the server holds this connection's messages back (its room's ring is
    /// full): nothing is delivered, but pings found among the held frames are answered and
    /// pongs taken out, so a pause never looks like a dead peer on either side. Everything
    /// else (data, a close, anything not yet complete) stays in order for
    /// [`Session::receive`] once the pause ends. The caller bounds what is held.
    ///
    /// A ping is answered ahead of data frames that precede it; RFC 6455 lets control frames
    /// interleave, and a pong answers the ping, not the data. A close is never taken early:
    /// the messages before it are delivered first.
    pub fn receive_held<H: Host>(&mut self, fresh: &[u8], lim: &Limits, now: u32, host: &mut H) {
        self.heard(now, lim);
        if self.phase != Phase::Open {
            let mut copy = fresh.to_vec();
            return self.receive(&mut copy, lim, now, host);
        }
        let ib = self.inbound.get_or_insert_with(Box::default);
        ib.stash.extend_from_slice(fresh);
        // The message in progress, as the data frames skipped so far leave it: whether it is
        // text, its UTF-8 state and its length. A ping behind a data frame that will fail the
        // connection is not answered (nothing after a failure is processed).
        let mut message = ib
            .fragments
            .as_ref()
            .map(|f| (f.kind == Kind::Text, f.utf8, f.data.len()));
        // A compressed message is judged only once inflated, so nothing behind one is
        // taken early: its pings wait for the pause to end like its data.
        let compressed = ib.fragments.as_ref().is_some_and(|f| f.compressed);
        let first_done = ib.partial.unmasked as usize;
        let stash = &mut ib.stash;
        let mut pos = 0;
        let deflate = self.deflate.is_some();
        // `partial` (progress through the first frame) is never disturbed: only complete
        // control frames are taken out, and a first frame with progress is a text frame.
        while let Ok(Parsed::Frame(h)) =
            codec::parse_header(&stash[pos..], lim.max_message, deflate)
        {
            let total = h.header_len + h.payload_len;
            if stash.len() - pos < total || h.kind == Kind::Close {
                break;
            }
            if !matches!(h.kind, Kind::Ping | Kind::Pong) {
                if h.compressed || compressed {
                    break;
                }
                let so_far = message.map_or(0, |m| m.2);
                let fits = match (h.kind, message) {
                    (Kind::Continuation, None) | (Kind::Text | Kind::Binary, Some(_)) => false,
                    _ => h.payload_len <= lim.max_message.saturating_sub(so_far),
                };
                if !fits {
                    break;
                }
                let text = h.kind == Kind::Text
                    || (h.kind == Kind::Continuation && message.is_some_and(|m| m.0));
                let mut utf8 = match (h.kind, message) {
                    (Kind::Continuation, Some(m)) => m.1,
                    _ => Utf8Stream::default(),
                };
                if text {
                    let mut copy = stash[pos + h.header_len..pos + total].to_vec();
                    let done = if pos == 0 {
                        first_done.min(copy.len())
                    } else {
                        0
                    };
                    codec::unmask_from(&mut copy[done..], h.mask, done);
                    if !utf8.feed(&copy) || (h.fin && !utf8.is_complete()) {
                        break;
                    }
                }
                message = (!h.fin).then(|| (text, utf8, so_far + h.payload_len));
                pos += total;
                continue;
            }
            if h.kind == Kind::Ping {
                let payload = &mut stash[pos + h.header_len..pos + total];
                codec::unmask(payload, h.mask);
                host.send(codec::encode(OutKind::Pong, payload));
            }
            stash.drain(pos..pos + total);
        }
        if stash.is_empty() {
            *stash = Vec::new();
        }
        if self.inbound.as_ref().is_some_and(|ib| ib.is_idle()) {
            self.inbound = None;
        }
    }

    /// Consumes what it can of `buf`; returns the bytes used (all of them once lingering).
    pub(super) fn consume<H: Host>(
        &mut self,
        buf: &mut [u8],
        ib: &mut Option<Box<Inbound>>,
        lim: &Limits,
        now: u32,
        host: &mut H,
    ) -> usize {
        let used = match self.phase {
            Phase::Handshake => self.consume_request(buf, ib, lim, now, host),
            Phase::Open | Phase::Closing => self.consume_frames(buf, ib, lim, now, host),
            Phase::Lingering => buf.len(),
        };
        if self.phase == Phase::Lingering {
            buf.len()
        } else {
            used
        }
    }

    fn consume_request<H: Host>(
        &mut self,
        buf: &mut [u8],
        ib: &mut Option<Box<Inbound>>,
        lim: &Limits,
        now: u32,
        host: &mut H,
    ) -> usize {
        if lim.proxy && self.bits & super::bit::PROXIED == 0 {
            return match crate::proxy_protocol::parse(buf) {
                crate::proxy_protocol::Header::Incomplete => 0,
                crate::proxy_protocol::Header::Invalid(reason) => {
                    self.reject(
                        handshake::Rejection {
                            status: 400,
                            reason,
                        },
                        now,
                        host,
                    );
                    buf.len()
                }
                crate::proxy_protocol::Header::Complete(n, addr) => {
                    self.bits |= super::bit::PROXIED;
                    if let Err(r) = host.peer(addr) {
                        self.reject(r, now, host);
                        return buf.len();
                    }
                    n + self.consume_request(&mut buf[n..], ib, lim, now, host)
                }
            };
        }
        const TOO_BIG: handshake::Rejection = handshake::Rejection {
            status: 431,
            reason: "request head over 8 KiB",
        };
        let mut from = ib.as_ref().map_or(0, |ib| ib.scanned as usize);
        // The head's end, as httparse sees it: an end found before the request line is only
        // blank lines (which it skips, RFC 9112 2.2), so the search goes on past it.
        let (end, parsed) = loop {
            let Some(end) = head_end(buf, from) else {
                if buf.len() > handshake::MAX_HEAD {
                    self.reject(TOO_BIG, now, host);
                    return buf.len();
                }
                ib.get_or_insert_with(Box::default).scanned = buf.len() as u32;
                return 0;
            };
            match handshake::parse(&buf[..end], &lim.deflate) {
                Upgrade::Incomplete if end > handshake::MAX_HEAD => {
                    self.reject(TOO_BIG, now, host);
                    return buf.len();
                }
                Upgrade::Incomplete => from = end,
                parsed => break (end, parsed),
            }
        };
        let parsed = self.admit(parsed, &buf[..end], host);
        match parsed {
            // The loop above only stops on a verdict; were it not to, waiting is harmless.
            Upgrade::Incomplete => 0,
            Upgrade::Reject(r) => {
                self.reject(r, now, host);
                buf.len()
            }
            Upgrade::Page(page) => {
                match host.page(page) {
                    Ok(response) => {
                        host.http_status(200);
                        host.ended(Disconnect::PageServed);
                        host.send(response);
                        self.enter(Phase::Lingering, now);
                    }
                    Err(r) => self.reject(r, now, host),
                }
                buf.len()
            }
            Upgrade::Accept {
                route,
                response,
                consumed,
                deflate,
            } => {
                debug_assert_eq!(consumed, end);
                self.deflate = deflate;
                host.http_status(101);
                host.upgraded(route, deflate);
                host.send(response);
                if let Some(ib) = ib.as_mut() {
                    ib.scanned = 0;
                }
                self.enter(Phase::Open, now);
                if self.bits & super::bit::DRAINING != 0 {
                    // Upgraded while the server drains: told at once (see `shutdown`).
                    host.before_close();
                    host.ended(Disconnect::Shutdown);
                    if let Some(frame) =
                        self.close(codec::CLOSE_GOING_AWAY, "server shutting down", now)
                    {
                        host.send(frame);
                    }
                }
                end + self.consume_frames(&mut buf[end..], ib, lim, now, host)
            }
        }
    }

    fn reject<H: Host>(&mut self, r: handshake::Rejection, now: u32, host: &mut H) {
        host.http_status(r.status);
        host.ended(Disconnect::HttpRejected);
        host.send(handshake::error_response(r));
        self.enter(Phase::Lingering, now);
    }

    fn consume_frames<H: Host>(
        &mut self,
        buf: &mut [u8],
        ib: &mut Option<Box<Inbound>>,
        lim: &Limits,
        now: u32,
        host: &mut H,
    ) -> usize {
        let mut pos = 0;
        while matches!(self.phase, Phase::Open | Phase::Closing) {
            let open = self.phase == Phase::Open;
            let fragments = ib.as_ref().and_then(|ib| ib.fragments.as_ref());
            let in_progress = fragments.map_or(0, |f| f.data.len());
            // Compressed text is checked once inflated, not as its frames arrive.
            let text_state = fragments.map(|f| (f.kind == Kind::Text && !f.compressed, f.utf8));
            let mut budget = lim.max_message - in_progress;
            if fragments.is_some_and(|f| f.compressed) {
                budget = deflate::compressed_bound(budget); // the inflated size is checked
            }
            let parsed =
                codec::parse_header(&buf[pos..], budget, self.deflate.is_some()).and_then(|p| {
                    if open {
                        check_sequence(p, fragments.is_some())
                    } else {
                        Ok(p)
                    }
                });
            let header = match parsed {
                Ok(Parsed::NeedMore) => break,
                Ok(Parsed::Frame(h)) => h,
                Err(v) => {
                    self.fail(v, now, host);
                    break;
                }
            };
            let total = header.header_len + header.payload_len;
            // Payload bytes of this frame unmasked (and checked) by an earlier read: only the
            // first frame of a stash can have them.
            let resume = if pos == 0 {
                ib.as_mut()
                    .map_or(Default::default(), |ib| std::mem::take(&mut ib.partial))
            } else {
                Default::default()
            };
            if buf.len() - pos < total {
                let available = &mut buf[pos + header.header_len..];
                // Fail fast: check the text received so far instead of waiting for the whole
                // frame (Autobahn 6.4.3/6.4.4), continuing from the message's UTF-8 state.
                let start = match (header.kind, text_state) {
                    _ if !open || header.compressed => None,
                    (Kind::Text, None) => Some(resume),
                    (Kind::Continuation, Some((true, utf8))) if resume.unmasked == 0 => {
                        Some(PartialText { unmasked: 0, utf8 })
                    }
                    (Kind::Continuation, Some((true, _))) => Some(resume),
                    _ => None,
                };
                let partial = match start {
                    None => resume,
                    Some(done) => match codec::check_partial_text(available, header.mask, done) {
                        Ok(p) => p,
                        Err(v) => {
                            self.fail(v, now, host);
                            break;
                        }
                    },
                };
                ib.get_or_insert_with(Box::default).partial = partial;
                break;
            }
            if open && !self.within_rate(header.kind, lim, now, host) {
                pos += total; // not delivered; what follows is read only for the client's close
                continue;
            }
            let payload = &mut buf[pos + header.header_len..pos + total];
            let done = resume.unmasked as usize;
            codec::unmask_from(&mut payload[done..], header.mask, done);
            pos += total;
            if let Err(f) = self.on_frame(&header, payload, ib, lim, now, host) {
                self.fail_with(f, now, host);
            }
        }
        pos
    }

    /// One complete, unmasked frame.
    fn on_frame<H: Host>(
        &mut self,
        header: &codec::Header,
        payload: &[u8],
        ib: &mut Option<Box<Inbound>>,
        lim: &Limits,
        now: u32,
        host: &mut H,
    ) -> Result<(), Failure> {
        let (kind, fin) = (header.kind, header.fin);
        if self.phase == Phase::Closing {
            // Our close is out: only the peer's answer matters.
            if kind == Kind::Close {
                self.enter(Phase::Lingering, now);
            }
            return Ok(());
        }
        match kind {
            Kind::Ping => host.send(codec::encode(OutKind::Pong, payload)),
            Kind::Pong => {}
            Kind::Close => {
                let code = codec::check_close_payload(payload)?;
                host.before_close();
                host.ended(Disconnect::ClientClose);
                // Echo the code (RFC 6455 5.5.1); an empty close is answered empty.
                host.send(match code {
                    Some(c) => codec::encode_close(c, ""),
                    None => codec::encode(OutKind::Close, &[]),
                });
                self.enter(Phase::Lingering, now);
            }
            Kind::Text | Kind::Binary if header.compressed => {
                self.inflate_first(kind, fin, payload, ib, lim, host)?;
            }
            Kind::Text | Kind::Binary if fin => {
                if kind == Kind::Text && simdutf8::basic::from_utf8(payload).is_err() {
                    return Err(invalid_utf8().into());
                }
                host.message(kind, payload);
            }
            Kind::Text | Kind::Binary => {
                let mut utf8 = Utf8Stream::default();
                if kind == Kind::Text && !utf8.feed(payload) {
                    return Err(invalid_utf8().into());
                }
                ib.get_or_insert_with(Box::default).fragments = Some(Fragments {
                    kind,
                    data: payload.to_vec(),
                    utf8,
                    compressed: false,
                });
            }
            Kind::Continuation => {
                let ib = ib.as_mut().expect("sequence checked at the header");
                let f = ib
                    .fragments
                    .as_mut()
                    .expect("sequence checked at the header");
                if f.compressed {
                    return self.inflate_more(fin, payload, ib, lim, host);
                }
                f.data.extend_from_slice(payload);
                if f.kind == Kind::Text && !f.utf8.feed(payload) {
                    return Err(invalid_utf8().into());
                }
                if fin {
                    let f = ib.fragments.take().expect("present");
                    if f.kind == Kind::Text && !f.utf8.is_complete() {
                        return Err(invalid_utf8().into());
                    }
                    host.message(f.kind, &f.data);
                }
            }
        }
        Ok(())
    }

    /// True if the client compresses with the previous messages as context: its inflate
    /// state then stays with the connection between messages.
    fn client_takeover(&self) -> bool {
        self.deflate.is_some_and(|a| a.client_context_takeover())
    }

    /// The first frame of a compressed message (RFC 7692 §6.2): a whole message is inflated
    /// into the worker's buffer and delivered; the start of a fragmented one into its own
    /// reassembly buffer. Either way the inflated size is bounded by `--max-message-size`
    /// while inflating (a zip bomb stops at the bound, with 1009), and text is checked as
    /// UTF-8 after inflating.
    fn inflate_first<H: Host>(
        &self,
        kind: Kind,
        fin: bool,
        payload: &[u8],
        ib: &mut Option<Box<Inbound>>,
        lim: &Limits,
        host: &mut H,
    ) -> Result<(), Failure> {
        let takeover = self.client_takeover();
        let max = lim.max_message;
        // Taken out of the inbound state (if there is one: only with context takeover), so
        // a one-frame message allocates no inbound state at all.
        let mut state = ib
            .as_mut()
            .map(|ib| std::mem::take(&mut ib.inflate))
            .unwrap_or_default();
        let result = if fin {
            let mut out = host.inflating().take_buffer();
            let done = inflate(&mut state, host, payload, true, takeover, &mut out, max);
            let result = match done {
                Err(e) => Err(Failure::inflate(e, host)),
                Ok(()) if kind == Kind::Text && simdutf8::basic::from_utf8(&out).is_err() => {
                    Err(invalid_utf8().into())
                }
                Ok(()) => {
                    host.inflated(out.len());
                    host.message(kind, &out);
                    Ok(())
                }
            };
            host.inflating().put_buffer(out);
            result
        } else {
            let mut f = Fragments {
                kind,
                data: Vec::new(),
                utf8: Utf8Stream::default(),
                compressed: true,
            };
            let done = inflate(&mut state, host, payload, false, takeover, &mut f.data, max);
            match done {
                Err(e) => Err(Failure::inflate(e, host)),
                Ok(()) if kind == Kind::Text && !f.utf8.feed(&f.data) => Err(invalid_utf8().into()),
                Ok(()) => {
                    ib.get_or_insert_with(Box::default).fragments = Some(f);
                    Ok(())
                }
            }
        };
        if state.heap_bytes() > 0 {
            ib.get_or_insert_with(Box::default).inflate = state;
        }
        result
    }

    /// A continuation of a compressed message: inflated onto what came before.
    fn inflate_more<H: Host>(
        &self,
        fin: bool,
        payload: &[u8],
        ib: &mut Inbound,
        lim: &Limits,
        host: &mut H,
    ) -> Result<(), Failure> {
        let takeover = self.client_takeover();
        let Inbound {
            fragments,
            inflate: state,
            ..
        } = ib;
        let f = fragments
            .as_mut()
            .expect("a compressed message in progress");
        let before = f.data.len();
        let max = lim.max_message;
        if let Err(e) = inflate(state, host, payload, fin, takeover, &mut f.data, max) {
            return Err(Failure::inflate(e, host));
        }
        if f.kind == Kind::Text && !f.utf8.feed(&f.data[before..]) {
            return Err(invalid_utf8().into());
        }
        if fin {
            let f = fragments.take().expect("present");
            if f.kind == Kind::Text && !f.utf8.is_complete() {
                return Err(invalid_utf8().into());
            }
            host.inflated(f.data.len());
            host.message(f.kind, &f.data);
        }
        Ok(())
    }

    /// The client broke the protocol: one close frame with the code, then nothing is read.
    fn fail<H: Host>(&mut self, v: Violation, now: u32, host: &mut H) {
        self.fail_with(v.into(), now, host);
    }

    fn fail_with<H: Host>(&mut self, f: Failure, now: u32, host: &mut H) {
        if self.phase == Phase::Open {
            host.before_close();
            host.ended(f.why);
            host.send(codec::encode_close(f.v.code, f.v.reason));
        }
        // From Closing our close frame is already out; from either, input is over.
        self.enter(Phase::Lingering, now);
    }
}

/// Inflates one frame's payload of a compressed message into `out` (at most `max` bytes), and
/// ends the message if `last`. The inflater comes from the worker's pool and goes back at the
/// end of the message (or on an error), unless the client keeps context takeover.
fn inflate<H: Host>(
    state: &mut MessageInflate,
    host: &mut H,
    payload: &[u8],
    last: bool,
    takeover: bool,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), deflate::InflateError> {
    let pool = &mut host.inflating().pool;
    state.feed(pool, payload, out, max)?;
    if last {
        state.finish(pool, takeover, out, max)?;
    }
    Ok(())
}

/// Where the request head ends (just past its blank line), searching from `from` (the bytes
/// before it were searched by an earlier call, less the 3 that could start a terminator).
/// Bare LF line ends count, as httparse accepts them.
pub(super) fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while let Some(off) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        let end = match buf.get(nl + 1..) {
            Some([b'\n', ..]) => Some(nl + 2),
            Some([b'\r', b'\n', ..]) => Some(nl + 3),
            _ => None,
        };
        // A terminator ending at or before `from` was already looked at (and was too early).
        if let Some(end) = end.filter(|&e| e > from) {
            return Some(end);
        }
        i = nl + 1;
    }
    None
}

fn invalid_utf8() -> Violation {
    Violation {
        code: codec::CLOSE_INVALID_DATA,
        reason: "text is not valid UTF-8",
    }
}

/// Data-frame order: a continuation needs a message in progress, a new message needs none.
fn check_sequence(p: Parsed, in_progress: bool) -> Result<Parsed, Violation> {
    if let Parsed::Frame(h) = &p {
        match h.kind {
            Kind::Continuation if !in_progress => {
                return Err(Violation::protocol("continuation without a message"))
            }
            Kind::Text | Kind::Binary if in_progress => {
                return Err(Violation::protocol(
                    "new message before the fragmented one finished",
                ))
            }
            _ => {}
        }
    }
    Ok(p)
}
