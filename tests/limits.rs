//! Abuse limits, against the real binary: the message rate (close 1008, a polite neighbour on
//! the same worker unaffected), connections per client address across workers (503; another
//! address still served; the PROXY protocol's address counts), and new connections per
//! address per second (429 with Retry-After). 127.0.0.2 and 127.0.0.3 stand for two clients.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A TCP connection to `to` from the loopback address `from` (127.0.0.0/8 is all ours).
fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Writes `bytes` then reads the answer's head (and an error's body, up to the close).
fn answer(mut s: TcpStream, bytes: &[u8]) -> (TcpStream, String) {
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    if !out.starts_with(b"HTTP/1.1 101") {
        let _ = s.read_to_end(&mut out);
    }
    (s, String::from_utf8_lossy(&out).into_owned())
}

fn status(text: &str) -> u16 {
    text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn a_client_over_the_message_rate_is_closed_and_its_neighbour_is_not() {
    let srv = ServerProc::start(&[
        "--workers",
        "1",
        "--max-message-rate",
        "20/s",
        "--max-message-burst",
        "10",
    ]);
    let mut polite = Client::connect(srv.ws, "/echo");
    let mut flood = Client::connect(srv.ws, "/echo");
    // The polite one sends 10 a second for 2 s, well under 20/s, while the other floods.
    let polite_thread = thread::spawn(move || {
        for i in 0..20 {
            let m = format!("polite {i}");
            polite.send_text(&m);
            let f = polite.recv();
            assert_eq!(f.payload, m.as_bytes(), "message {i}");
            thread::sleep(Duration::from_millis(100));
        }
        polite
    });
    let mut w = flood.s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        for i in 0..500 {
            let f = Client::frame_bytes(0x81, format!("flood {i}").as_bytes(), true);
            if w.write_all(&f).is_err() {
                break;
            }
        }
    });
    let mut echoed = 0;
    let close = loop {
        let f = flood.recv();
        if f.opcode == CLOSE {
            break f;
        }
        echoed += 1;
    };
    assert_eq!(
        u16::from_be_bytes([close.payload[0], close.payload[1]]),
        1008
    );
    assert_eq!(&close.payload[2..], b"message rate");
    assert!(
        (10..=20).contains(&echoed), // the burst, plus 2 per tick while the flood arrives
        "the burst (10) and at most a few refills got through, not {echoed}"
    );
    writer.join().unwrap();
    let mut polite = polite_thread.join().unwrap();
    polite.send_text("still fine");
    assert_eq!(polite.recv().payload, b"still fine");
    srv.wait_metric(
        "megasock_disconnects_total{reason=\"message_rate\"}",
        5,
        |v| v == 1,
    );
}

#[test]
fn connections_per_address_are_counted_across_workers() {
    let limit = 10;
    let srv = ServerProc::start(&[
        "--workers",
        "2",
        "--max-connections-per-ip",
        &limit.to_string(),
    ]);
    let mut held: Vec<Client> = (0..limit)
        .map(|_| Client::from_stream(connect_from([127, 0, 0, 2], srv.ws), "/ws/lobby"))
        .collect();
    // SO_REUSEPORT spreads one address over both workers; the count is one.
    let per_worker: Vec<i64> = srv
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("megasock_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    eprintln!("127.0.0.2's {limit} connections per worker: {per_worker:?}");
    let (_, text) = answer(
        connect_from([127, 0, 0, 2], srv.ws),
        upgrade_request("/ws/lobby").as_bytes(),
    );
    assert_eq!(status(&text), 503, "{text}");
    assert!(text.contains("Retry-After: 1\r\n"), "{text}");
    assert!(text.contains("--max-connections-per-ip"), "{text}");
    // Another address is served.
    let other = Client::from_stream(connect_from([127, 0, 0, 3], srv.ws), "/ws/lobby");
    assert_eq!(srv.metric("megasock_ip_table_entries"), 2);
    // One closes: its place is free again.
    held.pop().unwrap().reply_close(1000);
    let deadline = Instant::now() + Duration::from_secs(10);
    let replacement = loop {
        match Client::try_from_stream(connect_from([127, 0, 0, 2], srv.ws), "/ws/lobby") {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "never freed: {e}"),
        }
        thread::sleep(Duration::from_millis(20));
    };
    drop((held, other, replacement));
    srv.wait_metric("megasock_ip_table_entries", 10, |v| v == 0);
    assert!(srv.metric("megasock_limit_rejections_total{limit=\"connections_per_ip\"}") >= 1);
}

#[test]
fn behind_a_proxy_the_proxy_protocol_address_is_counted() {
    let srv = ServerProc::start(&[
        "--workers",
        "2",
        "--proxy-protocol",
        "--max-connections-per-ip",
        "2",
    ]);
    let via_proxy = |client: &str| {
        let line = format!("PROXY TCP4 {client} 10.0.0.1 40000 8080\r\n");
        let req = format!("{line}{}", upgrade_request("/ws/lobby"));
        answer(TcpStream::connect(srv.ws).unwrap(), req.as_bytes())
    };
    let a1 = via_proxy("203.0.113.7");
    let a2 = via_proxy("203.0.113.7");
    assert_eq!((status(&a1.1), status(&a2.1)), (101, 101));
    let (_, third) = via_proxy("203.0.113.7");
    assert_eq!(status(&third), 503, "{third}");
    let b = via_proxy("203.0.113.8");
    assert_eq!(status(&b.1), 101, "another client behind the same proxy");
    drop((a1, a2, b));
    srv.wait_metric("megasock_ip_table_entries", 10, |v| v == 0);
}

#[test]
fn too_many_new_connections_from_one_address_get_429() {
    let srv = ServerProc::start(&["--workers", "2", "--max-handshakes-per-ip", "5/s"]);
    // As fast as we can: 5 per one-second window pass, in however many windows this spans.
    let started = Instant::now();
    let mut passed = 0;
    let mut refused = None;
    for _ in 0..30 {
        let (_, text) = answer(
            connect_from([127, 0, 0, 2], srv.ws),
            upgrade_request("/echo").as_bytes(),
        );
        match status(&text) {
            101 => passed += 1,
            429 => refused = Some(text),
            s => panic!("unexpected {s}: {text}"),
        }
    }
    let text = refused.expect("some were refused");
    assert!(text.contains("Retry-After: 1\r\n"), "{text}");
    assert!(text.contains("--max-handshakes-per-ip"), "{text}");
    let windows = started.elapsed().as_secs() as usize + 2;
    assert!(
        passed >= 5 && passed <= 5 * windows,
        "{passed} passed in at most {windows} windows"
    );
    // Another address is unaffected; this one is served again in the next second.
    let (_, text) = answer(
        connect_from([127, 0, 0, 3], srv.ws),
        upgrade_request("/echo").as_bytes(),
    );
    assert_eq!(status(&text), 101, "{text}");
    thread::sleep(Duration::from_millis(1100));
    let (_, text) = answer(
        connect_from([127, 0, 0, 2], srv.ws),
        upgrade_request("/echo").as_bytes(),
    );
    assert_eq!(status(&text), 101, "{text}");
    let refused = 30 - passed as i64;
    assert_eq!(
        srv.metric("megasock_limit_rejections_total{limit=\"handshakes_per_ip\"}"),
        refused
    );
    assert_eq!(
        srv.metric("megasock_http_responses_total{status=\"429\"}"),
        refused
    );
}
