//! Test harness: start the real server binary, WebSocket and HTTP clients.
#![allow(dead_code)]

pub mod nats;
pub mod pg;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::{stream::MaybeTlsStream, Message, WebSocket};

/// A running `corecast` process.
pub struct Server {
    pub addr: SocketAddr,
    child: Option<Child>,
    /// The data directory (removed on drop unless kept for a restart).
    pub data_dir: std::path::PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    keep_dir: bool,
}

/// A server killed with SIGKILL, its port and data directory kept: [`Stopped::start`] brings
/// it back (same arguments and environment).
pub struct Stopped {
    addr: String,
    dir: std::path::PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Stopped {
    /// Starts the server again.
    pub fn start(self) -> Server {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Server::launch(&self.addr, &self.dir, &args, &env)
    }
}

/// A fresh, unique temporary directory.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("corecast-test-{tag}-{}-{:016x}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Server {
    /// Starts `corecast --listen 127.0.0.1:0 --shards 2` plus `args`, with its own data dir.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    /// Like [`Server::start`] with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::launch("127.0.0.1:0", &temp_dir("data"), args, env)
    }

    /// Stops this server (SIGTERM, clean) and starts a new one on the same port, data dir,
    /// arguments and environment.
    pub fn restart(mut self) -> Server {
        self.keep_dir = true;
        let (addr, dir, args, env) =
            (self.addr.to_string(), self.data_dir.clone(), self.args.clone(), self.env.clone());
        let _ = self.terminate_inner();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Self::launch(&addr, &dir, &args, &env)
    }

    /// Kills this server (SIGKILL: no clean shutdown) and starts a new one on the same port and
    /// data dir.
    pub fn crash_and_restart(mut self) -> Server {
        self.keep_dir = true;
        let (addr, dir, args, env) =
            (self.addr.to_string(), self.data_dir.clone(), self.args.clone(), self.env.clone());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Self::launch(&addr, &dir, &args, &env)
    }

    /// Kills this server (SIGKILL) and keeps what a restart needs.
    pub fn crash_and_restart_later(mut self) -> Stopped {
        self.keep_dir = true;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Stopped {
            addr: self.addr.to_string(),
            dir: self.data_dir.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
        }
    }

    /// Starts the binary on `listen` with `data_dir`.
    pub fn launch(listen: &str, data_dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::launch_wrapped(&[], listen, data_dir, args, env)
    }

    /// Starts the binary as PID 1 of a new PID namespace (`unshare --pid --fork`), the way it
    /// runs in every container, with a fresh data dir.
    pub fn start_as_pid1(args: &[&str]) -> Server {
        Self::launch_wrapped(
            &["unshare", "--pid", "--fork", "--kill-child"],
            "127.0.0.1:0",
            &temp_dir("pid1"),
            args,
            &[],
        )
    }

    /// Starts the binary with an open-files limit of `soft` (and `hard`), as `prlimit` sets it:
    /// the way systemd starts services (soft 1,024).
    pub fn start_with_open_files(soft: u64, hard: u64, args: &[&str]) -> Server {
        let nofile = format!("--nofile={soft}:{hard}");
        Self::launch_wrapped(&["prlimit", &nofile], "127.0.0.1:0", &temp_dir("nofile"), args, &[])
    }

    /// Like [`Server::launch`], run under `wrapper` (a command prefix; empty for none).
    fn launch_wrapped(
        wrapper: &[&str],
        listen: &str,
        data_dir: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let bin = env!("CARGO_BIN_EXE_corecast");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["--listen", listen, "--shards", "2", "--cpus", "0,1"]).arg("--data-dir").arg(data_dir).args(args);
        // CC_TEST_LOG=info (or any filter) shows the servers' logs in a test run.
        cmd.env_remove("DATABASE_URL").env("RUST_LOG", std::env::var("CC_TEST_LOG").unwrap_or_else(|_| "warn".into()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn corecast");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                // Kill it, or the stray process keeps the test's output pipes open forever.
                let _ = child.kill();
                let _ = child.wait();
                panic!("corecast did not report ready within 20 s");
            }
        };
        let addr = line
            .strip_prefix("corecast listening on http://")
            .or_else(|| line.strip_prefix("corecast listening on https://"))
            .and_then(|r| r.split(' ').next())
            .expect("ready line")
            .parse()
            .unwrap();
        Server {
            addr,
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            keep_dir: false,
        }
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self, vsn: &str) -> String {
        format!("ws://{}/realtime/v1/websocket?apikey=test&vsn={vsn}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> (std::process::ExitStatus, Duration) {
        self.terminate_inner()
    }

    /// Keeps the data directory when this server is dropped (the caller removes it).
    pub fn keep_data(&mut self) {
        self.keep_dir = true;
    }

    fn terminate_inner(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().unwrap();
        let t = Instant::now();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        (status, t.elapsed())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// A WebSocket client (tungstenite over a blocking socket with a read timeout).
pub struct Client {
    pub ws: WebSocket<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub fn connect(url: &str) -> Client {
        Self::connect_shard(url).0
    }

    /// Connects and also returns the shard serving the socket (`X-Corecast-Shard`).
    pub fn connect_shard(url: &str) -> (Client, usize) {
        let (ws, resp) = tungstenite::connect(url).expect("websocket connect");
        assert_eq!(resp.status(), 101);
        let shard = resp
            .headers()
            .get("x-corecast-shard")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (Client { ws }, shard)
    }

    /// Connects until it gets a socket on `shard` (the kernel spreads sockets by hash).
    pub fn connect_on(url: &str, shard: usize) -> Client {
        for _ in 0..200 {
            let (c, s) = Self::connect_shard(url);
            if s == shard {
                return c;
            }
        }
        panic!("no connection landed on shard {shard}");
    }

    pub fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s)).unwrap();
    }

    pub fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string());
    }

    pub fn send_binary(&mut self, b: Vec<u8>) {
        self.ws.send(Message::binary(b)).unwrap();
    }

    /// Next data message (text parsed as JSON, binary kept as bytes).
    pub fn recv(&mut self) -> Msg {
        loop {
            match self.ws.read().expect("read") {
                Message::Text(t) => return Msg::Json(serde_json::from_str(&t).expect("server sent invalid JSON")),
                Message::Binary(b) => return Msg::Binary(b.to_vec()),
                Message::Close(c) => return Msg::Close(c.map(|c| (u16::from(c.code), c.reason.to_string()))),
                _ => {}
            }
        }
    }

    pub fn recv_json(&mut self) -> Value {
        match self.recv() {
            Msg::Json(v) => v,
            other => panic!("expected JSON, got {other:?}"),
        }
    }

    /// Waits up to `d` for a message; `None` on timeout.
    pub fn try_recv(&mut self, d: Duration) -> Option<Msg> {
        if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            s.set_read_timeout(Some(d)).unwrap();
        }
        let r = match self.ws.read() {
            Ok(Message::Text(t)) => Some(Msg::Json(serde_json::from_str(&t).unwrap())),
            Ok(Message::Binary(b)) => Some(Msg::Binary(b.to_vec())),
            Ok(Message::Close(c)) => Some(Msg::Close(c.map(|c| (u16::from(c.code), c.reason.to_string())))),
            Ok(_) => None,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                None
            }
            Err(e) => Some(Msg::Error(e.to_string())),
        };
        if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        r
    }

    /// Joins `topic` (without the `realtime:` prefix) with vsn-2 framing; returns the reply.
    pub fn join_v2(&mut self, topic: &str, join_ref: &str, config: Value) -> Value {
        self.send_json(
            &serde_json::json!([join_ref, join_ref, format!("realtime:{topic}"), "phx_join", {"config": config}]),
        );
        self.recv_json()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    Json(Value),
    Binary(Vec<u8>),
    Close(Option<(u16, String)>),
    Error(String),
}

/// A raw TCP connection that completed the WebSocket upgrade; for malformed-frame tests.
pub struct Raw {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

impl Raw {
    pub fn upgrade(addr: SocketAddr, query: &str) -> Raw {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /realtime/v1/websocket?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed during upgrade");
            buf.extend_from_slice(&chunk[..n]);
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf));
        let rest = buf[end..].to_vec();
        Raw { s, buf: rest }
    }

    /// Sends one masked client frame.
    pub fn frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.s.write_all(&masked_frame(fin, opcode, payload)).unwrap();
    }

    /// Reads one server frame: (opcode, payload), or `None` when the socket closed.
    pub fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let op = self.buf[0] & 0x0f;
                let mut len = (self.buf[1] & 0x7f) as usize;
                let mut pos = 2;
                if len == 126 && self.buf.len() >= 4 {
                    len = u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize;
                    pos = 4;
                } else if len == 127 && self.buf.len() >= 10 {
                    len = u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize;
                    pos = 10;
                }
                if !(len >= 126 && pos == 2) && self.buf.len() >= pos + len {
                    let payload = self.buf[pos..pos + len].to_vec();
                    self.buf.drain(..pos + len);
                    return Some((op, payload));
                }
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until a close frame; returns its code and reason.
    pub fn read_close(&mut self) -> Option<(u16, String)> {
        while let Some((op, p)) = self.read_frame() {
            if op == 8 {
                let code = if p.len() >= 2 { u16::from_be_bytes([p[0], p[1]]) } else { 1005 };
                return Some((code, String::from_utf8_lossy(&p[2.min(p.len())..]).into_owned()));
            }
        }
        None
    }
}

/// Reads from `s` up to and including `end` (one byte at a time, so nothing after it is
/// taken), e.g. an HTTP response head; panics on a close or the read timeout.
pub fn read_until(s: &mut impl Read, end: &[u8]) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(end) {
        assert_eq!(s.read(&mut byte).expect("more before the read timeout"), 1, "closed");
        got.push(byte[0]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// The delayed-ACK floor: a write held for the peer's delayed ACK waits at least this long
/// (Linux's `TCP_ATO_MIN`).
pub const DELAYED_ACK: Duration = Duration::from_millis(40);

/// Runs `round` for 0..`rounds` and counts the rounds that took at least [`DELAYED_ACK`]: a
/// stall on delayed ACKs makes every round that slow, whatever the machine's load.
pub fn rounds_held_for_a_delayed_ack(rounds: usize, mut round: impl FnMut(usize)) -> usize {
    (0..rounds)
        .filter(|&i| {
            let t = Instant::now();
            round(i);
            t.elapsed() >= DELAYED_ACK
        })
        .count()
}

/// A masked client frame.
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        n if n < 126 => v.push(0x80 | n as u8),
        n if n <= 0xffff => {
            v.push(0x80 | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(0x80 | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

/// A minimal HTTP/1.1 request; returns (status, headers, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n", body.len());
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("connection")) {
        req.push_str("Connection: close\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) and stop reading before the whole body is sent.
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let end = resp.windows(4).position(|w| w == b"\r\n\r\n").expect("response head") + 4;
    let head = String::from_utf8_lossy(&resp[..end]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, resp[end..].to_vec())
}

/// A signed HS256 token.
pub fn jwt(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

/// A minimal SSE client over a raw socket (parses `id:`, `event:`, `data:` and comments).
pub struct SseClient {
    s: TcpStream,
    buf: Vec<u8>,
    /// The last `id:` seen (what a browser would send as `Last-Event-ID`).
    pub last_id: Option<String>,
    /// The response head.
    pub head: String,
}

impl SseClient {
    /// Opens `path` (with query) and reads the response head.
    pub fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<SseClient, (u16, String)> {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before the response head");
            buf.extend_from_slice(&chunk[..n]);
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        if status != 200 {
            let mut rest = buf[end..].to_vec();
            let _ = s.read_to_end(&mut rest);
            return Err((status, String::from_utf8_lossy(&rest).into_owned()));
        }
        Ok(SseClient { s, buf: buf[end..].to_vec(), last_id: None, head })
    }

    /// The next event (comments skipped); `None` when the stream ends or times out.
    pub fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block = String::from_utf8(self.buf[..pos].to_vec()).unwrap();
                self.buf.drain(..pos + 2);
                let (mut id, mut event, mut data) = (None, String::from("message"), Vec::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v.to_string());
                    }
                }
                if id.is_some() {
                    self.last_id = id.clone();
                }
                if data.is_empty() {
                    continue; // comment or retry-only block
                }
                let data = serde_json::from_str(&data.join("\n")).expect("SSE data is JSON");
                return Some(SseEvent { id, event, data });
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Waits up to `d` for an event.
    pub fn try_next(&mut self, d: Duration) -> Option<SseEvent> {
        self.s.set_read_timeout(Some(d)).unwrap();
        let e = self.next();
        self.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        e
    }
}
