//! What an idle wss:// connection costs in user space, counted by the allocator: the boxed
//! rustls state (keys, handshake leftovers) and nothing else once the handshake and a message
//! each way are done. The goal (issue 12) is 4 KiB per idle TLS connection, so a million fit in
//! about 4 GB beside the kernel's socket memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{IoSlice, Read, Write};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::sync::Arc;

use megasock::tls::{Buffers, Sealer, TlsConn, TlsFiles};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// Only the server side's allocations count (the clients live in the same thread).
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn counted(n: isize) {
    if COUNTING.with(|c| c.get()) {
        LIVE.fetch_add(n, Relaxed);
    }
}

/// Runs `f` with its allocations counted.
fn server<R>(f: impl FnOnce() -> R) -> R {
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    r
}

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        counted(l.size() as isize);
        // SAFETY: same layout the caller gave us.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        counted(-(l.size() as isize));
        // SAFETY: `p` came from `alloc` above with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        counted(n as isize - l.size() as isize);
        // SAFETY: as for `dealloc` and `alloc`.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const IDLE_BUDGET: isize = 4096;

fn pki(dir: &std::path::Path) -> (TlsFiles, rustls::pki_types::CertificateDer<'static>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    (
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        },
        ca.der().clone(),
    )
}

fn client(
    ca: &rustls::pki_types::CertificateDer<'static>,
    v: &'static rustls::SupportedProtocolVersion,
) -> rustls::ClientConnection {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[v])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap()
}

/// Handshake, a request in, a frame out: the life of a connection before it idles.
fn open(s: &mut TlsConn, c: &mut rustls::ClientConnection, bufs: &mut Buffers) {
    let mut plain = Vec::with_capacity(1 << 16);
    c.writer().write_all(b"GET /echo HTTP/1.1\r\n\r\n").unwrap();
    for _ in 0..10 {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        server(|| s.receive(&mut wire, &mut plain)).unwrap();
        let mut back = Vec::with_capacity(1 << 16);
        server(|| s.write_pending(&mut back)).unwrap();
        let mut r = &back[..];
        while !r.is_empty() {
            c.read_tls(&mut r).unwrap();
            c.process_new_packets().unwrap();
        }
        if !s.is_handshaking() && !c.wants_write() && !plain.is_empty() {
            break;
        }
    }
    assert_eq!(plain, b"GET /echo HTTP/1.1\r\n\r\n");
    let mut wire = Vec::with_capacity(1 << 16);
    server(|| {
        Sealer {
            tls: s,
            sock: &mut wire,
            bufs,
        }
        .write_vectored(&[IoSlice::new(b"\x81\x02hi")])
    })
    .unwrap();
    let mut r = &wire[..];
    while !r.is_empty() {
        c.read_tls(&mut r).unwrap();
        c.process_new_packets().unwrap();
    }
    let mut got = [0u8; 4];
    c.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"\x81\x02hi");
}

#[test]
fn an_idle_tls_connection_holds_under_4_kib() {
    let dir = std::env::temp_dir().join(format!("megasock-tls-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (files, ca) = pki(&dir);
    let tls = megasock::tls::load(&files).unwrap();
    let mut bufs = Buffers::default();
    for v in [&rustls::version::TLS13, &rustls::version::TLS12] {
        const N: usize = 100;
        let mut clients: Vec<_> = (0..N).map(|_| client(&ca, v)).collect();
        let mut servers = Vec::with_capacity(N);
        let before = LIVE.load(Relaxed) + bufs_capacity(&bufs);
        for c in clients.iter_mut() {
            let mut s = server(|| Box::new(TlsConn::new(&tls.config).unwrap()));
            open(&mut s, c, &mut bufs);
            servers.push(s);
        }
        // The worker's shared buffers are not the connections' (they serve them all).
        let held = LIVE.load(Relaxed) - before - bufs_capacity(&bufs);
        let per = held / N as isize;
        eprintln!(
            "{:?}: {per} bytes per idle TLS connection (size_of TlsConn {}, heap {})",
            v.version,
            std::mem::size_of::<TlsConn>(),
            per - std::mem::size_of::<TlsConn>() as isize
        );
        assert!(
            per <= IDLE_BUDGET,
            "{:?}: an idle TLS connection holds {per} bytes (budget {IDLE_BUDGET})",
            v.version
        );
        assert!(servers.iter().all(|s| s.buffered_capacity() == 0));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn bufs_capacity(b: &Buffers) -> isize {
    b.capacity() as isize
}
