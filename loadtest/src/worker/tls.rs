//! TLS for the worker's raw non-blocking sockets (`--tls`): a rustls client session per
//! connection, driven by the same edge-triggered epoll loop as plain sockets. Every connection
//! makes a full handshake (no session resumption), as a crowd of new browsers would; the
//! handshake is part of its connect time.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConnection;

use crate::sys;

/// A client configuration trusting exactly the certificates in `ca` (PEM).
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots.add(c.map_err(|e| format!("{}: {e}", ca.display()))?).map_err(|e| e.to_string())?;
    }
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    // Like a browser: X25519 first (ring's list starts with P-384).
    provider.kx_groups.sort_by_key(|g| if g.name() == rustls::NamedGroup::X25519 { 0 } else { 1 });
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// A new session to `ip`.
pub fn session(config: &Arc<rustls::ClientConfig>, ip: std::net::Ipv4Addr) -> io::Result<Box<ClientConnection>> {
    let name = ServerName::IpAddress(std::net::IpAddr::V4(ip).into());
    let mut c = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
    // Plaintext written before the handshake ends waits here, unbounded (our own requests).
    c.set_buffer_limit(None);
    Ok(Box::new(c))
}

struct FdIo(RawFd);

impl Read for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::recv(self.0, buf)
    }
}

impl Write for FdIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send(self.0, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes pending records; `Ok(false)` when the socket is full (wait for EPOLLOUT).
pub fn flush(t: &mut ClientConnection, fd: RawFd) -> io::Result<bool> {
    while t.wants_write() {
        match t.write_tls(&mut FdIo(fd)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Encrypts `data` and writes what the socket takes; `Ok(false)`: the rest waits for EPOLLOUT.
pub fn send(t: &mut ClientConnection, fd: RawFd, data: &[u8]) -> io::Result<bool> {
    t.writer().write_all(data)?;
    flush(t, fd)
}

/// Like `recv`: plaintext into `buf`, `Ok(0)` at the end of the stream, `WouldBlock` when the
/// socket is drained. Handshake answers are written on the way (check `wants_write` after).
pub fn recv(t: &mut ClientConnection, fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match t.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if t.read_tls(&mut FdIo(fd))? == 0 {
            return Ok(0);
        }
        t.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if t.wants_write() {
            flush(t, fd)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rustls server on the other end of a socket pair: handshake, request, response.
    #[test]
    fn round_trip_against_a_rustls_server() {
        let dir = std::env::temp_dir().join(format!("loadtest-tls-test-{}", std::process::id()));
        let (cert, key) = crate::tls_cert::make(&dir).unwrap();
        let certs: Vec<_> = CertificateDer::pem_file_iter(&cert).unwrap().map(|c| c.unwrap()).collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let scfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(scfg)).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&a);
        let mut client = session(&client_config(&cert).unwrap(), std::net::Ipv4Addr::LOCALHOST).unwrap();
        assert!(send(&mut client, fd, b"hello").unwrap());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < 5 {
            server.read_tls(&mut b).unwrap();
            server.process_new_packets().unwrap();
            let _ = server.reader().read_to_end(&mut got);
            while server.wants_write() {
                server.write_tls(&mut b).unwrap();
            }
            match recv(&mut client, fd, &mut buf) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            flush(&mut client, fd).unwrap();
        }
        assert_eq!(got, b"hello");
        server.writer().write_all(b"world").unwrap();
        server.write_tls(&mut b).unwrap();
        let n = loop {
            match recv(&mut client, fd, &mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(&buf[..n], b"world");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
