//! A real PostgreSQL for the Postgres-changes tests: `initdb` in a private temp directory,
//! started on a private port with `wal_level=logical`, as the `postgres` OS user when the tests
//! run as root (Postgres refuses to run as root), trust authentication on local TCP.
//!
//! [`shared`] is one instance for the whole test binary (each test takes its own database and
//! replication slot, see [`TestDb`]); a watchdog process stops it when the test binary exits.
//! [`Pg::start`] makes a private instance, for tests that restart Postgres.
//!
//! Binaries come from `CORECAST_PG_BIN` (default `/usr/lib/postgresql/15/bin`).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A running PostgreSQL instance.
pub struct Pg {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
    stop_on_drop: bool,
}

fn bin_dir() -> PathBuf {
    PathBuf::from(std::env::var("CORECAST_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Pg {
    /// initdb + start. Panics with the server log if it cannot start.
    pub fn start() -> Pg {
        let bin = bin_dir();
        assert!(
            bin.join("initdb").exists(),
            "PostgreSQL binaries not found in {} (set CORECAST_PG_BIN)",
            bin.display()
        );
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let dir = std::env::temp_dir().join(format!(
            "corecast-pg-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut pg = Pg { dir, port: 0, bin, as_postgres, stop_on_drop: true };
        if as_postgres {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&pg.dir));
        }
        let data = pg.dir.join("data");
        run(pg.cmd("initdb").arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
        ]));
        // Every test that streams changes leaves a slot of its own (a killed server cannot drop
        // it), and inactive slots count against the limit: room for all of the suite's.
        let conf = "\nlisten_addresses = '127.0.0.1'\nwal_level = logical\nmax_replication_slots = 64\n\
                    max_wal_senders = 64\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
                    wal_sender_timeout = 10s\n";
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(conf);
        text.push_str(&format!("unix_socket_directories = '{}'\n", pg.dir.display()));
        std::fs::write(&conf_path, text).unwrap();
        let mut last = String::new();
        for _ in 0..5 {
            pg.port = free_port();
            if pg.ctl(&["start", "-w", "-t", "30"]).is_ok() {
                return pg;
            }
            last = std::fs::read_to_string(pg.dir.join("log")).unwrap_or_default();
        }
        panic!("postgres did not start:\n{last}");
    }

    fn cmd(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn ctl(&self, args: &[&str]) -> Result<(), String> {
        let out = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .arg("-o")
            .arg(format!("-p {}", self.port))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Stops (fast) and starts again on the same port.
    pub fn restart(&self) {
        self.ctl(&["restart", "-w", "-m", "fast", "-t", "30"]).expect("pg_ctl restart");
    }

    /// Stops (fast).
    pub fn stop(&self) {
        self.ctl(&["stop", "-w", "-m", "fast", "-t", "30"]).expect("pg_ctl stop");
    }

    /// Starts again after [`Pg::stop`].
    pub fn start_again(&self) {
        self.ctl(&["start", "-w", "-t", "30"]).expect("pg_ctl start");
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL with psql (stops at the first error); returns unaligned tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &self.port.to_string(), "-d", db, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql failed: {sql}\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Path of the psql binary.
    pub fn psql_path(&self) -> PathBuf {
        self.bin.join("psql")
    }

    /// Leaves the server running when dropped (stopped by the watchdog instead).
    fn keep(mut self) -> Self {
        self.stop_on_drop = false;
        self
    }

    /// A private instance that lives for the rest of the process (for [`TestDb::on`]); stop
    /// it with [`Pg::shutdown`].
    pub fn leak() -> &'static Pg {
        Box::leak(Box::new(Pg::start().keep()))
    }

    /// Stops the instance at once and removes its directory.
    pub fn shutdown(&self) {
        let _ = self.ctl(&["stop", "-m", "immediate"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private instance for one test (one it restarts or reconfigures), shut down when the
/// guard is dropped. Declare it before the test's [`TestDb`]s so they drop first.
pub struct PrivatePg(&'static Pg);

impl PrivatePg {
    pub fn start() -> PrivatePg {
        PrivatePg(Pg::leak())
    }

    /// The instance, for [`TestDb::on`].
    pub fn pg(&self) -> &'static Pg {
        self.0
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.stop_on_drop {
            let _ = self.ctl(&["stop", "-m", "immediate"]);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The instance shared by the tests of this binary.
pub fn shared() -> &'static Pg {
    static PG: OnceLock<Pg> = OnceLock::new();
    PG.get_or_init(|| {
        let pg = Pg::start().keep();
        watchdog(&pg);
        pg
    })
}

/// A second instance for every test that creates the cluster-wide role `anon` (the client
/// interop tests, the RLS warning and realtime-js pg tests): dev-mode subscribers run as `anon`
/// when that role exists, so on the shared instance every other test's subscribers would lose
/// SELECT on their tables, depending on test order.
pub fn clients() -> &'static Pg {
    static PG: OnceLock<Pg> = OnceLock::new();
    PG.get_or_init(|| {
        let pg = Pg::start().keep();
        watchdog(&pg);
        pg
    })
}

/// A detached shell that waits for this process to exit, then stops the instance and
/// removes its directory (statics are never dropped).
// The watchdog outlives this process by design: there is nobody to wait for it.
#[allow(clippy::zombie_processes)]
fn watchdog(pg: &Pg) {
    let data = pg.dir.join("data");
    let ctl = pg.bin.join("pg_ctl");
    let stop = if pg.as_postgres {
        format!("runuser -u postgres -- {} -D {} stop -m immediate", ctl.display(), data.display())
    } else {
        format!("{} -D {} stop -m immediate", ctl.display(), data.display())
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = pg.dir.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn the postgres watchdog");
}

/// A database (and replication slot name) of its own for one test; dropped with the test.
pub struct TestDb {
    pub pg: &'static Pg,
    pub name: String,
}

impl TestDb {
    /// A fresh database on the shared instance.
    pub fn new(prefix: &str) -> TestDb {
        Self::on(shared(), prefix)
    }

    /// A fresh database on `pg` (which must outlive it).
    pub fn on(pg: &'static Pg, prefix: &str) -> TestDb {
        let name = format!("{prefix}_{}_{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
        pg.psql("postgres", &format!("CREATE DATABASE {name}"));
        TestDb { pg, name }
    }

    pub fn url(&self) -> String {
        self.pg.url(&self.name)
    }

    /// The replication slot corecast should use for this database.
    pub fn slot(&self) -> &str {
        &self.name
    }

    pub fn sql(&self, sql: &str) -> String {
        self.pg.psql(&self.name, sql)
    }

    /// Waits until corecast's slot has confirmed everything up to the current WAL position.
    pub fn wait_acked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let target = self.sql("SELECT pg_current_wal_lsn()");
        while Instant::now() < deadline {
            let ok = self.pg.psql(
                "postgres",
                &format!(
                    "SELECT coalesce(confirmed_flush_lsn >= '{target}'::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = '{}'",
                    self.name
                ),
            );
            if ok == "t" {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // The slot is released shortly after corecast exits; drop it, then the database.
        let deadline = Instant::now() + Duration::from_secs(10);
        let drop_slot = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE (slot_name = '{0}' OR slot_name LIKE '{0}\\_%') AND NOT active",
            self.name
        );
        while Instant::now() < deadline {
            let _ = Command::new(self.pg.psql_path())
                .args([
                    "-X",
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-p",
                    &self.pg.port.to_string(),
                    "-d",
                    "postgres",
                ])
                .args(["-c", &drop_slot])
                .stdin(Stdio::null())
                .output();
            let left = Command::new(self.pg.psql_path())
                .args(["-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-U", "postgres", "-p", &self.pg.port.to_string()])
                .args(["-d", "postgres", "-c"])
                .arg(format!(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{0}' OR slot_name LIKE '{0}\\_%'",
                    self.name
                ))
                .stdin(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
                .unwrap_or(true);
            if left {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new(self.pg.psql_path())
            .args(["-X", "-q", "-h", "127.0.0.1", "-U", "postgres", "-p", &self.pg.port.to_string(), "-d", "postgres"])
            .args(["-c", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)])
            .stdin(Stdio::null())
            .output();
    }
}
