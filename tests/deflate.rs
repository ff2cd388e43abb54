//! permessage-deflate (RFC 7692) against the real binary: what the 101 answers, the bytes each
//! kind of member gets (compressed payloads decoded here with flate2), a zip bomb, corrupt
//! data, client context takeover, and real clients (Python `websockets`, Node `ws`).
//!
//! The real clients need `.venv` with websockets (`scripts/venv.sh`) and `npm ci` in
//! `tests/clients`; `.ci/run` sets up both.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

#[allow(dead_code)]
#[path = "../src/deflate/reference.rs"]
mod reference;

/// What Chromium and Firefox offer.
const BROWSER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits";
/// The answer to an offer without window parameters (the server never keeps context, and by
/// default does not let the client keep it either).
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A client's compressed payload: raw deflate, sync-flushed, `00 00 ff ff` removed.
fn deflate(msg: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(6), false);
    let mut out = Vec::with_capacity(msg.len() + 64);
    c.compress_vec(msg, &mut out, FlushCompress::Sync).unwrap();
    assert_eq!(c.total_in() as usize, msg.len());
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Decodes a server's compressed payload with a fresh flate2 stream.
fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(payload.len() * 8 + 1024);
    loop {
        let before = d.total_in() as usize;
        d.decompress_vec(
            &input[before.min(input.len())..],
            &mut out,
            FlushDecompress::Sync,
        )
        .expect("the server's payload inflates");
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// The value of the response's `Sec-WebSocket-Extensions` line, if it has one.
fn extension_answer(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| value.trim().to_string())
    })
}

fn connect_deflate(srv: &ServerProc, path: &str) -> Client {
    let (c, head) = Client::connect_with(srv.ws, path, BROWSER).expect("101");
    assert_eq!(extension_answer(&head).as_deref(), Some(ANSWER), "{head}");
    c
}

fn chat(n: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < n {
        s.push_str(&format!(
            r#"{{"type":"message","room":"lobby","id":{i},"user":"user{}","text":"message number {i} says hello"}},"#,
            i % 7
        ));
        i += 1;
    }
    s.truncate(n);
    s.into_bytes()
}

/// Receives one data message as a permessage-deflate client: (was it compressed, opcode,
/// the message).
fn recv_message(c: &mut Client) -> (bool, u8, Vec<u8>) {
    let (rsv1, f) = c.recv_rsv1();
    assert!(f.fin, "the server does not fragment");
    assert!(matches!(f.opcode, TEXT | BINARY), "{f:?}");
    let payload = if rsv1 { inflate(&f.payload) } else { f.payload };
    (rsv1, f.opcode, payload)
}

fn post(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn negotiation_answers_offers_declines_bad_ones_and_refuses_malformed_headers() {
    let server = ServerProc::start(&["--workers", "1"]);
    let answer = |headers: &str| {
        Client::connect_with(server.ws, "/echo", headers).map(|(_, head)| extension_answer(&head))
    };
    let windowed = format!("{ANSWER}; server_max_window_bits=10");
    let cases: [(&str, Option<&str>); 9] = [
        ("Sec-WebSocket-Extensions: permessage-deflate", Some(ANSWER)),
        (BROWSER, Some(ANSWER)),
        // Several offers, by preference: the first acceptable one is answered.
        (
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10; \
             client_max_window_bits, permessage-deflate",
            Some(&windowed),
        ),
        // A bad offer is declined (RFC 7692 §7: not an error); the next one is taken.
        (
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=16, \
             permessage-deflate; client_no_context_takeover",
            Some(ANSWER),
        ),
        // Offers over several header lines, other extensions skipped.
        (
            "Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n\
             Sec-WebSocket-Extensions: permessage-deflate",
            Some(ANSWER),
        ),
        // Declined, nothing else offered: an uncompressed connection.
        (
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits",
            None,
        ),
        (
            "Sec-WebSocket-Extensions: permessage-deflate; mystery=1",
            None,
        ),
        (
            "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; \
             client_no_context_takeover",
            None,
        ),
        ("Sec-WebSocket-Extensions: foo, bar; baz=1", None),
    ];
    let mut agreed = 0;
    for (offer, want) in cases {
        let got = answer(offer).unwrap_or_else(|head| panic!("{offer}: {head}"));
        assert_eq!(got.as_deref(), want, "{offer}");
        agreed += i64::from(want.is_some());
    }
    // A header that breaks RFC 6455 §9.1 syntax is a 400 that says why.
    for bad in [
        "permessage-deflate;",
        "permessage-deflate x",
        "permessage-deflate; server_max_window_bits=\"1 0\"",
    ] {
        let head = answer(&format!("Sec-WebSocket-Extensions: {bad}")).unwrap_err();
        assert!(head.starts_with("HTTP/1.1 400 "), "{bad}: {head}");
    }
    let body = http_exchange(
        server.ws,
        upgrade_request("/echo")
            .replace(
                "\r\n\r\n",
                "\r\nSec-WebSocket-Extensions: permessage-deflate;\r\n\r\n",
            )
            .as_bytes(),
    );
    assert!(
        body.contains("malformed Sec-WebSocket-Extensions"),
        "{body}"
    );
    server.wait_metric("megasock_deflate_negotiated_total", 10, |v| v == agreed);

    // --no-deflate: offers are not even read (no answer, and no 400 for a bad one).
    let off = ServerProc::start(&["--workers", "1", "--no-deflate"]);
    for offer in [BROWSER, "Sec-WebSocket-Extensions: permessage-deflate;"] {
        let (mut c, head) = Client::connect_with(off.ws, "/echo", offer).expect("101");
        assert_eq!(extension_answer(&head), None, "{head}");
        // And RSV1 is a protocol error there.
        c.send_raw(&Client::frame_bytes(0xC1, &deflate(b"hello"), true))
            .unwrap();
        assert_eq!(c.expect_close(), Some(1002));
    }
    assert_eq!(off.metric("megasock_deflate_negotiated_total"), 0);
}

#[test]
fn compressed_and_plain_members_of_one_room_get_the_same_messages() {
    // Two workers, several members of each kind, so a room usually spans both workers with
    // both kinds on each (the cross-core path compresses what arrives from the other one).
    let server = ServerProc::start(&["--workers", "2"]);
    let path = "/ws/lobby";
    let mut compressed: Vec<Client> = (0..6).map(|_| connect_deflate(&server, path)).collect();
    let mut plain: Vec<Client> = (0..6).map(|_| Client::connect(server.ws, path)).collect();
    server.wait_metric("megasock_deflate_negotiated_total", 10, |v| v == 6);

    let big = chat(2000);
    let binary: Vec<u8> = (0..1000u32).map(|i| (i % 10) as u8).collect();
    let from_deflate = chat(3000);
    let api = chat(500);
    // (opcode, message, compressed for deflate members?) in the order everyone gets them.
    let expected: Vec<(u8, Vec<u8>, bool)> = vec![
        (TEXT, big.clone(), true),
        (TEXT, b"hi".to_vec(), false), // under --deflate-min-size (128): as it is
        (BINARY, binary.clone(), true),
        (TEXT, from_deflate.clone(), true),
        (TEXT, api.clone(), true),
    ];
    // A plain member publishes three, waits for them to arrive everywhere...
    plain[0].send_frame(TEXT, true, &big);
    plain[0].send_text("hi");
    plain[0].send_binary(&binary);
    let check = |c: &mut Client, deflate: bool, range: std::ops::Range<usize>| {
        for (opcode, msg, squeezed) in &expected[range] {
            if deflate {
                let (rsv1, op, got) = recv_message(c);
                assert_eq!((op, rsv1), (*opcode, *squeezed));
                assert_eq!(&got, msg);
            } else {
                let f = c.recv(); // panics on any reserved bit
                assert_eq!((f.opcode, &f.payload), (*opcode, msg));
            }
        }
    };
    for c in &mut compressed {
        check(c, true, 0..3);
    }
    for c in &mut plain {
        check(c, false, 0..3);
    }
    // ...then a deflate member publishes a compressed message (RSV1), then the admin API.
    compressed[0]
        .send_raw(&Client::frame_bytes(0xC1, &deflate(&from_deflate), true))
        .unwrap();
    for c in &mut compressed {
        check(c, true, 3..4);
    }
    for c in &mut plain {
        check(c, false, 3..4);
    }
    let resp = post(server.metrics, "/publish/lobby", &api);
    assert!(resp.starts_with("HTTP/1.1 202 "), "{resp}");
    for c in &mut compressed {
        check(c, true, 4..5);
    }
    for c in &mut plain {
        check(c, false, 4..5);
    }

    // Compressed once per batch and worker, never per member: at most 4 messages x 2
    // workers (the admin API's goes to both workers, the others to the publisher's worker
    // and through the bus), whatever the six members.
    let squeezed = server.metric("megasock_deflate_messages_compressed_total");
    assert!((4..=8).contains(&squeezed), "compressed {squeezed} times");
    let before = server.metric("megasock_deflate_compress_in_bytes_total");
    let after = server.metric("megasock_deflate_compress_out_bytes_total");
    assert!(after * 3 < before, "ratio {after}/{before}");
    assert!(server.metric("megasock_deflate_messages_uncompressed_total") >= 1);
    assert_eq!(server.metric("megasock_deflate_messages_inflated_total"), 1);
    for c in compressed.iter_mut().chain(plain.iter_mut()) {
        assert!(c.nothing_pending());
    }
}

#[test]
fn echo_replies_are_compressed_for_a_deflate_client() {
    let server = ServerProc::start(&["--workers", "1"]);
    let mut c = connect_deflate(&server, "/echo");
    let msg = chat(1500);
    c.send_raw(&Client::frame_bytes(0xC1, &deflate(&msg), true))
        .unwrap();
    c.send_frame(TEXT, true, &msg); // a plain one is echoed compressed too
    c.send_text("short");
    for (want, squeezed) in [(&msg[..], true), (&msg[..], true), (b"short", false)] {
        let (rsv1, op, got) = recv_message(&mut c);
        assert_eq!((op, rsv1, &got[..]), (TEXT, squeezed, want));
    }
    // Pings and closes are never compressed.
    c.send_frame(PING, true, b"p");
    let (rsv1, f) = c.recv_rsv1();
    assert_eq!((rsv1, f.opcode, &f.payload[..]), (false, PONG, &b"p"[..]));
    c.reply_close(1000);
    let (rsv1, f) = c.recv_rsv1();
    assert_eq!((rsv1, f.opcode), (false, CLOSE));
}

/// Peak resident memory of the server so far (VmHWM), in bytes.
fn peak_rss(srv: &ServerProc) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", srv.child.id())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

#[test]
fn zip_bomb_gets_1009_and_the_others_go_on() {
    let server = ServerProc::start(&["--workers", "1", "--max-message-size", "64KiB"]);
    let mut bystander = connect_deflate(&server, "/ws/bomb");
    let mut bomber = connect_deflate(&server, "/ws/bomb");
    let hwm = peak_rss(&server);
    // 16 KiB of deflate that inflates to 16 MiB (1032:1, the most deflate allows).
    let bomb = reference::zip_bomb((16 << 20) / 258);
    assert!(bomb.len() < 17 << 10);
    bomber
        .send_raw(&Client::frame_bytes(0xC2, &bomb, true))
        .unwrap();
    assert_eq!(bomber.expect_close(), Some(1009));
    bomber.expect_eof();
    server.wait_metric(
        "megasock_deflate_inflate_failures_total{reason=\"too_big\"}",
        10,
        |v| v == 1,
    );
    assert_eq!(
        server.metric("megasock_disconnects_total{reason=\"message_too_big\"}"),
        1
    );
    // Inflating stopped at the bound: nothing near 16 MiB was ever resident.
    let grew = peak_rss(&server).saturating_sub(hwm);
    assert!(grew < 4 << 20, "peak RSS grew by {grew} bytes");
    // The room's other member never saw any of it, and goes on.
    let msg = chat(700);
    bystander
        .send_raw(&Client::frame_bytes(0xC1, &deflate(&msg), true))
        .unwrap();
    assert_eq!(recv_message(&mut bystander), (true, TEXT, msg));
    assert!(bystander.nothing_pending());
}

#[test]
fn corrupt_data_gets_1007() {
    let server = ServerProc::start(&["--workers", "1"]);
    let mut c = connect_deflate(&server, "/echo");
    c.send_raw(&Client::frame_bytes(0xC1, &[0xff, 0xff, 0xff], true))
        .unwrap();
    assert_eq!(c.expect_close(), Some(1007));
    server.wait_metric(
        "megasock_deflate_inflate_failures_total{reason=\"corrupt\"}",
        10,
        |v| v == 1,
    );
    assert_eq!(
        server.metric("megasock_disconnects_total{reason=\"invalid_compressed_data\"}"),
        1
    );
    // RSV1 on a continuation is a protocol error, compressed or not.
    let mut c = connect_deflate(&server, "/echo");
    let payload = deflate(&chat(400));
    c.send_raw(&Client::frame_bytes(0x41, &payload[..20], true))
        .unwrap();
    c.send_raw(&Client::frame_bytes(0xC0, &payload[20..], true))
        .unwrap();
    assert_eq!(c.expect_close(), Some(1002));
}

/// RFC 7692 §7.2.3.2: "Hello" twice, the second referring back into the first.
const HELLO: [u8; 7] = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
const HELLO_AGAIN: [u8; 5] = [0xf2, 0x00, 0x11, 0x00, 0x00];

#[test]
fn client_context_takeover_only_when_allowed() {
    // Default: the client is told client_no_context_takeover; referring back is corrupt.
    let server = ServerProc::start(&["--workers", "1"]);
    let mut c = connect_deflate(&server, "/echo");
    c.send_raw(&Client::frame_bytes(0xC1, &HELLO, true))
        .unwrap();
    assert_eq!(recv_message(&mut c), (false, TEXT, b"Hello".to_vec()));
    assert_eq!(server.metric("megasock_deflate_inflaters_held"), 0);
    c.send_raw(&Client::frame_bytes(0xC1, &HELLO_AGAIN, true))
        .unwrap();
    assert_eq!(c.expect_close(), Some(1007));

    // Allowed: the answer leaves client_no_context_takeover out, the window is kept (and
    // counted) while the connection lives.
    let server = ServerProc::start(&["--workers", "1", "--deflate-client-context-takeover"]);
    let (mut c, head) = Client::connect_with(
        server.ws,
        "/echo",
        "Sec-WebSocket-Extensions: permessage-deflate",
    )
    .unwrap();
    assert_eq!(
        extension_answer(&head).as_deref(),
        Some("permessage-deflate; server_no_context_takeover")
    );
    c.send_raw(&Client::frame_bytes(0xC1, &HELLO, true))
        .unwrap();
    c.send_raw(&Client::frame_bytes(0xC1, &HELLO_AGAIN, true))
        .unwrap();
    for _ in 0..2 {
        assert_eq!(recv_message(&mut c), (false, TEXT, b"Hello".to_vec()));
    }
    server.wait_metric("megasock_deflate_inflaters_held", 10, |v| v == 1);
    c.reply_close(1000);
    assert_eq!(c.expect_close(), Some(1000));
    c.expect_eof();
    server.wait_metric("megasock_deflate_inflaters_held", 10, |v| v == 0);
}

fn need(path: &Path, how: &str) {
    assert!(
        path.exists(),
        "{} is missing: {how} (.ci/run does it)",
        path.display()
    );
}

#[test]
fn python_websockets_client_with_compression() {
    let python = root().join(".venv/bin/python");
    need(&python, "run scripts/venv.sh");
    let ok = Command::new(&python)
        .args(["-c", "import websockets"])
        .status()
        .unwrap();
    assert!(
        ok.success(),
        "websockets is not in .venv: run scripts/venv.sh"
    );
    let server = ServerProc::start(&["--workers", "2"]);
    let out = Command::new(&python)
        .arg(root().join("tests/clients/websockets_deflate.py"))
        .arg(format!("ws://{}", server.ws))
        .arg("python")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"ok\": true"), "{stdout}");
    // Both ways were compressed: the client's messages inflated, the server's compressed.
    assert_eq!(server.metric("megasock_deflate_negotiated_total"), 3);
    assert!(server.metric("megasock_deflate_messages_inflated_total") >= 2);
    assert!(server.metric("megasock_deflate_messages_compressed_total") >= 2);
}

#[test]
fn node_ws_client_with_per_message_deflate() {
    let dir = root().join("tests/clients");
    need(
        &dir.join("node_modules/ws"),
        "run `npm ci` in tests/clients",
    );
    let server = ServerProc::start(&["--workers", "2"]);
    let out = Command::new("node")
        .arg(dir.join("ws_deflate.mjs"))
        .arg(format!("ws://{}", server.ws))
        .arg("node")
        .output()
        .expect("node (Node 20) on PATH");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"ok\":true"), "{stdout}");
    assert_eq!(server.metric("megasock_deflate_negotiated_total"), 3);
    // threshold 0: ws compressed all three of its messages.
    assert_eq!(server.metric("megasock_deflate_messages_inflated_total"), 3);
    assert!(server.metric("megasock_deflate_messages_compressed_total") >= 2);
}
