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
use crate::deflate::{Agreement, DeflateConfig, InflateError, InflaterPool};
use crate::handshake::{self, Page, Route, Upgrade};
use crate::metrics::Disconnect;

mod parse;
mod policy;
#[cfg(test)]
mod tests;

use parse::Inbound;
pub use policy::{Admission, MESSAGE_RATE, TOKEN_EXPIRED};

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
    /// `--max-message-rate` with its burst, if set.
    pub message_rate: Option<crate::abuse::message_rate::MessageRate>,
    /// While the server drains, the last tick a closing connection may live.
    pub drain_until: Option<u32>,
    /// Connections start with a PROXY protocol header (`--proxy-protocol`).
    pub proxy: bool,
    /// What permessage-deflate negotiation may agree to.
    pub deflate: DeflateConfig,
}

/// What a session borrows from its worker to inflate permessage-deflate messages: spare
/// inflaters (a connection holds one only while a compressed message is in flight, unless
/// the client keeps context takeover) and the buffer a one-frame message is inflated into.
pub struct Inflating {
    pub pool: InflaterPool,
    out: Vec<u8>,
}

impl Default for Inflating {
    fn default() -> Self {
        Inflating::new(4)
    }
}

impl Inflating {
    /// Keeps at most `spare` idle inflaters (47,712 B each).
    pub fn new(spare: usize) -> Inflating {
        Inflating {
            pool: InflaterPool::new(spare),
            out: Vec::new(),
        }
    }

    fn take_buffer(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Takes the buffer back for the next message, unless a big message grew it: a worker
    /// should not pin up to `--max-message-size` after one.
    fn put_buffer(&mut self, mut out: Vec<u8>) {
        if out.capacity() <= 64 * 1024 {
            out.clear();
            self.out = out;
        }
    }
}

/// What a session asks of the server around it while it reads.
pub trait Host {
    /// The upgrade was accepted for `route`, with permessage-deflate if `deflate` (the 101
    /// response follows through [`Host::send`]).
    fn upgraded(&mut self, route: Route<'_>, deflate: Option<Agreement>);
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
    /// The worker's inflate pool and buffer (used only with permessage-deflate).
    fn inflating(&mut self) -> &mut Inflating;
    /// A compressed message was inflated to `bytes` bytes.
    fn inflated(&mut self, bytes: usize) {
        let _ = bytes;
    }
    /// A compressed message could not be inflated (the connection is failed right after).
    fn inflate_failed(&mut self, why: InflateError) {
        let _ = why;
    }
    /// The client's address from a PROXY protocol header (None: the proxy's own connection).
    /// An error refuses the connection with that answer (a per-address limit).
    fn peer(&mut self, addr: Option<std::net::SocketAddr>) -> Result<(), handshake::Rejection> {
        let _ = addr;
        Ok(())
    }
    /// May this request (`head`, parsed and well formed) have its answer? Asked before an
    /// upgrade or a room page is answered: the token, room grant, Origin and subprotocol
    /// checks (`crate::access`). An error is answered instead.
    fn admit(
        &mut self,
        head: &[u8],
        target: crate::access::Target<'_>,
    ) -> Result<Admission, handshake::Rejection> {
        let _ = (head, target);
        Ok(Admission::default())
    }
    /// A plain page on the WebSocket listener: the full response, or the error to answer.
    fn page(&mut self, page: Page<'_>) -> Result<Bytes, handshake::Rejection> {
        let _ = page;
        Err(handshake::Rejection {
            status: 404,
            reason: "no pages here",
        })
    }
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
    /// The server drains: an upgrade completed now is closed with 1001 right away.
    pub const DRAINING: u8 = 1 << 3;
    /// The PROXY protocol header was read (`--proxy-protocol`).
    pub const PROXIED: u8 = 1 << 4;
}

/// One connection's protocol state: 24 bytes while idle (16 of protocol state, 8 for the token's
/// expiry and the message-rate bucket; the deflate agreement fits in what would be padding).
pub struct Session {
    phase: Phase,
    bits: u8,
    /// permessage-deflate parameters, if the handshake agreed to it.
    deflate: Option<Agreement>,
    /// Tick the phase's clock started: last time heard from (Open), or when the phase was
    /// entered (other phases).
    since: u32,
    inbound: Option<Box<Inbound>>,
    /// The tick the client's token expires (`policy::NEVER` without one).
    expires: u32,
    /// The `--max-message-rate` bucket (`abuse::message_rate`; starts full).
    tokens: u32,
}

impl Session {
    pub fn new(now: u32) -> Session {
        Session {
            phase: Phase::Handshake,
            bits: 0,
            deflate: None,
            since: now,
            inbound: None,
            expires: policy::NEVER,
            tokens: u32::MAX,
        }
    }

    /// The permessage-deflate agreement, if any: how to compress what this connection gets.
    #[inline]
    pub fn deflate(&self) -> Option<Agreement> {
        self.deflate
    }

    /// Records the agreement on a stand-in (see [`Session::stand_in`]) when the real session
    /// upgrades while being fed, so output routed to this connection meanwhile is compressed.
    pub fn set_deflate(&mut self, deflate: Option<Agreement>) {
        self.deflate = deflate;
    }

    /// True while the connection holds an inflate state (a compressed message in flight, or
    /// kept between messages for client context takeover).
    pub fn holds_inflater(&self) -> bool {
        self.inbound
            .as_ref()
            .is_some_and(|ib| ib.inflate.heap_bytes() > 0)
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

    /// Input received but not processed yet (a partial frame, or bytes held while the
    /// server held this connection's messages back: [`Session::receive_held`]).
    pub fn held(&self) -> usize {
        self.inbound.as_ref().map_or(0, |ib| ib.stash.len())
    }

    /// A session to leave in the connection's slot while the real one is being fed: same
    /// phase (so a message routed back to this connection meanwhile sees the truth), no
    /// buffers.
    pub fn stand_in(&self) -> Session {
        Session {
            phase: self.phase,
            bits: self.bits,
            deflate: self.deflate,
            since: self.since,
            inbound: None,
            expires: self.expires,
            tokens: self.tokens,
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
    pub fn heard(&mut self, now: u32, lim: &Limits) {
        if self.phase == Phase::Open {
            self.refill(now, lim);
            self.since = now;
            self.bits &= !bit::PINGED;
        }
    }

    // ---- input -----------------------------------------------------------------------------

    /// Takes bytes read from the socket. `fresh` is parsed in place when nothing is stashed
    /// (the common case: no copy); only a trailing partial request or frame is kept.
    pub fn receive<H: Host>(&mut self, fresh: &mut [u8], lim: &Limits, now: u32, host: &mut H) {
        self.heard(now, lim);
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

    /// The server drains: an open connection gets close 1001; one still upgrading gets it as
    /// soon as its upgrade completes (within its handshake timeout and the drain timeout).
    pub fn shutdown<H: Host>(&mut self, now: u32, host: &mut H) -> Option<Due> {
        match self.phase {
            Phase::Handshake => {
                // A client mid-upgrade was accepted: refusing it now would be a failed connect
                // during a restart. It completes its upgrade and is told 1001 at once.
                self.bits |= bit::DRAINING;
                None
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
                (self.since + wait).min(self.expires)
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
            self.heard(now, lim);
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
                if now >= self.expires {
                    return self.expire(now, lim, host);
                }
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
                    return Due::At(
                        (self.since + lim.idle)
                            .min(now + lim.ping)
                            .min(self.expires),
                    );
                }
                Due::At(deadline)
            }
        }
    }
}
