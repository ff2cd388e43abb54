//! wss:// against the real binary: rustls, `openssl s_client` and Python's `ssl` as clients,
//! TLS 1.2 and 1.3, a room shared by TLS and plain members, big messages both ways, garbage
//! and a stalled handshake (counted, closed), certificates refused at start, and SIGHUP
//! reloading the certificate in place and through a takeover.
//!
//! Certificates are made here (rcgen): a test CA and a `localhost` certificate signed by it.
//! No private key is committed.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;

/// A CA and a `localhost`/127.0.0.1 certificate it signed, as PEM files in a fresh directory.
struct TestPki {
    dir: PathBuf,
    ca: CertificateDer<'static>,
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestPki {
    /// Valid from `from` to `until` days from now.
    fn new(name: &str, from: i64, until: i64) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let dir = std::env::temp_dir().join(format!("megasock-pki-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("megasock test CA {name}"),
        );
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(from);
        params.not_after = now + time::Duration::days(until);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        TestPki {
            dir,
            ca: ca_cert.der().clone(),
        }
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

/// Starts megasock with a plain listener (the helper's) and a TLS one.
fn start_tls(pki: &TestPki, extra: &[&str]) -> (ServerProc, SocketAddr) {
    let (cert, key) = (pki.cert(), pki.key());
    let mut args = vec![
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let server = ServerProc::start(&args);
    let wss = wss_addr(&server.ready_path());
    (server, wss)
}

fn wss_addr(ready: &Path) -> SocketAddr {
    std::fs::read_to_string(ready)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("wss="))
        .expect("a wss= line in the ready file")
        .parse()
        .unwrap()
}

fn client_config(
    ca: &CertificateDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A blocking wss:// client that shows frames as they are on the wire (inside TLS).
struct Wss {
    s: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buf: Vec<u8>,
}

impl Wss {
    fn try_connect(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        path: &str,
    ) -> Result<Wss, String> {
        let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap())
            .map_err(|e| e.to_string())?;
        let mut w = Wss {
            s: rustls::StreamOwned::new(conn, tcp),
            buf: Vec::new(),
        };
        w.s.write_all(upgrade_request(path).as_bytes())
            .map_err(|e| format!("TLS or write: {e}"))?;
        let head = loop {
            if let Some(i) = w.buf.windows(4).position(|x| x == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&w.buf[..i + 4]).into_owned();
                w.buf.drain(..i + 4);
                break head;
            }
            let mut tmp = [0u8; 4096];
            match w.s.read(&mut tmp) {
                Ok(0) => return Err("closed during the upgrade".into()),
                Ok(n) => w.buf.extend_from_slice(&tmp[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        };
        if !head.starts_with("HTTP/1.1 101 ")
            || !head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n")
        {
            return Err(format!("not a 101: {head}"));
        }
        Ok(w)
    }

    fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>, path: &str) -> Wss {
        Self::try_connect(addr, config, path).unwrap()
    }

    fn send(&mut self, opcode: u8, payload: &[u8]) {
        let frame = Client::frame_bytes(0x80 | opcode, payload, true);
        self.s.write_all(&frame).unwrap();
    }

    /// The next frame: (opcode, payload).
    fn recv(&mut self) -> (u8, Vec<u8>) {
        loop {
            if let Some((f, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return f;
            }
            let mut tmp = vec![0u8; 64 * 1024];
            let n = self.s.read(&mut tmp).expect("read a frame");
            assert!(n > 0, "EOF while waiting for a frame");
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

/// One unmasked server frame at the start of `b`, and its length.
fn parse(b: &[u8]) -> Option<((u8, Vec<u8>), usize)> {
    if b.len() < 2 {
        return None;
    }
    let (mut len, mut at) = ((b[1] & 0x7f) as usize, 2);
    if len == 126 {
        len = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize;
        at = 4;
    } else if len == 127 {
        len = u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize;
        at = 10;
    }
    let payload = b.get(at..at + len)?.to_vec();
    Some(((b[0] & 0x0f, payload), at + len))
}

#[test]
fn wss_echo_rooms_and_close_over_tls12_and_tls13() {
    let pki = TestPki::new("echo", -1, 30);
    let (server, wss) = start_tls(&pki, &["--workers", "2"]);
    for (i, v) in [&rustls::version::TLS12, &rustls::version::TLS13]
        .into_iter()
        .enumerate()
    {
        let config = client_config(&pki.ca, v);
        let mut c = Wss::connect(wss, config.clone(), "/echo");
        assert_eq!(c.s.conn.protocol_version(), Some(v.version));
        assert_eq!(c.s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        c.send(0x1, b"hello over tls");
        assert_eq!(c.recv(), (0x1, b"hello over tls".to_vec()));

        // A room with two wss members and one plain member: one encoding, three deliveries.
        let room = format!("/ws/mixed-{i}");
        let mut a = Wss::connect(wss, config.clone(), &room);
        let mut b = Wss::connect(wss, config.clone(), &room);
        let mut p = Client::connect(server.ws, &room);
        let url = format!("/rooms/{}", &room[4..]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !http_exchange(
            server.ws,
            format!("GET {url} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
        )
        .contains("\"members\":3")
        {
            assert!(Instant::now() < deadline, "members did not reach 3");
            std::thread::sleep(Duration::from_millis(20));
        }
        a.send(0x2, &[7u8; 300]);
        assert_eq!(b.recv(), (0x2, vec![7u8; 300]));
        assert_eq!(a.recv(), (0x2, vec![7u8; 300]), "members hear themselves");
        let f = p.recv();
        assert_eq!((f.opcode, f.payload), (0x2, vec![7u8; 300]));
        p.send_text("from plain");
        for m in [&mut a, &mut b] {
            assert_eq!(m.recv(), (0x1, b"from plain".to_vec()));
        }

        // The close handshake: code echoed, then the server ends TLS and TCP.
        c.send(0x8, &1000u16.to_be_bytes());
        let (op, payload) = c.recv();
        assert_eq!((op, &payload[..2]), (0x8, &1000u16.to_be_bytes()[..]));
        let mut rest = Vec::new();
        let end = c.s.read_to_end(&mut rest);
        assert!(
            end.is_ok() && rest.is_empty(),
            "a clean close_notify and EOF after the close frame: {end:?}"
        );
    }
    assert_eq!(server.metric("megasock_tls_handshakes_total"), 6);
    assert_eq!(
        server.metric("megasock_disconnects_total{reason=\"tls_handshake_failed\"}"),
        0
    );
}

#[test]
fn big_messages_both_ways_cross_many_records() {
    let pki = TestPki::new("big", -1, 30);
    let (_server, wss) = start_tls(&pki, &["--max-message-size", "4MiB"]);
    let mut c = Wss::connect(
        wss,
        client_config(&pki.ca, &rustls::version::TLS13),
        "/echo",
    );
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    // Written from another thread's view: the echo comes back while we still send.
    c.send(0x2, &payload);
    let (op, got) = c.recv();
    assert_eq!(op, 0x2);
    assert!(got == payload, "3 MB echoed intact ({} bytes)", got.len());
    for n in [
        0usize,
        1,
        125,
        126,
        65535,
        65536,
        16 * 1024 - 4,
        16 * 1024 + 5,
    ] {
        let p = vec![b'x'; n];
        c.send(0x1, &p);
        assert_eq!(c.recv(), (0x1, p), "{n} bytes");
    }
}

#[test]
fn listeners_coexist_and_garbage_is_counted_and_closed() {
    let pki = TestPki::new("garbage", -1, 30);
    let (server, wss) = start_tls(&pki, &[]);
    // Plain HTTP on the TLS port: not a ClientHello; closed at once.
    for junk in [
        b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0],
        (0..200u8).collect::<Vec<u8>>(),
    ] {
        let mut s = TcpStream::connect(wss).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&junk).unwrap();
        let started = Instant::now();
        let mut out = Vec::new();
        let r = s.read_to_end(&mut out);
        assert!(
            r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        assert!(
            !String::from_utf8_lossy(&out).contains("HTTP/1.1"),
            "no plaintext answer on the TLS port: {out:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "closed at once");
    }
    server.wait_metric(
        "megasock_disconnects_total{reason=\"tls_handshake_failed\"}",
        5,
        |v| v == 3,
    );
    // The plain listener beside it still serves WebSockets.
    let mut p = Client::connect(server.ws, "/echo");
    p.send_text("plain");
    assert_eq!(p.recv().payload, b"plain");
}

#[test]
fn a_client_hello_then_silence_hits_the_handshake_timeout() {
    let pki = TestPki::new("stall", -1, 30);
    let (server, wss) = start_tls(&pki, &["--handshake-timeout", "1s"]);
    let mut c = rustls::ClientConnection::new(
        client_config(&pki.ca, &rustls::version::TLS13),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    c.write_tls(&mut hello).unwrap();
    let mut s = TcpStream::connect(wss).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    s.write_all(&hello).unwrap();
    // The server answers its flight, then waits for ours, which never comes.
    let mut flight = Vec::new();
    let _ = s.read_to_end(&mut flight);
    let waited = started.elapsed();
    assert!(
        flight.first() == Some(&0x16),
        "a ServerHello came first: {:?}",
        &flight[..flight.len().min(8)]
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "closed at the handshake deadline, not {waited:?}"
    );
    server.wait_metric(
        "megasock_disconnects_total{reason=\"handshake_timeout\"}",
        5,
        |v| v == 1,
    );
    assert_eq!(server.metric("megasock_tls_handshakes_total"), 0);
}

/// Runs `openssl s_client` with an upgrade request on stdin; returns (stdout, stderr).
fn s_client(addr: SocketAddr, ca: &Path, version_flag: &str) -> (Vec<u8>, String) {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
        ])
        .args([
            "-alpn",
            "http/1.1",
            version_flag,
            "-verify_return_error",
            "-brief",
        ])
        .arg("-CAfile")
        .arg(ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl (apt-get install openssl; .ci/run does)");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(upgrade_request("/echo").as_bytes())
        .unwrap();
    // A masked text frame "hi", then wait for the echo before closing stdin.
    stdin
        .write_all(&Client::frame_bytes(0x81, b"hi", true))
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn openssl_s_client_upgrades_over_tls12_and_tls13() {
    let pki = TestPki::new("openssl", -1, 30);
    let (server, wss) = start_tls(&pki, &[]);
    for (flag, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (out, err) = s_client(wss, &pki.ca_pem(), flag);
        assert!(
            err.contains(&format!("Protocol version: {name}")) && err.contains("Verification: OK"),
            "{err}"
        );
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{text}"
        );
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(
            out.ends_with(b"\r\n\r\n\x81\x02hi"),
            "the echo frame: {text:?}"
        );
    }
    assert_eq!(server.metric("megasock_tls_handshakes_total"), 2);
}

#[test]
fn python_ssl_client_upgrades_and_echoes() {
    let pki = TestPki::new("python", -1, 30);
    let (_server, wss) = start_tls(&pki, &[]);
    let script = r#"
import os, socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["http/1.1"])
with socket.create_connection((host, port), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(4096)
        head, rest = buf.split(b"\r\n\r\n", 1)
        payload = b"python ssl"
        mask = os.urandom(4)
        s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask
                  + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while len(rest) < 2 + len(payload):
            rest += s.recv(4096)
        print(s.version(), s.selected_alpn_protocol())
        print(head.split(b"\r\n")[0].decode())
        print(rest.hex())
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(wss.ip().to_string())
        .arg(wss.port().to_string())
        .arg(pki.ca_pem())
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "TLSv1.3 http/1.1");
    assert_eq!(lines[1], "HTTP/1.1 101 Switching Protocols");
    assert_eq!(lines[2], format!("810a{}", hex(b"python ssl")));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn run_expecting_failure(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_megasock"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "megasock started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn expired_or_mismatched_certificates_refuse_to_start() {
    let expired = TestPki::new("expired", -30, -2);
    let (c, k) = (expired.cert(), expired.key());
    let err = run_expecting_failure(&[
        "--tls-cert",
        c.to_str().unwrap(),
        "--tls-key",
        k.to_str().unwrap(),
    ]);
    assert!(
        err.contains("the certificate expired on") && err.contains("renew it"),
        "{err}"
    );
    let a = TestPki::new("pair-a", -1, 30);
    let b = TestPki::new("pair-b", -1, 30);
    let (c, k) = (a.cert(), b.key());
    let err = run_expecting_failure(&[
        "--tls-cert",
        c.to_str().unwrap(),
        "--tls-key",
        k.to_str().unwrap(),
    ]);
    assert!(
        err.contains("does not belong to the certificate")
            && err.contains("pair each certificate with the key it was issued for"),
        "{err}"
    );
    let err = run_expecting_failure(&["--tls-cert", c.to_str().unwrap()]);
    assert!(
        err.contains("--tls-cert and --tls-key go together"),
        "{err}"
    );
}

/// Copies a PKI's certificate and key over the files the server was started with.
fn install(pki: &TestPki, dir: &Path) {
    std::fs::copy(pki.cert(), dir.join("cert.pem")).unwrap();
    std::fs::copy(pki.key(), dir.join("key.pem")).unwrap();
}

fn served_files(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("megasock-served-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn sighup_reloads_the_certificate_in_place_and_keeps_connections() {
    let first = TestPki::new("hup-1", -1, 30);
    let second = TestPki::new("hup-2", -1, 30);
    let dir = served_files("hup");
    install(&first, &dir);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let server = ServerProc::start(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let wss = wss_addr(&server.ready_path());
    let v13 = &rustls::version::TLS13;
    let mut before = Wss::connect(wss, client_config(&first.ca, v13), "/echo");
    install(&second, &dir);
    server.signal(1); // SIGHUP
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = loop {
        match Wss::try_connect(wss, client_config(&second.ca, v13), "/echo") {
            Ok(w) => break w,
            Err(e) => assert!(Instant::now() < deadline, "new certificate not served: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let e = Wss::try_connect(wss, client_config(&first.ca, v13), "/echo").err();
    assert!(
        e.as_deref().is_some_and(|e| e.contains("UnknownIssuer")),
        "the old certificate is no longer presented: {e:?}"
    );
    before.send(0x1, b"kept");
    assert_eq!(
        before.recv(),
        (0x1, b"kept".to_vec()),
        "open connections stay"
    );
    after.send(0x1, b"new");
    assert_eq!(after.recv(), (0x1, b"new".to_vec()));
    // A bad pair on SIGHUP is refused; the current certificate stays in use.
    std::fs::copy(first.key(), dir.join("key.pem")).unwrap();
    server.signal(1);
    std::thread::sleep(Duration::from_millis(300));
    Wss::connect(wss, client_config(&second.ca, v13), "/echo");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigusr1_reloads_in_place_and_sighup_with_takeover_restarts_with_the_files() {
    let first = TestPki::new("takeover-1", -1, 30);
    let second = TestPki::new("takeover-2", -1, 30);
    let dir = served_files("takeover");
    install(&first, &dir);
    let (cert, key, sock) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("takeover.sock"),
    );
    let mut old = ServerProc::start(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--takeover",
        sock.to_str().unwrap(),
        "--drain-timeout",
        "2s",
    ]);
    let old_pid = old.child.id();
    let wss = wss_addr(&old.ready_path());
    let v12 = &rustls::version::TLS12;
    let mut before = Wss::connect(wss, client_config(&first.ca, v12), "/echo");
    // SIGUSR1 only reloads the certificate: no restart, even with --takeover.
    install(&second, &dir);
    old.signal(10); // SIGUSR1
    let deadline = Instant::now() + Duration::from_secs(5);
    while Wss::try_connect(wss, client_config(&second.ca, v12), "/echo").is_err() {
        assert!(
            Instant::now() < deadline,
            "SIGUSR1 did not reload the certificate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    before.send(0x1, b"same process");
    assert_eq!(before.recv(), (0x1, b"same process".to_vec()));
    assert!(old.child.try_wait().unwrap().is_none(), "still running");
    // SIGHUP restarts: the successor reads the files.
    install(&first, &dir);
    old.signal(1);
    // The old process drains: its clients get 1001 and reconnect to the successor.
    let (op, payload) = before.recv();
    assert_eq!((op, &payload[..2]), (0x8, &1001u16.to_be_bytes()[..]));
    assert!(old.wait_exit(15).success());
    let ready = std::fs::read_to_string(old.ready_path()).unwrap();
    let successor: u32 = ready
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap();
    assert_ne!(successor, old_pid);
    let _kill = KillOnDrop(successor);
    assert_eq!(wss_addr(&old.ready_path()), wss, "same wss address");
    let ws: SocketAddr = ready
        .lines()
        .find_map(|l| l.strip_prefix("ws="))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ws, old.ws, "the plain listener stays plain");
    let mut after = Wss::connect(wss, client_config(&first.ca, v12), "/echo");
    after.send(0x1, b"successor");
    assert_eq!(after.recv(), (0x1, b"successor".to_vec()));
    let mut plain = Client::connect(ws, "/echo");
    plain.send_text("plain too");
    assert_eq!(plain.recv().payload, b"plain too");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stops a process that is not our child (the successor) by pid, even if the test fails.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

#[test]
fn refusals_at_accept_close_a_wss_socket_without_plaintext() {
    let pki = TestPki::new("per-ip", -1, 30);
    let (server, wss) = start_tls(&pki, &["--max-connections-per-ip", "1"]);
    let config = client_config(&pki.ca, &rustls::version::TLS13);
    let mut first = Wss::connect(wss, config.clone(), "/echo");
    let mut s = TcpStream::connect(wss).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let r = s.read_to_end(&mut out);
    assert!(
        r.is_ok() && out.is_empty(),
        "closed, nothing sent: {r:?} {out:?}"
    );
    assert!(
        Wss::try_connect(wss, config, "/echo").is_err(),
        "a TLS client over the limit gets no connection"
    );
    first.send(0x1, b"still served");
    assert_eq!(first.recv(), (0x1, b"still served".to_vec()));
    assert!(server.metric("megasock_disconnects_total{reason=\"http_rejected\"}") >= 2);
}

#[test]
fn proxy_protocol_with_tls_is_refused_with_advice() {
    let pki = TestPki::new("proxy", -1, 30);
    let (c, k) = (pki.cert(), pki.key());
    let err = run_expecting_failure(&[
        "--tls-cert",
        c.to_str().unwrap(),
        "--tls-key",
        k.to_str().unwrap(),
        "--proxy-protocol",
    ]);
    assert!(err.contains("terminate TLS at the proxy"), "{err}");
}
