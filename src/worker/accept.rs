//! Accepting: sockets in from the worker's own `SO_REUSEPORT` listeners, within a budget per
//! turn, with a 503 past `--max-connections` and a back-off when the process runs out of fds.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mio::{Interest, Token};

use super::{ticks_of, Worker, ACCEPTS_PER_TURN};
use crate::connection::Connection;
use crate::handshake;
use crate::metrics::{Disconnect, WorkerStats};

/// How long accept stays paused after EMFILE/ENFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl Worker {
    /// Accepts up to the turn's budget from listener `i`; what is left waits for next turn
    /// (edge-triggered: no new event would come for it).
    pub(super) fn accept(&mut self, i: usize) {
        if self.draining || self.accept_paused_until.is_some() {
            return;
        }
        for _ in 0..ACCEPTS_PER_TURN {
            match self.listeners[i].accept() {
                Ok((stream, addr)) => {
                    if std::mem::take(&mut self.accept_starved) {
                        log::info!("worker {}: accepting again", self.id);
                    }
                    self.admit(stream, addr, i)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if !is_resource_exhaustion(&e) => {
                    // ECONNABORTED and the like: that one client is gone; take the next.
                    WorkerStats::add(&self.stats().accept_errors, 1);
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: the connection stays in the backlog and no new
                    // edge comes; retrying now would spin. Pause and retry from the timer.
                    WorkerStats::add(&self.stats().accept_errors, 1);
                    self.accept_paused_until = Some(self.now + ticks_of(ACCEPT_BACKOFF));
                    // Once per episode at warn (it repeats every back-off while it lasts).
                    let level = if self.accept_starved {
                        log::Level::Debug
                    } else {
                        log::Level::Warn
                    };
                    self.accept_starved = true;
                    log::log!(
                        level,
                        "worker {}: accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF:?} \
                         and retrying (raise the fd limit or --max-connections headroom: \
                         scripts/tune.sh check)",
                        self.id,
                    );
                    return;
                }
            }
        }
        if !self.accept_backlog.contains(&i) {
            self.accept_backlog.push(i);
        }
    }

    /// Listeners whose budget ran out last turn get another turn's worth.
    pub(super) fn accept_backlog(&mut self) {
        for i in std::mem::take(&mut self.accept_backlog) {
            if i < self.listeners.len() {
                self.accept(i);
            }
        }
    }

    /// After an EMFILE back-off: try every listener again.
    pub(super) fn resume_accepting(&mut self) {
        if self
            .accept_paused_until
            .is_some_and(|until| self.now >= until)
        {
            self.accept_paused_until = None;
            for i in 0..self.listeners.len() {
                self.accept(i);
            }
        }
    }

    fn admit(&mut self, stream: mio::net::TcpStream, addr: std::net::SocketAddr, listener: usize) {
        WorkerStats::add(&self.stats().accepted, 1);
        let held = self.shared.sockets.fetch_add(1, Ordering::Relaxed);
        let max = self.shared.max_connections;
        // Over the limit a client still gets a 503, using the fd reserve; far over it (a
        // flood) the socket is closed at once so the reserve is never exhausted.
        let tls = self.listener_tls.get(listener).cloned().flatten();
        // A 503 needs a TLS handshake first: a wss:// client over the limit is closed at once.
        if held >= max + self.shared.reject_headroom || (held >= max && tls.is_some()) {
            self.shared.sockets.fetch_sub(1, Ordering::Relaxed);
            self.stats().disconnect(Disconnect::OverCapacity);
            return;
        }
        let _ = stream.set_nodelay(true);
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & 0x7fff_ffff;
        let entry = self.conns.vacant_entry();
        let key = entry.key() as u32;
        let token = Token(((generation as usize) << 32) | key as usize);
        let mut conn = Connection::new(stream, generation, self.now);
        if let Some(config) = tls {
            match crate::tls::TlsConn::new(&config) {
                Ok(t) => conn.tls = Some(Box::new(t)),
                Err(e) => {
                    log::warn!("worker {}: cannot start TLS: {e}", self.id);
                    self.shared.sockets.fetch_sub(1, Ordering::Relaxed);
                    self.stats().disconnect(Disconnect::TlsHandshakeFailed);
                    return;
                }
            }
        }
        // Both interests once, for good: toggling them would cost an epoll_ctl each time.
        if let Err(e) = self.poll.registry().register(
            &mut conn.stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::debug!("worker {}: register failed: {e}", self.id);
            self.shared.sockets.fetch_sub(1, Ordering::Relaxed);
            self.stats().disconnect(Disconnect::IoError);
            return;
        }
        entry.insert(conn);
        self.stats().connections.fetch_add(1, Ordering::Relaxed);
        if held >= max {
            self.stats().disconnect(Disconnect::OverCapacity);
            self.stats().http_status(503);
            let c = &mut self.conns[key as usize];
            c.session.refuse(self.now);
            c.outbox.push(handshake::over_capacity());
            self.mark_dirty(key);
        } else if !self.config().proxy_protocol {
            // Behind a proxy the client's address comes with its PROXY header (read.rs).
            self.guard_accepted(key, addr.ip());
        }
        self.reschedule(key);
    }
}

/// Accept errors that retrying at once cannot fix (out of fds or kernel memory).
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
