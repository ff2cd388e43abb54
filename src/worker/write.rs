//! Writing: each connection with output is flushed once per turn with vectored writes; what
//! the kernel refuses stays queued until writable readiness. A flushed queue is also where a
//! closing connection moves on (FIN, or gone once the peer has hung up).

use std::io;
use std::net::Shutdown;

use super::Worker;
use crate::connection::ready;
use crate::outbox::Flushed;
use crate::session::AfterFlush;

impl Worker {
    pub(super) fn flush_dirty(&mut self) {
        let mut list = std::mem::take(&mut self.dirty);
        for &key in &list {
            if let Some(c) = self.conns.get_mut(key as usize) {
                c.clear(ready::DIRTY);
                if !c.has(ready::WANTS_WRITE) {
                    self.flush(key);
                }
            }
        }
        // Flushing never marks anything dirty, so the (empty) list keeps its allocation.
        debug_assert!(self.dirty.is_empty());
        list.clear();
        self.dirty = list;
    }

    /// Writes a connection's queue and acts on the result: wait for writable readiness, move a
    /// closing connection on, or drop a broken one.
    pub(super) fn flush(&mut self, key: u32) {
        match self.write_out(key) {
            Ok(Flushed::Blocked) => {}
            Ok(Flushed::All) => {
                let c = &mut self.conns[key as usize];
                match c.session.on_flushed() {
                    AfterFlush::Nothing => {}
                    AfterFlush::ShutdownWrite => {
                        if let Some(tls) = c.tls.as_deref_mut() {
                            tls.queue_close_notify(); // best effort, before FIN
                            let _ = tls.write_pending(&mut &c.stream);
                        }
                        let _ = c.stream.shutdown(Shutdown::Write);
                    }
                    AfterFlush::Drop => self.drop_conn(key),
                }
            }
            Err(_) => self.fail_io(key),
        }
    }

    /// Writes as much of the queue as the kernel takes; never drops the connection (callers in
    /// the middle of a fan-out rely on that).
    pub(super) fn write_out(&mut self, key: u32) -> io::Result<Flushed> {
        let conn = &mut self.conns[key as usize];
        let t = &mut self.tally;
        let res = match conn.tls.as_deref_mut() {
            None => conn.outbox.flush(
                &mut &conn.stream,
                &mut t.write_syscalls,
                &mut t.bytes_out,
                &mut t.frames_out,
            ),
            Some(tls) => super::transport::flush_tls(
                tls,
                &conn.stream,
                &mut conn.outbox,
                &mut self.tls_bufs,
                t,
            ),
        };
        match res {
            Ok(Flushed::Blocked) => conn.set(ready::WANTS_WRITE),
            Ok(Flushed::All) => conn.clear(ready::WANTS_WRITE),
            Err(_) => {}
        }
        res
    }
}
