//! RFC 6455 behaviour of /echo and the upgrade, seen on the wire.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn echo_text_and_binary() {
    let srv = ServerProc::start(&["--workers", "1"]);
    let mut c = Client::connect(srv.ws, "/echo");
    c.send_text("hello, megasock");
    assert_eq!(
        c.recv(),
        Frame {
            fin: true,
            opcode: TEXT,
            payload: b"hello, megasock".to_vec()
        }
    );
    let bin: Vec<u8> = (0..=255).collect();
    c.send_binary(&bin);
    assert_eq!(
        c.recv(),
        Frame {
            fin: true,
            opcode: BINARY,
            payload: bin
        }
    );
    // Empty messages and the 125/126/65535/65536 length boundaries.
    for len in [0usize, 125, 126, 65535] {
        let p = vec![b'x'; len];
        c.send_text(std::str::from_utf8(&p).unwrap());
        let f = c.recv();
        assert_eq!((f.opcode, f.payload.len()), (TEXT, len));
    }
    // Many frames in one write come back in order.
    let mut burst = Vec::new();
    for i in 0..100 {
        burst.extend(Client::frame_bytes(0x81, format!("m{i}").as_bytes(), true));
    }
    c.send_raw(&burst).unwrap();
    for i in 0..100 {
        assert_eq!(c.recv().payload, format!("m{i}").into_bytes());
    }
    c.reply_close(1000);
    assert_eq!(c.expect_close(), Some(1000));
    c.expect_eof();
    assert_eq!(
        srv.metric("megasock_disconnects_total{reason=\"client_close\"}"),
        1
    );
}

#[test]
fn large_and_fragmented_messages() {
    let srv = ServerProc::start(&["--workers", "1", "--max-message-size", "2MiB"]);
    let mut c = Client::connect(srv.ws, "/echo");
    let big: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    c.send_binary(&big);
    let f = c.recv();
    assert_eq!(
        (f.opcode, f.fin),
        (BINARY, true),
        "{:?}",
        &f.payload[..f.payload.len().min(40)]
    );
    assert!(f.payload == big, "1 MiB echo differs");

    // Fragmented text with a ping in the middle, and a UTF-8 character split across fragments.
    let euro = "€".as_bytes();
    c.send_frame(TEXT, false, &[b'a', euro[0]]);
    c.send_frame(PING, true, b"mid");
    c.send_frame(CONT, false, &euro[1..]);
    c.send_frame(CONT, true, b"z");
    let pong = c.recv();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (PONG, &b"mid"[..]));
    let msg = c.recv();
    assert_eq!((msg.opcode, msg.payload), (TEXT, "a€z".as_bytes().to_vec()));

    // A big message in many fragments, written in small pieces.
    let mut bytes = Vec::new();
    let chunks: Vec<&[u8]> = big.chunks(100_000).collect();
    for (i, ch) in chunks.iter().enumerate() {
        let op = if i == 0 { BINARY } else { CONT };
        let fin = i == chunks.len() - 1;
        bytes.extend(Client::frame_bytes(
            op | if fin { 0x80 } else { 0 },
            ch,
            true,
        ));
    }
    for piece in bytes.chunks(7_000) {
        c.send_raw(piece).unwrap();
    }
    let f = c.recv();
    assert!(f.payload == big && f.opcode == BINARY);
}

#[test]
fn close_codes_for_bad_frames() {
    let srv = ServerProc::start(&["--workers", "1", "--max-message-size", "1000"]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "unmasked frame",
            Client::frame_bytes(0x81, b"hi", false),
            1002,
        ),
        ("reserved bit", Client::frame_bytes(0xC1, b"hi", true), 1002),
        (
            "reserved opcode",
            Client::frame_bytes(0x83, b"hi", true),
            1002,
        ),
        (
            "reserved control opcode",
            Client::frame_bytes(0x8B, b"", true),
            1002,
        ),
        (
            "fragmented ping",
            Client::frame_bytes(0x09, b"", true),
            1002,
        ),
        (
            "ping over 125 bytes",
            Client::frame_bytes(0x89, &[0; 126], true),
            1002,
        ),
        (
            "continuation first",
            Client::frame_bytes(0x80, b"x", true),
            1002,
        ),
        (
            "invalid UTF-8",
            Client::frame_bytes(0x81, &[0xce, 0xba, 0xff], true),
            1007,
        ),
        ("too big", Client::frame_bytes(0x82, &[0; 1001], true), 1009),
        (
            "close code 1005",
            Client::frame_bytes(0x88, &1005u16.to_be_bytes(), true),
            1002,
        ),
        (
            "close code 999",
            Client::frame_bytes(0x88, &999u16.to_be_bytes(), true),
            1002,
        ),
        (
            "one-byte close",
            Client::frame_bytes(0x88, &[3], true),
            1002,
        ),
        (
            "close reason not UTF-8",
            Client::frame_bytes(0x88, &[3, 232, 0xff], true),
            1007,
        ),
    ];
    for (name, bytes, code) in cases {
        let mut c = Client::connect(srv.ws, "/echo");
        c.send_raw(&bytes).unwrap();
        assert_eq!(c.expect_close(), Some(code), "{name}");
        c.reply_close(code);
        c.expect_eof();
    }

    // Across fragments: invalid UTF-8 fails at the fragment that holds it (fail fast),
    // and a new message inside a fragmented one is a protocol error.
    let mut c = Client::connect(srv.ws, "/echo");
    c.send_frame(TEXT, false, b"ok");
    c.send_frame(CONT, false, &[0xf8, 0x88]);
    assert_eq!(c.expect_close(), Some(1007));
    let mut c = Client::connect(srv.ws, "/echo");
    c.send_frame(TEXT, false, b"ok");
    c.send_frame(TEXT, true, b"again");
    assert_eq!(c.expect_close(), Some(1002));
    // Inside one frame that has only partly arrived: the close comes before the rest is sent.
    let mut c = Client::connect(srv.ws, "/echo");
    let mut payload = vec![b'a'; 500];
    payload[10] = 0xff;
    let frame = Client::frame_bytes(0x81, &payload, true);
    c.send_raw(&frame[..50]).unwrap();
    assert_eq!(c.expect_close(), Some(1007));
    // Fragments adding up past the limit: 1009.
    let mut c = Client::connect(srv.ws, "/echo");
    c.send_frame(BINARY, false, &[0; 600]);
    c.send_frame(CONT, true, &[0; 600]);
    assert_eq!(c.expect_close(), Some(1009));
    // A truncated multi-byte character at the end of the message: 1007.
    let mut c = Client::connect(srv.ws, "/echo");
    c.send_frame(TEXT, false, b"ok");
    c.send_frame(CONT, true, &"€".as_bytes()[..2]);
    assert_eq!(c.expect_close(), Some(1007));

    assert!(srv.metric("megasock_disconnects_total{reason=\"protocol_error\"}") >= 10);
    assert!(srv.metric("megasock_disconnects_total{reason=\"invalid_utf8\"}") >= 3);
    assert!(srv.metric("megasock_disconnects_total{reason=\"message_too_big\"}") >= 2);
    // Other connections are unharmed.
    let mut ok = Client::connect(srv.ws, "/echo");
    ok.send_text("still here");
    assert_eq!(ok.recv().payload, b"still here");
}

#[test]
fn close_handshake_echoes_code_and_empty_close() {
    let srv = ServerProc::start(&["--workers", "1"]);
    let mut c = Client::connect(srv.ws, "/echo");
    let mut payload = 4321u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye now");
    c.send_frame(CLOSE, true, &payload);
    assert_eq!(c.expect_close(), Some(4321));
    c.expect_eof();
    let mut c = Client::connect(srv.ws, "/echo");
    c.send_frame(CLOSE, true, b"");
    let f = c.recv();
    assert_eq!((f.opcode, f.payload.len()), (CLOSE, 0));
    c.expect_eof();
}

fn status_line(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

#[test]
fn http_errors_before_upgrade() {
    let srv = ServerProc::start(&["--workers", "1"]);
    let good = upgrade_request("/echo");
    let cases: Vec<(&str, String, u16)> = vec![
        ("version 8", good.replace("Version: 13", "Version: 8"), 426),
        (
            "no version",
            good.replace("Sec-WebSocket-Version: 13\r\n", ""),
            426,
        ),
        (
            "malformed",
            "GET /echo HTTP/1.1\r\nHost x\r\n\r\n".into(),
            400,
        ),
        ("garbage", "\u{1}\u{2}\u{3} nonsense\r\n\r\n".into(), 400),
        ("missing host", good.replace("Host: localhost\r\n", ""), 400),
        ("HTTP/1.0", good.replace("HTTP/1.1", "HTTP/1.0"), 400),
        (
            "not an upgrade",
            "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            400,
        ),
        (
            "no Connection: Upgrade",
            good.replace("Connection: Upgrade", "Connection: keep-alive"),
            400,
        ),
        ("bad key", good.replace(KEY, "short"), 400),
        ("unknown path", good.replace("/echo", "/nowhere"), 404),
        ("unknown path", good.replace("/echo", "/nope"), 404),
        (
            "room info, bad name",
            good.replace("/echo", "/rooms/.."),
            400,
        ),
        (
            "room info, not GET",
            good.replace("GET /echo", "PUT /rooms/x"),
            405,
        ),
        ("room ..", good.replace("/echo", "/ws/.."), 400),
        ("room .", good.replace("/echo", "/ws/."), 400),
        ("empty room", good.replace("/echo", "/ws/"), 400),
        ("room with slash", good.replace("/echo", "/ws/a/b"), 400),
        (
            "percent-encoded room",
            good.replace("/echo", "/ws/a%2Fb"),
            400,
        ),
        (
            "room over 128 bytes",
            good.replace("/echo", &format!("/ws/{}", "r".repeat(129))),
            400,
        ),
        ("POST", good.replace("GET", "POST"), 405),
        (
            "head over 8 KiB",
            good.replace(
                "\r\n\r\n",
                &format!("\r\nX-Big: {}\r\n\r\n", "b".repeat(9000)),
            ),
            431,
        ),
    ];
    for (name, req, status) in cases {
        let resp = http_exchange(srv.ws, req.as_bytes());
        assert!(
            status_line(&resp).starts_with(&format!("HTTP/1.1 {status} ")),
            "{name}: got {resp:?}"
        );
        assert!(resp.contains("\r\nConnection: close\r\n"), "{name}: {resp}");
        if status == 426 {
            assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{resp}");
            assert!(resp.contains("\r\nUpgrade: websocket\r\n"), "{resp}");
        }
    }
    // A head that never ends is cut off at 8 KiB even if sent slowly.
    let resp = http_exchange(
        srv.ws,
        format!("GET /echo HTTP/1.1\r\n{}", "X: y\r\n".repeat(2000)).as_bytes(),
    );
    assert!(status_line(&resp).starts_with("HTTP/1.1 431 "), "{resp}");
    // The longest valid room name works; the request may arrive in pieces.
    let room = "a".repeat(128);
    let mut c = Client::connect(srv.ws, &format!("/ws/{room}"));
    c.send_text("in the long room");
    assert_eq!(c.recv().payload, b"in the long room");
    assert!(srv.metric("megasock_http_responses_total{status=\"400\"}") >= 12);
}

#[test]
fn request_split_across_reads_and_frame_pipelined_after_it() {
    let srv = ServerProc::start(&["--workers", "1"]);
    let mut s = std::net::TcpStream::connect(srv.ws).unwrap();
    s.set_nodelay(true).unwrap();
    let req = upgrade_request("/echo");
    let mut bytes = req.into_bytes();
    bytes.extend(Client::frame_bytes(0x81, b"early", true));
    use std::io::Write;
    for piece in bytes.chunks(17) {
        s.write_all(piece).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let mut out = vec![0u8; 4096];
    let mut got = Vec::new();
    use std::io::Read;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    while !got.ends_with(b"early") {
        let n = s.read(&mut out).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&out[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101 "));
}

/// The WebSocket listener's plain pages: the demo at `/` (unless `--no-demo`) and a room's
/// member count at `/rooms/{room}`, each answered once with `Connection: close`.
#[test]
fn demo_page_and_room_info() {
    let srv = ServerProc::start(&["--workers", "2"]);
    let page = http_exchange(srv.ws, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(page.starts_with("HTTP/1.1 200 "), "{page}");
    assert!(page.contains("Content-Type: text/html") && page.contains("<title>"));
    let info = |room: &str| {
        let req = format!("GET /rooms/{room} HTTP/1.1\r\nHost: x\r\n\r\n");
        let resp = http_exchange(srv.ws, req.as_bytes());
        assert!(resp.starts_with("HTTP/1.1 200 ") && resp.contains("\r\nConnection: close\r\n"));
        resp.split("\r\n\r\n").nth(1).unwrap().trim().to_string()
    };
    assert_eq!(info("hall"), r#"{"room":"hall","members":0}"#);
    let members: Vec<Client> = (0..3)
        .map(|_| Client::connect(srv.ws, "/ws/hall"))
        .collect();
    assert_eq!(info("hall"), r#"{"room":"hall","members":3}"#);
    drop(members);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while info("hall") != r#"{"room":"hall","members":0}"# {
        assert!(std::time::Instant::now() < deadline, "members never left");
        std::thread::sleep(Duration::from_millis(20));
    }
    let off = ServerProc::start(&["--no-demo"]);
    let page = http_exchange(off.ws, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(page.starts_with("HTTP/1.1 404 "), "{page}");
}
