//! Who may connect, against the real binary: JWTs from each of the three places a client can
//! put one (header, query, subprotocol entry), every reason to refuse one (401), room grants
//! (403), the close at the token's expiry (1008), the Origin allowlist, and the subprotocol
//! the 101 names. Tokens are signed here with the keys in tests/keys/ (tests/common/jwt.rs).

mod common;
#[path = "common/jwt.rs"]
#[allow(dead_code)]
mod jwt;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use jwt::{now, Signer};

const SECRET: &str = "megasock-test-secret-0123456789abcdef";

/// Where a client puts its token.
#[derive(Debug, Clone, Copy)]
enum Via {
    Header,
    Query,
    Subprotocol,
}

const ALL_VIAS: [Via; 3] = [Via::Header, Via::Query, Via::Subprotocol];

/// An upgrade request for `path` carrying `token` as `via` says, plus `extra` header lines.
fn request(path: &str, token: Option<&str>, via: Via, extra: &str) -> String {
    let (path, header) = match (token, via) {
        (None, _) => (path.to_string(), String::new()),
        (Some(t), Via::Header) => (path.to_string(), format!("Authorization: Bearer {t}\r\n")),
        (Some(t), Via::Query) => (format!("{path}?access_token={t}"), String::new()),
        (Some(t), Via::Subprotocol) => (
            path.to_string(),
            format!("Sec-WebSocket-Protocol: bearer.{t}\r\n"),
        ),
    };
    upgrade_request(&path).replace("\r\n\r\n", &format!("\r\n{header}{extra}\r\n"))
}

/// Sends `req` and returns the response head (the connection is then dropped).
fn head(addr: SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    // Error answers carry a one-line body after the head: keep it for the messages.
    if !text.starts_with("HTTP/1.1 101") {
        let _ = s.read_to_end(&mut out);
        return String::from_utf8_lossy(&out).into_owned();
    }
    text
}

fn status(text: &str) -> u16 {
    text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Claims expiring `exp_in` seconds from now, plus `extra` (`,"k":v` pairs).
fn claims(exp_in: i64, extra: &str) -> String {
    format!(
        "{{\"sub\":\"tester\",\"exp\":{}{extra}}}",
        now() as i64 + exp_in
    )
}

fn expect(
    srv: &ServerProc,
    path: &str,
    token: Option<&str>,
    via: Via,
    want: u16,
    what: &str,
) -> String {
    let text = head(srv.ws, &request(path, token, via, ""));
    assert_eq!(status(&text), want, "{what} via {via:?}: {text}");
    text
}

#[test]
fn bad_or_missing_tokens_get_401_whichever_way_they_come() {
    let srv = ServerProc::start(&[
        "--workers",
        "1",
        "--auth-jwt-secret",
        SECRET,
        "--auth-audience",
        "megasock",
        "--auth-issuer",
        "https://idp.test",
    ]);
    let good = Signer::hs256(SECRET.as_bytes());
    let other = Signer::hs256(b"another-secret-another-secret-0123456789");
    let std_claims = ",\"aud\":\"megasock\",\"iss\":\"https://idp.test\"";
    let cases: Vec<(&str, String)> = vec![
        (
            "signed with another secret",
            other.token(&claims(60, std_claims)),
        ),
        ("expired", good.token(&claims(-10, std_claims))),
        (
            "nbf in the future",
            good.token(&claims(
                600,
                &format!("{std_claims},\"nbf\":{}", now() + 300),
            )),
        ),
        (
            "wrong audience",
            good.token(&claims(
                60,
                ",\"aud\":\"other\",\"iss\":\"https://idp.test\"",
            )),
        ),
        (
            "wrong issuer",
            good.token(&claims(
                60,
                ",\"aud\":\"megasock\",\"iss\":\"https://evil.test\"",
            )),
        ),
        (
            "no exp",
            good.token("{\"aud\":\"megasock\",\"iss\":\"https://idp.test\"}"),
        ),
        ("not a JWT", "hello.world".to_string()),
    ];
    let valid = good.token(&claims(60, std_claims));
    for via in ALL_VIAS {
        expect(&srv, "/ws/lobby", Some(&valid), via, 101, "a valid token");
        let text = expect(&srv, "/ws/lobby", None, via, 401, "no token");
        assert!(text.contains("WWW-Authenticate: Bearer"), "{text}");
        assert!(
            text.contains("no token: send `Authorization: Bearer TOKEN`"),
            "{text}"
        );
        for (what, token) in &cases {
            let text = expect(&srv, "/ws/lobby", Some(token), via, 401, what);
            assert!(text.contains("WWW-Authenticate: Bearer"), "{what}: {text}");
        }
    }
    // The body says what is wrong.
    let text = expect(
        &srv,
        "/echo",
        Some(&cases[1].1),
        Via::Header,
        401,
        "expired",
    );
    assert!(text.contains("token expired"), "{text}");
    let text = expect(&srv, "/echo", Some(&cases[3].1), Via::Header, 401, "aud");
    assert!(text.contains("--auth-audience"), "{text}");
    // The same token twice is ambiguous (RFC 6750 2): 400.
    let twice = request(
        &format!("/echo?access_token={valid}"),
        Some(&valid),
        Via::Header,
        "",
    );
    assert_eq!(status(&head(srv.ws, &twice)), 400);
    // Counted by reason: 3 sources x (bad signature + not a JWT + no exp) are "invalid".
    let m = |r: &str| srv.metric(&format!("megasock_auth_rejections_total{{reason=\"{r}\"}}"));
    srv.wait_metric(
        "megasock_auth_rejections_total{reason=\"invalid\"}",
        5,
        |v| v >= 9,
    );
    assert_eq!(m("missing"), 3);
    assert_eq!(m("invalid"), 9);
    assert_eq!(m("expired"), 4);
    assert_eq!(m("not_yet_valid"), 3);
    assert_eq!(m("wrong_audience"), 4);
    assert_eq!(m("wrong_issuer"), 3);
    assert_eq!(m("bad_request"), 1);
    assert_eq!(
        srv.metric("megasock_http_responses_total{status=\"401\"}"),
        26
    );
}

#[test]
fn public_keys_rs256_es256_eddsa_each_accept_only_their_own_algorithm() {
    let signers = [
        ("rs256.pub.pem", Signer::rs256()),
        ("es256.pub.pem", Signer::es256()),
        ("ed25519.pub.pem", Signer::eddsa()),
    ];
    for (file, signer) in &signers {
        let key = jwt::key_path(file);
        let srv = ServerProc::start(&["--workers", "1", "--auth-jwt-public-key", &key]);
        let token = signer.token(&claims(60, ""));
        for via in ALL_VIAS {
            expect(&srv, "/echo", Some(&token), via, 101, signer.alg());
        }
        let mut c = Client::from_stream(
            {
                let s = TcpStream::connect(srv.ws).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s
            },
            &format!("/echo?access_token={token}"),
        );
        c.send_text("signed in");
        assert_eq!(c.recv().payload, b"signed in");
        for (_, other) in &signers {
            if other.alg() != signer.alg() {
                let t = other.token(&claims(60, ""));
                expect(&srv, "/echo", Some(&t), Via::Header, 401, other.alg());
            }
        }
        // HS256 keyed with the public key file's bytes: the classic confusion, refused.
        let pem = std::fs::read(&key).unwrap();
        let forged = Signer::hs256(&pem).token(&claims(60, ""));
        let text = expect(
            &srv,
            "/echo",
            Some(&forged),
            Via::Header,
            401,
            "HS256 forgery",
        );
        assert!(text.contains(&format!("not {}", signer.alg())), "{text}");
    }
}

#[test]
fn the_rooms_claim_limits_which_rooms_may_be_joined() {
    let srv = ServerProc::start(&["--workers", "1", "--auth-jwt-secret", SECRET]);
    let s = Signer::hs256(SECRET.as_bytes());
    let granted = s.token(&claims(60, ",\"rooms\":[\"lobby\",\"team:red:*\"]"));
    for (path, want) in [
        ("/ws/lobby", 101),
        ("/ws/team:red:1", 101),
        ("/ws/team:red:", 101),
        ("/echo", 101),
        ("/ws/lobby2", 403),
        ("/ws/team:blue:1", 403),
        ("/ws/team:red", 403),
        ("/rooms/lobby", 200),
        ("/rooms/other", 403),
    ] {
        let text = expect(&srv, path, Some(&granted), Via::Header, want, path);
        if want == 403 {
            assert!(
                text.contains("rooms claim does not grant this room"),
                "{text}"
            );
        }
    }
    let none = s.token(&claims(60, ",\"rooms\":[]"));
    expect(&srv, "/ws/lobby", Some(&none), Via::Query, 403, "rooms: []");
    expect(
        &srv,
        "/echo",
        Some(&none),
        Via::Query,
        101,
        "/echo needs no grant",
    );
    let all = s.token(&claims(60, ""));
    expect(
        &srv,
        "/ws/anything",
        Some(&all),
        Via::Query,
        101,
        "no rooms claim: every room",
    );
    let star = s.token(&claims(60, ",\"rooms\":[\"*\"]"));
    expect(
        &srv,
        "/ws/anything",
        Some(&star),
        Via::Subprotocol,
        101,
        "rooms: [*]",
    );
    // The room page needs the same token as joining it.
    expect(
        &srv,
        "/rooms/lobby",
        None,
        Via::Header,
        401,
        "room page without a token",
    );
    assert_eq!(
        srv.metric("megasock_auth_rejections_total{reason=\"forbidden_room\"}"),
        5
    );
}

#[test]
fn an_open_connection_is_closed_with_1008_when_its_token_expires() {
    let srv = ServerProc::start(&["--workers", "1", "--auth-jwt-secret", SECRET]);
    let s = Signer::hs256(SECRET.as_bytes());
    let exp = now() + 3;
    let short = s.token(&format!("{{\"exp\":{exp}}}"));
    let long = s.token(&claims(600, ""));
    let mut expiring = Client::from_stream(
        TcpStream::connect(srv.ws).unwrap(),
        &format!("/ws/r?access_token={short}"),
    );
    let mut staying = Client::from_stream(
        TcpStream::connect(srv.ws).unwrap(),
        &format!("/ws/r?access_token={long}"),
    );
    expiring.send_text("before expiry");
    assert_eq!(expiring.recv().payload, b"before expiry");
    assert_eq!(staying.recv().payload, b"before expiry");
    expiring.set_timeout(Duration::from_secs(10));
    let f = loop {
        let f = expiring.recv();
        if f.opcode == CLOSE {
            break f;
        }
    };
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert_eq!(u16::from_be_bytes([f.payload[0], f.payload[1]]), 1008);
    assert_eq!(&f.payload[2..], b"token expired");
    // At its exp: not before it; a tick (100 ms) after at most, plus slack for a busy machine.
    assert!(
        at >= exp as f64 - 0.01,
        "closed {:.3} s before exp",
        exp as f64 - at
    );
    assert!(
        at < exp as f64 + 1.0,
        "closed {:.3} s after exp",
        at - exp as f64
    );
    eprintln!("closed {:.3} s after exp", at - exp as f64);
    expiring.reply_close(1008);
    expiring.expect_eof();
    // The other member is unaffected.
    staying.send_text("still here");
    assert_eq!(staying.recv().payload, b"still here");
    srv.wait_metric(
        "megasock_disconnects_total{reason=\"token_expired\"}",
        5,
        |v| v == 1,
    );
}

#[test]
fn origins_outside_the_allowlist_get_403() {
    let srv = ServerProc::start(&[
        "--workers",
        "1",
        "--allowed-origin",
        "https://app.example.com",
        "--allowed-origin",
        "https://*.example.org",
    ]);
    for (origin, want) in [
        (Some("https://app.example.com"), 101),
        (Some("https://APP.example.com:443"), 101),
        (Some("https://a.example.org"), 101),
        (Some("https://a.b.example.org"), 101),
        (Some("https://example.org"), 403),
        (Some("http://app.example.com"), 403),
        (Some("https://evil.example"), 403),
        (Some("https://app.example.com.evil.example"), 403),
        (Some("null"), 403),
        (None, 101), // not a browser
    ] {
        let extra = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
        let text = head(srv.ws, &request("/ws/lobby", None, Via::Header, &extra));
        assert_eq!(status(&text), want, "{origin:?}: {text}");
    }
    assert_eq!(
        srv.metric("megasock_auth_rejections_total{reason=\"origin\"}"),
        5
    );
    assert_eq!(
        srv.metric("megasock_http_responses_total{status=\"403\"}"),
        5
    );
}

#[test]
fn the_101_names_the_clients_first_supported_subprotocol_and_never_a_token() {
    let srv = ServerProc::start(&[
        "--workers",
        "1",
        "--subprotocol",
        "v2.chat",
        "--subprotocol",
        "v1.chat",
        "--auth-jwt-secret",
        SECRET,
    ]);
    let t = Signer::hs256(SECRET.as_bytes()).token(&claims(60, ""));
    let auth = format!("Authorization: Bearer {t}\r\n");
    let chosen = |extra: &str| {
        let text = head(srv.ws, &request("/echo", None, Via::Header, extra));
        assert_eq!(status(&text), 101, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Protocol: "))
            .map(str::to_string)
    };
    assert_eq!(
        chosen(&format!(
            "{auth}Sec-WebSocket-Protocol: x, v1.chat, v2.chat\r\n"
        )),
        Some("v1.chat".into()),
        "the client's order decides"
    );
    assert_eq!(
        chosen(&format!(
            "{auth}Sec-WebSocket-Protocol: x\r\nSec-WebSocket-Protocol: v2.chat\r\n"
        )),
        Some("v2.chat".into())
    );
    assert_eq!(
        chosen(&format!("{auth}Sec-WebSocket-Protocol: x, y\r\n")),
        None
    );
    assert_eq!(chosen(&auth), None);
    // A browser's way: the token rides as a protocol entry, next to the real one.
    assert_eq!(
        chosen(&format!("Sec-WebSocket-Protocol: bearer.{t}, v2.chat\r\n")),
        Some("v2.chat".into())
    );
    assert_eq!(
        chosen(&format!("Sec-WebSocket-Protocol: bearer.{t}\r\n")),
        None
    );
}

#[test]
fn bad_key_options_stop_the_start_with_a_clear_error() {
    let bin = env!("CARGO_BIN_EXE_megasock");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let small = jwt::key_path("rsa1024.pub.pem");
    let e = run(&["--auth-jwt-public-key", &small]);
    assert!(
        e.contains("--auth-jwt-public-key") && e.contains("2048"),
        "{e}"
    );
    let private = jwt::key_path("es256.pem");
    let e = run(&["--auth-jwt-public-key", &private]);
    assert!(e.contains("private key") && e.contains("-pubout"), "{e}");
    let e = run(&["--auth-jwt-secret", "short"]);
    assert!(e.contains("32 bytes"), "{e}");
    let e = run(&["--allowed-origin", "https://example.com/"]);
    assert!(e.contains("--allowed-origin"), "{e}");
    let e = run(&["--auth-audience", "x"]);
    assert!(e.contains("--auth-jwt-secret"), "{e}");
    let started = Instant::now();
    let e = run(&["--subprotocol", "bearer.x"]);
    assert!(e.contains("carry tokens"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
