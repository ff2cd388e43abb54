//! TLS for `wss://`: the transport between a socket and a [`Session`](crate::session::Session).
//!
//! The session never sees TLS: it is fed plaintext and queues plaintext frames, as on a plain
//! connection. What sits between is one [`TlsConn`] per connection, a rustls
//! *unbuffered* server connection: rustls keeps the handshake state and the traffic keys, and
//! every buffer is the caller's:
//!
//! - In: ciphertext is read into the worker's scratch buffer and handed to
//!   [`TlsConn::receive`], which decrypts the complete records into the worker's plaintext
//!   buffer (for the session) and writes the handshake's answers into the connection's
//!   outbound queue. Only a trailing partial record is kept by the connection (allocated then,
//!   freed once the record completes), like the session's own stash.
//! - Out: the connection's [`Outbox`](crate::outbox::Outbox) still holds shared, pre-encoded
//!   frames (a room batch is encoded once); [`Sealer`] is the writer the outbox flushes into:
//!   it gathers up to [`CORK`] bytes of frames, encrypts them once for this connection into the
//!   worker's ciphertext buffer, and writes that. Only what the kernel refuses is copied into
//!   the connection's own outbound queue, freed once written.
//!
//! So an idle TLS connection holds rustls's state (keys, a few small vectors) and no record
//! buffer. Encryption is per connection (each has its own keys); encoding is not.
//!
//! [`load`] reads the certificate and key at start and refuses what would fail every client
//! (an expired certificate, a key of another certificate) with a message that says what to do.

use std::io::{self, IoSlice, Write};
use std::path::Path;
use std::sync::Arc;

use std::sync::RwLock;

use rustls::server::{
    ClientHello, ResolvesServerCert, ServerConnectionData, UnbufferedServerConnection,
};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, EncodeTlsData, EncryptError};
use rustls::ServerConfig;

pub use crate::config::TlsFiles;

/// Plaintext encrypted per write: up to four full records, so a backlog of small frames goes
/// out in few records and one syscall (uWebSockets corks 16 KiB the same way).
pub const CORK: usize = 64 * 1024;
/// Largest partial input a connection may hold between reads: a record is at most 16 KiB plus
/// 256 bytes of expansion; a handshake message may span records.
const MAX_INBOUND: usize = 32 * 1024;
/// Room for one record's header, padding and tag (TLS 1.2 AES-GCM needs 29).
const RECORD_OVERHEAD: usize = 32;
const MAX_FRAGMENT: usize = 16 * 1024;

/// A connection's TLS state: rustls's unbuffered connection and the little it cannot hand on
/// at once. Lives boxed in the [`Connection`](crate::connection::Connection), so a plain
/// connection pays one pointer.
pub struct TlsConn {
    conn: UnbufferedServerConnection,
    /// The start of a record that has not arrived whole (empty, unallocated, between records).
    inbound: Vec<u8>,
    /// Ciphertext not yet taken by the kernel, from `sent` on (handshake flights, or the tail
    /// of a write the kernel refused).
    outbound: OutBuf,
    sent: usize,
    flags: u8,
}

mod flag {
    /// The handshake completed: application data may flow.
    pub const OPEN: u8 = 1 << 0;
    /// The peer sent close_notify.
    pub const PEER_CLOSED: u8 = 1 << 1;
    /// The peer's close_notify was reported as EOF.
    pub const EOF_REPORTED: u8 = 1 << 2;
    /// Our close_notify is queued.
    pub const CLOSE_SENT: u8 = 1 << 3;
}

/// What one call to [`TlsConn::receive`] found besides plaintext.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The handshake completed with these bytes.
    pub handshake_done: bool,
    /// The peer sent close_notify: no more data will come.
    pub peer_closed: bool,
}

/// Why a TLS connection cannot go on.
#[derive(Debug)]
pub enum TlsError {
    /// A protocol error, a bad record, a failed handshake (the peer's fault or a mismatch).
    Protocol(rustls::Error),
    /// More than [`MAX_INBOUND`] bytes of an incomplete record or handshake message.
    TooLarge,
    /// Data to encrypt before the handshake completed, or after the connection closed.
    NotOpen,
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Protocol(e) => write!(f, "{e}"),
            TlsError::TooLarge => write!(f, "TLS message over {MAX_INBOUND} bytes"),
            TlsError::NotOpen => write!(f, "TLS connection not open for data"),
        }
    }
}

impl std::error::Error for TlsError {}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError::Protocol(e)
    }
}

impl TlsConn {
    pub fn new(config: &Arc<ServerConfig>) -> Result<TlsConn, TlsError> {
        Ok(TlsConn {
            conn: UnbufferedServerConnection::new(config.clone())?,
            inbound: Vec::new(),
            outbound: OutBuf::default(),
            sent: 0,
            flags: 0,
        })
    }

    /// True until the handshake completed.
    #[inline]
    pub fn is_handshaking(&self) -> bool {
        self.flags & flag::OPEN == 0
    }

    /// Bytes of a partial record held between reads.
    #[inline]
    pub fn inbound_len(&self) -> usize {
        self.inbound.len()
    }

    /// Ciphertext waiting for the kernel.
    #[inline]
    pub fn has_output(&self) -> bool {
        self.sent < self.outbound.len()
    }

    /// Heap bytes held by the connection's own buffers (not rustls's internals).
    pub fn buffered_capacity(&self) -> usize {
        self.inbound.capacity() + self.outbound.capacity()
    }

    /// The peer's close_notify arrived and was not reported as EOF yet: report it now, once.
    pub fn take_peer_eof(&mut self) -> bool {
        if self.flags & (flag::PEER_CLOSED | flag::EOF_REPORTED) == flag::PEER_CLOSED {
            self.flags |= flag::EOF_REPORTED;
            return true;
        }
        false
    }

    /// Takes ciphertext read from the socket (`fresh` is decrypted in place when no partial
    /// record is held, else appended to it). Plaintext is appended to `plain`; the handshake's
    /// answers are queued for [`TlsConn::write_pending`].
    pub fn receive(&mut self, fresh: &mut [u8], plain: &mut Vec<u8>) -> Result<Received, TlsError> {
        let mut got = Received::default();
        if self.flags & flag::PEER_CLOSED != 0 {
            return Ok(got); // nothing after close_notify counts
        }
        if self.inbound.is_empty() {
            let used = self.process(fresh, plain, &mut got)?;
            self.keep(&fresh[used..])?;
        } else {
            let mut held = std::mem::take(&mut self.inbound);
            held.extend_from_slice(fresh);
            let used = self.process(&mut held, plain, &mut got)?;
            held.drain(..used);
            if held.is_empty() {
                held = Vec::new();
            }
            self.inbound = held;
            self.keep(&[])?;
        }
        Ok(got)
    }

    /// Keeps an incomplete record for the next read, within [`MAX_INBOUND`].
    fn keep(&mut self, rest: &[u8]) -> Result<(), TlsError> {
        if self.flags & flag::PEER_CLOSED != 0 {
            self.inbound = Vec::new();
            return Ok(());
        }
        if self.inbound.len() + rest.len() > MAX_INBOUND {
            return Err(TlsError::TooLarge);
        }
        self.inbound.extend_from_slice(rest);
        Ok(())
    }

    /// Runs rustls over `data` until it needs more input; returns the bytes it used.
    fn process(
        &mut self,
        data: &mut [u8],
        plain: &mut Vec<u8>,
        got: &mut Received,
    ) -> Result<usize, TlsError> {
        let mut at = 0;
        loop {
            let status = self.conn.process_tls_records(&mut data[at..]);
            let mut discard = status.discard;
            let stop = match status.state? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    false
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode(&mut e, &mut self.outbound);
                    false
                }
                // What was encoded waits in `outbound`; it is written before anything else.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    false
                }
                ConnectionState::BlockedHandshake => true,
                ConnectionState::WriteTraffic(_) => {
                    if self.flags & flag::OPEN == 0 {
                        self.flags |= flag::OPEN;
                        got.handshake_done = true;
                    }
                    true
                }
                ConnectionState::PeerClosed => {
                    self.flags |= flag::PEER_CLOSED;
                    got.peer_closed = true;
                    false
                }
                // Closed, or early data (not enabled: max_early_data_size is 0).
                _ => true,
            };
            at += discard;
            if stop {
                return Ok(at);
            }
        }
    }

    /// Encrypts `data` for this connection, appending the records to `out`.
    pub fn encrypt(&mut self, data: &[u8], out: &mut OutBuf) -> Result<(), TlsError> {
        self.with_traffic(out, |w, out| {
            let records = data.len() / MAX_FRAGMENT + 1;
            let n = match w.encrypt(data, out.room(data.len() + records * RECORD_OVERHEAD)) {
                Ok(n) => n,
                Err(EncryptError::InsufficientSize(s)) => w
                    .encrypt(data, out.room(s.required_size))
                    .map_err(|_| TlsError::NotOpen)?,
                Err(_) => return Err(TlsError::NotOpen), // keys exhausted: close
            };
            out.advance(n);
            Ok(())
        })
    }

    /// Queues close_notify (once), to go before FIN.
    pub fn queue_close_notify(&mut self) {
        if self.flags & (flag::CLOSE_SENT | flag::OPEN) != flag::OPEN {
            return;
        }
        self.flags |= flag::CLOSE_SENT;
        let mut out = std::mem::take(&mut self.outbound);
        let _ = self.with_traffic(&mut out, |w, out| {
            let n = w.queue_close_notify(out.room(64)).unwrap_or(0);
            out.advance(n);
            Ok(())
        });
        self.outbound = out;
    }

    /// Brings rustls to its "write traffic" state (emitting anything it has to send first,
    /// such as session tickets, into `out`, in order) and runs `f` there.
    fn with_traffic(
        &mut self,
        out: &mut OutBuf,
        f: impl FnOnce(
            &mut rustls::unbuffered::WriteTraffic<'_, ServerConnectionData>,
            &mut OutBuf,
        ) -> Result<(), TlsError>,
    ) -> Result<(), TlsError> {
        if self.is_handshaking() {
            return Err(TlsError::NotOpen);
        }
        // A few rounds at most (tickets, a key update); bounded so no state can spin here.
        for _ in 0..16 {
            let status = self.conn.process_tls_records(&mut []);
            match status.state? {
                ConnectionState::WriteTraffic(mut w) => return f(&mut w, out),
                ConnectionState::EncodeTlsData(mut e) => encode(&mut e, out),
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::PeerClosed => self.flags |= flag::PEER_CLOSED,
                // Plaintext is always drained by `receive`; anything else means closed.
                _ => return Err(TlsError::NotOpen),
            }
        }
        Err(TlsError::NotOpen)
    }

    /// Writes queued ciphertext; true once none is left (its buffer is then freed).
    pub fn write_pending<W: Write>(&mut self, w: &mut W) -> io::Result<bool> {
        while self.sent < self.outbound.len() {
            match w.write(&self.outbound.filled()[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.outbound.release();
        self.sent = 0;
        Ok(true)
    }

    /// Keeps ciphertext the kernel refused, to be written first next time.
    fn stash(&mut self, rest: &[u8]) {
        debug_assert!(!self.has_output());
        self.outbound.clear();
        self.sent = 0;
        self.outbound.extend_from_slice(rest);
    }
}

/// Encodes one handshake record into `out` (rustls says how much room it needs).
fn encode(e: &mut EncodeTlsData<'_, ServerConnectionData>, out: &mut OutBuf) {
    let mut need = 2048;
    loop {
        match e.encode(out.room(need)) {
            Ok(n) => return out.advance(n),
            Err(EncodeError::InsufficientSize(s)) if s.required_size > need => {
                need = s.required_size
            }
            Err(_) => return,
        }
    }
}

/// Bytes written at the front of a buffer that is reused: its length only grows (so it is
/// zeroed once when it grows, not for every record), `used` says how much is filled.
#[derive(Default)]
pub struct OutBuf {
    buf: Vec<u8>,
    used: usize,
}

impl OutBuf {
    /// At least `n` writable bytes after what is filled.
    fn room(&mut self, n: usize) -> &mut [u8] {
        if self.buf.len() < self.used + n {
            self.buf.resize(self.used + n, 0);
        }
        &mut self.buf[self.used..]
    }

    fn advance(&mut self, n: usize) {
        self.used = (self.used + n).min(self.buf.len());
    }

    fn extend_from_slice(&mut self, data: &[u8]) {
        self.room(data.len())[..data.len()].copy_from_slice(data);
        self.advance(data.len());
    }

    /// What is filled.
    pub fn filled(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    pub fn len(&self) -> usize {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    pub fn clear(&mut self) {
        self.used = 0;
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Empties it and frees its storage.
    fn release(&mut self) {
        if self.buf.capacity() > 0 {
            self.buf = Vec::new();
        }
        self.used = 0;
    }
}

/// A worker's buffers for TLS, shared by all its connections (allocated on first use).
#[derive(Default)]
pub struct Buffers {
    /// Plaintext decrypted from one read, before it goes to the session.
    pub plain: Vec<u8>,
    /// Frames gathered for one encryption.
    cork: Vec<u8>,
    /// Ciphertext of one write.
    out: OutBuf,
}

impl Buffers {
    /// Bytes allocated.
    pub fn capacity(&self) -> usize {
        self.plain.capacity() + self.cork.capacity() + self.out.capacity()
    }
}

/// The writer an [`Outbox`](crate::outbox::Outbox) flushes a TLS connection into: each call
/// encrypts up to [`CORK`] bytes of the frames it is given into one buffer and writes it;
/// what the kernel refuses is kept by the connection, and until that is written every call
/// answers `WouldBlock`. The count returned is plaintext taken, so the outbox's accounting
/// (queued bytes, messages handed on) is the same as on a plain connection.
pub struct Sealer<'a, S> {
    pub tls: &'a mut TlsConn,
    pub sock: S,
    pub bufs: &'a mut Buffers,
}

impl<S: Write> Write for Sealer<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        if !self.tls.write_pending(&mut self.sock)? || self.tls.is_handshaking() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let Buffers { cork, out, .. } = &mut *self.bufs;
        let first = slices.first().map_or(&[][..], |s| &s[..]);
        // One slice (or a big first one) is encrypted where it is; small ones are gathered.
        let plain: &[u8] = if slices.len() == 1 || first.len() >= CORK {
            &first[..first.len().min(CORK)]
        } else {
            cork.clear();
            for s in slices {
                let room = CORK - cork.len();
                if room == 0 {
                    break;
                }
                cork.extend_from_slice(&s[..s.len().min(room)]);
            }
            cork
        };
        if plain.is_empty() {
            return Ok(0);
        }
        out.clear();
        self.tls
            .encrypt(plain, out)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let out_len = out.len();
        let mut written = 0;
        while written < out_len {
            match self.sock.write(&out.filled()[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if written < out_len {
            self.tls.stash(&out.filled()[written..]);
        }
        if out.capacity() > 2 * (CORK + 4 * RECORD_OVERHEAD) {
            out.release(); // a big single frame went through; keep the usual size only
        }
        Ok(plain.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---- configuration ---------------------------------------------------------------------------

/// The listening addresses that serve wss://, and their configuration.
pub struct Listeners {
    pub config: Arc<ServerConfig>,
    /// What SIGHUP reloads.
    pub certs: Arc<Certificates>,
    /// Bound addresses (port 0 resolved).
    pub addrs: Vec<std::net::SocketAddr>,
}

impl Listeners {
    /// The configuration for connections accepted on `addr`, if it serves TLS.
    pub fn config_for(&self, addr: std::net::SocketAddr) -> Option<Arc<ServerConfig>> {
        self.addrs.contains(&addr).then(|| self.config.clone())
    }
}

/// Whether a socket inherited through `--takeover` (bound at `bound`) is one of the TLS
/// addresses asked for: the same address, or the same IP where port 0 was asked for.
pub fn is_tls_addr(asked: &[std::net::SocketAddr], bound: std::net::SocketAddr) -> bool {
    asked
        .iter()
        .any(|a| *a == bound || (a.port() == 0 && a.ip() == bound.ip()))
}

/// A certificate or key that cannot serve: what is wrong and what to do, naming the file.
#[derive(Debug)]
pub struct LoadError(pub String);

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LoadError {}

/// The server's TLS configuration and the certificate it presents, which SIGHUP can replace.
pub struct Tls {
    pub config: Arc<ServerConfig>,
    pub certs: Arc<Certificates>,
}

/// The certificate and key in use. New handshakes take the current one; connections already
/// established keep the keys they negotiated, so a swap touches none of them.
#[derive(Debug)]
pub struct Certificates {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificates {
    /// Reads the files again; on success new handshakes present the new certificate. On error
    /// the previous one stays in use. Returns a description of what is served now.
    pub fn reload(&self) -> Result<String, LoadError> {
        let (key, what) = read_certified(&self.files, unix_now())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(what)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// Reads `--tls-cert` and `--tls-key` and builds the server configuration: TLS 1.3 and 1.2,
/// ALPN `http/1.1`, stateless session tickets (resumption without per-session memory).
/// Refuses an unreadable file, a certificate that is expired or not yet valid, and a key that
/// does not belong to the certificate, saying what to do.
pub fn load(files: &TlsFiles) -> Result<Tls, LoadError> {
    let (key, _) = read_certified(files, unix_now())?;
    let certs = Arc::new(Certificates {
        files: files.clone(),
        current: RwLock::new(Arc::new(key)),
    });
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| LoadError(format!("TLS setup: {e}")))?
        .with_no_client_auth();
    let mut config = builder.with_cert_resolver(certs.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Resumption through tickets the server does not store (a fresh key per process).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    if let Ok(t) = rustls::crypto::aws_lc_rs::Ticketer::new() {
        config.ticketer = t;
    }
    config.send_tls13_tickets = 1;
    Ok(Tls {
        config: Arc::new(config),
        certs,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads and checks the certificate chain and key; returns them and a one-line description.
fn read_certified(files: &TlsFiles, now: i64) -> Result<(CertifiedKey, String), LoadError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert_path, key_path) = (files.cert.as_path(), files.key.as_path());
    let read = |what: &str, p: &Path| {
        std::fs::read(p).map_err(|e| {
            LoadError(format!(
                "cannot read --{what} {}: {e} (check the path, and that megasock's user may read it)",
                p.display()
            ))
        })
    };
    let cert_pem = read("tls-cert", cert_path)?;
    let key_pem = read("tls-key", key_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            LoadError(format!(
                "--tls-cert {}: not a PEM certificate file ({e}); it should hold \
                 `-----BEGIN CERTIFICATE-----` blocks, the server's certificate first",
                cert_path.display()
            ))
        })?;
    let Some(leaf) = chain.first() else {
        return Err(LoadError(format!(
            "--tls-cert {}: no `-----BEGIN CERTIFICATE-----` block in it (is it the key? \
             --tls-cert takes the certificate chain, --tls-key the private key)",
            cert_path.display()
        )));
    };
    let until = match validity(leaf) {
        Some((from, _)) if now < from => {
            return Err(LoadError(format!(
                "--tls-cert {}: the certificate is not valid before {} (check the clock, or \
                 use a certificate valid now)",
                cert_path.display(),
                utc(from)
            )))
        }
        Some((_, until)) if now > until => {
            return Err(LoadError(format!(
                "--tls-cert {}: the certificate expired on {}; renew it (e.g. `certbot renew`), \
                 then start megasock again or send SIGHUP to a running one",
                cert_path.display(),
                utc(until)
            )))
        }
        Some((_, until)) => until,
        None => {
            return Err(LoadError(format!(
                "--tls-cert {}: the first certificate cannot be parsed as X.509",
                cert_path.display()
            )))
        }
    };
    if until - now < 14 * 86_400 {
        log::warn!(
            "--tls-cert {}: the certificate expires on {}; renew it soon and send SIGHUP",
            cert_path.display(),
            utc(until)
        );
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        LoadError(format!(
            "--tls-key {}: no private key in it ({e}); it should hold a \
             `-----BEGIN PRIVATE KEY-----` (or RSA/EC PRIVATE KEY) block",
            key_path.display()
        ))
    })?;
    let n = chain.len();
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        LoadError(match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the key in --tls-key {} does not belong to the certificate in --tls-cert {} \
                 (pair each certificate with the key it was issued for)",
                key_path.display(),
                cert_path.display()
            ),
            e => format!(
                "--tls-key {}: {e} (supported keys: RSA, ECDSA P-256/P-384, Ed25519)",
                key_path.display()
            ),
        })
    })?;
    let what = format!(
        "{} ({n} certificate{}, valid until {})",
        cert_path.display(),
        if n == 1 { "" } else { "s" },
        utc(until)
    );
    Ok((certified, what))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// One DER element at the start of `d`: its tag, its contents, and what follows.
fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, d) = d.split_first()?;
    let (&first, mut d) = d.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || d.len() < n {
            return None;
        }
        let len = d[..n].iter().fold(0usize, |l, &b| (l << 8) | b as usize);
        d = &d[n..];
        len
    };
    (d.len() >= len).then(|| (tag, &d[..len], &d[len..]))
}

/// The certificate's validity (notBefore, notAfter) in Unix seconds.
fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    let (0x30, cert, _) = tlv(cert)? else {
        return None;
    };
    let (0x30, tbs, _) = tlv(cert)? else {
        return None;
    };
    // version [0] (optional), serial, signature algorithm, issuer, validity
    let (tag, _, mut rest) = tlv(tbs)?;
    if tag == 0xa0 {
        rest = tlv(rest)?.2; // the serial
    }
    rest = tlv(rest)?.2; // signature algorithm
    rest = tlv(rest)?.2; // issuer
    let (0x30, validity, _) = tlv(rest)? else {
        return None;
    };
    let (t1, from, rest) = tlv(validity)?;
    let (t2, until, _) = tlv(rest)?;
    Some((der_time(t1, from)?, der_time(t2, until)?))
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ) in Unix seconds.
fn der_time(tag: u8, s: &[u8]) -> Option<i64> {
    let s = s.strip_suffix(b"Z")?;
    if !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| {
        s.get(r)
            .map(|d| d.iter().fold(0i64, |n, &c| n * 10 + (c - b'0') as i64))
    };
    let (year, rest) = match (tag, s.len()) {
        (0x17, 12) => {
            let yy = num(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (0x18, 14) => (num(0..4)?, 4),
        _ => return None,
    };
    let (mo, d) = (num(rest..rest + 2)?, num(rest + 2..rest + 4)?);
    let (h, mi, sec) = (
        num(rest + 4..rest + 6)?,
        num(rest + 6..rest + 8)?,
        num(rest + 8..rest + 10)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    Some(days_from_civil(year, mo, d) * 86_400 + h * 3600 + mi * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD HH:MM:SS UTC` for messages.
fn utc(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests;
