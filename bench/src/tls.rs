//! wss:// for the load generator: a rustls client under the same non-blocking engine. The
//! engine reads and writes plaintext through [`Sock`]; for a TLS connection that means
//! rustls's buffered client, whose ciphertext goes to the socket as soon as it can.
//!
//! The server's certificate is checked against `--ca FILE` (a test CA), or not at all with
//! `--insecure` (the handshake and the encryption cost the same either way).

use std::io::{self, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

/// A connection's socket: plain, or TLS over it.
pub enum Sock {
    Plain(TcpStream),
    Tls(Box<TlsSock>),
}

pub struct TlsSock {
    tcp: TcpStream,
    conn: ClientConnection,
}

impl Sock {
    pub fn new(tcp: TcpStream, tls: Option<&Arc<ClientConfig>>, host: &str) -> io::Result<Sock> {
        let Some(config) = tls else {
            return Ok(Sock::Plain(tcp));
        };
        let name = server_name(host)?;
        let conn = ClientConnection::new(config.clone(), name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Sock::Tls(Box::new(TlsSock { tcp, conn })))
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Sock::Plain(s) => s,
            Sock::Tls(t) => &t.tcp,
        }
    }

    /// Writes ciphertext rustls holds (TLS only); call on writable readiness.
    pub fn flush_tls(&mut self) -> io::Result<()> {
        match self {
            Sock::Plain(_) => Ok(()),
            Sock::Tls(t) => t.flush_tls(),
        }
    }
}

impl TlsSock {
    fn flush_tls(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = match self {
            Sock::Plain(s) => return s.read(buf),
            Sock::Tls(t) => t,
        };
        loop {
            match t.conn.reader().read(buf) {
                Ok(n) => return Ok(n), // 0: close_notify
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            match t.conn.read_tls(&mut t.tcp) {
                Ok(0) => {} // TCP EOF: the reader says what is left, then EOF
                Ok(_) => {
                    t.conn
                        .process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    t.flush_tls()?; // handshake answers, alerts
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = match self {
            Sock::Plain(s) => return s.write(buf),
            Sock::Tls(t) => t,
        };
        t.flush_tls()?;
        if t.conn.wants_write() && !t.conn.is_handshaking() {
            return Err(io::ErrorKind::WouldBlock.into()); // the kernel has not taken the last
        }
        let n = t.conn.writer().write(buf)?;
        t.flush_tls()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_tls()
    }
}

/// `HOST[:PORT]` (or `[V6]:PORT`) to the name the certificate must carry.
fn server_name(authority: &str) -> io::Result<ServerName<'static>> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))
}

/// The client configuration for wss:// targets: trusting `ca` (PEM), or nothing checked.
pub fn client_config(ca: Option<&str>, insecure: bool) -> Result<Arc<ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = match (ca, insecure) {
        (_, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth(),
        (Some(path), false) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(path).map_err(|e| format!("--ca {path}: {e}"))?
            {
                let cert = cert.map_err(|e| format!("--ca {path}: {e}"))?;
                roots.add(cert).map_err(|e| format!("--ca {path}: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("--ca {path}: no certificate in it"));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, false) => {
            return Err(
                "wss:// needs --ca FILE (the CA that signed the server's certificate) or \
                 --insecure (no check)"
                    .into(),
            )
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any certificate (`--insecure`); signatures are still checked for form.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
