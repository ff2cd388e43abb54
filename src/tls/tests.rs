//! The TLS transport against an in-memory rustls client: handshakes, data both ways split at
//! every byte, partial writes, close_notify, garbage, and the certificate checks at load.

use std::io::{Read, Write};

use super::*;

struct Certs {
    dir: std::path::PathBuf,
    ca: rustls::pki_types::CertificateDer<'static>,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA and a `localhost` certificate signed by it, valid from `from` to `until` (days from
/// now), written as PEM files into a fresh directory.
fn certs(name: &str, from: i64, until: i64) -> Certs {
    use rcgen::{CertificateParams, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(format!("megasock-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let now = time_now();
    params.not_before = now + rcgen_days(from);
    params.not_after = now + rcgen_days(until);
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    Certs {
        dir,
        ca: ca_cert.der().clone(),
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn rcgen_days(d: i64) -> time::Duration {
    time::Duration::days(d)
}

fn client(ca: &rustls::pki_types::CertificateDer<'static>) -> rustls::ClientConnection {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap()
}

/// Moves everything the client wants to send into the server, `step` bytes at a time, and
/// everything the server queued back; returns the plaintext the server got.
fn pump(c: &mut rustls::ClientConnection, s: &mut TlsConn, step: usize) -> Vec<u8> {
    let mut plain = Vec::new();
    for _ in 0..20 {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        for piece in wire.chunks_mut(step) {
            s.receive(piece, &mut plain).unwrap();
        }
        let mut back = Vec::new();
        s.write_pending(&mut back).unwrap();
        let mut r = &back[..];
        while !r.is_empty() {
            c.read_tls(&mut r).unwrap();
            c.process_new_packets().unwrap();
        }
        if !c.wants_write() && !s.has_output() && !c.is_handshaking() {
            break;
        }
    }
    plain
}

fn files(a: &Certs, b: &Certs) -> TlsFiles {
    TlsFiles {
        cert: a.dir.join("cert.pem"),
        key: b.dir.join("key.pem"),
    }
}

fn server_config(certs: &Certs) -> Arc<ServerConfig> {
    load(&files(certs, certs)).unwrap().config
}

#[test]
fn handshake_and_data_both_ways_at_any_split() {
    let certs = certs("data", -1, 30);
    let config = server_config(&certs);
    for step in [1, 7, 100, 1 << 20] {
        let mut c = client(&certs.ca);
        let mut s = TlsConn::new(&config).unwrap();
        pump(&mut c, &mut s, step);
        assert!(!s.is_handshaking(), "handshake done (step {step})");
        assert_eq!(c.alpn_protocol(), Some(&b"http/1.1"[..]));
        c.writer().write_all(b"GET /echo HTTP/1.1\r\n\r\n").unwrap();
        let got = pump(&mut c, &mut s, step);
        assert_eq!(got, b"GET /echo HTTP/1.1\r\n\r\n");
        assert_eq!(
            s.inbound.capacity(),
            0,
            "no partial record held between records"
        );

        // Server to client, through the sealer, many small frames corked into few records.
        let frames: Vec<Vec<u8>> = (0..100).map(|i| vec![i as u8; 300]).collect();
        let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
        let mut bufs = Buffers::default();
        let mut wire = Vec::new();
        let mut taken = 0;
        while taken < 30_000 {
            let mut sealer = Sealer {
                tls: &mut s,
                sock: &mut wire,
                bufs: &mut bufs,
            };
            let skip = taken / 300;
            let mut sl: Vec<IoSlice<'_>> = slices[skip..].to_vec();
            let off = taken % 300;
            if off > 0 {
                sl[0] = IoSlice::new(&frames[skip][off..]);
            }
            taken += sealer.write_vectored(&sl).unwrap();
        }
        let mut r = &wire[..];
        while !r.is_empty() {
            c.read_tls(&mut r).unwrap();
            c.process_new_packets().unwrap();
        }
        let mut got = Vec::new();
        let _ = c.reader().read_to_end(&mut got);
        assert_eq!(got, frames.concat());
    }
}

/// A socket that takes `budget` bytes, then refuses.
struct Tight {
    out: Vec<u8>,
    budget: usize,
}

impl Write for Tight {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.budget == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = b.len().min(self.budget);
        self.budget -= n;
        self.out.extend_from_slice(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn refused_ciphertext_is_kept_and_written_first_then_freed() {
    let certs = certs("partial", -1, 30);
    let config = server_config(&certs);
    let mut c = client(&certs.ca);
    let mut s = TlsConn::new(&config).unwrap();
    pump(&mut c, &mut s, 1 << 20);
    let mut bufs = Buffers::default();
    let mut sock = Tight {
        out: Vec::new(),
        budget: 10,
    };
    let msg = vec![b'x'; 5000];
    let n = Sealer {
        tls: &mut s,
        sock: &mut sock,
        bufs: &mut bufs,
    }
    .write(&msg)
    .unwrap();
    assert_eq!(n, 5000, "all plaintext taken, the ciphertext tail kept");
    assert!(s.has_output());
    let again = Sealer {
        tls: &mut s,
        sock: &mut sock,
        bufs: &mut bufs,
    }
    .write(b"more");
    assert_eq!(again.unwrap_err().kind(), io::ErrorKind::WouldBlock);
    sock.budget = usize::MAX;
    assert!(s.write_pending(&mut sock).unwrap());
    assert_eq!(
        s.buffered_capacity(),
        0,
        "an idle connection holds no buffer"
    );
    let mut r = &sock.out[..];
    while !r.is_empty() {
        c.read_tls(&mut r).unwrap();
        c.process_new_packets().unwrap();
    }
    let mut got = Vec::new();
    let _ = c.reader().read_to_end(&mut got);
    assert_eq!(got, msg);
}

#[test]
fn close_notify_both_ways() {
    let certs = certs("close", -1, 30);
    let config = server_config(&certs);
    let mut c = client(&certs.ca);
    let mut s = TlsConn::new(&config).unwrap();
    pump(&mut c, &mut s, 1 << 20);
    c.writer().write_all(b"bye").unwrap();
    c.send_close_notify();
    let mut wire = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut wire).unwrap();
    }
    let mut plain = Vec::new();
    let got = s.receive(&mut wire, &mut plain).unwrap();
    assert!(got.peer_closed);
    assert_eq!(plain, b"bye");
    assert!(s.take_peer_eof());
    assert!(!s.take_peer_eof(), "reported once");
    s.queue_close_notify();
    let mut back = Vec::new();
    s.write_pending(&mut back).unwrap();
    let mut r = &back[..];
    while !r.is_empty() {
        c.read_tls(&mut r).unwrap();
        c.process_new_packets().unwrap();
    }
    let mut rest = Vec::new();
    assert_eq!(c.reader().read_to_end(&mut rest).unwrap(), 0, "clean EOF");
}

#[test]
fn garbage_instead_of_a_client_hello_is_an_error() {
    let certs = certs("garbage", -1, 30);
    let config = server_config(&certs);
    let mut s = TlsConn::new(&config).unwrap();
    let mut plain = Vec::new();
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    assert!(s.receive(&mut req, &mut plain).is_err());
    // A record header announcing a huge record is refused, not buffered.
    let mut s = TlsConn::new(&config).unwrap();
    let mut big = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    big.extend_from_slice(&[0u8; 100]);
    assert!(s.receive(&mut big, &mut plain).is_err());
    assert!(plain.is_empty());
}

#[test]
fn expired_not_yet_valid_and_mismatched_are_refused_with_advice() {
    let expired = certs("expired", -30, -1);
    let e = load(&files(&expired, &expired)).err().unwrap();
    assert!(e.0.contains("expired on") && e.0.contains("renew"), "{e}");
    let future = certs("future", 2, 30);
    let e = load(&files(&future, &future)).err().unwrap();
    assert!(e.0.contains("not valid before"), "{e}");
    let a = certs("mismatch-a", -1, 30);
    let b = certs("mismatch-b", -1, 30);
    let e = load(&files(&a, &b)).err().unwrap();
    assert!(e.0.contains("does not belong to the certificate"), "{e}");
    let swap = |cert: &str, key: &str| TlsFiles {
        cert: a.dir.join(cert),
        key: a.dir.join(key),
    };
    let e = load(&swap("key.pem", "key.pem")).err().unwrap();
    assert!(e.0.contains("no `-----BEGIN CERTIFICATE-----`"), "{e}");
    let e = load(&swap("cert.pem", "cert.pem")).err().unwrap();
    assert!(e.0.contains("no private key"), "{e}");
    let e = load(&swap("nope.pem", "key.pem")).err().unwrap();
    assert!(e.0.contains("cannot read --tls-cert"), "{e}");
}

#[test]
fn reload_swaps_the_certificate_for_new_handshakes_only() {
    let first = certs("reload-1", -1, 30);
    let second = certs("reload-2", -1, 30);
    let dir = std::env::temp_dir().join(format!("megasock-tls-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    let install = |c: &Certs| {
        std::fs::copy(c.dir.join("cert.pem"), &f.cert).unwrap();
        std::fs::copy(c.dir.join("key.pem"), &f.key).unwrap();
    };
    install(&first);
    let tls = load(&f).unwrap();
    let mut old_client = client(&first.ca);
    let mut old = TlsConn::new(&tls.config).unwrap();
    pump(&mut old_client, &mut old, 1 << 20);
    install(&second);
    let what = tls.certs.reload().unwrap();
    assert!(what.contains("valid until"), "{what}");
    // A new handshake presents the new certificate (trusted only through the second CA).
    let mut c = client(&second.ca);
    let mut s = TlsConn::new(&tls.config).unwrap();
    pump(&mut c, &mut s, 1 << 20);
    assert!(!s.is_handshaking() && !c.is_handshaking());
    // The connection made before goes on with its keys.
    let mut wire = Vec::new();
    Sealer {
        tls: &mut old,
        sock: &mut wire,
        bufs: &mut Buffers::default(),
    }
    .write_all(b"still here")
    .unwrap();
    let mut r = &wire[..];
    while !r.is_empty() {
        old_client.read_tls(&mut r).unwrap();
        old_client.process_new_packets().unwrap();
    }
    let mut got = Vec::new();
    let _ = old_client.reader().read_to_end(&mut got);
    assert_eq!(got, b"still here");
    // A bad pair is refused and the current certificate stays.
    std::fs::copy(first.dir.join("key.pem"), &f.key).unwrap();
    assert!(tls.certs.reload().is_err());
    let mut c = client(&second.ca);
    let mut s = TlsConn::new(&tls.config).unwrap();
    pump(&mut c, &mut s, 1 << 20);
    assert!(!c.is_handshaking());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn der_times_and_dates() {
    assert_eq!(der_time(0x17, b"700101000000Z"), Some(0));
    assert_eq!(der_time(0x18, b"20380119031407Z"), Some(i32::MAX as i64));
    assert_eq!(der_time(0x17, b"491231235959Z"), Some(2_524_607_999));
    assert_eq!(der_time(0x17, b"7001010000Z"), None);
    assert_eq!(der_time(0x17, b"70010100000aZ"), None);
    assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
    assert_eq!(utc(2_524_607_999), "2049-12-31 23:59:59 UTC");
    for junk in [
        &[][..],
        &[0x30],
        &[0x30, 0x85, 1, 2, 3, 4, 5],
        &[0x30, 0x03, 0x30, 0x01],
    ] {
        assert_eq!(validity(junk), None);
    }
}
