//! TLS on the listener (`--tls-cert` / `--tls-key`), with rustls: loading and checking the
//! certificate and key, swapping them on SIGHUP, and the per-connection session that sits
//! between the socket and the protocol code.
//!
//! What this module owns:
//! - [`Acceptor`]: the current `rustls::ServerConfig`, read once per accepted connection and
//!   replaced whole by [`Acceptor::reload`]; connections keep the configuration they started
//!   with, so a reload drops nothing.
//! - [`Session`]: one connection's TLS state. Input: raw bytes from the socket in, plaintext
//!   out ([`Session::absorb`], [`Session::plaintext`]). Output: frames of the connection's
//!   [`Outbox`] are encrypted many at a time (one `write_vectored` into rustls, which packs
//!   them into records of up to 16 KiB) and the records leave with one vectored `sendmsg`
//!   ([`Session::flush`]), so the flusher's batching survives encryption.
//! - [`kernel_tls`]: whether this kernel offers kTLS (the `tls` upper-layer protocol). The
//!   session keys are not handed to the kernel: see the README's TLS section for why and for
//!   what this kernel offers; encryption happens here, per connection, in user space.
//!
//! Certificates are checked at start: a key that does not belong to the certificate, a
//! certificate that has expired or is not valid yet, or a file with no PEM block of the right
//! kind stops the start with a message naming the file. The same checks guard a reload, which
//! keeps the old certificate when the new one fails them.

use std::io::{self, Read, Write};
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use super::{Flush, Outbox};

/// Most frames handed to rustls in one `write_vectored`.
const MAX_FRAMES_PER_WRITE: usize = 256;

/// Encrypted bytes a session may hold unsent (rustls' buffer limit). The connection's own
/// outbox holds the rest, where the slow-consumer limit counts it.
const TLS_BUFFER: usize = 64 << 10;

/// Why a certificate and key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM certificate (expected a `-----BEGIN CERTIFICATE-----` block)")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (expected PKCS#8, PKCS#1 or SEC1: `-----BEGIN PRIVATE KEY-----` …)")]
    NoKey { path: PathBuf },
    #[error("{path} is not valid PEM: {message}")]
    BadPem { path: PathBuf, message: String },
    #[error("the certificate in {path} cannot be parsed: {message}")]
    BadCertificate { path: PathBuf, message: String },
    #[error("the certificate in {path} expired on {not_after} (now {now}): renew it")]
    Expired { path: PathBuf, not_after: String, now: String },
    #[error("the certificate in {path} is not valid before {not_before} (now {now}): check the clock")]
    NotYetValid { path: PathBuf, not_before: String, now: String },
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot use the certificate in {cert} with the key in {key}: {message}")]
    Rejected { cert: PathBuf, key: PathBuf, message: String },
}

/// What was loaded, for the log line and the status page.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub subject: String,
    pub not_after: String,
    /// Certificates in the chain (leaf first).
    pub chain: usize,
}

/// The listener's TLS configuration, shared by every shard and replaced on reload.
#[derive(Debug)]
pub struct Acceptor {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<ServerConfig>, CertInfo)>,
}

impl Acceptor {
    /// Loads and checks `cert` (a PEM chain, leaf first) and `key`.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let loaded = load_config(cert, key)?;
        Ok(Self { cert: cert.to_owned(), key: key.to_owned(), current: RwLock::new(loaded) })
    }

    /// The configuration for a new connection.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// What is being served now.
    pub fn info(&self) -> CertInfo {
        self.current.read().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// Reads the files again; on success new connections use them, on failure the old ones
    /// stay. Open connections are not touched either way.
    pub fn reload(&self) -> Result<CertInfo, TlsError> {
        let loaded = load_config(&self.cert, &self.key)?;
        let info = loaded.1.clone();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(info)
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

/// Parses, checks and builds a server configuration.
fn load_config(cert_path: &Path, key_path: &Path) -> Result<(Arc<ServerConfig>, CertInfo), TlsError> {
    let cert_pem = read_file(cert_path)?;
    let key_pem = read_file(key_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem { path: cert_path.to_owned(), message: e.to_string() })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate { path: cert_path.to_owned() });
    };
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => return Err(TlsError::NoKey { path: key_path.to_owned() }),
        Err(e) => return Err(TlsError::BadPem { path: key_path.to_owned(), message: e.to_string() }),
    };
    let info = check_validity(cert_path, leaf, std::time::SystemTime::now())?;
    let info = CertInfo { chain: chain.len(), ..info };
    let provider = Arc::new(crypto_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                TlsError::KeyMismatch { cert: cert_path.to_owned(), key: key_path.to_owned() }
            }
            e => TlsError::Rejected { cert: cert_path.to_owned(), key: key_path.to_owned(), message: e.to_string() },
        })?;
    // HTTP/1.1 only: WebSocket upgrades and SSE are HTTP/1.1 here.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    Ok((Arc::new(config), info))
}

/// The crypto corecast's TLS uses: rustls' *ring* provider with AES-128-GCM and X25519 first
/// (why, below). Public so that tests and tools build clients that negotiate what browsers do.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    // ring has no post-quantum key exchange (rustls deprecates its provider for that reason):
    // clients offering X25519MLKEM768 fall back to X25519. aws-lc-rs has it, at the price of a
    // C build (cmake, NASM) in every build; see the README's dependency notes.
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first, and the server's order over the client's: it is as strong as needed,
    // its key schedule uses SHA-256 (SHA-NI on this kind of CPU; ring's SHA-384 has no
    // hardware path and was 6.5 % of a handshake's profile), and it encrypts fan-out faster
    // than AES-256. Clients that offer only other suites still get one of them.
    provider.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 1,
        _ => 2,
    });
    // X25519 first: ring 0.17's provider lists P-384 first, and a client that sends its key
    // share for the first group it knows (rustls does) then costs the server a P-384
    // exchange — ring's generic `bn_mul_mont`, 63 % of the server's profile in a TLS connect
    // storm. Browsers offer X25519 first anyway.
    provider.kx_groups.sort_by_key(|g| match g.name() {
        rustls::NamedGroup::X25519 => 0,
        rustls::NamedGroup::secp256r1 => 1,
        _ => 2,
    });
    provider
}

/// Checks the leaf certificate's validity period against `now`.
fn check_validity(path: &Path, leaf: &CertificateDer<'_>, now: std::time::SystemTime) -> Result<CertInfo, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| TlsError::BadCertificate { path: path.to_owned(), message: e.to_string() })?;
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let now_asn1 = x509_parser::time::ASN1Time::from_timestamp(secs)
        .map_err(|e| TlsError::BadCertificate { path: path.to_owned(), message: e.to_string() })?;
    let validity = cert.validity();
    if now_asn1 > validity.not_after {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            not_after: validity.not_after.to_string(),
            now: now_asn1.to_string(),
        });
    }
    if now_asn1 < validity.not_before {
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            not_before: validity.not_before.to_string(),
            now: now_asn1.to_string(),
        });
    }
    Ok(CertInfo { subject: cert.subject().to_string(), not_after: validity.not_after.to_string(), chain: 1 })
}

/// Whether this kernel offers kTLS: a connected TCP socket accepts the `tls` upper-layer
/// protocol. `ENOENT` means the kernel was built without `CONFIG_TLS` (or the module is not
/// loaded).
pub fn kernel_tls() -> bool {
    let probe = || -> io::Result<bool> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let client = std::net::TcpStream::connect(listener.local_addr()?)?;
        let _server = listener.accept()?;
        let name = b"tls";
        // SAFETY: setsockopt with a valid fd and a buffer of the given length.
        let r = unsafe {
            libc::setsockopt(
                std::os::unix::io::AsRawFd::as_raw_fd(&client),
                libc::IPPROTO_TCP,
                libc::TCP_ULP,
                name.as_ptr().cast(),
                name.len() as libc::socklen_t,
            )
        };
        Ok(r == 0)
    };
    probe().unwrap_or(false)
}

/// What [`Session::absorb`] found at the start of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// TLS (or not enough bytes to tell yet).
    Tls,
    /// The client spoke plain HTTP to the TLS port.
    PlainHttp,
}

/// One connection's TLS state.
pub struct Session {
    conn: rustls::ServerConnection,
    /// Raw bytes read from the socket and not yet given to rustls (it takes them as its
    /// plaintext buffer drains).
    raw: Vec<u8>,
    /// Nothing has been received yet.
    fresh: bool,
    /// The peer sent `close_notify`.
    peer_closed: bool,
    /// This side queued its `close_notify`.
    sent_close: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("handshaking", &self.conn.is_handshaking()).finish_non_exhaustive()
    }
}

/// A fatal TLS error on one connection (the peer's fault: bad handshake, bad record).
#[derive(Debug, thiserror::Error)]
#[error("tls: {0}")]
pub struct SessionError(pub rustls::Error);

impl Session {
    /// A session for a new connection.
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, SessionError> {
        let mut conn = rustls::ServerConnection::new(config).map_err(SessionError)?;
        conn.set_buffer_limit(Some(TLS_BUFFER));
        Ok(Self { conn, raw: Vec::new(), fresh: true, peer_closed: false, sent_close: false })
    }

    /// Takes bytes read from the socket. The first byte of a TLS connection is a handshake
    /// record (22); anything else is a client that did not speak TLS.
    pub fn absorb(&mut self, data: &[u8]) -> Opening {
        if self.fresh && !data.is_empty() {
            self.fresh = false;
            if data[0] != 22 {
                return Opening::PlainHttp;
            }
        }
        self.raw.extend_from_slice(data);
        Opening::Tls
    }

    /// Decrypts what was absorbed into `out`; returns the plaintext length. Handshake
    /// messages it produces wait in the session: call [`Session::wants_write`] and flush.
    pub fn plaintext(&mut self, out: &mut [u8]) -> Result<usize, SessionError> {
        let mut filled = 0;
        loop {
            match self.conn.reader().read(&mut out[filled..]) {
                Ok(0) if filled < out.len() => self.peer_closed = true,
                Ok(n) => filled += n,
                Err(_) => {}
            }
            if filled == out.len() || self.raw.is_empty() || self.peer_closed {
                break;
            }
            let mut rd: &[u8] = &self.raw;
            match self.conn.read_tls(&mut rd) {
                Ok(n) => {
                    self.raw.drain(..n);
                }
                // "received plaintext buffer full": drained above, so only when `out` is full.
                Err(_) => break,
            }
            if let Err(e) = self.conn.process_new_packets() {
                return Err(SessionError(e));
            }
        }
        if self.raw.is_empty() && self.raw.capacity() > 0 {
            self.raw = Vec::new();
        }
        Ok(filled)
    }

    /// Whether decrypted input is still waiting (more than `out` could take).
    pub fn has_input(&mut self) -> bool {
        !self.raw.is_empty() || std::io::BufRead::fill_buf(&mut self.conn.reader()).is_ok_and(|b| !b.is_empty())
    }

    /// The peer sent `close_notify`: no more input will come.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Whether encrypted bytes are waiting to be written.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// The handshake is over: frames can be encrypted.
    pub fn established(&self) -> bool {
        !self.conn.is_handshaking()
    }

    /// Queues the `close_notify` alert (after what is already encrypted), once.
    pub fn close_notify(&mut self) {
        if !self.sent_close {
            self.sent_close = true;
            self.conn.send_close_notify();
        }
    }

    /// Whether [`Session::close_notify`] was called.
    pub fn closed(&self) -> bool {
        self.sent_close
    }

    /// Encrypts as many queued frames as rustls' buffer takes.
    fn encrypt(&mut self, outbox: &mut Outbox) -> io::Result<usize> {
        let mut slices: [io::IoSlice<'_>; MAX_FRAMES_PER_WRITE] = [io::IoSlice::new(&[]); MAX_FRAMES_PER_WRITE];
        let mut n = 0;
        for s in outbox.pending(MAX_FRAMES_PER_WRITE) {
            slices[n] = io::IoSlice::new(s);
            n += 1;
        }
        let wrote = self.conn.writer().write_vectored(&slices[..n])?;
        outbox.advance(wrote);
        Ok(wrote)
    }

    /// Encrypts and writes what is queued, with `sendmsg(MSG_DONTWAIT)`; the TLS counterpart
    /// of [`Outbox::flush`]. Before the handshake ends only handshake messages leave.
    pub fn flush(&mut self, outbox: &mut Outbox, fd: RawFd) -> io::Result<Flush> {
        let mut w = FdWriter { fd, sends: 0 };
        let r = self.pump(outbox, &mut w);
        outbox.count_sends(w.sends);
        match r {
            Ok(()) => Ok(Flush::Drained),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Flush::Blocked),
            Err(e) => Err(e),
        }
    }

    /// Encrypts frames until rustls' buffer is full or the outbox empty, writes the records
    /// (many per `sendmsg`), and again, until both are empty or `w` blocks.
    fn pump(&mut self, outbox: &mut Outbox, w: &mut dyn Write) -> io::Result<()> {
        loop {
            if self.established() {
                while !outbox.is_empty() {
                    if self.encrypt(outbox)? == 0 {
                        break;
                    }
                }
            }
            while self.conn.wants_write() {
                match self.conn.write_tls(w) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if outbox.is_empty() || !self.established() {
                return Ok(());
            }
        }
    }
}

/// Writes to a socket without blocking; counts the `sendmsg` calls.
struct FdWriter {
    fd: RawFd,
    sends: u64,
}

impl Write for FdWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: `msghdr` is plain data; zeroed is a valid empty header.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        // `IoSlice` is ABI-compatible with `iovec` on Unix.
        mh.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        mh.msg_iovlen = bufs.len() as _;
        // SAFETY: the iovecs point into buffers alive for the call.
        let r = unsafe { libc::sendmsg(self.fd, &mh, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.sends += 1;
        Ok(r as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
