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
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Own process group, so a hang can be killed with every server it started.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn node");
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
        if let Some(status) = child.try_wait().expect("wait for node") {
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
        "--- node --test {file} ({:.1} s) stdout:\n{}\n--- stderr:\n{}",
        started.elapsed().as_secs_f64(),
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default()
    );
    match status {
        Some(s) if s.success() => println!("{output}"),
        Some(s) => panic!("{file} failed ({s}):\n{output}"),
        None => panic!("{file} did not finish within {timeout:?} (killed):\n{output}"),
    }
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
