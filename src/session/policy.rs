//! What the session enforces for the access and abuse limits (`crate::access`,
//! `crate::abuse`): the host's verdict on a request before it is answered, the token's expiry
//! on an open connection (close 1008 at the tick it passes, from the session's own deadline:
//! no extra timer, no scan), and the message-rate bucket (close 1008 when empty).
//!
//! Per connection this is two `u32`s in the session: the expiry tick and the bucket.

use super::*;
use crate::access::{self, Target};

/// The host's answer to [`Host::admit`].
#[derive(Debug, Default)]
pub struct Admission {
    /// Header lines for the 101 (the chosen subprotocol).
    pub header: Option<Bytes>,
    /// The tick at which the connection's token expires.
    pub expires: Option<u32>,
}

/// No expiry (the tick never comes: deadlines are capped far below it).
pub(super) const NEVER: u32 = u32::MAX;

/// The close reason a client sees when its token expires.
pub const TOKEN_EXPIRED: &str = "token expired";
/// The close reason a client sees past `--max-message-rate`.
pub const MESSAGE_RATE: &str = "message rate";

impl Session {
    /// Asks the host whether the request in `head` may have the answer `parsed` (an upgrade
    /// or a room page; other answers pass untouched). A refusal turns it into that HTTP
    /// error; a grant may add header lines to the 101 and set the token's expiry.
    pub(super) fn admit<'a, H: Host>(
        &mut self,
        mut parsed: Upgrade<'a>,
        head: &[u8],
        host: &mut H,
    ) -> Upgrade<'a> {
        let target = match &parsed {
            Upgrade::Accept {
                route: Route::Echo, ..
            } => Target::Echo,
            Upgrade::Accept {
                route: Route::Room(r),
                ..
            } => Target::Room(r),
            Upgrade::Page(Page::RoomInfo(r)) => Target::RoomInfo(r),
            _ => return parsed,
        };
        match host.admit(head, target) {
            Err(r) => Upgrade::Reject(r),
            Ok(a) => {
                if let Upgrade::Accept { response, .. } = &mut parsed {
                    if let Some(lines) = a.header {
                        *response = access::with_header_lines(response, &lines);
                    }
                    if let Some(at) = a.expires {
                        self.expires = at.min(NEVER - 1);
                    }
                }
                parsed
            }
        }
    }

    /// Charges one message (or ping) to the rate bucket. False if the connection went over
    /// `--max-message-rate`: it was closed with 1008 and the frame must be skipped.
    pub(super) fn within_rate<H: Host>(
        &mut self,
        kind: Kind,
        lim: &Limits,
        now: u32,
        host: &mut H,
    ) -> bool {
        let Some(rate) = lim.message_rate else {
            return true;
        };
        if !matches!(kind, Kind::Text | Kind::Binary | Kind::Ping) || rate.take(&mut self.tokens) {
            return true;
        }
        self.close_for(Disconnect::MessageRate, MESSAGE_RATE, now, host);
        false
    }

    /// The token expired on an open connection: close 1008 now.
    pub(super) fn expire<H: Host>(&mut self, now: u32, lim: &Limits, host: &mut H) -> Due {
        self.close_for(Disconnect::TokenExpired, TOKEN_EXPIRED, now, host);
        Due::At(self.deadline(lim))
    }

    /// A policy close (1008) from the server: counted under `why`, then the close handshake.
    fn close_for<H: Host>(&mut self, why: Disconnect, reason: &str, now: u32, host: &mut H) {
        host.before_close();
        host.ended(why);
        if let Some(frame) = self.close(codec::CLOSE_POLICY, reason, now) {
            host.send(frame);
        }
    }

    /// Refills the rate bucket for the time since the client was last heard from (called
    /// before that time is moved to `now`).
    #[inline]
    pub(super) fn refill(&mut self, now: u32, lim: &Limits) {
        if let Some(rate) = lim.message_rate {
            self.tokens = rate.refill(self.tokens, now.saturating_sub(self.since));
        }
    }
}
