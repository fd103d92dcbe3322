//! Interop with the unmodified `@supabase/realtime-js` npm client: each test runs one file of
//! `tests/js` with `node --test` and asserts it exits 0 (its output is printed either way).
//!
//! The JS tests start the `corecast` binary themselves (path in env `CORECAST_BIN`) through
//! `tests/js/helpers.mjs`. Node (20+, 20.14+ recommended) and npm must be installed; the first
//! test runs `npm ci` in `tests/js` when `node_modules` is missing or lacks a package version
//! that `package.json` pins (realtime-js, ws; dev: eventsource, playwright-core). The browser
//! test also needs Debian's Chromium at `/usr/bin/chromium` (`apt-get install -y chromium`;
//! env CORECAST_CHROMIUM for another path, CORECAST_SKIP_BROWSER=1 to skip it). By hand:
//! `cargo build && cd tests/js && npm ci && CORECAST_BIN=../../target/debug/corecast npm test`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Wall-clock limit for one JS test file (they take seconds; this only catches hangs).
const FILE_TIMEOUT: Duration = Duration::from_secs(180);

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("js")
}

/// How to run node: extra flags supported by the installed version.
struct Node {
    force_exit: bool,
}

/// Checks node/npm and installs `tests/js/node_modules` once per test binary.
fn node() -> &'static Node {
    static NODE: OnceLock<Result<Node, String>> = OnceLock::new();
    match NODE.get_or_init(setup) {
        Ok(n) => n,
        Err(e) => panic!("{e}"),
    }
}

fn setup() -> Result<Node, String> {
    let out = Command::new("node").arg("--version").output().map_err(|e| {
        format!(
            "the interop tests need Node.js (20 or newer) and npm on PATH to run @supabase/realtime-js: \
             `node --version` failed: {e}"
        )
    })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut parts = version.trim_start_matches('v').split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if major < 20 {
        return Err(format!("the interop tests need Node.js 20 or newer, found {version}"));
    }
    let dir = js_dir();
    if !installed(&dir) {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .map_err(|e| format!("the interop tests need npm on PATH (`npm ci` in {}): {e}", dir.display()))?;
        if !status.success() {
            return Err(format!("`npm ci` in {} failed: {status}", dir.display()));
        }
        if !installed(&dir) {
            return Err(format!("`npm ci` in {} did not install @supabase/realtime-js", dir.display()));
        }
    }
    // `--test-force-exit` (Node 20.14+/22+): realtime-js leaves 10 s push timers behind.
    Ok(Node { force_exit: major >= 22 || (major == 20 && minor >= 14) })
}

/// Whether node_modules holds every package that package.json pins (dependencies and
/// devDependencies, exact versions), so a checkout whose package.json gained a package gets
/// `npm ci` again.
fn installed(dir: &Path) -> bool {
    let read = |p: PathBuf| -> Option<serde_json::Value> { serde_json::from_slice(&std::fs::read(p).ok()?).ok() };
    let Some(pkg) = read(dir.join("package.json")) else { return false };
    let pinned = ["dependencies", "devDependencies"]
        .iter()
        .filter_map(|k| pkg[*k].as_object())
        .flat_map(|deps| deps.iter())
        .collect::<Vec<_>>();
    !pinned.is_empty()
        && pinned.iter().all(|(name, want)| {
            read(dir.join("node_modules").join(name.as_str()).join("package.json"))
                .is_some_and(|have| want.is_string() && **want == have["version"])
        })
}

/// Runs `node --test <file>` in tests/js; panics with its output unless it exits 0.
fn run_js(file: &str) {
    run_js_with(file, &[], FILE_TIMEOUT);
}

/// [`run_js`] with extra environment variables (corecast's `DATABASE_URL` is removed unless
/// `env` sets it) and a wall-clock limit.
pub(crate) fn run_js_with(file: &str, env: &[(&str, &str)], timeout: Duration) {
    let node = node();
    let mut cmd = Command::new("node");
    cmd.arg("--test").arg("--test-reporter=spec");
    if node.force_exit {
        cmd.arg("--test-force-exit");
    }
    cmd.arg(file)
        .current_dir(js_dir())
        .env("CORECAST_BIN", env!("CARGO_BIN_EXE_corecast"))
        .env_remove("DATABASE_URL")
        .envs(env.iter().copied());
    run_checked(cmd, &format!("node --test {file}"), timeout);
}

/// Join config shapes, vsn 1, `/socket` prefix, heartbeats, leave, removeChannel.
#[test]
fn realtime_js_lifecycle() {
    run_js("lifecycle.test.mjs");
}

/// Socket broadcast between clients: JSON, binary, vsn 1/2, self, ack, ordering, meta.
#[test]
fn realtime_js_broadcast() {
    run_js("broadcast.test.mjs");
}

/// REST fallback of `send()` and `httpSend()` (JSON, binary, private), ordering.
#[test]
fn realtime_js_rest() {
    run_js("rest.test.mjs");
}

/// `--jwt-secret`: apikey, private channels, access_token/setAuth/accessToken, expiry, REST auth.
#[test]
fn realtime_js_auth() {
    run_js("auth.test.mjs");
}

/// Automatic reconnect and rejoin after a server restart and after an idle close.
#[test]
fn realtime_js_reconnect() {
    run_js("reconnect.test.mjs");
}

/// Concurrent 2-shard startups all become ready (the suite starts many servers at once).
#[test]
fn realtime_js_startup() {
    run_js("startup.test.mjs");
}

/// Presence: sync/join/leave and presenceState() across shards, updates, untrack, keys, rejoin,
/// 10 trackers, a SIGKILLed client process, track errors, vsn 1.
#[test]
fn realtime_js_presence() {
    run_js("presence.test.mjs");
}

/// SSE with the npm `eventsource` package: REST and realtime-js publishers, several topics,
/// presence, Last-Event-ID resume after a TCP cut and a server restart, auth, bad requests.
#[test]
fn eventsource_sse() {
    run_js("sse.test.mjs");
}

/// A real browser's EventSource (headless Debian Chromium via playwright-core): cross-origin
/// stream, resume after a TCP cut and a server restart. Needs `/usr/bin/chromium` (or env
/// CORECAST_CHROMIUM); fails without it unless CORECAST_SKIP_BROWSER=1.
#[test]
fn browser_eventsource() {
    run_js("browser.test.mjs");
}

/// The @corecast/client examples (examples/client-js) run against the server (the orders
/// dashboard with a database).
#[test]
fn client_examples() {
    let db = crate::util::pg::TestDb::on(crate::util::pg::clients(), "cc_examples");
    let env = pg_env(&db);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    run_js_with("examples.test.mjs", &env, FILE_TIMEOUT);
}

/// The status page (`GET /`) in headless Chromium, with and without a service_role token.
#[test]
fn status_page_in_chromium() {
    run_js("status.test.mjs");
}

/// A fresh database (and replication slot) on the client tests' PostgreSQL, as the environment
/// the client test files read: `DATABASE_URL`, `CORECAST_SLOT`, `PSQL`.
fn pg_env(db: &crate::util::pg::TestDb) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), db.url()),
        ("CORECAST_SLOT".into(), db.slot().into()),
        ("PSQL".into(), db.pg.psql_path().to_string_lossy().into_owned()),
    ]
}

/// The full SDK, `@supabase/supabase-js` (tests/js/supabase-js.test.mjs): `createClient` with
/// corecast as the project URL, socket and REST-fallback broadcast, presence, removeChannel,
/// private channels through `accessToken`, postgres_changes under RLS with `realtime.setAuth`.
#[test]
fn supabase_js() {
    let db = crate::util::pg::TestDb::on(crate::util::pg::clients(), "cc_sbjs");
    let env = pg_env(&db);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    run_js_with("supabase-js.test.mjs", &env, FILE_TIMEOUT);
}

/// The official Phoenix JS client, npm `phoenix` 1.8 (tests/js/phoenix.test.mjs): join, push,
/// receive, the Presence helper, presence by `track` on a `presence: {key}` join, a kind-0
/// binary push answered with an error reply, the `authToken` subprotocol, postgres_changes.
#[test]
fn phoenix_js() {
    let db = crate::util::pg::TestDb::on(crate::util::pg::clients(), "cc_phx");
    let env = pg_env(&db);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    run_js_with("phoenix.test.mjs", &env, FILE_TIMEOUT);
}

/// Supabase's Python client `realtime` (`AsyncRealtimeClient`, tests/python/test_realtime.py,
/// pytest): broadcast over the socket and REST, presence, private channels, postgres_changes
/// under RLS with `set_auth`. Runs in the venv `target/py-venv`, made by
/// `tests/python/setup.sh` (python3 with the venv module; pip reaches PyPI) when it is missing
/// or older than `tests/python/requirements.txt`.
#[test]
fn python_realtime() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let setup = root.join("tests").join("python").join("setup.sh");
    let python = root.join("target").join("py-venv").join("bin").join("python");
    // setup.sh is idempotent (a stamp of the requirements it installed); run it every time.
    static SETUP: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = SETUP.get_or_init(|| {
        let status = Command::new("bash")
            .arg(&setup)
            .env("PY_VENV", root.join("target").join("py-venv"))
            .status()
            .map_err(|e| format!("run {}: {e}", setup.display()))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed ({status}): the Python client tests need python3 with the venv module \
                 (Debian: apt-get install python3-venv) and pip access to PyPI",
                setup.display()
            ))
        }
    });
    if let Err(e) = ready {
        panic!("{e}");
    }
    let db = crate::util::pg::TestDb::on(crate::util::pg::clients(), "cc_py");
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "pytest", "-q", "-rA", "--color=no"])
        .current_dir(root.join("tests").join("python"))
        .env("CORECAST_BIN", env!("CARGO_BIN_EXE_corecast"))
        .env_remove("DATABASE_URL")
        .envs(pg_env(&db))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    run_checked(cmd, "pytest tests/python", FILE_TIMEOUT);
}

/// Runs `cmd` in its own process group with piped output; panics with that output unless it
/// exits 0 within `timeout` (then the whole group is killed).
pub(crate) fn run_checked(mut cmd: Command, what: &str, timeout: Duration) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break Some(status);
        }
        if started.elapsed() > timeout {
            // SAFETY: plain kill(2) on the process group this test created.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = format!(
        "--- {what} ({:.1} s) stdout:\n{}\n--- stderr:\n{}",
        started.elapsed().as_secs_f64(),
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default()
    );
    match status {
        Some(s) if s.success() => println!("{output}"),
        Some(s) => panic!("{what} failed ({s}):\n{output}"),
        None => panic!("{what} did not finish within {timeout:?} (killed):\n{output}"),
    }
}
