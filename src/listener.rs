//! Listening sockets: one per worker per address, all bound to the same port with
//! `SO_REUSEPORT`, so the kernel spreads incoming connections across the workers.
//!
//! Port 0 is resolved by the first socket; the other workers bind the port it got.

use std::io;
use std::net::SocketAddr;

use mio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};

/// A non-blocking listener with SO_REUSEADDR, SO_REUSEPORT and the given backlog.
pub fn reuseport_listener(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(TcpListener::from_std(s.into()))
}

/// Binds `workers` listeners on each address. Returns per-worker listener lists and the
/// addresses actually bound (port 0 resolved).
pub fn bind_all(
    addrs: &[SocketAddr],
    workers: usize,
    backlog: u32,
) -> io::Result<(Vec<Vec<TcpListener>>, Vec<SocketAddr>)> {
    let mut per_worker: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let first = reuseport_listener(addr, backlog).map_err(|e| with_addr(e, addr))?;
        let actual = first.local_addr()?;
        bound.push(actual);
        per_worker[0].push(first);
        for list in per_worker.iter_mut().skip(1) {
            list.push(reuseport_listener(actual, backlog).map_err(|e| with_addr(e, actual))?);
        }
    }
    Ok((per_worker, bound))
}

/// Spreads inherited listening sockets (see `takeover`) over `workers`, binding more on the
/// same addresses where there are fewer than workers. Returns per-worker lists and the
/// addresses served.
pub fn adopt(
    inherited: Vec<(SocketAddr, std::net::TcpListener)>,
    workers: usize,
    backlog: u32,
) -> io::Result<(Vec<Vec<TcpListener>>, Vec<SocketAddr>)> {
    let mut groups: Vec<(SocketAddr, Vec<std::net::TcpListener>)> = Vec::new();
    for (addr, l) in inherited {
        match groups.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, g)) => g.push(l),
            None => groups.push((addr, vec![l])),
        }
    }
    let mut per_worker: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::with_capacity(groups.len());
    for (addr, group) in groups {
        bound.push(addr);
        let have = group.len();
        // Every inherited socket keeps being accepted from (closing one would reset its
        // queue); workers beyond them get new sockets in the same SO_REUSEPORT group.
        for (i, l) in group.into_iter().enumerate() {
            per_worker[i % workers].push(TcpListener::from_std(l));
        }
        for list in per_worker.iter_mut().skip(have) {
            list.push(reuseport_listener(addr, backlog).map_err(|e| with_addr(e, addr))?);
        }
    }
    Ok((per_worker, bound))
}

fn with_addr(e: io::Error, addr: SocketAddr) -> io::Error {
    let hint = match e.kind() {
        io::ErrorKind::AddrInUse => " (another process holds this port; pick another --listen)",
        io::ErrorKind::PermissionDenied => " (ports below 1024 need CAP_NET_BIND_SERVICE)",
        io::ErrorKind::AddrNotAvailable => " (that address is not on this machine)",
        _ => "",
    };
    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}{hint}"))
}
