//! Edge cases found in review: half-closed clients, fail-fast UTF-8 across pieces, a member's
//! last message before its close, ping timing after a pong, and what the bus metrics count.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// A client that sends a message and its close frame, then half-closes its side (shutdown
/// SHUT_WR, as `nc -N` or many HTTP stacks do), is still reading: it must get the echo and the
/// close reply (README: "client sends close | the same code echoed, then the server closes TCP").
#[test]
fn half_closed_client_still_gets_its_echo_and_close_reply() {
    let srv = ServerProc::start(&["--workers", "1"]);
    for round in 0..5 {
        let mut c = Client::connect(srv.ws, "/echo");
        let mut bytes = Client::frame_bytes(0x81, b"last words", true);
        bytes.extend(Client::frame_bytes(0x88, &1000u16.to_be_bytes(), true));
        c.send_raw(&bytes).unwrap();
        c.s.shutdown(Shutdown::Write).unwrap();
        c.set_timeout(Duration::from_secs(5));
        let f = c.try_recv();
        assert_eq!(
            f.as_ref().map(|f| (f.opcode, f.payload.clone())),
            Some((TEXT, b"last words".to_vec())),
            "round {round}: the echo of a message sent before the client's FIN was lost"
        );
        let f = c.try_recv();
        assert_eq!(
            f.as_ref().map(|f| (f.opcode, f.payload.clone())),
            Some((CLOSE, 1000u16.to_be_bytes().to_vec())),
            "round {round}: the close reply was lost"
        );
    }
}

/// An HTTP client that sends its request and half-closes must still get the HTTP error.
#[test]
fn http_error_reaches_a_client_that_half_closed() {
    let srv = ServerProc::start(&["--workers", "1"]);
    for round in 0..5 {
        let mut s = TcpStream::connect(srv.ws).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 404 "),
            "round {round}: expected a 404, got {text:?}"
        );
    }
}

/// Fail-fast UTF-8 must also hold for a continuation frame whose payload arrives in pieces
/// (issue: "text is UTF-8 validated (also across fragments, fail-fast)"). The server must close
/// with 1007 as soon as the invalid byte arrives, not when the rest of the frame does.
#[test]
fn continuation_frame_fails_fast_on_invalid_utf8() {
    let srv = ServerProc::start(&["--workers", "1"]);
    let mut c = Client::connect(srv.ws, "/echo");
    c.send_frame(TEXT, false, b"valid start ");
    let mut payload = b"ok\xffbad".to_vec();
    payload.resize(1000, b'x');
    let frame = Client::frame_bytes(0x80, &payload, true); // FIN continuation
    c.send_raw(&frame[..frame.len() - 900]).unwrap(); // header + 100 bytes, rest withheld
    c.set_timeout(Duration::from_secs(3));
    let f = c.try_recv();
    assert_eq!(
        f.as_ref().map(|f| f.opcode),
        Some(CLOSE),
        "no close within 3 s: the invalid byte in a partial continuation frame was not checked"
    );
    let f = f.unwrap();
    assert_eq!(u16::from_be_bytes([f.payload[0], f.payload[1]]), 1007);
}

/// The same check on a chopped single text frame (Autobahn 6.4.3).
#[test]
fn chopped_text_frame_fails_fast_on_invalid_utf8() {
    let srv = ServerProc::start(&["--workers", "1"]);
    let mut c = Client::connect(srv.ws, "/echo");
    let mut payload = "h€llo".as_bytes().to_vec();
    payload.extend_from_slice(b"\xed\xa0\x80"); // a surrogate: invalid
    payload.resize(1000, b'x');
    let frame = Client::frame_bytes(0x81, &payload, true);
    // Valid prefix first, split inside the euro sign, then the bad bytes.
    c.send_raw(&frame[..8 + 2]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    c.send_raw(&frame[10..8 + 20]).unwrap();
    c.set_timeout(Duration::from_secs(3));
    let f = c
        .try_recv()
        .expect("close 1007 before the rest of the frame");
    assert_eq!(f.opcode, CLOSE);
    assert_eq!(u16::from_be_bytes([f.payload[0], f.payload[1]]), 1007);
}

/// `megasock_bus_sent_total` counts messages handed to other workers, not the batches that
/// carry them: 20 messages read in one read cross as one delivery but count as 20.
#[test]
fn bus_metrics_count_messages_not_batches() {
    let srv = ServerProc::start(&["--workers", "2"]);
    let mut clients = members_on_every_worker(&srv, "m", 2);
    let mut burst = Vec::new();
    for i in 0..20 {
        burst.extend(Client::frame_bytes(0x81, format!("m{i}").as_bytes(), true));
    }
    clients[0].send_raw(&burst).unwrap();
    for c in clients.iter_mut() {
        for i in 0..20 {
            assert_eq!(c.recv().payload, format!("m{i}").as_bytes());
        }
    }
    assert_eq!(
        srv.metric("megasock_bus_sent_total"),
        20,
        "20 messages were handed to the one other worker"
    );
}

/// A room member's message published just before its close frame must still reach the sender
/// itself ("delivered to every member of the room, the sender included"): it was published while
/// the sender was open and precedes its close, so the room batch is flushed before the close
/// reply is queued.
#[test]
fn sender_gets_its_own_message_sent_right_before_its_close() {
    let srv = ServerProc::start(&["--workers", "1"]);
    let mut a = Client::connect(srv.ws, "/ws/j");
    let mut b = Client::connect(srv.ws, "/ws/j");
    let mut bytes = Client::frame_bytes(0x81, b"bye", true);
    bytes.extend(Client::frame_bytes(0x88, &1000u16.to_be_bytes(), true));
    a.send_raw(&bytes).unwrap();
    assert_eq!(b.recv().payload, b"bye");
    let f = a.recv();
    assert_eq!(
        (f.opcode, f.payload.as_slice()),
        (TEXT, &b"bye"[..]),
        "the sender's own copy was dropped; it got {f:?} first"
    );
    assert_eq!(a.expect_close(), Some(1000));
    assert_eq!(srv.metric("megasock_messages_dropped_total"), 0);
}

/// README: "quiet for --ping-interval | a ping". After a client answers a ping, it is quiet
/// again from the pong on, so the next ping is due one ping interval later (not at the idle
/// deadline computed when the first ping went out).
#[test]
fn next_ping_comes_one_interval_after_the_pong() {
    let srv = ServerProc::start(&[
        "--workers",
        "1",
        "--ping-interval",
        "500ms",
        "--idle-timeout",
        "4s",
    ]);
    let mut c = Client::connect(srv.ws, "/echo");
    c.set_timeout(Duration::from_secs(6));
    let f = c.recv();
    assert_eq!(f.opcode, PING);
    c.send_frame(PONG, true, &f.payload);
    let ponged = Instant::now();
    let f = c.recv();
    assert_eq!(f.opcode, PING);
    let gap = ponged.elapsed();
    assert!(
        gap < Duration::from_millis(1500),
        "second ping {gap:?} after the pong (ping interval 500ms)"
    );
}
