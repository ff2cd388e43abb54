//! The transport under a session on a wss:// listener: ciphertext in and out through the
//! connection's [`TlsConn`](crate::tls::TlsConn), plaintext to and from the session and the
//! outbox. Plain connections never come here (`read_some` and `write_out` branch on
//! `Connection::tls`).

use std::io::{self, Read};

use mio::net::TcpStream;

use super::read::ReadOutcome;
use super::{Tally, Worker};
use crate::metrics::{Disconnect, WorkerStats};
use crate::outbox::{Flushed, Outbox};
use crate::tls::{Buffers, Sealer, TlsConn, TlsError};

impl Worker {
    /// One read from a TLS connection: ciphertext into `buf`, then the plaintext it carried
    /// back into `buf` for the session (it is never longer than the ciphertext, and what the
    /// connection held of a partial record is left room for). The handshake's answers are
    /// queued and the connection marked for the end-of-turn flush.
    pub(super) fn read_tls(&mut self, key: u32, buf: &mut [u8]) -> ReadOutcome {
        loop {
            let Some(c) = self.conns.get_mut(key as usize) else {
                return ReadOutcome::Dropped;
            };
            let Some(tls) = c.tls.as_deref_mut() else {
                return ReadOutcome::Dropped;
            };
            if tls.take_peer_eof() {
                return ReadOutcome::Eof; // close_notify: the session sees EOF
            }
            let cap = buf.len().saturating_sub(tls.inbound_len());
            if cap == 0 {
                return ReadOutcome::Drained; // a paused publisher's small hold; read on later
            }
            let n = match (&c.stream).read(&mut buf[..cap]) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.fail_io(key);
                    return ReadOutcome::Dropped;
                }
            };
            self.tally.bytes_in += n as u64;
            let plain = &mut self.tls_bufs.plain;
            plain.clear();
            let handshaking = tls.is_handshaking();
            let got = match tls.receive(&mut buf[..n], plain) {
                Ok(got) => got,
                Err(e) => {
                    self.fail_tls(key, handshaking, &e);
                    return ReadOutcome::Dropped;
                }
            };
            let answer = tls.has_output();
            let m = plain.len();
            buf[..m].copy_from_slice(plain);
            if got.handshake_done {
                WorkerStats::add(&self.stats().tls_handshakes, 1);
            }
            if answer {
                self.mark_dirty(key);
            }
            // After close_notify, one more call reports the EOF.
            return ReadOutcome::Bytes(m, n == cap || got.peer_closed);
        }
    }

    /// A TLS error: during the handshake it is counted as a failed TLS handshake (the session
    /// never started), later as an I/O error of the session. The socket is closed.
    fn fail_tls(&mut self, key: u32, handshaking: bool, e: &TlsError) {
        log::debug!(
            "worker {}: TLS {}: {e}",
            self.id,
            if handshaking {
                "handshake failed"
            } else {
                "error"
            }
        );
        if handshaking {
            self.stats().disconnect(Disconnect::TlsHandshakeFailed);
            self.drop_conn(key);
        } else {
            self.fail_io(key);
        }
    }
}

/// Writes a TLS connection's queue: first the ciphertext it holds (handshake flights, or what
/// the kernel refused last time), then the outbox's frames, encrypted by the [`Sealer`].
/// Blocked as long as any ciphertext is left.
pub(super) fn flush_tls(
    tls: &mut TlsConn,
    stream: &TcpStream,
    outbox: &mut Outbox,
    bufs: &mut Buffers,
    t: &mut Tally,
) -> io::Result<Flushed> {
    if tls.has_output() {
        t.write_syscalls += 1;
        if !tls.write_pending(&mut &*stream)? {
            return Ok(Flushed::Blocked);
        }
    }
    let mut sealer = Sealer {
        tls,
        sock: stream,
        bufs,
    };
    let res = outbox.flush(
        &mut sealer,
        &mut t.write_syscalls,
        &mut t.bytes_out,
        &mut t.frames_out,
    )?;
    Ok(if sealer.tls.has_output() {
        Flushed::Blocked
    } else {
        res
    })
}
