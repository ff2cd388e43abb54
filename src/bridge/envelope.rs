//! What travels through Redis: megasock's envelope, and the rule for bare payloads.
//!
//! An envelope is binary: the 4 bytes `MSK1`, the 16-byte id of the node that published, the
//! publish time (u64, nanoseconds since the Unix epoch, big-endian), the number of messages
//! (u32, big-endian), then the messages as WebSocket server frames, exactly the bytes members
//! receive (so a receiving node forwards them without re-encoding). Anything else published
//! on a room's channel (`PUBLISH megasock:room:lobby hello` from any backend) is one message:
//! a text frame if it is UTF-8, a binary frame otherwise. See docs/CLUSTER.md.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{self, OutKind};

const MAGIC: &[u8; 4] = b"MSK1";
const HEADER: usize = 4 + 16 + 8 + 4;

/// A node's identity in envelopes (random at start).
pub type NodeId = [u8; 16];

/// Wraps frames published on this node.
pub fn wrap(node: &NodeId, published_ns: u64, messages: u32, frames: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER + frames.len());
    b.put_slice(MAGIC);
    b.put_slice(node);
    b.put_u64(published_ns);
    b.put_u32(messages);
    b.put_slice(frames);
    b.freeze()
}

/// What arrived on a room's channel.
#[derive(Debug, PartialEq, Eq)]
pub struct Received {
    /// The publishing node (None for a bare payload from another backend).
    pub node: Option<NodeId>,
    pub published_ns: Option<u64>,
    pub messages: u32,
    /// Server frames, ready for members.
    pub frames: Bytes,
}

/// Reads a payload from a room channel.
pub fn unwrap(payload: &[u8]) -> Received {
    if payload.len() >= HEADER && &payload[..4] == MAGIC && frames_check(payload) {
        let mut node = [0u8; 16];
        node.copy_from_slice(&payload[4..20]);
        let ts = u64::from_be_bytes(payload[20..28].try_into().expect("8 bytes"));
        let messages = u32::from_be_bytes(payload[28..32].try_into().expect("4 bytes"));
        return Received {
            node: Some(node),
            published_ns: Some(ts),
            messages,
            frames: Bytes::copy_from_slice(&payload[HEADER..]),
        };
    }
    let kind = if simdutf8::basic::from_utf8(payload).is_ok() {
        OutKind::Text
    } else {
        OutKind::Binary
    };
    Received {
        node: None,
        published_ns: None,
        messages: 1,
        frames: codec::encode(kind, payload),
    }
}

/// An envelope's frames must be exactly `messages` whole, unmasked, final data frames (text
/// or binary) covering the rest of the payload: anything else is not ours, and is treated as a
/// bare payload rather than written into clients' streams.
fn frames_check(payload: &[u8]) -> bool {
    let messages = u32::from_be_bytes(payload[28..32].try_into().expect("4 bytes")) as usize;
    let mut rest = &payload[HEADER..];
    let mut seen = 0;
    while !rest.is_empty() {
        if rest.len() < 2 || !matches!(rest[0], 0x81 | 0x82) || rest[1] & 0x80 != 0 {
            return false;
        }
        let (len, head) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 if rest.len() >= 10 => (
                u64::from_be_bytes(rest[2..10].try_into().expect("8 bytes")) as usize,
                10,
            ),
            126 | 127 => return false,
            n => (n as usize, 2),
        };
        let Some(total) = len.checked_add(head).filter(|&t| t <= rest.len()) else {
            return false;
        };
        rest = &rest[total..];
        seen += 1;
    }
    seen == messages && messages > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_bare_payloads_become_frames() {
        let frames = codec::encode(OutKind::Binary, &[1, 2, 3]);
        let node = [7u8; 16];
        let got = unwrap(&wrap(&node, 42, 1, &frames));
        assert_eq!(got.node, Some(node));
        assert_eq!((got.published_ns, got.messages), (Some(42), 1));
        assert_eq!(got.frames, frames);
        let bare = unwrap(b"hello");
        assert_eq!(bare.node, None);
        assert_eq!(&bare.frames[..], &[0x81, 5, b'h', b'e', b'l', b'l', b'o']);
        assert_eq!(unwrap(&[0xff, 0x00]).frames[0], 0x82, "not UTF-8: binary");
        assert_eq!(
            unwrap(b"MSK1 short").frames[0],
            0x81,
            "too short to be an envelope"
        );
    }
}
