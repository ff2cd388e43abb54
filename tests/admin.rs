//! The admin listener (`--admin`, alias `--metrics-listen`) against the real binary: every
//! route's answers and errors, the bearer token, the publish API (one message and NDJSON
//! batches) as the room members see it, keep-alive and pipelining, slow clients that must not
//! delay `/healthz`, `/readyz` during a drain, `/healthz` after a worker died, and the
//! consistency of the Prometheus text.

mod common;
use common::*;
use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 client that shows what is on the wire and keeps the connection open.

#[derive(Debug)]
struct Resp {
    status: u16,
    /// The status line, without CRLF.
    status_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        assert_eq!(
            self.header("Content-Type"),
            Some("application/json"),
            "{self:?}"
        );
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

struct Http {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    fn connect(addr: SocketAddr) -> Http {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Http { s, buf: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.s.write_all(bytes) {
            panic!("write to the admin listener failed: {e} (did the server close or exit?)");
        }
    }

    /// The next complete response (Content-Length framed), or what went wrong.
    fn try_response(&mut self) -> Result<Resp, String> {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                let mut lines = head.split("\r\n");
                let status_line = lines.next().unwrap_or("").to_string();
                assert!(
                    status_line.starts_with("HTTP/1.1 "),
                    "bad status line {status_line:?}"
                );
                let status: u16 = status_line[9..12]
                    .parse()
                    .unwrap_or_else(|_| panic!("bad status line {status_line:?}"));
                let headers: Vec<(String, String)> = lines
                    .map(|l| {
                        let (n, v) = l
                            .split_once(':')
                            .unwrap_or_else(|| panic!("bad header line {l:?}"));
                        (n.to_string(), v.trim().to_string())
                    })
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse().expect("numeric Content-Length"))
                    .unwrap_or_else(|| panic!("response without Content-Length: {head}"));
                if self.buf.len() >= i + 4 + len {
                    let body = self.buf[i + 4..i + 4 + len].to_vec();
                    self.buf.drain(..i + 4 + len);
                    return Ok(Resp {
                        status,
                        status_line,
                        headers,
                        body,
                    });
                }
            }
            let mut tmp = [0u8; 16 * 1024];
            match self.s.read(&mut tmp) {
                Ok(0) => {
                    return Err(format!(
                        "EOF after {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(format!(
                        "{e} after {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
            }
        }
    }

    fn response(&mut self) -> Resp {
        self.try_response()
            .unwrap_or_else(|e| panic!("no response: {e}"))
    }

    /// The server closed the connection (FIN or reset) with nothing more sent.
    fn expect_closed(&mut self) {
        assert!(self.buf.is_empty(), "unexpected bytes {:?}", self.buf);
        let mut tmp = [0u8; 1024];
        match self.s.read(&mut tmp) {
            Ok(0) => {}
            Ok(n) => panic!(
                "expected the server to close, got {:?}",
                String::from_utf8_lossy(&tmp[..n])
            ),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server kept the connection open")
            }
            Err(_) => {} // reset: closed too
        }
    }
}

/// A request's bytes: `headers` as given, `Content-Length` for POST (or any body).
fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: admin.test\r\n");
    for (n, v) in headers {
        r.push_str(&format!("{n}: {v}\r\n"));
    }
    if method == "POST" || !body.is_empty() {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    let mut bytes = r.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One request on a fresh connection; its response.
fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut c = Http::connect(addr);
    c.send(&request(method, path, headers, body));
    c.response()
}

fn get(addr: SocketAddr, path: &str) -> Resp {
    call(addr, "GET", path, &[], b"")
}

/// A fresh-connection GET, timed from connect to the last byte of the response.
fn timed_get(addr: SocketAddr, path: &str) -> (Resp, Duration) {
    let start = Instant::now();
    let r = get(addr, path);
    (r, start.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Metrics and rooms.

/// The value of the sample named exactly `series` (name plus labels), as a float.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse::<f64>().expect("numeric sample"))
    })
}

/// Waits until the room directory holds `n` memberships (the members joined).
fn wait_memberships(srv: &ServerProc, n: i64) {
    srv.wait_metric("megasock_room_memberships ", 5, |v| v == n);
}

/// Every client receives exactly `expected` (opcode, payload) frames, in order.
fn expect_frames(clients: &mut [Client], expected: &[(u8, &[u8])]) {
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_timeout(Duration::from_secs(5));
        for (k, (op, payload)) in expected.iter().enumerate() {
            let f = c
                .try_recv()
                .unwrap_or_else(|| panic!("member {i}: message {k} never arrived"));
            assert_eq!(
                (f.fin, f.opcode, f.payload.as_slice()),
                (true, *op, *payload),
                "member {i}: message {k}"
            );
        }
    }
}

/// No client receives anything within `wait`.
fn expect_silence(clients: &mut [Client], wait: Duration) {
    std::thread::sleep(wait);
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(
            c.nothing_pending(),
            "member {i} received {:?}",
            c.try_recv()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Every route: success and errors.

#[test]
fn routes_answer_health_ready_metrics_and_stats() {
    let srv = ServerProc::start(&["--workers", "2"]);

    let r = get(srv.metrics, "/healthz");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"), "{r:?}");
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    let r = get(srv.metrics, "/readyz");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "ready\n");
    // A query string is not part of the path.
    assert_eq!(get(srv.metrics, "/healthz?verbose=1").status, 200);

    let r = get(srv.metrics, "/metrics");
    assert_eq!(r.status, 200);
    let ct = r.header("Content-Type").unwrap_or("");
    assert!(
        ct.starts_with("text/plain; version=0.0.4"),
        "Content-Type {ct:?}"
    );
    assert!(r.text().contains("# TYPE megasock_connections gauge\n"));

    // Rooms: "big" with 3 members, "small" with 1, plus one /echo client (no room).
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(srv.ws, "/ws/big")).collect();
    clients.push(Client::connect(srv.ws, "/ws/small"));
    clients.push(Client::connect(srv.ws, "/echo"));
    wait_memberships(&srv, 4);

    let r = get(srv.metrics, "/stats");
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    assert_eq!(j["connections"], 5, "{j}");
    assert_eq!(j["rooms"], 2, "{j}");
    assert_eq!(j["memberships"], 4, "{j}");
    assert_eq!(j["ready"], true, "{j}");
    let workers = j["workers"].as_array().expect("workers array");
    assert_eq!(workers.len(), 2, "one entry per worker: {j}");
    let per_worker: u64 = workers
        .iter()
        .map(|w| w["connections"].as_u64().expect("connections per worker"))
        .sum();
    assert_eq!(per_worker, 5, "{j}");
    assert_eq!(
        j["top_rooms"],
        serde_json::json!([{"room": "big", "members": 3}, {"room": "small", "members": 1}]),
        "top rooms, most members first"
    );
}

#[test]
fn route_errors_404_405_411_431_400() {
    let srv = ServerProc::start(&["--workers", "1"]);
    let a = srv.metrics;

    let r = get(a, "/nope");
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.status_line, "HTTP/1.1 404 Not Found");

    for (method, path, allow) in [
        ("POST", "/healthz", "GET"),
        ("DELETE", "/stats", "GET"),
        ("PUT", "/metrics", "GET"),
        ("POST", "/readyz", "GET"),
        ("GET", "/publish/news", "POST"),
        ("GET", "/publish", "POST"),
    ] {
        let r = call(a, method, path, &[], b"");
        assert_eq!(r.status, 405, "{method} {path}: {r:?}");
        assert_eq!(r.header("Allow"), Some(allow), "{method} {path}: {r:?}");
    }

    // Error answers from the parser close the connection.
    let refused = |bytes: &[u8], status: u16| {
        let mut c = Http::connect(a);
        c.send(bytes);
        let r = c.response();
        assert_eq!(r.status, status, "{r:?}");
        assert_eq!(r.header("Connection"), Some("close"), "{r:?}");
        c.expect_closed();
        r
    };
    let chunked = b"POST /publish/news HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
    refused(chunked, 411);

    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    refused(big.as_bytes(), 431);
    // An over-long head that never ends is refused once it passes 8 KiB.
    let mut c = Http::connect(a);
    c.send(format!("GET /healthz HTTP/1.1\r\nX-Filler: {}", "a".repeat(8300)).as_bytes());
    assert_eq!(c.response().status, 431);

    let r = refused(b"GET /healthz HTTP/1.1\r\nHost t\r\n\r\n", 400);
    assert!(r.text().contains("malformed"), "{r:?}");
    refused(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400);
    refused(
        b"POST /publish/news HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
        400,
    );
    refused(
        b"POST /publish/news HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
    );

    let text = srv.metrics_text();
    for (code, n) in [(404, 1), (405, 6), (411, 1), (431, 2), (400, 4)] {
        assert_eq!(
            sample(
                &text,
                &format!("megasock_admin_requests_total{{code=\"{code}\"}}")
            ),
            Some(n as f64),
            "admin responses with {code}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. --admin-token

#[test]
fn admin_token_guards_every_route_but_health_and_ready() {
    let srv = ServerProc::start(&["--workers", "1", "--admin-token", "s3cret"]);
    let a = srv.metrics;
    let routes: [(&str, &str, &[u8], u16); 4] = [
        ("GET", "/metrics", b"", 200),
        ("GET", "/stats", b"", 200),
        ("POST", "/publish/news", b"hi", 202),
        (
            "POST",
            "/publish",
            b"{\"room\":\"news\",\"text\":\"hi\"}\n",
            202,
        ),
    ];
    for (method, path, body, ok) in routes {
        for auth in [
            None,
            Some("Bearer nope"),
            Some("Bearer s3cre"),
            Some("Bearer s3cretX"),
            Some("Basic s3cret"),
            Some("s3cret"),
            Some("Bearer "),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|v| ("Authorization", v)).into_iter().collect();
            let r = call(a, method, path, &headers, body);
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {r:?}");
            assert_eq!(
                r.header("WWW-Authenticate"),
                Some("Bearer"),
                "{method} {path} with {auth:?}: {r:?}"
            );
        }
        let r = call(a, method, path, &[("Authorization", "Bearer s3cret")], body);
        assert_eq!(r.status, ok, "{method} {path} with the token: {r:?}");
    }
    // Health checks need no token.
    for path in ["/healthz", "/readyz"] {
        let r = get(a, path);
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
    // The accepted publishes were counted; the refused ones were not.
    let r = call(
        a,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer s3cret")],
        b"",
    );
    let text = r.text();
    assert_eq!(sample(&text, "megasock_api_published_total"), Some(2.0));
    assert_eq!(
        sample(&text, "megasock_admin_requests_total{code=\"401\"}"),
        Some(28.0)
    );
}

// ---------------------------------------------------------------------------------------------
// 3. POST /publish/{room}

#[test]
fn publish_to_a_room_reaches_its_members_on_every_worker() {
    let srv = ServerProc::start(&["--workers", "2", "--max-message-size", "1KiB"]);
    let a = srv.metrics;
    let mut members = members_on_every_worker(&srv, "news", 2);
    let n = members.len() as i64;
    wait_memberships(&srv, n);

    let r = call(
        a,
        "POST",
        "/publish/news",
        &[("Content-Type", "text/plain")],
        "héllo news".as_bytes(),
    );
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.status_line, "HTTP/1.1 202 Accepted");
    let j = r.json();
    assert_eq!(j["room"], "news", "{j}");
    assert_eq!(j["local_members"], n, "{j}");

    let bin = [0u8, 1, 2, 0xff, 0x80];
    let r = call(
        a,
        "POST",
        "/publish/news",
        &[("Content-Type", "application/octet-stream")],
        &bin,
    );
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.json()["local_members"], n);

    // Exactly --max-message-size is accepted.
    let full = vec![b'z'; 1024];
    let r = call(
        a,
        "POST",
        "/publish/news",
        &[("Content-Type", "text/plain; charset=utf-8")],
        &full,
    );
    assert_eq!(r.status, 202, "{r:?}");
    expect_frames(
        &mut members,
        &[
            (TEXT, "héllo news".as_bytes()),
            (BINARY, &bin),
            (TEXT, &full),
        ],
    );

    // Over --max-message-size: 413 on the head alone, before the body is sent.
    let mut c = Http::connect(a);
    c.send(b"POST /publish/news HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: 2048\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.header("Connection"), Some("close"));
    c.expect_closed();

    // Bad room names.
    for path in [
        "/publish/..",
        "/publish/.",
        "/publish/a%20b",
        "/publish/",
        "/publish/a/b",
    ] {
        let r = call(a, "POST", path, &[("Content-Type", "text/plain")], b"x");
        assert_eq!(r.status, 400, "{path}: {r:?}");
    }
    // text/* must be UTF-8.
    let r = call(
        a,
        "POST",
        "/publish/news",
        &[("Content-Type", "text/plain")],
        b"ok\xff\xfe",
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text().contains("UTF-8"), "{r:?}");

    // A room nobody is in: accepted, nobody to deliver to.
    let r = call(
        a,
        "POST",
        "/publish/empty",
        &[("Content-Type", "text/plain")],
        b"x",
    );
    assert_eq!(r.status, 202, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["room"].as_str(), j["local_members"].as_u64()),
        (Some("empty"), Some(0))
    );

    // None of the refused publishes reached anyone.
    expect_silence(&mut members, Duration::from_millis(300));
    assert_eq!(srv.metric("megasock_api_published_total"), 4);
    assert_eq!(srv.metric("megasock_messages_dropped_total"), 0);
}

// ---------------------------------------------------------------------------------------------
// 4. POST /publish (NDJSON batch)

#[test]
fn batch_publish_delivers_in_order_and_a_bad_line_sends_nothing() {
    let srv = ServerProc::start(&["--workers", "2"]);
    let a = srv.metrics;
    let mut room_a = members_on_every_worker(&srv, "a", 2);
    let mut room_b: Vec<Client> = (0..2).map(|_| Client::connect(srv.ws, "/ws/b")).collect();
    wait_memberships(&srv, (room_a.len() + room_b.len()) as i64);

    let body = concat!(
        "{\"room\":\"a\",\"text\":\"x1\"}\n",
        "{\"room\":\"b\",\"base64\":\"AAEC\"}\n",
        "\n",
        "{\"room\":\"a\",\"text\":\"x2\"}\r\n",
        "{\"room\":\"b\",\"text\":\"y\"}\n",
        "{\"room\":\"a\",\"base64\":\"AAEC\"}"
    );
    let r = call(
        a,
        "POST",
        "/publish",
        &[("Content-Type", "application/x-ndjson")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 202, "{r:?}");
    let j = r.json();
    assert_eq!(j["messages"], 5, "{j}");
    assert_eq!(j["rooms"], 2, "{j}");
    assert_eq!(
        j["local_deliveries"].as_u64(),
        Some(3 * room_a.len() as u64 + 2 * room_b.len() as u64),
        "{j}"
    );
    expect_frames(
        &mut room_a,
        &[(TEXT, b"x1"), (TEXT, b"x2"), (BINARY, &[0, 1, 2])],
    );
    expect_frames(&mut room_b, &[(BINARY, &[0, 1, 2]), (TEXT, b"y")]);

    // Line 3 is not JSON: 400 naming it, and nothing of the batch is sent.
    let bad = concat!(
        "{\"room\":\"a\",\"text\":\"never\"}\n",
        "{\"room\":\"b\",\"text\":\"never\"}\n",
        "this is not json\n",
        "{\"room\":\"a\",\"text\":\"never\"}\n"
    );
    let r = call(a, "POST", "/publish", &[], bad.as_bytes());
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text().contains("line 3"), "{r:?}");
    // Other bad lines, each after a good one.
    for (body, why) in [
        ("{\"room\":\"a\",\"text\":\"n\"}\n{\"room\":\"..\",\"text\":\"n\"}\n", "bad room"),
        ("{\"room\":\"a\",\"text\":\"n\"}\n{\"room\":\"a\",\"base64\":\"!!\"}\n", "base64"),
        ("{\"room\":\"a\",\"text\":\"n\"}\n{\"room\":\"a\",\"text\":\"n\",\"base64\":\"AA==\"}\n", "exactly one"),
        ("{\"room\":\"a\",\"text\":\"n\"}\n{\"room\":\"a\"}\n", "exactly one"),
    ] {
        let r = call(a, "POST", "/publish", &[], body.as_bytes());
        assert_eq!(r.status, 400, "{body}: {r:?}");
        let text = r.text();
        assert!(text.contains("line 2") && text.contains(why), "{body}: {text}");
    }
    // A line over --max-message-size (64 KiB by default): 413 naming it, nothing sent.
    let big = format!(
        "{{\"room\":\"b\",\"text\":\"n\"}}\n{{\"room\":\"a\",\"text\":\"{}\"}}\n",
        "z".repeat(64 * 1024 + 1)
    );
    let r = call(a, "POST", "/publish", &[], big.as_bytes());
    assert_eq!(r.status, 413, "{r:?}");
    assert!(r.text().contains("line 2"), "{r:?}");
    let mut everyone: Vec<Client> = room_a.into_iter().chain(room_b).collect();
    expect_silence(&mut everyone, Duration::from_millis(300));
    assert_eq!(srv.metric("megasock_api_published_total"), 5);
}

// ---------------------------------------------------------------------------------------------
// 5. Keep-alive and pipelining

#[test]
fn keep_alive_pipelined_requests_are_answered_in_order() {
    let srv = ServerProc::start(&["--workers", "1"]);
    let mut c = Http::connect(srv.metrics);
    c.send(&request("GET", "/healthz", &[], b""));
    let r = c.response();
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    assert_eq!(r.header("Connection"), Some("keep-alive"));

    // Two more in one write: a publish with a body, then a GET.
    let mut two = request(
        "POST",
        "/publish/nobody",
        &[("Content-Type", "text/plain")],
        b"pipelined",
    );
    two.extend(request("GET", "/readyz", &[], b""));
    c.send(&two);
    let r = c.response();
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.json()["room"], "nobody");
    let r = c.response();
    assert_eq!((r.status, r.text().as_str()), (200, "ready\n"), "{r:?}");

    // Connection: close: answered, then closed.
    c.send(&request("GET", "/healthz", &[("Connection", "close")], b""));
    let r = c.response();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Connection"), Some("close"));
    c.expect_closed();

    // HTTP/1.0 without keep-alive closes too.
    let mut c = Http::connect(srv.metrics);
    c.send(b"GET /healthz HTTP/1.0\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Connection"), Some("close"));
    c.expect_closed();
}

/// A request that arrives in pieces (the head in two writes, the body after the head, as many
/// HTTP clients send a POST) is answered once complete, and the server stays up.
#[test]
fn request_arriving_in_pieces_is_answered() {
    let srv = ServerProc::start(&["--workers", "1"]);
    let mut c = Http::connect(srv.metrics);
    c.send(b"POST /publish/nobody HTTP/1.1\r\nHost: t\r\n");
    std::thread::sleep(Duration::from_millis(100));
    c.send(b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\n");
    std::thread::sleep(Duration::from_millis(100));
    c.send(b"hello");
    let r = c.try_response();
    let alive = TcpStream::connect(srv.metrics).is_ok();
    let r = r.unwrap_or_else(|e| {
        panic!("no answer to a request sent in pieces ({e}); server still listening: {alive}")
    });
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(get(srv.metrics, "/healthz").status, 200);
}

// ---------------------------------------------------------------------------------------------
// 6. Slow clients do not delay /healthz

#[test]
fn silent_and_trickling_clients_do_not_delay_healthz() {
    let srv = ServerProc::start(&["--workers", "1"]);
    let a = srv.metrics;

    // Trickles a request one byte every 300 ms: 36 bytes would take 10.8 s, past the 5 s
    // request deadline.
    let trickle = TcpStream::connect(a).unwrap();
    trickle.set_nodelay(true).unwrap();
    let mut trickle_reader = trickle.try_clone().unwrap();
    trickle_reader
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut w = trickle;
        std::thread::spawn(move || {
            for b in b"GET /healthz HTTP/1.1\r\nHost: slow\r\n\r\n" {
                if stop.load(Ordering::Relaxed) || w.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    let trickle_start = Instant::now();

    let mut silent = TcpStream::connect(a).unwrap();
    let mut partial = TcpStream::connect(a).unwrap();
    partial.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    let idle: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(a).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));

    let mut times = Vec::new();
    for _ in 0..20 {
        let (r, t) = timed_get(a, "/healthz");
        assert_eq!((r.status, r.text().as_str()), (200, "ok\n"), "{r:?}");
        times.push(t);
    }
    let worst = times.iter().max().unwrap();
    assert!(
        *worst < Duration::from_millis(100),
        "a /healthz took {worst:?} with slow clients connected; all: {times:?}"
    );

    // The trickling client gets 408 once its request deadline (5 s) passed, then EOF.
    let mut out = Vec::new();
    let _ = trickle_reader.read_to_end(&mut out);
    let took = trickle_start.elapsed();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 408 "),
        "trickling client got {text:?}"
    );
    assert!(text.contains("Connection: close\r\n"), "{text:?}");
    assert!(
        took > Duration::from_millis(4500) && took < Duration::from_secs(8),
        "408 after {took:?} (deadline 5 s)"
    );
    // The half-sent head gets the same; the silent client is closed without a word.
    partial
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut out = Vec::new();
    let _ = partial.read_to_end(&mut out);
    assert!(
        out.starts_with(b"HTTP/1.1 408 "),
        "partial head got {:?}",
        String::from_utf8_lossy(&out)
    );
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 64];
    match silent.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("silent client got {:?}", String::from_utf8_lossy(&b[..n])),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("the silent client was never closed")
        }
        Err(_) => {}
    }
    drop(idle);
    assert_eq!(get(a, "/healthz").status, 200);
    let text = srv.metrics_text();
    assert_eq!(
        sample(&text, "megasock_admin_requests_total{code=\"408\"}"),
        Some(2.0)
    );
    eprintln!(
        "healthz with slow clients: worst {worst:?}, all {:?}",
        times
    );
}

// ---------------------------------------------------------------------------------------------
// 7. /readyz during a drain

#[test]
fn readyz_is_503_while_draining_and_healthz_still_answers() {
    let mut srv = ServerProc::start(&[
        "--workers",
        "1",
        "--drain-timeout",
        "5s",
        "--close-timeout",
        "10s",
    ]);
    let a = srv.metrics;
    let mut mute = Client::connect(srv.ws, "/ws/x");
    assert_eq!(get(a, "/readyz").status, 200);
    assert_eq!(sample(&srv.metrics_text(), "megasock_ready"), Some(1.0));

    srv.signal(libc::SIGTERM);
    assert_eq!(mute.expect_close(), Some(1001), "the drain began");
    // The client does not answer: the drain lasts until --drain-timeout.
    let (r, t) = timed_get(a, "/readyz");
    assert_eq!((r.status, r.text().as_str()), (503, "draining\n"), "{r:?}");
    assert!(t < Duration::from_millis(100), "/readyz took {t:?}");
    let (r, t) = timed_get(a, "/healthz");
    assert!(matches!(r.status, 200 | 503), "{r:?}");
    assert!(t < Duration::from_millis(100), "/healthz took {t:?}");
    assert_eq!(sample(&srv.metrics_text(), "megasock_ready"), Some(0.0));
    assert_eq!(get(a, "/stats").json()["ready"], false);

    let status = srv.wait_exit(15);
    assert!(status.success(), "exit status {status}");
}

// ---------------------------------------------------------------------------------------------
// 8. /healthz after a worker died

#[test]
fn healthz_is_503_naming_the_worker_after_one_panicked() {
    let mut srv = ServerProc::start_with(
        &[
            "--workers",
            "2",
            "--drain-timeout",
            "5s",
            "--close-timeout",
            "10s",
        ],
        |cmd| {
            cmd.env("MEGASOCK_TEST_FAULTS", "1");
        },
    );
    let a = srv.metrics;
    // Members on both workers that never answer the close: whichever worker dies, the other
    // one drains for --drain-timeout and the process stays up meanwhile.
    let _mute = members_on_every_worker(&srv, "keep", 2);
    assert_eq!(get(a, "/healthz").status, 200);

    let mut fault = TcpStream::connect(srv.ws).unwrap();
    fault
        .write_all(upgrade_request("/ws/__worker_panic__").as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let r = loop {
        let (r, t) = timed_get(a, "/healthz");
        assert!(t < Duration::from_millis(100), "/healthz took {t:?}");
        if r.status == 503 {
            break r;
        }
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            Instant::now() < deadline,
            "/healthz still 200 2 s after a worker panicked"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(r.text().contains("worker"), "{r:?}");
    assert_eq!(get(a, "/readyz").status, 503);

    let status = srv.wait_exit(15);
    assert!(
        !status.success(),
        "a dead worker must make the exit non-zero: {status}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Metrics sanity

#[test]
fn metrics_are_consistent_after_room_traffic_and_pass_promtool() {
    let srv = ServerProc::start(&["--workers", "2"]);
    let mut r1 = members_on_every_worker(&srv, "r1", 2);
    let mut r2: Vec<Client> = (0..2).map(|_| Client::connect(srv.ws, "/ws/r2")).collect();
    let members = (r1.len() + r2.len()) as f64;
    wait_memberships(&srv, members as i64);
    for i in 0..5 {
        let m = format!("m{i}");
        r1[0].send_text(&m);
        r2[1].send_binary(m.as_bytes());
        expect_frames(&mut r1, &[(TEXT, m.as_bytes())]);
        expect_frames(&mut r2, &[(BINARY, m.as_bytes())]);
    }
    let r = call(srv.metrics, "POST", "/publish/r2", &[], b"api");
    assert_eq!(r.status, 202);
    expect_frames(&mut r2, &[(BINARY, b"api")]);

    srv.wait_metric("megasock_delivery_latency_seconds_count", 5, |v| v > 0);
    let text = srv.metrics_text();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .expect("HTTP response");

    let count = sample(&body, "megasock_delivery_latency_seconds_count").unwrap();
    assert!(count > 0.0);
    let buckets: Vec<(f64, f64)> = body
        .lines()
        .filter_map(|l| l.strip_prefix("megasock_delivery_latency_seconds_bucket{le=\""))
        .map(|l| {
            let (le, rest) = l.split_once("\"} ").unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, rest.parse().unwrap())
        })
        .collect();
    assert!(buckets.len() > 2, "{body}");
    for w in buckets.windows(2) {
        assert!(w[0].0 < w[1].0, "le not increasing: {buckets:?}");
        assert!(w[0].1 <= w[1].1, "buckets not cumulative: {buckets:?}");
    }
    let (le, inf) = *buckets.last().unwrap();
    assert!(le.is_infinite(), "last bucket is +Inf: {buckets:?}");
    assert_eq!(inf, count, "+Inf bucket equals _count");
    assert!(sample(&body, "megasock_delivery_latency_seconds_sum").unwrap() > 0.0);

    assert_eq!(sample(&body, "megasock_rooms"), Some(2.0));
    assert_eq!(sample(&body, "megasock_room_memberships"), Some(members));
    let conns: f64 = (0..2)
        .map(|w| sample(&body, &format!("megasock_connections{{worker=\"{w}\"}}")).unwrap())
        .sum();
    assert_eq!(conns, members);
    assert!(sample(&body, "process_open_fds").unwrap() > 0.0);
    assert!(sample(&body, "process_resident_memory_bytes").unwrap() > 0.0);
    assert!(sample(&body, "process_max_fds").unwrap() > 0.0);
    assert_eq!(sample(&body, "megasock_api_published_total"), Some(1.0));
    assert_eq!(sample(&body, "megasock_ready"), Some(1.0));

    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Err(e) => eprintln!("promtool not run ({e}); skipping `promtool check metrics`"),
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(body.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A worker that stops turning its loop (here blocked 4 s by an injected stall) makes
/// `/healthz` answer 503 naming it, promptly; once it turns again, 200.
#[test]
fn healthz_is_503_while_a_worker_is_stuck_then_200() {
    let srv = ServerProc::start_with(&["--workers", "2"], |cmd| {
        cmd.env("MEGASOCK_TEST_FAULTS", "1");
    });
    assert_eq!(get(srv.metrics, "/healthz").status, 200);
    let ws = srv.ws;
    let staller = std::thread::spawn(move || {
        let s = std::net::TcpStream::connect(ws).unwrap();
        let _ = Client::try_from_stream(s, "/ws/__worker_stall__");
    });
    let start = Instant::now();
    let mut saw_stuck = None;
    while start.elapsed() < Duration::from_secs(4) {
        let asked = Instant::now();
        let r = get(srv.metrics, "/healthz");
        assert!(
            asked.elapsed() < Duration::from_millis(100),
            "healthz took {:?}",
            asked.elapsed()
        );
        if r.status == 503 {
            saw_stuck = Some(String::from_utf8_lossy(&r.body).into_owned());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = saw_stuck.expect("healthz never reported the stuck worker");
    assert!(body.contains("has not turned its loop"), "{body}");
    staller.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(srv.metrics, "/healthz").status != 200 {
        assert!(Instant::now() < deadline, "healthz did not recover");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Idle keep-alive connections filling every admin slot do not lock the probes out: the
/// longest idle one makes room.
#[test]
fn idle_connections_at_the_limit_do_not_lock_out_healthz() {
    let srv = ServerProc::start(&[]);
    let mut idle = Vec::new();
    for _ in 0..256 {
        let mut s = TcpStream::connect(srv.metrics).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        idle.push(s);
    }
    for _ in 0..5 {
        let r = get(srv.metrics, "/healthz");
        assert_eq!(r.status, 200);
    }
}
