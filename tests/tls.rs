//! TLS on the listener (`--tls-cert` / `--tls-key`): curl over https, a rustls WebSocket
//! client over wss, plain HTTP on the TLS port refused with a clear answer, bad certificates
//! and keys failing the start with a message naming the problem, SIGHUP reloading the
//! certificate without dropping open connections (and keeping the old one when the new files
//! are broken), and the real JavaScript clients over wss/https (tests/js/tls.test.mjs).
//!
//! Certificates are made here with rcgen: a private CA and a leaf for `localhost` and
//! `127.0.0.1` signed by it, which is how a deployment with an internal CA looks.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use crate::util::{temp_dir, Server};

/// A private CA.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
}

/// A leaf for localhost/127.0.0.1 signed by `ca`, valid from `from` to `to` (unix seconds);
/// returns (certificate chain PEM, key PEM, leaf DER).
fn leaf(ca: &Ca, cn: &str, from: i64, to: i64) -> (String, String, Vec<u8>) {
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.not_before = time_of(from);
    params.not_after = time_of(to);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (format!("{}{}", cert.pem(), ca.pem), key.serialize_pem(), cert.der().to_vec())
}

fn time_of(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap()
}

fn now() -> i64 {
    crate::util::unix_now() as i64
}

const DAY: i64 = 86_400;

/// Writes `files` into a fresh directory; returns it.
fn write_files(tag: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = temp_dir(tag);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, body) in files {
        std::fs::write(dir.join(name), body).unwrap();
    }
    dir
}

/// A server on `dir/cert.pem` and `dir/key.pem`.
fn tls_server(dir: &Path) -> Server {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    Server::start(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()])
}

/// A rustls client session to `addr` trusting `ca_pem`; returns the stream after the handshake.
fn tls_connect(addr: SocketAddr, ca_pem: &str) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(corecast::transport::tls::crypto_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("TLS handshake");
    }
    s
}

type Wss = WebSocket<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

/// A WebSocket over TLS, joined to `topic` (vsn 2 framing).
fn wss_join(addr: SocketAddr, ca_pem: &str, topic: &str) -> Wss {
    let s = tls_connect(addr, ca_pem);
    let url = format!("wss://localhost:{}/realtime/v1/websocket?apikey=test&vsn=2.0.0", addr.port());
    let (mut ws, resp) = tungstenite::client::client(url, s).expect("wss upgrade");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text(json!(["1", "1", format!("realtime:{topic}"), "phx_join", {"config": {}}]).to_string()))
        .unwrap();
    let reply = recv_json(&mut ws);
    assert_eq!(reply[3], "phx_reply", "{reply}");
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    ws
}

fn recv_json(ws: &mut Wss) -> Value {
    loop {
        match ws.read().expect("wss read") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

fn broadcast(ws: &mut Wss, topic: &str, payload: Value) {
    ws.send(Message::text(
        json!([null, "2", format!("realtime:{topic}"), "broadcast", {"type": "broadcast", "event": "e", "payload": payload}])
            .to_string(),
    ))
    .unwrap();
}

/// The next broadcast payload on `ws`.
fn next_broadcast(ws: &mut Wss) -> Value {
    loop {
        let m = recv_json(ws);
        if m[3] == "broadcast" {
            return m[4]["payload"].clone();
        }
    }
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn https_wss_and_plain_http_refused() {
    let ca = ca("corecast test CA");
    let (cert, key, _) = leaf(&ca, "corecast test", now() - DAY, now() + DAY);
    let dir = write_files("tls-basic", &[("cert.pem", &cert), ("key.pem", &key), ("ca.pem", &ca.pem)]);
    let srv = tls_server(&dir);
    let port = srv.addr.port();
    let cafile = dir.join("ca.pem");
    let cafile = cafile.to_str().unwrap();
    // curl over https, verifying against the CA.
    let (ok, body, err) = curl(&["--cacert", cafile, &format!("https://localhost:{port}/health")]);
    assert!(ok, "curl https /health: {err}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    // A REST broadcast over https reaches a wss subscriber.
    let mut sub = wss_join(srv.addr, &ca.pem, "tls-rest");
    let (ok, body, err) = curl(&[
        "--cacert",
        cafile,
        "-H",
        "apikey: test",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"messages":[{"topic":"tls-rest","event":"e","payload":{"via":"curl"}}]}"#,
        "-w",
        "%{http_code}",
        &format!("https://localhost:{port}/realtime/v1/api/broadcast"),
    ]);
    assert!(ok && body.ends_with("202"), "REST over https: {body} {err}");
    assert_eq!(next_broadcast(&mut sub), json!({"via": "curl"}));
    // wss to wss, across whatever shards the two sockets landed on, in order.
    let mut publisher = wss_join(srv.addr, &ca.pem, "tls-rest");
    for i in 0..200 {
        broadcast(&mut publisher, "tls-rest", json!({ "i": i }));
    }
    for i in 0..200 {
        assert_eq!(next_broadcast(&mut sub), json!({ "i": i }));
    }
    // Plain HTTP on the TLS port: a readable refusal, not a hang or garbage.
    let (status, _, body) = crate::util::http(srv.addr, "GET", "/health", &[], b"");
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("this port speaks TLS"), "{}", String::from_utf8_lossy(&body));
    // A client that does not trust the certificate fails the handshake (curl without the CA).
    let (ok, _, err) = curl(&[&format!("https://localhost:{port}/health")]);
    assert!(!ok, "curl must not trust a private CA by default: {err}");
    // The status page's figures name the certificate.
    let (ok, status, _) = curl(&["--cacert", cafile, &format!("https://localhost:{port}/status.json")]);
    assert!(ok);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["tls"]["subject"], "CN=corecast test", "{status}");
    assert!(status["tls"]["handshakes"].as_u64().unwrap() >= 3, "{status}");
    // The metrics count both.
    let (ok, metrics, _) = curl(&["--cacert", cafile, &format!("https://localhost:{port}/metrics")]);
    assert!(ok);
    let sum = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(sum("corecast_tls_handshakes_total") >= 4.0, "{metrics}");
    assert!(sum("corecast_tls_failures_total") >= 1.0, "{metrics}");
}

/// Runs corecast with `args` and expects a failed start; returns its stderr.
fn failed_start(args: &[&str]) -> (Option<i32>, String) {
    let data = temp_dir("tls-fail-data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_corecast"))
        .args(["--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("corecast started with {args:?}; it must refuse");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).is_empty(), "no ready line: {}", String::from_utf8_lossy(&out.stdout));
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_certificates_fail_the_start_clearly() {
    let ca = ca("corecast test CA");
    let (good_cert, good_key, _) = leaf(&ca, "good", now() - DAY, now() + DAY);
    let (expired_cert, expired_key, _) = leaf(&ca, "expired", now() - 10 * DAY, now() - DAY);
    let (future_cert, future_key, _) = leaf(&ca, "future", now() + DAY, now() + 10 * DAY);
    let (_, other_key, _) = leaf(&ca, "other", now() - DAY, now() + DAY);
    let dir = write_files(
        "tls-bad",
        &[
            ("good.pem", &good_cert),
            ("good.key", &good_key),
            ("expired.pem", &expired_cert),
            ("expired.key", &expired_key),
            ("future.pem", &future_cert),
            ("future.key", &future_key),
            ("other.key", &other_key),
            ("garbage.pem", "this is not PEM\n"),
        ],
    );
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let cases: [(&str, &str, &[&str]); 6] = [
        ("expired.pem", "expired.key", &["expired on", "renew it", "expired.pem"]),
        ("future.pem", "future.key", &["is not valid before", "check the clock"]),
        ("good.pem", "other.key", &["does not belong to the certificate", "other.key", "good.pem"]),
        ("garbage.pem", "good.key", &["holds no PEM certificate", "garbage.pem"]),
        ("good.pem", "garbage.pem", &["holds no PEM private key", "garbage.pem"]),
        ("missing.pem", "good.key", &["cannot read", "missing.pem"]),
    ];
    for (cert, key, wanted) in cases {
        let (code, err) = failed_start(&["--tls-cert", &p(cert), "--tls-key", &p(key)]);
        assert_eq!(code, Some(1), "{cert}/{key}: {err}");
        assert!(err.contains("error: cannot serve TLS:"), "{cert}/{key}: {err}");
        for w in wanted {
            assert!(err.contains(w), "{cert}/{key}: wanted {w:?} in: {err}");
        }
    }
    // One flag without the other: a usage error (exit 2) naming the missing flag.
    let (code, err) = failed_start(&["--tls-cert", &p("good.pem")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--tls-key"), "{err}");
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_connections() {
    let ca = ca("corecast test CA");
    let (cert_a, key_a, der_a) = leaf(&ca, "first", now() - DAY, now() + DAY);
    let (cert_b, key_b, der_b) = leaf(&ca, "second", now() - DAY, now() + DAY);
    let dir = write_files("tls-reload", &[("cert.pem", &cert_a), ("key.pem", &key_a)]);
    let srv = tls_server(&dir);
    let peer_leaf = |s: &rustls::StreamOwned<rustls::ClientConnection, TcpStream>| -> Vec<u8> {
        s.conn.peer_certificates().unwrap()[0].as_ref().to_vec()
    };
    assert_eq!(peer_leaf(&tls_connect(srv.addr, &ca.pem)), der_a);
    let mut old = wss_join(srv.addr, &ca.pem, "tls-reload");

    // Replace both files (renamed into place, as certbot and friends do), then SIGHUP.
    for (name, body) in [("cert.pem", &cert_b), ("key.pem", &key_b)] {
        std::fs::write(dir.join(format!("{name}.new")), body).unwrap();
        std::fs::rename(dir.join(format!("{name}.new")), dir.join(name)).unwrap();
    }
    let hup = |pid: u32| assert!(Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
    hup(srv.pid());
    let deadline = Instant::now() + Duration::from_secs(5);
    while peer_leaf(&tls_connect(srv.addr, &ca.pem)) != der_b {
        assert!(Instant::now() < deadline, "new connections still get the first certificate after SIGHUP");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The connection opened before the reload is still served.
    let mut newer = wss_join(srv.addr, &ca.pem, "tls-reload");
    broadcast(&mut newer, "tls-reload", json!({"after": "reload"}));
    assert_eq!(next_broadcast(&mut old), json!({"after": "reload"}));

    // A broken key: the reload fails, the server keeps serving the second certificate.
    std::fs::write(dir.join("key.pem"), "not a key\n").unwrap();
    hup(srv.pid());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(peer_leaf(&tls_connect(srv.addr, &ca.pem)), der_b);
    broadcast(&mut old, "tls-reload", json!({"still": "alive"}));
    assert_eq!(next_broadcast(&mut newer), json!({"still": "alive"}));
    let (status, _) = srv.terminate();
    assert!(status.success(), "clean exit after the reloads: {status:?}");
    // Shutdown reached the TLS clients as a WebSocket close 1001, through the session.
    loop {
        match old.read() {
            Ok(Message::Close(Some(c))) => {
                assert_eq!(u16::from(c.code), 1001);
                break;
            }
            Ok(Message::Close(None)) => panic!("close without a code"),
            Ok(_) => {}
            Err(e) => panic!("no close frame before the connection ended: {e}"),
        }
    }
}

/// realtime-js, supabase-js and eventsource over wss:// and https:// (tests/js/tls.test.mjs).
#[test]
fn javascript_clients_over_tls() {
    let ca = ca("corecast test CA");
    let (cert, key, _) = leaf(&ca, "corecast js", now() - DAY, now() + DAY);
    let dir = write_files("tls-js", &[("cert.pem", &cert), ("key.pem", &key), ("ca.pem", &ca.pem)]);
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    crate::interop::run_js_with(
        "tls.test.mjs",
        &[
            ("CORECAST_TEST_TLS_CERT", &p("cert.pem")),
            ("CORECAST_TEST_TLS_KEY", &p("key.pem")),
            ("NODE_EXTRA_CA_CERTS", &p("ca.pem")),
        ],
        Duration::from_secs(120),
    );
}
