//! A rustls client against [`Session`] over a Unix socket pair: handshake, request in,
//! frames out (many per record and per `sendmsg`), a full socket, plain HTTP detection; and
//! the certificate checks of [`Acceptor`].

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

use bytes::Bytes;

use super::*;

struct Files {
    dir: PathBuf,
    ca: Vec<CertificateDer<'static>>,
}

/// A self-signed certificate for `localhost` valid from `from` to `to` (unix seconds), written
/// as `cert.pem`/`key.pem` in a fresh directory.
fn files(tag: &str, from: i64, to: i64) -> Files {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(to).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let dir = std::env::temp_dir().join(format!("corecast-tls-{tag}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    Files { dir, ca: vec![cert.der().clone()] }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn valid(tag: &str) -> Files {
    files(tag, unix_now() - 3600, unix_now() + 3600)
}

fn client_for(f: &Files) -> rustls::ClientConnection {
    let mut roots = rustls::RootCertStore::empty();
    for c in &f.ca {
        roots.add(c.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap()
}

/// Moves what the server socket received into the session; returns the plaintext.
fn server_read(session: &mut Session, outbox: &mut Outbox, sock: &mut UnixStream) -> Vec<u8> {
    let mut raw = vec![0u8; 1 << 16];
    let n = sock.read(&mut raw).unwrap();
    assert_eq!(session.absorb(&raw[..n]), Opening::Tls);
    let mut plain = vec![0u8; 1 << 16];
    let m = session.plaintext(&mut plain).unwrap();
    if session.wants_write() {
        assert_eq!(session.flush(outbox, sock.as_raw_fd()).unwrap(), Flush::Drained);
    }
    plain.truncate(m);
    plain
}

/// Client ↔ server handshake over a socket pair; returns both ends.
fn established(f: &Files) -> (rustls::ClientConnection, UnixStream, Session, UnixStream, Outbox) {
    let acceptor = Acceptor::load(&f.dir.join("cert.pem"), &f.dir.join("key.pem")).unwrap();
    let (mut csock, mut ssock) = UnixStream::pair().unwrap();
    let mut client = client_for(f);
    let mut session = Session::new(acceptor.config()).unwrap();
    let mut outbox = Outbox::new();
    while client.is_handshaking() || !session.established() {
        while client.wants_write() {
            client.write_tls(&mut csock).unwrap();
        }
        server_read(&mut session, &mut outbox, &mut ssock);
        if client.is_handshaking() {
            client.read_tls(&mut csock).unwrap();
            client.process_new_packets().unwrap();
        }
    }
    (client, csock, session, ssock, outbox)
}

/// Reads and decrypts on the client until `want` plaintext bytes arrived.
fn client_read(client: &mut rustls::ClientConnection, sock: &mut UnixStream, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        client.read_tls(sock).unwrap();
        client.process_new_packets().unwrap();
        let _ = client.reader().read_to_end(&mut got);
    }
    got
}

#[test]
fn request_in_frames_out_many_per_send() {
    let f = valid("roundtrip");
    let (mut client, mut csock, mut session, mut ssock, mut outbox) = established(&f);
    client.writer().write_all(b"GET /health HTTP/1.1\r\n\r\n").unwrap();
    client.write_tls(&mut csock).unwrap();
    // The client's last handshake flight and the request may arrive in one read or two.
    let mut plain = server_read(&mut session, &mut outbox, &mut ssock);
    if plain.is_empty() {
        plain = server_read(&mut session, &mut outbox, &mut ssock);
    }
    assert_eq!(plain, b"GET /health HTTP/1.1\r\n\r\n");

    let before = outbox.counters();
    let frame = Bytes::from_static(b"0123456789abcdef");
    for _ in 0..1000 {
        outbox.push(frame.clone());
    }
    assert_eq!(session.flush(&mut outbox, ssock.as_raw_fd()).unwrap(), Flush::Drained);
    assert!(outbox.is_empty());
    let (frames, sends) = (outbox.counters().0 - before.0, outbox.counters().1 - before.1);
    assert_eq!(frames, 1000);
    assert!(sends <= 4, "1000 frames (16 KB) leave in a few sendmsg calls, not {sends}");
    let got = client_read(&mut client, &mut csock, 16_000);
    assert_eq!(got, frame.repeat(1000));
}

#[test]
fn a_full_socket_blocks_and_the_rest_follows_in_order() {
    let f = valid("blocked");
    let (mut client, mut csock, mut session, ssock, mut outbox) = established(&f);
    let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    outbox.push(Bytes::from(big.clone()));
    outbox.push(Bytes::from_static(b"tail"));
    assert_eq!(session.flush(&mut outbox, ssock.as_raw_fd()).unwrap(), Flush::Blocked);
    let mut got = Vec::new();
    loop {
        client.read_tls(&mut csock).unwrap();
        client.process_new_packets().unwrap();
        let _ = client.reader().read_to_end(&mut got);
        if session.flush(&mut outbox, ssock.as_raw_fd()).unwrap() == Flush::Drained && got.len() >= big.len() + 4 {
            break;
        }
    }
    assert_eq!(&got[..big.len()], &big[..]);
    assert_eq!(&got[big.len()..], b"tail");
}

#[test]
fn close_notify_follows_the_last_frame() {
    let f = valid("close");
    let (mut client, mut csock, mut session, ssock, mut outbox) = established(&f);
    // As `linger` does it: the queue first, then the alert.
    outbox.push(Bytes::from_static(b"bye"));
    assert_eq!(session.flush(&mut outbox, ssock.as_raw_fd()).unwrap(), Flush::Drained);
    session.close_notify();
    session.close_notify();
    assert!(session.closed());
    assert_eq!(session.flush(&mut outbox, ssock.as_raw_fd()).unwrap(), Flush::Drained);
    let mut got = Vec::new();
    let mut closed = false;
    while !closed {
        client.read_tls(&mut csock).unwrap();
        closed = client.process_new_packets().unwrap().peer_has_closed();
        let _ = client.reader().read_to_end(&mut got);
    }
    assert_eq!(got, b"bye");
}

#[test]
fn plain_http_is_told_apart_from_a_handshake() {
    let f = valid("plain");
    let acceptor = Acceptor::load(&f.dir.join("cert.pem"), &f.dir.join("key.pem")).unwrap();
    let mut s = Session::new(acceptor.config()).unwrap();
    assert_eq!(s.absorb(b"GET / HTTP/1.1\r\n"), Opening::PlainHttp);
    let mut s = Session::new(acceptor.config()).unwrap();
    assert_eq!(s.absorb(&[22, 3, 1]), Opening::Tls);
    // Garbage after a handshake byte is a TLS error, not a panic.
    s.absorb(&[0xff; 64]);
    assert!(s.plaintext(&mut [0u8; 256]).is_err());
}

#[test]
fn certificate_checks_and_reload() {
    let now = unix_now();
    let expired = files("expired", now - 7200, now - 3600);
    match Acceptor::load(&expired.dir.join("cert.pem"), &expired.dir.join("key.pem")) {
        Err(TlsError::Expired { .. }) => {}
        other => panic!("expected Expired, got {other:?}"),
    }
    let future = files("future", now + 3600, now + 7200);
    assert!(matches!(
        Acceptor::load(&future.dir.join("cert.pem"), &future.dir.join("key.pem")),
        Err(TlsError::NotYetValid { .. })
    ));
    let a = valid("a");
    let b = valid("b");
    assert!(matches!(
        Acceptor::load(&a.dir.join("cert.pem"), &b.dir.join("key.pem")),
        Err(TlsError::KeyMismatch { .. })
    ));
    // Reload: a broken file keeps the old configuration; good files replace it.
    let acceptor = Acceptor::load(&a.dir.join("cert.pem"), &a.dir.join("key.pem")).unwrap();
    let first = acceptor.config();
    std::fs::write(a.dir.join("key.pem"), "nope").unwrap();
    assert!(matches!(acceptor.reload(), Err(TlsError::NoKey { .. })));
    assert!(Arc::ptr_eq(&first, &acceptor.config()));
    std::fs::copy(b.dir.join("cert.pem"), a.dir.join("cert.pem")).unwrap();
    std::fs::copy(b.dir.join("key.pem"), a.dir.join("key.pem")).unwrap();
    acceptor.reload().unwrap();
    assert!(!Arc::ptr_eq(&first, &acceptor.config()));
}
