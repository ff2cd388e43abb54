//! megasock: a thread-per-core WebSocket server that holds a million sockets on one box and
//! fans messages out to them fast.
//!
//! The path of the data names the modules: a connection is accepted by a [`worker`] on its
//! [`listener`], upgraded by the [`handshake`], framed by the [`codec`], routed by the
//! [`room_index`] (and across cores by the [`bus`]), queued in an [`outbox`], and written.
//! [`session`] is the protocol of one connection without sockets (bytes in, actions out);
//! [`connection`] is what a worker holds per socket, [`timer_wheel`] its deadlines.

pub mod abuse;
pub mod access;
pub mod admin;
pub mod bridge;
pub mod bus;
pub mod codec;
pub mod config;
pub mod connection;
pub mod deflate;
pub mod handshake;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod outbox;
pub mod plan;
pub mod proxy_protocol;
pub mod room_index;
pub mod server;
pub mod session;
pub mod takeover;
pub mod timer_wheel;
pub mod tls;
pub mod worker;

pub use config::{Config, ServeArgs};
pub use server::Server;
