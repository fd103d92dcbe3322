//! A real `nats-server` with JetStream for the NATS cluster tests: a private port and store
//! directory per instance, stopped (SIGKILL) on drop. [`Nats::stop`] and [`Nats::start_again`]
//! restart it on the same port and store, as an operator's restart would.
//!
//! The binary comes from `CORECAST_NATS_SERVER`, else `nats-server` on the `PATH`, else
//! `/usr/sbin/nats-server` (Debian's package; `scripts/test` installs it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server -js`.
pub struct Nats {
    pub port: u16,
    dir: PathBuf,
    child: std::sync::Mutex<Option<Child>>,
    jetstream: bool,
    extra: Vec<String>,
}

fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("CORECAST_NATS_SERVER") {
        return p.into();
    }
    let on_path = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| PathBuf::from(d).join("nats-server"))
        .find(|p| p.exists());
    on_path.unwrap_or_else(|| "/usr/sbin/nats-server".into())
}

impl Nats {
    /// Starts a fresh server; panics with its log if it does not become ready.
    pub fn start() -> Nats {
        Self::start_with(true)
    }

    /// A fresh server without JetStream (a set-up mistake corecast must name).
    pub fn start_without_jetstream() -> Nats {
        Self::start_with(false)
    }

    /// A fresh server (JetStream on) that requires `user` / `pass`.
    pub fn start_with_auth(user: &str, pass: &str) -> Nats {
        Self::start_inner(true, vec!["--user".into(), user.into(), "--pass".into(), pass.into()])
    }

    fn start_with(jetstream: bool) -> Nats {
        Self::start_inner(jetstream, Vec::new())
    }

    fn start_inner(jetstream: bool, extra: Vec<String>) -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let n = Nats { port, dir: super::temp_dir("nats"), child: Default::default(), jetstream, extra };
        n.start_again();
        n
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and store directory, waiting until it is ready.
    pub fn start_again(&self) {
        let bin = binary();
        assert!(bin.exists(), "nats-server not found at {} (apt-get install nats-server)", bin.display());
        let log = self.dir.join("log");
        let mut cmd = Command::new(&bin);
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.jetstream {
            cmd.arg("-js").arg("-sd").arg(self.dir.join("store"));
        }
        cmd.args(&self.extra);
        let child = cmd
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            // The log is appended to on restarts: count the ready lines.
            if text.matches("Server is ready").count() > self.starts_before(&text) {
                return;
            }
            assert!(Instant::now() < deadline, "nats-server did not become ready:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn starts_before(&self, text: &str) -> usize {
        text.matches("Starting nats-server").count().saturating_sub(1)
    }

    /// Stops it (SIGKILL: an abrupt outage), keeping the store.
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
