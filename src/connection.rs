//! One client connection: its state machine and the little it keeps between events.
//!
//! The struct is kept small on purpose (see the `size_of` test): an idle open connection is a
//! socket, a few integers and an empty [`Outbox`]; it owns no heap. Bytes are kept only for a
//! partial frame or request ([`Inbound::stash`]), for a fragmented message in progress
//! ([`Inbound::fragments`]), or for output the kernel would not take.
//!
//! # States (every transition is a method here)
//! ```text
//!  accept ──► Handshake ──upgrade()──► Open ──begin_close()──► Closing ──client close──► Lingering ──EOF/timeout──► dropped
//!                │                       │                       └──────timeout─────────────────────────────────► dropped
//!                │                       └──client close (reply queued)──► Lingering
//!                └──HTTP error / 503 (response queued)──► Lingering
//! ```
//! - `Handshake`: reading the request head; deadline `--handshake-timeout`.
//! - `Open`: frames flow; pinged after `--ping-interval` of silence, closed after `--idle-timeout`.
//! - `Closing`: the server sent a close frame and waits (`--close-timeout`) for the client's;
//!   data frames are discarded.
//! - `Lingering`: everything to send is queued; once it is written the server sends FIN and
//!   waits (`--close-timeout`) for the client's EOF, so the last bytes are not lost to a reset.

use bytes::Bytes;
use mio::net::TcpStream;

use crate::codec::{self, Kind, Utf8Stream};
use crate::outbox::Outbox;
use crate::room_index::Membership;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Handshake,
    Open,
    Closing,
    Lingering,
}

/// Flag bits in [`Connection::flags`].
pub mod flags {
    /// Already in the worker's list of connections to flush this turn.
    pub const DIRTY: u8 = 1 << 0;
    /// The kernel refused output; waiting for writable readiness.
    pub const WANTS_WRITE: u8 = 1 << 1;
    /// A ping is outstanding since the client was last heard from.
    pub const PINGED: u8 = 1 << 2;
    /// FIN was sent (Lingering).
    pub const FIN_SENT: u8 = 1 << 3;
    /// Readable but not read yet (read budget spent, or publishers paused).
    pub const IN_BACKLOG: u8 = 1 << 4;
    /// The client closed its side; drop the connection once its output is written.
    pub const PEER_EOF: u8 = 1 << 5;
}

/// Bytes kept between reads. Allocated only while needed.
#[derive(Default)]
pub struct Inbound {
    /// Raw bytes of an incomplete request head or frame.
    pub stash: Vec<u8>,
    /// A fragmented message being reassembled.
    pub fragments: Option<Fragments>,
    /// How much of the partial frame at the start of `stash` was already unmasked and checked.
    pub partial: codec::PartialText,
}

pub struct Fragments {
    pub kind: Kind,
    pub data: Vec<u8>,
    pub utf8: Utf8Stream,
}

impl Inbound {
    pub fn is_idle(&self) -> bool {
        self.stash.is_empty() && self.fragments.is_none()
    }
}

const NO_ROOM: u32 = u32::MAX;

pub struct Connection {
    pub stream: TcpStream,
    pub generation: u32,
    /// Tick the current state's clock started: last time heard from (Open), or when the
    /// state was entered (other states).
    pub since: u32,
    /// The tick of this connection's live timer entry; others are stale.
    pub timer_at: u32,
    room: u32,
    room_position: u32,
    pub state: State,
    pub flags: u8,
    pub inbound: Option<Box<Inbound>>,
    pub outbox: Outbox,
}

impl Connection {
    pub fn new(stream: TcpStream, generation: u32, now: u32) -> Connection {
        Connection {
            stream,
            generation,
            since: now,
            timer_at: 0,
            room: NO_ROOM,
            room_position: 0,
            state: State::Handshake,
            flags: 0,
            inbound: None,
            outbox: Outbox::default(),
        }
    }

    #[inline]
    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
    #[inline]
    pub fn set(&mut self, f: u8) {
        self.flags |= f;
    }
    #[inline]
    pub fn clear(&mut self, f: u8) {
        self.flags &= !f;
    }

    pub fn membership(&self) -> Option<Membership> {
        (self.room != NO_ROOM).then_some(Membership {
            room: self.room,
            position: self.room_position,
        })
    }

    pub fn set_room_position(&mut self, position: u32) {
        self.room_position = position;
    }

    /// Handshake -> Open, queueing the 101 response.
    pub fn upgrade(&mut self, response: Bytes, room: Option<Membership>, now: u32) {
        debug_assert_eq!(self.state, State::Handshake);
        self.outbox.push(response);
        if let Some(m) = room {
            self.room = m.room;
            self.room_position = m.position;
        }
        self.state = State::Open;
        self.since = now;
    }

    /// Any state -> Lingering with a final response (HTTP error, or the reply to a close).
    pub fn linger(&mut self, last: Bytes, now: u32) {
        self.outbox.push(last);
        self.state = State::Lingering;
        self.since = now;
    }

    /// Open -> Closing: queue a close frame behind what is already queued.
    pub fn begin_close(&mut self, code: u16, reason: &str, now: u32) {
        debug_assert_eq!(self.state, State::Open);
        self.outbox.push(codec::encode_close(code, reason));
        self.state = State::Closing;
        self.since = now;
    }

    /// Open -> Closing for a slow consumer: drop the queued frames that have not started, so
    /// the close frame is next on the wire. Returns how many messages were dropped.
    pub fn close_slow_consumer(&mut self, now: u32) -> u64 {
        let dropped = self.outbox.discard_unstarted();
        self.begin_close(codec::CLOSE_POLICY, "slow consumer", now);
        dropped
    }

    /// Something was received: the connection is alive.
    #[inline]
    pub fn heard(&mut self, now: u32) {
        if self.state == State::Open {
            self.since = now;
            self.clear(flags::PINGED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-connection budget we commit to. Release builds are smaller (mio's TcpStream
    /// is 4 bytes there, 16 in debug builds); this bound holds for both.
    const MAX_CONNECTION_BYTES: usize = 96;

    #[test]
    fn connection_state_stays_small() {
        let size = std::mem::size_of::<Connection>();
        assert!(
            size <= MAX_CONNECTION_BYTES,
            "Connection grew to {size} bytes (budget {MAX_CONNECTION_BYTES}); an idle million \
             connections pay for every byte"
        );
        // The slab stores an enum around it; that must not add more than a word.
        assert!(std::mem::size_of::<slab::Slab<Connection>>() > 0);
        assert!(std::mem::size_of::<Option<Box<Inbound>>>() == 8);
    }
}
