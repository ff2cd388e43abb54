//! A connection's output queue: shared, pre-encoded frames waiting to be written.
//!
//! A chunk is `Bytes` (refcounted) holding one or more whole frames, so a broadcast queued for
//! ten thousand connections is one buffer and ten thousand refcount increments. Each chunk
//! remembers how many messages it carries, so a drop is counted in messages. The queue is written with vectored writes, once
//! per loop turn, and frees its storage when it empties: an idle connection owns no heap.
//!
//! Invariant: `queued` is the number of bytes not yet taken by the kernel, and the first frame
//! may be partly written (`head_offset`). Frames are dropped only whole and never the partly
//! written one, so the byte stream a client sees is always a sequence of complete frames.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::{Bytes, BytesMut};

use crate::codec::{self, OutKind};

/// How many frames one `writev` takes at most (well under IOV_MAX = 1024).
const MAX_IOV: usize = 256;

/// Whole frames, shared with other recipients (cloning is a refcount increment).
#[derive(Clone)]
pub struct Chunk {
    pub bytes: Bytes,
    /// Data messages inside (control frames count zero).
    pub messages: u32,
}

/// Frames encoded one after another into one buffer (a room's messages of one turn, or the
/// echoes of one read), handed out whole as one [`Chunk`] for every recipient to share.
#[derive(Default)]
pub struct FrameBatch {
    frames: BytesMut,
    messages: u32,
}

impl FrameBatch {
    /// Appends one data message as a frame.
    #[inline]
    pub fn push(&mut self, kind: OutKind, payload: &[u8]) {
        codec::encode_into(&mut self.frames, kind, payload);
        self.messages += 1;
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The frames so far as one shared chunk. The buffer goes with it (taken whole, not
    /// split), so an idle room or connection keeps no allocation pinned behind a sent batch.
    pub fn take(&mut self) -> Option<Chunk> {
        if self.frames.is_empty() {
            return None;
        }
        Some(Chunk {
            bytes: std::mem::take(&mut self.frames).freeze(),
            messages: std::mem::take(&mut self.messages),
        })
    }

    /// Messages in the batch so far.
    pub fn messages(&self) -> u32 {
        self.messages
    }

    /// Bytes allocated (zero between turns).
    pub fn capacity(&self) -> usize {
        self.frames.capacity()
    }
}

#[derive(Default)]
pub struct Outbox {
    frames: VecDeque<Chunk>,
    head_offset: u32,
    queued: u32,
}

/// What a flush achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything was written.
    All,
    /// The kernel took part; wait for writable readiness.
    Blocked,
}

impl Outbox {
    /// Bytes waiting for the kernel.
    #[inline]
    pub fn queued(&self) -> usize {
        self.queued as usize
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Queues a control frame or an HTTP response (no data message).
    #[inline]
    pub fn push(&mut self, bytes: Bytes) {
        self.push_chunk(Chunk { bytes, messages: 0 });
    }

    /// Queues a chunk. The caller enforces the backpressure limit first.
    #[inline]
    pub fn push_chunk(&mut self, chunk: Chunk) {
        self.queued = self.queued.saturating_add(chunk.bytes.len() as u32);
        self.frames.push_back(chunk);
    }

    /// Drops every chunk not yet started (used before a slow consumer's close frame, so the
    /// close reaches the client as soon as it reads again). Returns the messages dropped.
    pub fn discard_unstarted(&mut self) -> u64 {
        let keep = usize::from(self.head_offset > 0).min(self.frames.len());
        let dropped = self.frames.drain(keep..).map(|c| c.messages as u64).sum();
        self.queued = self
            .frames
            .front()
            .map_or(0, |f| (f.bytes.len() - self.head_offset as usize) as u32);
        if self.frames.is_empty() {
            self.release();
        }
        dropped
    }

    /// Writes as much as the kernel takes. `writes`, `bytes` and `messages` count syscalls,
    /// bytes, and data messages fully handed to the kernel.
    pub fn flush<W: Write>(
        &mut self,
        w: &mut W,
        writes: &mut u64,
        bytes: &mut u64,
        messages: &mut u64,
    ) -> io::Result<Flushed> {
        while !self.frames.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (i, f) in self.frames.iter().take(MAX_IOV).enumerate() {
                let start = if i == 0 { self.head_offset as usize } else { 0 };
                slices[i] = IoSlice::new(&f.bytes[start..]);
                n += 1;
            }
            *writes += 1;
            let written = match w.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            *bytes += written as u64;
            *messages += self.consume(written);
        }
        self.release();
        Ok(Flushed::All)
    }

    /// Drops what the kernel took; returns the messages of the chunks it finished.
    fn consume(&mut self, mut written: usize) -> u64 {
        self.queued -= written as u32;
        let mut finished = 0;
        while written > 0 {
            let front_left = self.frames[0].bytes.len() - self.head_offset as usize;
            if written >= front_left {
                written -= front_left;
                finished += self.frames.pop_front().map_or(0, |c| c.messages as u64);
                self.head_offset = 0;
            } else {
                self.head_offset += written as u32;
                written = 0;
            }
        }
        finished
    }

    /// Frees the queue's storage so an idle connection holds no heap.
    fn release(&mut self) {
        if self.frames.capacity() > 0 {
            self.frames = VecDeque::new();
        }
        self.head_offset = 0;
        self.queued = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `cap` bytes per call, then blocks.
    struct Trickle {
        out: Vec<u8>,
        budget: usize,
    }
    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.budget).min(5);
            self.budget -= n;
            self.out.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_order_and_resume() {
        let mut o = Outbox::default();
        o.push(Bytes::from_static(b"hello "));
        o.push(Bytes::from_static(b"wide "));
        o.push(Bytes::from_static(b"world"));
        let mut w = Trickle {
            out: vec![],
            budget: 8,
        };
        let (mut s, mut b, mut m) = (0, 0, 0);
        assert_eq!(
            o.flush(&mut w, &mut s, &mut b, &mut m).unwrap(),
            Flushed::Blocked
        );
        assert_eq!(o.queued(), 16 - 8);
        w.budget = 100;
        assert_eq!(
            o.flush(&mut w, &mut s, &mut b, &mut m).unwrap(),
            Flushed::All
        );
        assert_eq!(w.out, b"hello wide world");
        assert_eq!(o.queued(), 0);
        assert_eq!(o.frames.capacity(), 0, "storage released when empty");
    }

    #[test]
    fn a_taken_batch_leaves_no_buffer_behind_and_owns_its_bytes() {
        let mut batch = FrameBatch::default();
        batch.push(OutKind::Text, b"hello");
        batch.push(OutKind::Binary, &[1u8; 300]);
        let chunk = batch.take().unwrap();
        assert_eq!(chunk.messages, 2);
        assert_eq!(chunk.bytes.len(), 2 + 5 + 4 + 300);
        assert_eq!(batch.capacity(), 0, "the builder keeps nothing");
        assert!(batch.take().is_none());
        // The only reference is the chunk's: once every recipient wrote it, memory is freed.
        assert!(chunk.bytes.is_unique());
        let mut o = Outbox::default();
        o.push_chunk(chunk);
        let mut w = Trickle {
            out: vec![],
            budget: usize::MAX,
        };
        let (mut s, mut b, mut m) = (0, 0, 0);
        while o.flush(&mut w, &mut s, &mut b, &mut m).unwrap() != Flushed::All {}
        assert_eq!(m, 2);
        assert_eq!(o.frames.capacity(), 0);
    }

    #[test]
    fn discard_keeps_the_partly_written_frame() {
        let mut o = Outbox::default();
        o.push(Bytes::from_static(b"0123456789"));
        o.push_chunk(Chunk {
            bytes: Bytes::from_static(b"abc"),
            messages: 3,
        });
        let mut w = Trickle {
            out: vec![],
            budget: 4,
        };
        let (mut s, mut b, mut m) = (0, 0, 0);
        o.flush(&mut w, &mut s, &mut b, &mut m).unwrap();
        assert_eq!(o.discard_unstarted(), 3);
        assert_eq!(o.queued(), 6);
        w.budget = 100;
        o.flush(&mut w, &mut s, &mut b, &mut m).unwrap();
        assert_eq!(w.out, b"0123456789");
    }
}
