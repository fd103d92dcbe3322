//! Starting and stopping the servers under test, each pinned to the server CPU (the same as
//! `taskset -c 0`): corecast, nats-server (WebSocket), the Node `ws` peer and the Socket.IO peer.

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
}

impl ServerKind {
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Corecast => "corecast",
            ServerKind::Nats => "nats",
            ServerKind::Ws => "ws",
            ServerKind::Socketio => "socketio",
        }
    }

    pub fn proto(self) -> Proto {
        match self {
            ServerKind::Corecast => Proto::Phoenix,
            ServerKind::Nats => Proto::Nats,
            ServerKind::Ws => Proto::Ws,
            ServerKind::Socketio => Proto::Socketio,
        }
    }

    pub const ALL: [ServerKind; 4] = [ServerKind::Corecast, ServerKind::Nats, ServerKind::Ws, ServerKind::Socketio];
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
    if dir.join("node_modules").join("socket.io").exists() && dir.join("node_modules").join("ws").exists() {
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
        ServerKind::Ws | ServerKind::Socketio => {
            ensure_node_modules()?;
            let script = peers_dir().join(if kind == ServerKind::Ws { "ws-server.js" } else { "socketio-server.js" });
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
    #[test]
    fn nats_conf_websocket_port() {
        let p = super::conf_ws_port(&super::peers_dir().join("nats.conf"));
        assert_eq!(p, Some(8223));
    }
}
