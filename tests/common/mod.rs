//! Test helpers: start the real `megasock` binary on port 0, and a raw blocking WebSocket
//! client that shows exactly what is on the wire.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct ServerProc {
    pub child: Child,
    pub ws: SocketAddr,
    pub metrics: SocketAddr,
    dir: PathBuf,
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl ServerProc {
    /// Starts megasock with `args` on 127.0.0.1:0 and waits until it listens.
    pub fn start(args: &[&str]) -> ServerProc {
        Self::start_with(args, |_| {})
    }

    pub fn start_with(args: &[&str], tweak: impl FnOnce(&mut Command)) -> ServerProc {
        Self::launch("127.0.0.1:0", args, tweak)
    }

    /// Starts megasock listening on `listen` (e.g. the port of a running one, to take over).
    pub fn start_on(listen: &str, args: &[&str]) -> ServerProc {
        Self::launch(listen, args, |_| {})
    }

    fn launch(listen: &str, args: &[&str], tweak: impl FnOnce(&mut Command)) -> ServerProc {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("megasock-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ready = dir.join("ready");
        // MEGASOCK_BIN runs the same tests against another build (e.g. an older binary).
        let bin = std::env::var_os("MEGASOCK_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_megasock")));
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .args(["--listen", listen, "--metrics-listen", "127.0.0.1:0"])
            .arg("--ready-file")
            .arg(&ready)
            .args(args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        tweak(&mut cmd);
        let mut child = cmd.spawn().expect("spawn megasock");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let get = |k: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(k))
                        .map(|v| v.parse::<SocketAddr>().unwrap())
                };
                if let (Some(ws), Some(metrics)) = (get("ws="), get("metrics=")) {
                    return ServerProc {
                        child,
                        ws,
                        metrics,
                        dir,
                    };
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("megasock exited before listening: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "megasock did not write its ready file"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The full Prometheus text.
    pub fn metrics_text(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// Sum of every sample whose line starts with `prefix` (name plus optional labels).
    pub fn metric(&self, prefix: &str) -> i64 {
        self.metrics_text()
            .lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
            .sum()
    }

    /// Polls a metric until `pred` holds (or panics after `secs`).
    pub fn wait_metric(&self, prefix: &str, secs: u64, pred: impl Fn(i64) -> bool) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.metric(prefix);
            if pred(v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "metric {prefix} stuck at {v}\n{}",
                self.metrics_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The ready file the server wrote (`pid=`, `ws=`, `metrics=`, `admin=` lines).
    pub fn ready_path(&self) -> PathBuf {
        self.dir.join("ready")
    }

    pub fn signal(&self, sig: i32) {
        let r = unsafe_kill(self.child.id() as i32, sig);
        assert_eq!(r, 0, "kill failed");
    }

    pub fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "megasock did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn unsafe_kill(pid: i32, sig: i32) -> i32 {
    // SAFETY: kill(2) with a pid we spawned; no memory is involved.
    unsafe { libc::kill(pid, sig) }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A frame as received from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

pub const TEXT: u8 = 1;
pub const BINARY: u8 = 2;
pub const CONT: u8 = 0;
pub const CLOSE: u8 = 8;
pub const PING: u8 = 9;
pub const PONG: u8 = 10;

/// How a connection's input ended (see [`Client::recv_or_end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// An orderly close (FIN): `read` returned 0.
    Eof,
    /// `read` failed (ECONNRESET and the like).
    Reset,
    /// Nothing arrived within the read timeout.
    Timeout,
}

pub struct Client {
    pub s: TcpStream,
    buf: Vec<u8>,
}

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A complete upgrade request for `path`.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
}

/// Sends raw bytes, returns everything the server sends until it closes (bounded by time).
pub fn http_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

impl Client {
    /// Connects and upgrades; panics unless the answer is a correct 101.
    pub fn connect(addr: SocketAddr, path: &str) -> Client {
        Self::from_stream(TcpStream::connect(addr).unwrap(), path)
    }

    /// Upgrades an already connected stream.
    pub fn from_stream(s: TcpStream, path: &str) -> Client {
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client { s, buf: Vec::new() };
        c.s.write_all(upgrade_request(path).as_bytes()).unwrap();
        let head = c.read_head();
        assert!(
            head.starts_with("HTTP/1.1 101 "),
            "expected 101, got: {head}"
        );
        assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        c
    }

    /// Upgrades a connected stream; an error (not a panic) if anything but a 101 comes back.
    pub fn try_from_stream(s: TcpStream, path: &str) -> Result<Client, String> {
        let _ = s.set_nodelay(true);
        let mut c = Client { s, buf: Vec::new() };
        c.s.write_all(upgrade_request(path).as_bytes())
            .map_err(|e| format!("write request: {e}"))?;
        loop {
            if let Some(i) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&c.buf[..i + 4]).into_owned();
                c.buf.drain(..i + 4);
                return if head.starts_with("HTTP/1.1 101 ") {
                    Ok(c)
                } else {
                    Err(format!("answered {:?}", head.lines().next()))
                };
            }
            let mut tmp = [0u8; 4096];
            match c.s.read(&mut tmp) {
                Ok(0) => return Err("closed during the handshake".into()),
                Ok(n) => c.buf.extend_from_slice(&tmp[..n]),
                Err(e) => return Err(format!("read response: {e}")),
            }
        }
    }

    fn read_head(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i + 4]).into_owned();
                self.buf.drain(..i + 4);
                return head;
            }
            let mut tmp = [0u8; 4096];
            let n = self.s.read(&mut tmp).expect("read response head");
            assert!(n > 0, "connection closed during handshake");
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    /// Wraps a stream whose upgrade request was already written (in whatever pieces);
    /// panics unless the answer is a correct 101.
    pub fn finish_upgrade(s: TcpStream) -> Client {
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client { s, buf: Vec::new() };
        let head = c.read_head();
        assert!(
            head.starts_with("HTTP/1.1 101 "),
            "expected 101, got: {head}"
        );
        assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        c
    }

    /// Reads one frame, or says how the input ended (EOF, reset or read timeout).
    pub fn recv_or_end(&mut self) -> Result<Frame, End> {
        loop {
            if let Some(f) = self.parse_buffered() {
                return Ok(f);
            }
            let mut tmp = vec![0u8; 64 * 1024];
            match self.s.read(&mut tmp) {
                Ok(0) => return Err(End::Eof),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(End::Timeout)
                }
                Err(_) => return Err(End::Reset),
            }
        }
    }

    /// The first complete frame in the buffer, if any (removed from it).
    fn parse_buffered(&mut self) -> Option<Frame> {
        self.parse_buffered_rsv1(false).map(|(_, f)| f)
    }

    /// Upgrades with extra request header lines (e.g. `Sec-WebSocket-Extensions: ...`);
    /// returns the client and the response head, or the head if it is not a 101.
    pub fn connect_with(
        addr: SocketAddr,
        path: &str,
        extra_headers: &str,
    ) -> Result<(Client, String), String> {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client { s, buf: Vec::new() };
        let request = upgrade_request(path).replace(
            "\r\n\r\n",
            &format!("\r\n{}\r\n\r\n", extra_headers.trim_end()),
        );
        c.s.write_all(request.as_bytes()).unwrap();
        let head = c.read_head();
        if head.starts_with("HTTP/1.1 101 ") {
            Ok((c, head))
        } else {
            Err(head)
        }
    }

    /// Reads one frame that may have RSV1 set (permessage-deflate): (RSV1, frame).
    pub fn recv_rsv1(&mut self) -> (bool, Frame) {
        loop {
            if let Some(f) = self.parse_buffered_rsv1(true) {
                return f;
            }
            let mut tmp = vec![0u8; 64 * 1024];
            match self.s.read(&mut tmp) {
                Ok(0) => panic!("expected a frame, got EOF"),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("expected a frame, got {e}"),
            }
        }
    }

    /// Like [`Client::parse_buffered`]; RSV1 is accepted (and returned) if `rsv1_ok`.
    fn parse_buffered_rsv1(&mut self, rsv1_ok: bool) -> Option<(bool, Frame)> {
        if self.buf.len() < 2 {
            return None;
        }
        let b0 = self.buf[0];
        let b1 = self.buf[1];
        assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
        let (len, hl) = match b1 & 0x7f {
            126 if self.buf.len() >= 4 => {
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 if self.buf.len() >= 10 => (
                u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            l => (l as usize, 2),
        };
        if self.buf.len() < hl + len {
            return None;
        }
        let payload = self.buf[hl..hl + len].to_vec();
        self.buf.drain(..hl + len);
        let reserved = if rsv1_ok { 0x30 } else { 0x70 };
        assert_eq!(b0 & reserved, 0, "server set reserved bits");
        Some((
            b0 & 0x40 != 0,
            Frame {
                fin: b0 & 0x80 != 0,
                opcode: b0 & 0x0f,
                payload,
            },
        ))
    }

    pub fn set_timeout(&self, d: Duration) {
        self.s.set_read_timeout(Some(d)).unwrap();
    }

    /// Encodes a masked client frame.
    pub fn frame_bytes(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut v = vec![first];
        let m = if masked { 0x80 } else { 0 };
        if payload.len() < 126 {
            v.push(m | payload.len() as u8);
        } else if payload.len() < 65536 {
            v.push(m | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            v.push(m | 127);
            v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        if masked {
            let key = [0x37, 0xfa, 0x21, 0x3d];
            v.extend_from_slice(&key);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            v.extend_from_slice(payload);
        }
        v
    }

    pub fn send_frame(&mut self, opcode: u8, fin: bool, payload: &[u8]) {
        let first = opcode | if fin { 0x80 } else { 0 };
        self.s
            .write_all(&Self::frame_bytes(first, payload, true))
            .unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)
    }

    pub fn send_text(&mut self, t: &str) {
        self.send_frame(TEXT, true, t.as_bytes());
    }

    pub fn send_binary(&mut self, b: &[u8]) {
        self.send_frame(BINARY, true, b);
    }

    /// Reads one frame; None on EOF, reset or timeout.
    pub fn try_recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.parse_buffered() {
                return Some(f);
            }
            let mut tmp = vec![0u8; 64 * 1024];
            match self.s.read(&mut tmp) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }
    }

    pub fn recv(&mut self) -> Frame {
        self.try_recv()
            .expect("expected a frame, got EOF or timeout")
    }

    /// Reads frames until a close frame; returns its code (None if it had no payload).
    /// Skips pings and data frames queued before the close.
    pub fn expect_close(&mut self) -> Option<u16> {
        loop {
            let f = self.recv();
            if f.opcode == CLOSE {
                assert!(f.payload.len() != 1);
                return (f.payload.len() >= 2)
                    .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
            }
        }
    }

    /// After a close, the server must close the TCP connection.
    pub fn expect_eof(&mut self) {
        self.set_timeout(Duration::from_secs(10));
        let start = Instant::now();
        while let Some(f) = self.try_recv() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "server kept sending: {f:?}"
            );
        }
    }

    /// True if no byte is waiting to be read (checked without blocking).
    pub fn nothing_pending(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        self.s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = self.s.read(&mut b);
        self.s.set_nonblocking(false).unwrap();
        matches!(r, Err(e) if e.kind() == ErrorKind::WouldBlock)
    }

    /// Answers the server's close (completing the handshake).
    pub fn reply_close(&mut self, code: u16) {
        self.send_frame(CLOSE, true, &code.to_be_bytes());
    }
}

/// Connects room members until each of `workers` workers holds at least one.
pub fn members_on_every_worker(srv: &ServerProc, room: &str, workers: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    loop {
        clients.push(Client::connect(srv.ws, &format!("/ws/{room}")));
        let text = srv.metrics_text();
        let busy = text
            .lines()
            .filter(|l| l.starts_with("megasock_connections{"))
            .filter(|l| l.rsplit(' ').next().unwrap() != "0")
            .count();
        if busy == workers {
            return clients;
        }
        assert!(
            clients.len() < 200,
            "connections never reached every worker"
        );
    }
}
