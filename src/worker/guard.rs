//! The worker's side of the access and abuse limits (`crate::access`, `crate::abuse`): the
//! per-address limits when a client's address becomes known (at accept, or from its PROXY
//! header), their release when the connection is dropped, and the gate's verdict on a request
//! head, turned into the session's terms (ticks).
//!
//! The per-address key of each counted connection is kept here, in a map that stays empty
//! unless `--max-connections-per-ip` is set (about 20 bytes per connection when it is).

use std::net::IpAddr;

use super::Worker;
use crate::abuse::{self, message_rate::UNITS as TICKS_PER_SECOND};
use crate::access::Target;
use crate::handshake::{self, Rejection};
use crate::metrics::Disconnect;
use crate::session::Admission;
use crate::timer_wheel::TICK;

impl Worker {
    /// A new connection from `ip`: counted against the per-address limits. An error is the
    /// answer to give it instead of serving it.
    pub(super) fn guard_ip(&mut self, key: u32, ip: IpAddr) -> Result<(), Rejection> {
        let guards = &self.shared.guards;
        if !guards.active() || self.ip_keys.contains_key(&key) {
            return Ok(());
        }
        let ip_key = abuse::ip_key(ip);
        let second = self.now / TICKS_PER_SECOND;
        match guards.admit(ip_key, second) {
            Ok(counted) => {
                if counted {
                    self.ip_keys.insert(key, ip_key);
                }
                Ok(())
            }
            Err(limit) => {
                self.stats().limits.limited(limit);
                Err(limit.rejection())
            }
        }
    }

    /// At accept (without `--proxy-protocol`): the per-address limits; over one, the
    /// connection gets its HTTP answer at once and is closed, unread.
    pub(super) fn guard_accepted(&mut self, key: u32, ip: IpAddr) {
        if let Err(r) = self.guard_ip(key, ip) {
            self.stats().disconnect(Disconnect::HttpRejected);
            self.stats().http_status(r.status);
            let c = &mut self.conns[key as usize];
            c.session.refuse(self.now);
            // On wss:// an answer would need a TLS handshake first: the socket is only closed.
            if c.tls.is_none() {
                c.outbox.push(handshake::error_response(r));
            }
            self.mark_dirty(key);
        }
    }

    /// The connection is going: its per-address count is returned.
    pub(super) fn release_ip(&mut self, key: u32) {
        if let Some(ip_key) = self.ip_keys.remove(&key) {
            self.shared.guards.release(ip_key);
        }
    }

    /// The gate's verdict on a request head (`Host::admit`): refusals are counted by reason,
    /// and the token's expiry becomes a tick of this worker's clock.
    pub(super) fn admit_request(
        &mut self,
        head: &[u8],
        target: Target<'_>,
    ) -> Result<Admission, Rejection> {
        let Some(gate) = self.shared.config.gate.clone() else {
            return Ok(Admission::default());
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        match gate.check(head, target, now) {
            Ok(a) => Ok(Admission {
                header: a.header,
                // The first tick that starts at or after exp (valid only before it), counted
                // from the start of the current tick so that it never fires early.
                expires: a.expires.map(|exp| {
                    let tick_start = self.start + TICK * self.now;
                    let into_tick = tick_start.elapsed().as_secs_f64();
                    let ticks = ((exp - now + into_tick) / TICK.as_secs_f64())
                        .ceil()
                        .max(1.0);
                    self.now.saturating_add(ticks.min(u32::MAX as f64) as u32)
                }),
            }),
            Err(d) => {
                self.stats().access.denied(d.why);
                Err(d.rejection)
            }
        }
    }
}
