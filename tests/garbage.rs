//! Random bytes from many clients, before and after the upgrade, must never take the server
//! down or disturb a well-behaved client, and must leave no connection behind.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Random bytes, sometimes shaped like frames (a plausible first byte and length) so the
/// parser gets past the header check and into payloads, fragments and control frames.
fn noise(rng: &mut u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let r = xorshift(rng);
        if r % 4 == 0 {
            let first = [0x81u8, 0x82, 0x01, 0x00, 0x80, 0x89, 0x8a, 0x88][(r >> 8) as usize % 8];
            let payload: Vec<u8> = (0..(r >> 16) % 40).map(|_| xorshift(rng) as u8).collect();
            out.extend(Client::frame_bytes(first, &payload, r & (1 << 40) != 0));
        } else {
            out.push((r >> 24) as u8);
        }
    }
    out
}

#[test]
fn random_bytes_never_hurt_the_server_or_other_clients() {
    let mut srv = ServerProc::start(&["--workers", "2", "--max-message-size", "4KiB"]);
    let mut witness = Client::connect(srv.ws, "/ws/witness");
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 0..400 {
        let mut s = TcpStream::connect(srv.ws).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut bytes = Vec::new();
        match round % 3 {
            0 => {} // garbage instead of a request
            1 => bytes.extend(upgrade_request("/echo").into_bytes()),
            _ => bytes.extend(upgrade_request("/ws/witness").into_bytes()),
        }
        let len = (xorshift(&mut rng) % 3000) as usize;
        bytes.extend(noise(&mut rng, len));
        for piece in bytes.chunks(1 + (xorshift(&mut rng) % 700) as usize) {
            if s.write_all(piece).is_err() {
                break; // the server already closed it: fine
            }
        }
        // Read whatever comes back (a response, frames, a close), then hang up.
        let mut sink = [0u8; 8192];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        drop(s);
        // The witness, in a room that the noise also publishes into, still works.
        if round % 25 == 0 {
            witness.send_text(&format!("still fine {round}"));
            loop {
                let f = witness.recv();
                if f.payload == format!("still fine {round}").into_bytes() {
                    break;
                }
            }
        }
    }
    // A panic anywhere exits the process (see main.rs), so this also means "no panic".
    assert!(srv.child.try_wait().unwrap().is_none(), "the server died");
    drop(witness);
    srv.wait_metric("megasock_connections", 15, |v| v == 0);
}
