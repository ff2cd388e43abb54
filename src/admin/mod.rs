//! The admin listener (`--admin ADDR`): `/metrics`, `/healthz`, `/readyz`, `/stats` and the
//! publish API, on its own thread with its own small mio loop, never on a worker.
//!
//! No client can hold it: sockets are non-blocking, each request (head and body) has a
//! deadline, heads and bodies are bounded, idle keep-alive connections are closed, and past
//! [`MAX_CONNS`] new connections are closed at once. A silent or trickling client costs one
//! slot and nothing else, so `/healthz` always answers promptly.

mod http;
mod routes;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::bus::Injector;
use crate::worker::Shared;

/// Connections held at once; more are closed as they arrive.
const MAX_CONNS: usize = 256;
/// Time for one request, head and body, from its first byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a keep-alive connection may sit idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Output queued for one connection before it stops being served more requests.
const MAX_OUTPUT: usize = 1 << 20;
const LISTENER: Token = Token(usize::MAX);

/// Binds the admin listener (or adopts the one a predecessor handed over, see `takeover`) and
/// serves it on a background thread. Returns the bound address and the listener's fd (for the
/// next handover).
pub fn spawn(
    addr: SocketAddr,
    shared: Arc<Shared>,
    injector: Injector,
    inherited: Option<std::net::TcpListener>,
) -> io::Result<(SocketAddr, RawFd)> {
    let adopted = inherited.filter(|l| {
        l.local_addr()
            .is_ok_and(|a| a == addr || (addr.port() == 0 && a.ip() == addr.ip()))
    });
    let std_listener = match adopted {
        Some(l) => l,
        None => std::net::TcpListener::bind(addr).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on --admin {addr}: {e} (is another process using it?)"),
            )
        })?,
    };
    std_listener.set_nonblocking(true)?;
    let bound = std_listener.local_addr()?;
    let fd = std_listener.as_raw_fd();
    let listener = TcpListener::from_std(std_listener);
    let poll = Poll::new()?;
    std::thread::Builder::new()
        .name("megasock-admin".into())
        .spawn(move || {
            let mut admin = Admin {
                poll,
                listener: Some(listener),
                conns: Slab::new(),
                ctx: routes::Ctx::new(shared, injector),
            };
            if let Err(e) = admin.run() {
                log::error!("admin listener stopped: {e}");
            }
        })?;
    Ok((bound, fd))
}

struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    deadline: Instant,
    /// Close once the output is written (the client asked, or an error was answered).
    closing: bool,
}

struct Admin {
    poll: Poll,
    /// None once handed over to a successor (it accepts from the same socket now).
    listener: Option<TcpListener>,
    conns: Slab<Conn>,
    ctx: routes::Ctx,
}

impl Admin {
    fn run(&mut self) -> io::Result<()> {
        if let Some(l) = self.listener.as_mut() {
            self.poll
                .registry()
                .register(l, LISTENER, Interest::READABLE)?;
        }
        let mut events = Events::with_capacity(256);
        loop {
            // Published messages waiting for room in a ring are retried often; otherwise the
            // loop wakes for the nearest deadline.
            let timeout = if self.ctx.injector.overflow_bytes() > 0 {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(250)
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                if ev.token() == LISTENER {
                    self.accept();
                } else {
                    self.serve(ev.token().0);
                }
            }
            self.ctx.injector.retry();
            self.expire();
            if self.listener.is_some() && self.ctx.handed_over() {
                // The successor accepts from the same socket: our copy goes, our open
                // connections are still answered.
                if let Some(mut l) = self.listener.take() {
                    let _ = self.poll.registry().deregister(&mut l);
                }
                self.ctx.release_admin();
            }
        }
    }

    fn accept(&mut self) {
        loop {
            // After a handover the successor accepts: what waits in the queue is its now.
            let Some(listener) = self.listener.as_ref().filter(|_| !self.ctx.handed_over()) else {
                return;
            };
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if self.conns.len() >= MAX_CONNS && !self.evict_idle() {
                        continue; // every slot is busy with a request: closed at once
                    }
                    let entry = self.conns.vacant_entry();
                    let registered = self.poll.registry().register(
                        &mut stream,
                        Token(entry.key()),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                    if registered.is_ok() {
                        entry.insert(Conn {
                            stream,
                            input: Vec::new(),
                            output: Vec::new(),
                            written: 0,
                            deadline: Instant::now() + REQUEST_TIMEOUT,
                            closing: false,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return, // fd exhaustion and the like: the next event retries
            }
        }
    }

    /// Reads what arrived, answers every complete request, writes what it can.
    fn serve(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        let mut eof = false;
        // A client that does not read its answers is not read either (its requests would pile
        // up here); the writable event that follows its next read brings it back.
        while !c.closing && c.output.len() - c.written < MAX_OUTPUT {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    if c.input.is_empty() {
                        c.deadline = Instant::now() + REQUEST_TIMEOUT;
                    }
                    c.input.extend_from_slice(&buf[..n]);
                    if c.input.len() > http::MAX_HEAD + self.ctx.max_body() {
                        break; // parse below refuses it
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(key);
                    return;
                }
            }
        }
        self.answer(key);
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if eof && c.written == c.output.len() {
            self.close(key);
            return;
        }
        if eof {
            c.closing = true; // write what is owed, then close
        }
        self.write(key);
    }

    fn answer(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let mut used = 0;
        while !c.closing && c.output.len() - c.written < MAX_OUTPUT {
            let rest = &c.input[used..];
            if rest.is_empty() {
                break;
            }
            let ctx = &mut self.ctx;
            match http::parse(rest, |path| ctx.body_limit(path)) {
                http::Parsed::Partial => break,
                http::Parsed::Error(resp) => {
                    ctx.count(resp.status);
                    resp.encode(false, &mut c.output);
                    c.closing = true;
                }
                http::Parsed::Request(req, n) => {
                    let resp = ctx.handle(&req);
                    ctx.count(resp.status);
                    resp.encode(req.keep_alive, &mut c.output);
                    c.closing = !req.keep_alive;
                    used += n;
                }
            }
        }
        c.input.drain(..used);
        if used > 0 {
            c.deadline = Instant::now()
                + if c.input.is_empty() {
                    IDLE_TIMEOUT
                } else {
                    REQUEST_TIMEOUT
                };
        }
        if c.input.is_empty() && c.input.capacity() > 64 * 1024 {
            c.input = Vec::new();
        }
    }

    /// Writes what is owed; answers requests held back while output was pending, for as
    /// long as that produces output. A partial request simply waits for more bytes.
    fn write(&mut self, key: usize) {
        loop {
            let Some(c) = self.conns.get_mut(key) else {
                return;
            };
            while c.written < c.output.len() {
                match c.stream.write(&c.output[c.written..]) {
                    Ok(0) => break,
                    Ok(n) => {
                        c.written += n;
                        // A client reading its (pipelined) answers is making progress.
                        c.deadline = Instant::now() + REQUEST_TIMEOUT;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.close(key);
                        return;
                    }
                }
            }
            c.output.clear();
            c.written = 0;
            if c.closing {
                self.close(key);
                return;
            }
            if c.input.is_empty() {
                return;
            }
            self.answer(key);
            if self.conns.get(key).is_none_or(|c| c.output.is_empty()) {
                return;
            }
        }
    }

    /// Closes connections whose request or idle time ran out.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| now >= c.deadline)
            .map(|(k, _)| k)
            .collect();
        for key in late {
            let c = &mut self.conns[key];
            if !c.input.is_empty() && c.output.is_empty() {
                // A request that never completed: say so, then close.
                let resp = http::Response::text(408, "request not completed in time\n");
                self.ctx.count(408);
                resp.encode(false, &mut c.output);
                let _ = c.stream.write(&c.output);
            }
            self.close(key);
        }
    }

    /// Full: makes room by closing the connection idle the longest (between requests). Idle
    /// keep-alive connections must not lock the probes out.
    fn evict_idle(&mut self) -> bool {
        let oldest = self
            .conns
            .iter()
            .filter(|(_, c)| c.input.is_empty() && c.output.len() == c.written)
            .min_by_key(|(_, c)| c.deadline)
            .map(|(k, _)| k);
        match oldest {
            Some(k) => {
                self.close(k);
                true
            }
            None => false,
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(mut c) = self.conns.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }
}
