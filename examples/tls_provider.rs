//! Which rustls crypto provider megasock uses, measured: ring against aws-lc-rs, in memory (no
//! sockets), in the same process, taking turns, medians of several rounds.
//!
//! - server CPU per full handshake (TLS 1.3 and 1.2, ECDSA P-256 certificate, X25519, no
//!   resumption), counted around the server's calls only;
//! - encryption per record for 64 B, 1 KiB and 16 KiB of plaintext (what a broadcast costs per
//!   connection: one record per corked batch);
//! - heap a server connection (unbuffered API, as megasock uses it) holds once the handshake is
//!   done.
//!
//!   cargo run --release --example tls_provider --features provider-compare [ROUNDS]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use megasock::tls::{Buffers, Sealer, TlsConn};
use rustls::crypto::CryptoProvider;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

struct Setup {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn setup(
    provider: &Arc<CryptoProvider>,
    version: &'static rustls::SupportedProtocolVersion,
    cert: &rcgen::CertifiedKey<rcgen::KeyPair>,
) -> Setup {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = rustls::client::Resumption::disabled();
    Setup {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

/// One full handshake; returns the server side and the time spent in its calls.
fn handshake(s: &Setup) -> (TlsConn, rustls::ClientConnection, Duration) {
    let mut c =
        rustls::ClientConnection::new(s.client.clone(), "localhost".try_into().unwrap()).unwrap();
    let t = Instant::now();
    let mut conn = TlsConn::new(&s.server).unwrap();
    let mut spent = t.elapsed();
    let mut plain = Vec::new();
    for _ in 0..10 {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let t = Instant::now();
        conn.receive(&mut wire, &mut plain).unwrap();
        let mut back = Vec::new();
        conn.write_pending(&mut back).unwrap();
        spent += t.elapsed();
        let mut r = &back[..];
        while !r.is_empty() {
            c.read_tls(&mut r).unwrap();
            c.process_new_packets().unwrap();
        }
        if !conn.is_handshaking() && !c.is_handshaking() && !c.wants_write() {
            break;
        }
    }
    assert!(!conn.is_handshaking());
    (conn, c, spent)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args().nth(1).map_or(5, |a| a.parse().unwrap());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let providers: [(&str, Arc<CryptoProvider>); 2] = [
        ("ring", Arc::new(rustls::crypto::ring::default_provider())),
        (
            "aws-lc-rs",
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        ),
    ];
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    // [provider][version] -> samples
    let mut hs = vec![vec![Vec::new(); 2]; 2];
    let mut enc = vec![vec![vec![Vec::new(); 3]; 2]; 2];
    let mut heap = vec![vec![0isize; 2]; 2];
    const HANDSHAKES: usize = 300;
    const SIZES: [usize; 3] = [64, 1024, 16 * 1024];
    for round in 0..rounds {
        for (p, (_, provider)) in providers.iter().enumerate() {
            for (v, version) in versions.iter().enumerate() {
                let s = setup(provider, version, &cert);
                let mut spent = Duration::ZERO;
                for _ in 0..HANDSHAKES {
                    spent += handshake(&s).2;
                }
                hs[p][v].push(spent.as_nanos() as f64 / HANDSHAKES as f64 / 1000.0);
                let (mut conn, _c, _) = handshake(&s);
                let mut bufs = Buffers::default();
                for (k, size) in SIZES.iter().enumerate() {
                    let msg = vec![7u8; *size];
                    let n = 20_000_000 / (size + 100);
                    let mut sink = std::io::sink();
                    let t = Instant::now();
                    for _ in 0..n {
                        Sealer {
                            tls: &mut conn,
                            sock: &mut sink,
                            bufs: &mut bufs,
                        }
                        .write_all(&msg)
                        .unwrap();
                    }
                    enc[p][v][k].push(t.elapsed().as_nanos() as f64 / n as f64);
                }
                if round == 0 {
                    let mut keep = Vec::new();
                    let mut clients = Vec::new();
                    let before = LIVE.load(Relaxed);
                    for _ in 0..100 {
                        let (conn, c, _) = handshake(&s);
                        keep.push(Box::new(conn));
                        clients.push(c);
                    }
                    drop(clients); // what is left is the servers'
                    heap[p][v] = (LIVE.load(Relaxed) - before) / 100;
                }
            }
        }
    }
    println!("rustls {rounds} rounds, medians; server side only");
    for (p, (name, _)) in providers.iter().enumerate() {
        for (v, version) in versions.iter().enumerate() {
            println!(
                "{name:>9} {:?}: handshake {:6.1} us | encrypt 64 B {:5.0} ns, 1 KiB {:5.0} ns, \
                 16 KiB {:6.0} ns per record | idle connection {} B (boxed TlsConn and heap)",
                version.version,
                median(hs[p][v].clone()),
                median(enc[p][v][0].clone()),
                median(enc[p][v][1].clone()),
                median(enc[p][v][2].clone()),
                heap[p][v],
            );
        }
    }
}
