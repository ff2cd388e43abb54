//! The operator's HTTP endpoint: `GET /metrics` (Prometheus text) and `GET /healthz`.
//!
//! It runs on its own thread with blocking sockets: it is off the hot path, sees a scrape every
//! few seconds, and only reads the workers' counters.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::worker::Shared;

/// Binds the endpoint and serves it on a background thread. Returns the bound address.
pub fn spawn(addr: SocketAddr, shared: Arc<Shared>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on --metrics-listen {addr}: {e}"),
        )
    })?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("megasock-admin".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve(stream, &shared);
            }
        })?;
    Ok(bound)
}

fn serve(mut s: TcpStream, shared: &Shared) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    let path = loop {
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => break req.path.unwrap_or("/").to_string(),
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => return respond(&mut s, "400 Bad Request", "bad request\n"),
        }
    };
    match path.as_str() {
        "/metrics" => respond(&mut s, "200 OK", &shared.metrics.render()),
        "/healthz" => {
            let draining = shared.shutdown.load(std::sync::atomic::Ordering::Relaxed);
            if draining {
                respond(&mut s, "503 Service Unavailable", "draining\n")
            } else {
                respond(&mut s, "200 OK", "ok\n")
            }
        }
        _ => respond(&mut s, "404 Not Found", "try /metrics or /healthz\n"),
    }
}

fn respond(s: &mut TcpStream, status: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())
}
