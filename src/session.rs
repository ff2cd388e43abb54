//! The WebSocket protocol of one connection, without sockets: bytes in, actions out.
//!
//! A [`Session`] is fed what the socket gave ([`Session::receive`]), the peer's EOF
//! ([`Session::eof`]), the clock ([`Session::on_timer`]) and the server's own decisions
//! ([`Session::close`], [`Session::shutdown`]). It answers through a [`Host`] (an upgrade to
//! route, messages to deliver, bytes to queue, the reason the connection ended) and through
//! return values (when to look again, when to drop). It never touches a socket, so every path
//! is tested with plain byte slices (`session/tests.rs`), including random splits of random
//! frame sequences against a reference interpreter.
//!
//! # Phases (every change happens in this file, in [`Session::enter`])
//! ```text
//!  Handshake ──101──► Open ──server close──► Closing ──peer close──► Lingering ──EOF/timeout──► dropped
//!     │                 │                       └──bad frame / timeout────►│
//!     │                 ├──peer close (echoed)────────────────────────────►│
//!     │                 └──protocol error (close 1002/1007/1009 queued)───►│
//!     └──HTTP error queued────────────────────────────────────────────────►│
//! ```
//! - `Handshake`: the request head is read (its end searched from where the last read stopped).
//! - `Open`: frames flow; quiet connections are pinged, then closed with 1001.
//! - `Closing`: the server sent its close and reads only to find the peer's.
//! - `Lingering`: everything the server will ever send is queued. Input is discarded unread
//!   (RFC 6455 §7.1.7: after failing, nothing more is processed), the write side is shut once
//!   the queue is written, and the socket is dropped at the peer's EOF or after
//!   `--close-timeout`. Reading on to EOF is what keeps the kernel from answering unread
//!   input with a reset that would destroy the close frame on its way.
//!
//! Properties the types give: nothing is parsed after a failure (a `Lingering` session returns
//! before looking at input); a session sends at most one close frame (only `Open` can send one,
//! and sending leaves `Open`); [`Host::ended`] is called exactly once for every connection that
//! left `Handshake` or `Open` (only those two phases report an end).

use bytes::Bytes;

use crate::codec::{self, Kind, OutKind, Parsed, PartialText, Utf8Stream, Violation};
use crate::handshake::{self, Route, Upgrade};
use crate::metrics::Disconnect;

#[cfg(test)]
mod tests;

/// Where a session is in its life (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Handshake,
    Open,
    Closing,
    Lingering,
}

/// The limits a session enforces, with durations in timer ticks.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message: usize,
    pub handshake: u32,
    pub ping: u32,
    pub idle: u32,
    pub close: u32,
    /// While the server drains, the last tick a closing connection may live.
    pub drain_until: Option<u32>,
}

/// What a session asks of the server around it while it reads.
pub trait Host {
    /// The upgrade was accepted for `route` (the 101 response follows through [`Host::send`]).
    fn upgraded(&mut self, route: Route<'_>);
    /// A complete, checked data message from an open connection.
    fn message(&mut self, kind: Kind, payload: &[u8]);
    /// Bytes to write after everything emitted before them (pong, close, HTTP response).
    fn send(&mut self, bytes: Bytes);
    /// Called while still `Open`, right before the session queues its last frame: what the
    /// connection sent so far (echoes, its own copy of its room messages) must precede it.
    fn before_close(&mut self);
    /// The connection ended, for this reason (once per connection).
    fn ended(&mut self, why: Disconnect);
    /// An HTTP status was answered (101 or an error).
    fn http_status(&mut self, status: u16);
    /// A ping went out to a quiet connection.
    fn pinged(&mut self) {}
}

/// What to do when a timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Look again at this tick.
    At(u32),
    /// Close the socket now.
    Drop,
}

/// What to do once the output queue is fully written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFlush {
    Nothing,
    /// Send FIN (everything is said) and wait for the peer's EOF.
    ShutdownWrite,
    /// Everything is said and the peer has hung up.
    Drop,
}

mod bit {
    /// A ping is outstanding since the client was last heard from.
    pub const PINGED: u8 = 1 << 0;
    /// The peer closed its side.
    pub const PEER_EOF: u8 = 1 << 1;
    /// FIN was sent.
    pub const FIN_SENT: u8 = 1 << 2;
}

/// Bytes kept between reads, allocated only while needed.
#[derive(Default)]
struct Inbound {
    /// Raw bytes of an incomplete request head or frame. Grows with what arrives, never with
    /// what a header announces.
    stash: Vec<u8>,
    /// A fragmented message being reassembled.
    fragments: Option<Fragments>,
    /// How much of the partial frame at the start of `stash` was already unmasked and checked.
    partial: PartialText,
    /// Handshake: bytes of the head already searched for its end.
    scanned: u32,
}

struct Fragments {
    kind: Kind,
    data: Vec<u8>,
    utf8: Utf8Stream,
}

impl Inbound {
    fn is_idle(&self) -> bool {
        self.stash.is_empty() && self.fragments.is_none()
    }
}

/// One connection's protocol state: 16 bytes while idle.
pub struct Session {
    phase: Phase,
    bits: u8,
    /// Tick the phase's clock started: last time heard from (Open), or when the phase was
    /// entered (other phases).
    since: u32,
    inbound: Option<Box<Inbound>>,
}

impl Session {
    pub fn new(now: u32) -> Session {
        Session {
            phase: Phase::Handshake,
            bits: 0,
            since: now,
            inbound: None,
        }
    }

    #[inline]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// True while data messages may be queued for this connection.
    #[inline]
    pub fn accepts_data(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Bytes held between reads (stash and reassembly), for memory accounting and tests.
    pub fn buffered_capacity(&self) -> usize {
        self.inbound.as_ref().map_or(0, |ib| {
            ib.stash.capacity() + ib.fragments.as_ref().map_or(0, |f| f.data.capacity())
        })
    }

    /// A session to leave in the connection's slot while the real one is being fed: same
    /// phase (so a message routed back to this connection meanwhile sees the truth), no
    /// buffers.
    pub fn stand_in(&self) -> Session {
        Session {
            phase: self.phase,
            bits: self.bits,
            since: self.since,
            inbound: None,
        }
    }

    /// The only place the phase changes.
    fn enter(&mut self, phase: Phase, now: u32) {
        debug_assert!(
            matches!(
                (self.phase, phase),
                (Phase::Handshake, Phase::Open | Phase::Lingering)
                    | (Phase::Open, Phase::Closing | Phase::Lingering)
                    | (Phase::Closing, Phase::Lingering)
            ),
            "illegal transition {:?} -> {phase:?}",
            self.phase
        );
        self.phase = phase;
        self.since = now;
        if phase == Phase::Lingering {
            self.inbound = None; // nothing more will be parsed
        }
    }

    /// Something arrived: the connection is alive.
    #[inline]
    pub fn heard(&mut self, now: u32) {
        if self.phase == Phase::Open {
            self.since = now;
            self.bits &= !bit::PINGED;
        }
    }

    // ---- input -----------------------------------------------------------------------------

    /// Takes bytes read from the socket. `fresh` is parsed in place when nothing is stashed
    /// (the common case: no copy); only a trailing partial request or frame is kept.
    pub fn receive<H: Host>(&mut self, fresh: &mut [u8], lim: &Limits, now: u32, host: &mut H) {
        self.heard(now);
        if self.phase == Phase::Lingering {
            return; // discarded unread
        }
        let mut ib = self.inbound.take();
        let mut stash = ib
            .as_mut()
            .map(|ib| std::mem::take(&mut ib.stash))
            .unwrap_or_default();
        if stash.is_empty() {
            let used = self.consume(fresh, &mut ib, lim, now, host);
            if used < fresh.len() {
                stash.extend_from_slice(&fresh[used..]);
            }
        } else {
            stash.extend_from_slice(fresh);
            let used = self.consume(&mut stash, &mut ib, lim, now, host);
            stash.drain(..used);
            if stash.is_empty() {
                stash = Vec::new(); // a connection between frames owns no buffer
            } else if stash.capacity() > 4 * stash.len() + 4096 {
                stash.shrink_to_fit(); // a big frame went through; keep only the tail's size
            }
        }
        if self.phase == Phase::Lingering {
            return; // `enter` dropped the inbound state; so do we
        }
        if !stash.is_empty() {
            ib.get_or_insert_with(Box::default).stash = stash;
        }
        self.inbound = ib.filter(|ib| !ib.is_idle());
    }

    /// Consumes what it can of `buf`; returns the bytes used (all of them once lingering).
    fn consume<H: Host>(
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
        let from = ib.as_ref().map_or(0, |ib| ib.scanned as usize);
        let Some(end) = head_end(buf, from) else {
            if buf.len() > handshake::MAX_HEAD {
                self.reject(
                    handshake::Rejection {
                        status: 431,
                        reason: "request head over 8 KiB",
                    },
                    now,
                    host,
                );
                return buf.len();
            }
            ib.get_or_insert_with(Box::default).scanned = buf.len() as u32;
            return 0;
        };
        match handshake::parse(&buf[..end]) {
            Upgrade::Incomplete => {
                // Our end-of-head guess was early (httparse wants more): search on from it.
                ib.get_or_insert_with(Box::default).scanned = end as u32;
                0
            }
            Upgrade::Reject(r) => {
                self.reject(r, now, host);
                buf.len()
            }
            Upgrade::Accept {
                route,
                response,
                consumed,
            } => {
                debug_assert_eq!(consumed, end);
                host.http_status(101);
                host.upgraded(route);
                host.send(response);
                if let Some(ib) = ib.as_mut() {
                    ib.scanned = 0;
                }
                self.enter(Phase::Open, now);
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
            let text_state = fragments.map(|f| (f.kind == Kind::Text, f.utf8));
            let parsed =
                codec::parse_header(&buf[pos..], lim.max_message - in_progress).and_then(|p| {
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
                    _ if !open => None,
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
            let payload = &mut buf[pos + header.header_len..pos + total];
            let done = resume.unmasked as usize;
            codec::unmask_from(&mut payload[done..], header.mask, done);
            pos += total;
            if let Err(v) = self.on_frame(header.kind, header.fin, payload, ib, now, host) {
                self.fail(v, now, host);
            }
        }
        pos
    }

    /// One complete, unmasked frame.
    fn on_frame<H: Host>(
        &mut self,
        kind: Kind,
        fin: bool,
        payload: &[u8],
        ib: &mut Option<Box<Inbound>>,
        now: u32,
        host: &mut H,
    ) -> Result<(), Violation> {
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
            Kind::Text | Kind::Binary if fin => {
                if kind == Kind::Text && simdutf8::basic::from_utf8(payload).is_err() {
                    return Err(invalid_utf8());
                }
                host.message(kind, payload);
            }
            Kind::Text | Kind::Binary => {
                let mut utf8 = Utf8Stream::default();
                if kind == Kind::Text && !utf8.feed(payload) {
                    return Err(invalid_utf8());
                }
                ib.get_or_insert_with(Box::default).fragments = Some(Fragments {
                    kind,
                    data: payload.to_vec(),
                    utf8,
                });
            }
            Kind::Continuation => {
                let ib = ib.as_mut().expect("sequence checked at the header");
                let f = ib
                    .fragments
                    .as_mut()
                    .expect("sequence checked at the header");
                f.data.extend_from_slice(payload);
                if f.kind == Kind::Text && !f.utf8.feed(payload) {
                    return Err(invalid_utf8());
                }
                if fin {
                    let f = ib.fragments.take().expect("present");
                    if f.kind == Kind::Text && !f.utf8.is_complete() {
                        return Err(invalid_utf8());
                    }
                    host.message(f.kind, &f.data);
                }
            }
        }
        Ok(())
    }

    /// The client broke the protocol: one close frame with the code, then nothing is read.
    fn fail<H: Host>(&mut self, v: Violation, now: u32, host: &mut H) {
        if self.phase == Phase::Open {
            host.before_close();
            host.ended(match v.code {
                codec::CLOSE_INVALID_DATA => Disconnect::InvalidUtf8,
                codec::CLOSE_TOO_BIG => Disconnect::MessageTooBig,
                _ => Disconnect::ProtocolError,
            });
            host.send(codec::encode_close(v.code, v.reason));
        }
        // From Closing our close frame is already out; from either, input is over.
        self.enter(Phase::Lingering, now);
    }

    /// The peer closed its side. Returns what to do: drop at once, or write out what is
    /// queued first (a half-closed client still reads).
    pub fn eof<H: Host>(&mut self, now: u32, lim: &Limits, host: &mut H) -> Due {
        self.bits |= bit::PEER_EOF;
        match self.phase {
            Phase::Handshake => {
                host.ended(Disconnect::PeerGone);
                return Due::Drop;
            }
            Phase::Open => {
                host.before_close();
                host.ended(Disconnect::PeerGone);
                self.enter(Phase::Lingering, now);
            }
            Phase::Closing => self.enter(Phase::Lingering, now),
            Phase::Lingering => {}
        }
        Due::At(self.deadline(lim))
    }

    /// A read or write failed: the socket is unusable. Reports the end if nothing else did.
    pub fn io_failed<H: Host>(&mut self, host: &mut H) {
        if matches!(self.phase, Phase::Handshake | Phase::Open) {
            host.ended(Disconnect::IoError);
        }
    }

    // ---- the server's own decisions --------------------------------------------------------

    /// Starts the close handshake from the server's side (idle, slow consumer, shutdown).
    /// Returns the close frame to queue, or None if the session is not open (a connection
    /// never gets two close frames).
    #[must_use]
    pub fn close(&mut self, code: u16, reason: &str, now: u32) -> Option<Bytes> {
        if self.phase != Phase::Open {
            return None;
        }
        self.enter(Phase::Closing, now);
        Some(codec::encode_close(code, reason))
    }

    /// Refuses a connection before reading its request (over capacity): the caller queues
    /// the HTTP response.
    pub fn refuse(&mut self, now: u32) {
        self.enter(Phase::Lingering, now);
    }

    /// The server drains: an open connection gets close 1001, a half-open one is dropped.
    pub fn shutdown<H: Host>(&mut self, now: u32, host: &mut H) -> Option<Due> {
        match self.phase {
            Phase::Handshake => {
                host.ended(Disconnect::Shutdown);
                Some(Due::Drop)
            }
            Phase::Open => {
                host.before_close();
                host.ended(Disconnect::Shutdown);
                if let Some(frame) =
                    self.close(codec::CLOSE_GOING_AWAY, "server shutting down", now)
                {
                    host.send(frame);
                }
                None
            }
            Phase::Closing | Phase::Lingering => None,
        }
    }

    /// The queue was fully written.
    pub fn on_flushed(&mut self) -> AfterFlush {
        if self.phase != Phase::Lingering {
            return AfterFlush::Nothing;
        }
        if self.bits & bit::PEER_EOF != 0 {
            AfterFlush::Drop
        } else if self.bits & bit::FIN_SENT == 0 {
            self.bits |= bit::FIN_SENT;
            AfterFlush::ShutdownWrite
        } else {
            AfterFlush::Nothing
        }
    }

    // ---- time ------------------------------------------------------------------------------

    /// The tick at which this session next needs [`Session::on_timer`].
    pub fn deadline(&self, lim: &Limits) -> u32 {
        match self.phase {
            Phase::Handshake => self.since + lim.handshake,
            Phase::Open => {
                let wait = if self.bits & bit::PINGED != 0 || lim.ping >= lim.idle {
                    lim.idle
                } else {
                    lim.ping
                };
                self.since + wait
            }
            Phase::Closing | Phase::Lingering => {
                let own = self.since + lim.close;
                lim.drain_until.map_or(own, |d| d.max(own))
            }
        }
    }

    /// The timer fired: ping a quiet connection, close an idle one, drop one whose time ran
    /// out. `paused` says the server itself held back reading this connection (a full
    /// cross-core ring), which does not count as the client's silence.
    pub fn on_timer<H: Host>(&mut self, now: u32, paused: bool, lim: &Limits, host: &mut H) -> Due {
        if paused {
            self.heard(now);
        }
        let deadline = self.deadline(lim);
        match self.phase {
            Phase::Handshake | Phase::Closing | Phase::Lingering => {
                if now < deadline {
                    return Due::At(deadline);
                }
                if self.phase == Phase::Handshake {
                    host.ended(Disconnect::HandshakeTimeout);
                }
                Due::Drop
            }
            Phase::Open => {
                let quiet = now.saturating_sub(self.since);
                if quiet >= lim.idle {
                    host.before_close();
                    host.ended(Disconnect::IdleTimeout);
                    if let Some(frame) = self.close(codec::CLOSE_GOING_AWAY, "idle timeout", now) {
                        host.send(frame);
                    }
                    return Due::At(self.deadline(lim));
                }
                if quiet >= lim.ping && self.bits & bit::PINGED == 0 {
                    self.bits |= bit::PINGED;
                    host.pinged();
                    host.send(codec::encode(OutKind::Ping, b""));
                    // Look again one interval from now: if the pong came, the next ping is due.
                    return Due::At((self.since + lim.idle).min(now + lim.ping));
                }
                Due::At(deadline)
            }
        }
    }
}

/// Where the request head ends (just past its blank line), searching from `from` (the bytes
/// before it were searched by an earlier call, less the 3 that could start a terminator).
/// Bare LF line ends count, as httparse accepts them.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while let Some(off) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        match buf.get(nl + 1..) {
            Some([b'\n', ..]) => return Some(nl + 2),
            Some([b'\r', b'\n', ..]) => return Some(nl + 3),
            _ => i = nl + 1,
        }
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
