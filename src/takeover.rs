//! Restarts without a refused connect: the running process hands its listening sockets to its
//! successor over a Unix socket (`--takeover PATH`, SCM_RIGHTS), then drains.
//!
//! Two processes sharing a port through `SO_REUSEPORT` are not enough: when the old one closes
//! its listeners, Linux resets the connections still waiting in their accept queues (seen in
//! `tests/restart.rs`: a few resets per restart under a steady connect loop). Handing over the
//! very same sockets keeps those queues: the successor accepts from them, and the old
//! process's copies close without touching them.
//!
//! The exchange, on `PATH`:
//! 1. The successor connects; the running process sends `megasock-takeover 1 N A\n` with its
//!    N sockets attached: its listeners, then its admin listener if A is 1 (so a fixed
//!    `--admin` port carries over too; the old process stops accepting on it once done).
//!    A process with wss:// listeners adds ` tls=ADDR,ADDR` (which of the listeners serve
//!    TLS: with port 0 the addresses asked for cannot tell a plain from a TLS socket).
//! 2. The successor starts its workers on them (binding more on the same port if it has more
//!    workers), then answers `ready\n`.
//! 3. The old process drains (close 1001 to its clients, `--drain-timeout`) and exits; the
//!    successor binds `PATH` for the next restart.
//!
//! If the successor fails before `ready`, the old process keeps serving as if nothing happened.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sendfd::{RecvWithFd, SendWithFd};

use crate::worker::Shared;

const HEADER: &str = "megasock-takeover 1";
/// Most listening sockets one process hands over (addresses × workers).
const MAX_FDS: usize = 1024;

/// Listening sockets received from the process that served `PATH`.
pub struct Inherited {
    pub listeners: Vec<(SocketAddr, TcpListener)>,
    /// Its admin listener, if it had one (taken over too, so a fixed admin port carries over).
    pub admin: Option<TcpListener>,
    /// Which listeners served wss:// in the predecessor (`None`: it did not say).
    pub tls_addrs: Option<Vec<SocketAddr>>,
    predecessor: UnixStream,
}

/// Takes the listening sockets of the process serving `path`, or `None` if no process serves
/// it (a first start; a stale socket file is removed).
pub fn take(path: &Path) -> io::Result<Option<Inherited>> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            let _ = std::fs::remove_file(path); // left by a process that is gone
            return Ok(None);
        }
        Err(e) => return Err(context(path, e)),
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 4096];
    let mut fds: Vec<RawFd> = vec![-1; MAX_FDS];
    let (n, nfds) = stream
        .recv_with_fd(&mut buf, &mut fds)
        .map_err(|e| context(path, e))?;
    // SAFETY: the kernel installed these `nfds` descriptors in this process for us (SCM_RIGHTS);
    // nothing else owns them, so each is wrapped exactly once.
    let received: Vec<TcpListener> = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { TcpListener::from_raw_fd(fd) })
        .collect();
    let text = String::from_utf8_lossy(&buf[..n]);
    // `HEADER N A [tls=ADDR,...]`: N sockets, the last of them the admin listener if A is 1.
    let mut fields: Vec<&str> = text
        .strip_prefix(HEADER)
        .map_or(Vec::new(), |r| r.split_whitespace().collect());
    let tls_addrs = match fields.last().and_then(|f| f.strip_prefix("tls=")) {
        Some(list) => {
            let addrs = list
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<SocketAddr>, _>>();
            fields.pop();
            addrs.ok()
        }
        None => None,
    };
    let with_admin = match fields.as_slice() {
        [n, a] if *n == nfds.to_string() && (*a == "0" || *a == "1") => *a == "1",
        _ => {
            return Err(context(
                path,
                io::Error::other(format!(
                    "unexpected handover message {text:?} with {nfds} sockets"
                )),
            ))
        }
    };
    let mut received = received;
    let admin = if with_admin { received.pop() } else { None };
    let mut listeners = Vec::with_capacity(nfds);
    for l in received {
        l.set_nonblocking(true)?;
        listeners.push((l.local_addr()?, l));
    }
    Ok(Some(Inherited {
        listeners,
        admin,
        tls_addrs,
        predecessor: stream,
    }))
}

impl Inherited {
    /// Our workers run: the predecessor may drain now.
    pub fn release_predecessor(mut self) -> io::Result<()> {
        self.predecessor.write_all(b"ready\n")
    }
}

/// Serves `path` for a successor, on its own thread: hands it `fds` (this process's
/// listening sockets), and once it is ready, drains this process.
pub fn serve(
    path: PathBuf,
    listeners: Vec<RawFd>,
    admin: Option<RawFd>,
    shared: Arc<Shared>,
) -> io::Result<()> {
    let with_admin = admin.is_some() as u8;
    let fds: Vec<RawFd> = listeners.into_iter().chain(admin).collect();
    let tls: Vec<String> = shared.tls.as_ref().map_or(Vec::new(), |t| {
        t.addrs.iter().map(|a| a.to_string()).collect()
    });
    let _ = std::fs::remove_file(&path); // our predecessor's, now ours
    let listener = UnixListener::bind(&path).map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::NotFound => " (create its directory; under systemd, RuntimeDirectory=megasock makes /run/megasock)",
            io::ErrorKind::PermissionDenied => " (the directory must be writable by megasock's user)",
            _ => "",
        };
        context(&path, io::Error::new(e.kind(), format!("cannot listen: {e}{hint}")))
    })?;
    std::thread::Builder::new()
        .name("megasock-takeover".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                match hand_over(&stream, &fds, with_admin, &tls) {
                    Ok(()) => {
                        shared
                            .handed_over
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                        // Our admin thread lets go of the shared admin socket before we drain,
                        // so no probe reaching this process answers "draining" meanwhile.
                        let deadline = std::time::Instant::now() + Duration::from_secs(1);
                        while with_admin == 1
                            && !shared
                                .admin_released
                                .load(std::sync::atomic::Ordering::SeqCst)
                            && std::time::Instant::now() < deadline
                        {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        log::info!(
                            "handed {} listening sockets to a new megasock over {}; draining",
                            fds.len(),
                            path.display()
                        );
                        shared.begin_shutdown();
                        return;
                    }
                    Err(e) => log::warn!(
                        "takeover over {} did not complete ({e}); still serving",
                        path.display()
                    ),
                }
            }
        })?;
    Ok(())
}

fn hand_over(stream: &UnixStream, fds: &[RawFd], with_admin: u8, tls: &[String]) -> io::Result<()> {
    let tls = if tls.is_empty() {
        String::new()
    } else {
        format!(" tls={}", tls.join(","))
    };
    let header = format!("{HEADER} {} {with_admin}{tls}\n", fds.len());
    stream.send_with_fd(header.as_bytes(), fds)?;
    // The successor has the sockets; it answers once its workers accept from them.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line == "ready\n" {
        Ok(())
    } else {
        Err(io::Error::other(
            "the new process stopped before it was ready",
        ))
    }
}

fn context(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("--takeover {}: {e}", path.display()))
}
