//! Starting and stopping the servers under test, each pinned to the server CPU (the same as
//! `taskset -c 0`): corecast, nats-server (WebSocket), the Node `ws` peer, the Socket.IO peer,
//! the uWebSockets.js peer and nchan (nginx with Debian's nchan module, one worker, a config
//! written into the run's log directory by [`nchan_conf`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::sys;
use crate::wire::Proto;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ServerKind {
    Corecast,
    Nats,
    Ws,
    Socketio,
    /// uWebSockets.js (`peers/uws-server.js`): the `ws` peer's protocol on uWS's native pub/sub.
    Uws,
    /// nchan (nginx + `libnginx-mod-nchan`): WebSocket and EventSource subscriber locations.
    Nchan,
}

impl ServerKind {
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Corecast => "corecast",
            ServerKind::Nats => "nats",
            ServerKind::Ws => "ws",
            ServerKind::Socketio => "socketio",
            ServerKind::Uws => "uws",
            ServerKind::Nchan => "nchan",
        }
    }

    pub fn proto(self) -> Proto {
        match self {
            ServerKind::Corecast => Proto::Phoenix,
            ServerKind::Nats => Proto::Nats,
            ServerKind::Ws => Proto::Ws,
            ServerKind::Socketio => Proto::Socketio,
            // uws-server.js speaks ws-server.js's protocol.
            ServerKind::Uws => Proto::Ws,
            ServerKind::Nchan => Proto::Nchan,
        }
    }

    /// Whether the server has a Server-Sent Events endpoint the `sse` scenario can subscribe to.
    pub fn has_sse(self) -> bool {
        matches!(self, ServerKind::Corecast | ServerKind::Nchan)
    }

    /// `compare`'s default servers, in order.
    pub const ALL: [ServerKind; 6] = [
        ServerKind::Corecast,
        ServerKind::Nats,
        ServerKind::Ws,
        ServerKind::Socketio,
        ServerKind::Uws,
        ServerKind::Nchan,
    ];
}

#[derive(Clone, Debug)]
pub struct ServerOpts {
    pub cpu: Option<usize>,
    pub corecast_bin: Option<PathBuf>,
    pub corecast_args: Vec<String>,
    pub log_dir: PathBuf,
}

pub struct Running {
    pub kind: ServerKind,
    pub addr: SocketAddrV4,
    pub pid: u32,
    child: Option<Child>,
    pub log: PathBuf,
}

/// The workspace root (where `target/` and `loadtest/` live).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

pub fn peers_dir() -> PathBuf {
    workspace_root().join("loadtest").join("peers")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_or(0, |a| a.port())
}

fn port_in_use(port: u16) -> bool {
    TcpStream::connect_timeout(&std::net::SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok()
}

fn pinned(cmd: &mut Command, cpu: Option<usize>) {
    // SAFETY: the closure only calls async-signal-safe syscalls (sched_setaffinity, prctl).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(c) = cpu {
                sys::pin_to_cpu(c);
            }
            sys::die_with_parent();
            Ok(())
        });
    }
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

fn wait_port(port: u16, child: &mut Child, timeout: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("exited with {st}"));
        }
        if port_in_use(port) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("port {port} not open after {timeout:?}"))
}

/// Make sure `loadtest/peers/node_modules` exists (`npm ci` from the lock file otherwise).
pub fn ensure_node_modules() -> Result<(), String> {
    let dir = peers_dir();
    let nm = dir.join("node_modules");
    if ["socket.io", "ws", "@trufflesuite/uws-js-unofficial"].iter().all(|p| nm.join(p).exists()) {
        return Ok(());
    }
    eprintln!("loadtest: installing peer servers' npm packages (npm ci in {dir:?})");
    let st = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .status()
        .map_err(|e| format!("npm: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("npm ci failed: {st}"))
    }
}

pub fn start(kind: ServerKind, opts: &ServerOpts) -> Result<Running, String> {
    std::fs::create_dir_all(&opts.log_dir).map_err(|e| e.to_string())?;
    let log = opts.log_dir.join(format!("{}.log", kind.name()));
    let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let logf2 = logf.try_clone().map_err(|e| e.to_string())?;
    match kind {
        ServerKind::Corecast => {
            let bin = opts.corecast_bin.clone().unwrap_or_else(|| workspace_root().join("target/release/corecast"));
            if !bin.exists() {
                return Err(format!(
                    "{} not found: build it with `cargo build --release --bin corecast`",
                    bin.display()
                ));
            }
            let port = free_port();
            let addr = SocketAddrV4::new([127, 0, 0, 1].into(), port);
            let mut cmd = Command::new(&bin);
            cmd.arg("--listen").arg(addr.to_string()).args(["--shards", "1"]);
            if let Some(c) = opts.cpu {
                cmd.args(["--cpus", &c.to_string()]);
            }
            cmd.args(&opts.corecast_args)
                .env("CORECAST_DATA_DIR", opts.log_dir.join("corecast-data"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(logf);
            pinned(&mut cmd, opts.cpu);
            let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", bin.display()))?;
            let out = child.stdout.take().expect("piped stdout");
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut r = BufReader::new(out);
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                let _ = tx.send(line);
                // Keep draining so the server never blocks on a full pipe.
                let mut sink = Vec::new();
                let _ = r.read_to_end(&mut sink);
            });
            let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
            if !line.contains("listening on") {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("corecast did not report ready (got {:?}); log:\n{}", line.trim(), tail(&log)));
            }
            let pid = child.id();
            let mut r = Running { kind, addr, pid, child: Some(child), log };
            if line.contains("https://") {
                // TLS (`--tls`): the ready line is the check; this plain client cannot ask.
                return Ok(r);
            }
            match http_get(addr, "/health") {
                Ok((200, _)) => Ok(r),
                other => {
                    r.stop();
                    Err(format!("GET /health: {other:?}"))
                }
            }
        }
        ServerKind::Nats => {
            let conf = peers_dir().join("nats.conf");
            let ws_port = conf_ws_port(&conf).unwrap_or(8223);
            if port_in_use(ws_port) {
                return Err(format!("port {ws_port} (nats websocket, {}) is already in use", conf.display()));
            }
            let mut cmd = Command::new("nats-server");
            cmd.arg("-c").arg(&conf).stdin(Stdio::null()).stdout(logf).stderr(logf2);
            pinned(&mut cmd, opts.cpu);
            let mut child =
                cmd.spawn().map_err(|e| format!("nats-server: {e} (install it: apt-get install -y nats-server)"))?;
            if let Err(e) = wait_port(ws_port, &mut child, Duration::from_secs(10)) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("nats-server: {e}; log:\n{}", tail(&log)));
            }
            Ok(Running {
                kind,
                addr: SocketAddrV4::new([127, 0, 0, 1].into(), ws_port),
                pid: child.id(),
                child: Some(child),
                log,
            })
        }
        ServerKind::Nchan => start_nchan(opts, log, logf, logf2),
        ServerKind::Ws | ServerKind::Socketio | ServerKind::Uws => {
            ensure_node_modules()?;
            let script = peers_dir().join(match kind {
                ServerKind::Ws => "ws-server.js",
                ServerKind::Socketio => "socketio-server.js",
                _ => "uws-server.js",
            });
            let port = free_port();
            let mut cmd = Command::new("node");
            cmd.arg(&script)
                .args(["--port", &port.to_string()])
                .current_dir(peers_dir())
                .stdin(Stdio::null())
                .stdout(logf)
                .stderr(logf2);
            pinned(&mut cmd, opts.cpu);
            let mut child = cmd.spawn().map_err(|e| format!("node: {e}"))?;
            if let Err(e) = wait_port(port, &mut child, Duration::from_secs(15)) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{}: {e}; log:\n{}", kind.name(), tail(&log)));
            }
            Ok(Running {
                kind,
                addr: SocketAddrV4::new([127, 0, 0, 1].into(), port),
                pid: child.id(),
                child: Some(child),
                log,
            })
        }
    }
}

/// Debian's path of the nchan module (package `libnginx-mod-nchan`).
pub const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

/// The nginx configuration of the nchan peer: one worker, in the foreground, everything it
/// writes (pid, error log, temp files) under `dir`, listening on `127.0.0.1:port`.
///
/// Locations (channel id = the last path segment, the generator's topic `t<k>`):
/// - `/sub/<id>`: WebSocket subscribers (`nchan_subscriber websocket`);
/// - `/pub/<id>`: WebSocket publishers (`nchan_publisher websocket`): pipelined like every
///   other peer's publishers, where an HTTP `POST` keeps one request in flight per connection
///   (nchan answers each WebSocket publish with a short channel-info frame, which the generator
///   discards);
/// - `/ps/<id>`: `nchan_pubsub websocket`, for clients that publish and subscribe (chat). nchan
///   has no "no echo" option, so these also get their own messages back; the generator discards
///   them (not counted as deliveries);
/// - `/sse/<id>`: EventSource subscribers (`nchan_subscriber eventsource`), for `compare sse`;
///   no chunked encoding, so the body is the plain event stream.
///
/// Buffering, so that nothing is dropped under the fan-out: live subscribers get every message
/// as it is published (the message buffer is for subscribers that connect or resume later); a
/// message queued on a slow subscriber's connection stays referenced until it is written. The
/// buffer is kept at nchan's default length (10 messages) with a 60 s expiry, the shared memory
/// raised to 256 MiB (default 128 MiB) so that publishing never fails for lack of it, no
/// subscriber timeout, no pings (the generator sends none to any peer), `send_timeout` raised so
/// a subscriber that is behind is not closed, and new subscribers start at the newest message
/// (a reconnecting subscriber does not get earlier ones again).
pub fn nchan_conf(dir: &Path, port: u16, worker_connections: u64, module: &Path) -> String {
    let d = dir.display();
    format!(
        "# Written by loadtest (servers::nchan_conf) for one run; started as\n\
         # nginx -p {d} -c {d}/nginx.conf\n\
         load_module {module};\n\
         worker_processes 1;\n\
         daemon off;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{\n    worker_connections {worker_connections};\n    multi_accept on;\n}}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {d}/tmp-body;\n\
         \x20   proxy_temp_path {d}/tmp-proxy;\n\
         \x20   send_timeout 600s;\n\
         \x20   nchan_shared_memory_size 256m;\n\
         \x20   nchan_message_buffer_length 10;\n\
         \x20   nchan_message_timeout 60s;\n\
         \x20   nchan_subscriber_timeout 0;\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{port} backlog=4096;\n\
         \x20       location ~ ^/sub/([^/]+)$ {{ nchan_subscriber websocket; nchan_channel_id $1; nchan_subscriber_first_message newest; }}\n\
         \x20       location ~ ^/pub/([^/]+)$ {{ nchan_publisher websocket; nchan_channel_id $1; }}\n\
         \x20       location ~ ^/ps/([^/]+)$ {{ nchan_pubsub websocket; nchan_channel_id $1; nchan_subscriber_first_message newest; }}\n\
         \x20       location ~ ^/sse/([^/]+)$ {{ nchan_subscriber eventsource; nchan_channel_id $1; nchan_subscriber_first_message newest; chunked_transfer_encoding off; }}\n\
         \x20   }}\n\
         }}\n",
        module = module.display()
    )
}

/// Starts nginx with [`nchan_conf`] (master and one worker, pinned as a whole). The returned
/// `pid` is the worker's (it holds the connections: RSS and CPU figures are its own); stopping
/// signals the master, which stops the worker.
fn start_nchan(opts: &ServerOpts, log: PathBuf, logf: std::fs::File, logf2: std::fs::File) -> Result<Running, String> {
    let module = Path::new(NCHAN_MODULE);
    if !module.exists() {
        return Err(format!(
            "{} not found (install it: apt-get install -y nginx-light libnginx-mod-nchan)",
            module.display()
        ));
    }
    let dir = opts.log_dir.join("nchan");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let port = free_port();
    // One fd per connection, below the open-files limit nginx inherits from us.
    let nofile = sys::raise_nofile();
    let conns = nofile.saturating_sub(64).clamp(1024, 65_536);
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nchan_conf(&dir, port, conns, module)).map_err(|e| format!("{}: {e}", conf.display()))?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-p").arg(&dir).arg("-c").arg(&conf).stdin(Stdio::null()).stdout(logf).stderr(logf2);
    pinned(&mut cmd, opts.cpu);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("nginx: {e} (install it: apt-get install -y nginx-light libnginx-mod-nchan)"))?;
    let fail = |child: &mut Child, e: String| {
        let _ = child.kill();
        let _ = child.wait();
        Err(format!("nchan: {e}; log:\n{}\n{}", tail(&log), tail(&dir.join("error.log"))))
    };
    if let Err(e) = wait_port(port, &mut child, Duration::from_secs(10)) {
        return fail(&mut child, e);
    }
    let master = child.id();
    let t0 = Instant::now();
    let worker = loop {
        if let Some(w) = child_pids(master).into_iter().next() {
            break w;
        }
        if t0.elapsed() > Duration::from_secs(5) {
            return fail(&mut child, "no worker process".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Running {
        kind: ServerKind::Nchan,
        addr: SocketAddrV4::new([127, 0, 0, 1].into(), port),
        pid: worker,
        child: Some(child),
        log,
    })
}

/// Pids of the processes whose parent is `parent` (from `/proc/*/stat`).
fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid …: comm may hold spaces, so split after its ')'.
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(parent)
        })
        .collect()
}

fn conf_ws_port(conf: &Path) -> Option<u16> {
    let s = std::fs::read_to_string(conf).ok()?;
    let body: String = s.lines().map(|l| l.split('#').next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let ws = &body[body.find("websocket")?..];
    let p = &ws[ws.find("port")? + 4..];
    let p = p.trim_start_matches([' ', ':', '=']);
    p.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

impl Running {
    /// A server started elsewhere (`--addr`, optionally `--pid` for memory and CPU figures).
    pub fn external(kind: ServerKind, addr: SocketAddrV4, pid: Option<u32>) -> Running {
        Running { kind, addr, pid: pid.unwrap_or(0), child: None, log: PathBuf::new() }
    }

    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    pub fn rss_kib(&self) -> Option<u64> {
        if self.pid == 0 {
            None
        } else {
            sys::rss_kib(self.pid)
        }
    }

    /// Anonymous resident memory (see [`sys::anon_kib`]).
    pub fn anon_kib(&self) -> Option<u64> {
        if self.pid == 0 {
            None
        } else {
            sys::anon_kib(self.pid)
        }
    }

    pub fn cpu_secs(&self) -> Option<f64> {
        if self.pid == 0 {
            return None;
        }
        sys::proc_cpu_ticks(self.pid).map(|t| t as f64 / sys::clock_ticks_per_sec() as f64)
    }

    /// Seconds the server's threads waited for a CPU so far (see [`sys::proc_run_wait_ns`]).
    pub fn run_wait_secs(&self) -> Option<f64> {
        if self.pid == 0 {
            return None;
        }
        sys::proc_run_wait_ns(self.pid).map(|n| n as f64 / 1e9)
    }

    /// corecast's (frames sent, sendmsg calls) counters from `/metrics`.
    pub fn send_counters(&self) -> Option<(f64, f64)> {
        if self.kind != ServerKind::Corecast {
            return None;
        }
        let (status, body) = http_get(self.addr, "/metrics").ok()?;
        if status != 200 {
            return None;
        }
        let get = |name: &str| -> Option<f64> {
            body.lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| l.split([' ', '{']).next() == Some(name))
                .map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
                .sum::<Option<f64>>()
        };
        Some((get("corecast_frames_sent_total")?, get("corecast_sends_total")?))
    }

    /// Stops the server and starts a fresh one of the same kind with `opts` (its address may
    /// change); a server started elsewhere (`--addr`) is left as it is.
    pub fn restart(&mut self, opts: &ServerOpts) -> Result<(), String> {
        if self.child.is_none() {
            return Ok(());
        }
        self.stop();
        *self = start(self.kind, opts)?;
        Ok(())
    }

    /// SIGKILL (no clean shutdown) and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A blocking HTTP/1.1 GET with `Connection: close`: (status, body).
pub fn http_get(addr: SocketAddrV4, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        if let Some((status, hl, cl)) = crate::wire::parse_http_response(&buf) {
            let chunked =
                String::from_utf8_lossy(&buf[..hl]).to_ascii_lowercase().contains("transfer-encoding: chunked");
            if !chunked && cl > 0 && buf.len() >= hl + cl {
                let body = String::from_utf8_lossy(&buf[hl..hl + cl]).into_owned();
                return Ok((status, body));
            }
            if !chunked
                && cl == 0
                && !String::from_utf8_lossy(&buf[..hl]).to_ascii_lowercase().contains("content-length")
            {
                // No length: read to close.
                let _ = s.read_to_end(&mut buf);
                return Ok((status, String::from_utf8_lossy(&buf[hl..]).into_owned()));
            }
            if !chunked && cl == 0 {
                return Ok((status, String::new()));
            }
            if chunked && buf.ends_with(b"0\r\n\r\n") {
                return Ok((status, dechunk(&buf[hl..])));
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            let text = String::from_utf8_lossy(&buf).into_owned();
            let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
            let body = text.find("\r\n\r\n").map_or(String::new(), |i| text[i + 4..].to_string());
            return Ok((status, body));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn dechunk(mut b: &[u8]) -> String {
    let mut out = Vec::new();
    while let Some(i) = memchr::memmem::find(b, b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..i]).unwrap_or("0").trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < i + 2 + n {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[(i + 4 + n).min(b.len())..];
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddrV4, TcpStream};
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use super::{start, ServerKind, ServerOpts};
    use crate::wire::{self, Proto};

    #[test]
    fn nats_conf_websocket_port() {
        let p = super::conf_ws_port(&super::peers_dir().join("nats.conf"));
        assert_eq!(p, Some(8223));
    }

    #[test]
    fn nchan_conf_is_one_private_foreground_worker() {
        let dir = std::path::Path::new("/tmp/run-x/nchan");
        let c = super::nchan_conf(dir, 41234, 19_000, std::path::Path::new(super::NCHAN_MODULE));
        for line in [
            "load_module /usr/lib/nginx/modules/ngx_nchan_module.so;",
            "worker_processes 1;",
            "daemon off;",
            "pid /tmp/run-x/nchan/nginx.pid;",
            "error_log /tmp/run-x/nchan/error.log warn;",
            "worker_connections 19000;",
            "listen 127.0.0.1:41234 backlog=4096;",
            "client_body_temp_path /tmp/run-x/nchan/tmp-body;",
            "nchan_message_buffer_length 10;",
            "nchan_subscriber_timeout 0;",
        ] {
            assert!(c.lines().any(|l| l.trim() == line), "missing `{line}` in:\n{c}");
        }
        // load_module must come before any block; every location maps its last segment to the channel.
        assert!(c.find("load_module").unwrap() < c.find("events {").unwrap());
        for (loc, kind) in [
            ("sub", "nchan_subscriber websocket;"),
            ("pub", "nchan_publisher websocket;"),
            ("ps", "nchan_pubsub websocket;"),
            ("sse", "nchan_subscriber eventsource;"),
        ] {
            let l = c.lines().find(|l| l.contains(&format!("location ~ ^/{loc}/"))).unwrap();
            assert!(l.contains(kind) && l.contains("nchan_channel_id $1;"), "{l}");
        }
        assert_eq!(c.matches('{').count(), c.matches('}').count());
        assert_eq!(wire::nchan_path(3, true, false), "/sub/t3");
        assert_eq!(wire::nchan_path(3, false, true), "/pub/t3");
        assert_eq!(wire::nchan_path(3, true, true), "/ps/t3");
    }

    fn log_dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("loadtest-test-{name}-{}", std::process::id()))
    }

    fn opts(name: &str) -> ServerOpts {
        ServerOpts { cpu: None, corecast_bin: None, corecast_args: Vec::new(), log_dir: log_dir(name) }
    }

    /// A blocking WebSocket client: connect, upgrade (101 checked); returns the socket and the
    /// bytes received after the response head.
    fn ws_connect(addr: SocketAddrV4, req: &[u8]) -> (TcpStream, Vec<u8>) {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        s.write_all(req).unwrap();
        let mut buf = Vec::new();
        let t0 = Instant::now();
        loop {
            if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                assert!(buf.starts_with(b"HTTP/1.1 101"), "upgrade refused: {}", String::from_utf8_lossy(&buf));
                return (s, buf[end + 4..].to_vec());
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no upgrade response");
            read_some(&mut s, &mut buf);
        }
    }

    fn read_some(s: &mut TcpStream, buf: &mut Vec<u8>) {
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => panic!("closed by the server"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }

    /// Text/binary messages in `buf` (whole frames only; consumed).
    fn messages(buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(h) = wire::parse_frame_head(&buf[pos..]) {
            let end = pos + h.header_len + h.payload_len;
            if end > buf.len() {
                break;
            }
            if matches!(h.opcode, wire::OP_TEXT | wire::OP_BINARY) {
                out.push(buf[pos + h.header_len..end].to_vec());
            }
            pos = end;
        }
        buf.drain(..pos);
        out
    }

    fn publish(s: &mut TcpStream, payload: &[u8]) {
        let mut f = Vec::new();
        wire::push_client_frame(&mut f, wire::OP_TEXT, payload, [7, 1, 2, 9]);
        s.write_all(&f).unwrap();
    }

    /// Publishes `payload` on `publisher` every 200 ms (a subscription may take effect a little
    /// after its 101) until `got` returns true for what the subscribers received, for at most
    /// 10 s.
    fn publish_until(publisher: &mut TcpStream, payload: &[u8], mut got: impl FnMut() -> bool) {
        let t0 = Instant::now();
        let mut next = Instant::now();
        while !got() {
            assert!(t0.elapsed() < Duration::from_secs(10), "the message never arrived");
            if Instant::now() >= next {
                publish(publisher, payload);
                next = Instant::now() + Duration::from_millis(200);
            }
        }
    }

    /// nchan (nginx + libnginx-mod-nchan) started as `compare` starts it: a WebSocket
    /// subscriber and an EventSource subscriber both get a message a WebSocket publisher sends.
    /// Fails (does not skip) when nginx or the module is not installed.
    #[test]
    fn nchan_peer_delivers_to_websocket_and_sse_subscribers() {
        let o = opts("nchan");
        let srv = start(ServerKind::Nchan, &o).unwrap_or_else(|e| {
            panic!("nchan peer did not start (needs: apt-get install -y nginx-light libnginx-mod-nchan): {e}")
        });
        assert_ne!(srv.pid, 0);
        assert!(srv.rss_kib().is_some(), "the worker's pid {} has no RSS", srv.pid);
        let host = srv.addr.to_string();
        let (mut sub, mut sbuf) =
            ws_connect(srv.addr, &wire::client_upgrade_request(Proto::Nchan, 0, &host, true, false));
        let mut sse = TcpStream::connect(srv.addr).unwrap();
        sse.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        sse.write_all(&wire::sse_request(Proto::Nchan, 0, &host)).unwrap();
        let (mut publ, _) = ws_connect(srv.addr, &wire::client_upgrade_request(Proto::Nchan, 0, &host, false, true));
        let mut payload = Vec::new();
        wire::push_payload(&mut payload, 1, 2, 3, 100);
        let (mut ws_got, mut sse_got) = (false, false);
        let mut ebuf = Vec::new();
        publish_until(&mut publ, &payload, || {
            read_some(&mut sub, &mut sbuf);
            ws_got |= messages(&mut sbuf).iter().any(|m| m == &payload);
            read_some(&mut sse, &mut ebuf);
            wire::sse_data_lines(&ebuf, |d| sse_got |= d == &payload[..]);
            ws_got && sse_got
        });
        let head = String::from_utf8_lossy(&ebuf);
        assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/event-stream"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
        drop(srv);
        let _ = std::fs::remove_dir_all(log_dir("nchan"));
    }

    /// The uWebSockets.js peer started as `compare` starts it (native binary, not the package's
    /// JavaScript fallback): "joined" on connect, a message goes to the other subscriber of
    /// the room. Fails (does not skip) when Node or the npm packages cannot be had.
    #[test]
    fn uws_peer_joins_and_broadcasts() {
        let o = opts("uws");
        let srv = start(ServerKind::Uws, &o).unwrap_or_else(|e| panic!("uws peer did not start: {e}"));
        let log = std::fs::read_to_string(&srv.log).unwrap_or_default();
        assert!(!log.contains("allback"), "uWS fell back to its JavaScript implementation: {log}");
        let host = srv.addr.to_string();
        let req = wire::client_upgrade_request(Proto::Ws, 0, &host, true, false);
        let (mut sub, mut sbuf) = ws_connect(srv.addr, &req);
        let (mut publ, mut pbuf) = ws_connect(srv.addr, &req);
        for (s, b) in [(&mut sub, &mut sbuf), (&mut publ, &mut pbuf)] {
            let t0 = Instant::now();
            let mut got = Vec::new();
            while got.is_empty() {
                assert!(t0.elapsed() < Duration::from_secs(10), "no \"joined\"");
                read_some(s, b);
                got = messages(b);
            }
            assert_eq!(got[0], b"joined");
        }
        let mut payload = Vec::new();
        wire::push_payload(&mut payload, 1, 2, 3, 100);
        publish_until(&mut publ, &payload, || {
            read_some(&mut sub, &mut sbuf);
            messages(&mut sbuf).iter().any(|m| m == &payload)
        });
        drop(srv);
        let _ = std::fs::remove_dir_all(log_dir("uws"));
    }
}
