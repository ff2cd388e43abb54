//! One client connection as the worker holds it: the socket, its protocol [`Session`], its
//! [`Outbox`], its room seat and its timer, in as few bytes as possible.
//!
//! The struct is kept small on purpose (see the `size_of` test): an idle open connection is a
//! socket, a few integers, a session with no buffers and an empty outbox; it owns no heap.
//! The protocol (phases, parsing, closing) lives in [`crate::session`]; what is here is the
//! worker's bookkeeping: readiness it still has to act on, and where the connection sits in the
//! worker's lists.

use mio::net::TcpStream;

use crate::outbox::Outbox;
use crate::room_index::Membership;
use crate::session::Session;
use crate::tls::TlsConn;

/// What the worker still owes a connection, in one byte. Edge-triggered readiness means an
/// event is not repeated: what was not acted on is remembered here.
pub mod ready {
    /// Already in the worker's list of connections to flush this turn.
    pub const DIRTY: u8 = 1 << 0;
    /// The kernel refused output; waiting for writable readiness.
    pub const WANTS_WRITE: u8 = 1 << 1;
    /// Readable but not read to the end yet (read budget spent, or its room's ring is full):
    /// it sits on the worker's backlog.
    pub const IN_BACKLOG: u8 = 1 << 2;
    /// Held back because a ring its room needs is full (does not count as the client's
    /// silence).
    pub const PAUSED: u8 = 1 << 3;
}

const NO_ROOM: u32 = u32::MAX;

pub struct Connection {
    pub stream: TcpStream,
    pub generation: u32,
    /// The tick of this connection's live timer entry; others are stale.
    pub timer_at: u32,
    room: u32,
    room_position: u32,
    pub ready: u8,
    pub session: Session,
    pub outbox: Outbox,
    /// The TLS transport on a wss:// listener (`None`: plain TCP).
    pub tls: Option<Box<TlsConn>>,
}

impl Connection {
    pub fn new(stream: TcpStream, generation: u32, now: u32) -> Connection {
        Connection {
            stream,
            generation,
            timer_at: 0,
            room: NO_ROOM,
            room_position: 0,
            ready: 0,
            session: Session::new(now),
            outbox: Outbox::default(),
            tls: None,
        }
    }

    #[inline]
    pub fn has(&self, f: u8) -> bool {
        self.ready & f != 0
    }
    #[inline]
    pub fn set(&mut self, f: u8) {
        self.ready |= f;
    }
    #[inline]
    pub fn clear(&mut self, f: u8) {
        self.ready &= !f;
    }

    pub fn membership(&self) -> Option<Membership> {
        (self.room != NO_ROOM).then_some(Membership {
            room: self.room,
            position: self.room_position,
        })
    }

    pub fn join(&mut self, m: Membership) {
        debug_assert_eq!(self.room, NO_ROOM, "a connection joins one room");
        self.room = m.room;
        self.room_position = m.position;
    }

    pub fn set_room_position(&mut self, position: u32) {
        self.room_position = position;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-connection budget we commit to. Release builds are smaller (mio's TcpStream
    /// is 4 bytes there, 16 in debug builds); this bound holds for both. The session's token
    /// expiry and message-rate bucket took it from 96 to 104, the TLS pointer to 112 (96 in
    /// release builds).
    const MAX_CONNECTION_BYTES: usize = 112;

    #[test]
    fn connection_state_stays_small() {
        let size = std::mem::size_of::<Connection>();
        assert!(
            size <= MAX_CONNECTION_BYTES,
            "Connection grew to {size} bytes (budget {MAX_CONNECTION_BYTES}); an idle million \
             connections pay for every byte"
        );
        assert_eq!(
            std::mem::size_of::<Session>(),
            24,
            "an idle session is 24 bytes"
        );
        eprintln!(
            "size_of: Connection {size} B, Session {} B",
            std::mem::size_of::<Session>()
        );
    }
}
