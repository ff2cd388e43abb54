//! permessage-deflate (RFC 7692), as sans-IO pieces: the handshake's negotiation
//! ([`negotiate`]) and the payload codec ([`Compressor`], [`Inflater`]). Nothing here reads
//! sockets or knows about sessions; the caller wires it into the handshake and the frame path.
//!
//! What the design relies on:
//! - The server always answers `server_no_context_takeover`, so the compressed bytes of a
//!   message depend only on the message, the level and the window
//!   ([`Agreement::compress_window_bits`]): a room's batch is compressed once per window size
//!   present among its members (in practice once: browsers never ask for a smaller window) and
//!   the frame is shared like an uncompressed one.
//! - A connection stores an [`Agreement`] (1 byte; the session keeps an `Option` of it in what
//!   was padding) and, only while a compressed message is in flight, a [`MessageInflate`]
//!   (8 bytes, in the session's boxed inbound state; it stays between messages only if the
//!   client keeps context takeover, which the server grants only if configured to:
//!   [`DeflateConfig::allow_client_context_takeover`]).
//!
//! Rules for the caller (RFC 7692 §6): RSV1 marks a compressed message on its first frame only;
//! RSV1 on a continuation or control frame, or on any frame of a connection without an
//! agreement, is a protocol error (1002). A compressed message's frame payloads go to
//! [`MessageInflate::feed`], and its last frame to [`MessageInflate::finish`]; the size bound
//! is on the inflated bytes. Errors close with [`InflateError::close_code`]: 1009 for too big,
//! 1007 for corrupt data. Text is validated as UTF-8 after inflating.
//!
//! Where the server does this: the handshake (`handshake.rs`) negotiates and the session
//! (`session.rs`) keeps the [`Agreement`]; `session/parse.rs` inflates; the worker compresses
//! room batches and echoes with a [`FrameCompressor`] (`worker/fanout.rs`).

mod codec;
mod frames;
mod negotiate;
#[cfg(test)]
pub(crate) mod reference;

pub use codec::{CompressFailed, Compressor, InflateError, Inflater, InflaterPool, MessageInflate};
pub use frames::{compressed_bound, CompressStats, FrameCompressor};
pub use negotiate::{negotiate, Agreement, DeflateConfig, Malformed};
