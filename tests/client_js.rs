//! `@corecast/client` (clients/js), the product's own JavaScript client: its `node:test` suite
//! (clients/js/test/*.test.mjs) runs against the real `corecast` binary (env `CORECAST_BIN`).
//!
//! Needs Node 20+ and npm; `npm ci` runs in clients/js when `node_modules` lacks a version
//! that its package.json pins (`ws`, `playwright-core`). The browser test drives Debian's
//! Chromium at `/usr/bin/chromium` (env CORECAST_CHROMIUM for another path,
//! CORECAST_SKIP_BROWSER=1 to skip it loudly); the table-topic test gets a PostgreSQL from
//! tests/util/pg.rs. By hand: `cargo build && cd clients/js && npm ci &&
//! CORECAST_BIN=../../target/debug/corecast npm test`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Wall-clock limit for the whole suite (it takes well under a minute; this only catches hangs).
const TIMEOUT: Duration = Duration::from_secs(300);

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients").join("js")
}

/// Whether node_modules holds the devDependencies that package.json pins.
fn installed(dir: &Path) -> bool {
    let read = |p: PathBuf| -> Option<serde_json::Value> { serde_json::from_slice(&std::fs::read(p).ok()?).ok() };
    let Some(pkg) = read(dir.join("package.json")) else { return false };
    let Some(deps) = pkg["devDependencies"].as_object() else { return true };
    deps.iter().all(|(name, want)| {
        read(dir.join("node_modules").join(name.as_str()).join("package.json"))
            .is_some_and(|have| want.is_string() && *want == have["version"])
    })
}

/// The test files, relative to clients/js: every `test/*.test.mjs` except the Postgres one
/// (`with_pg`: only that one).
fn test_files(dir: &Path, with_pg: bool) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir.join("test"))
        .expect("clients/js/test")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".test.mjs") && (n == "pg.test.mjs") == with_pg)
        .map(|n| format!("test/{n}"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no clients/js/test/*.test.mjs");
    files
}

/// Runs `node --test` on `files` in clients/js (installing `ws` first when needed) with
/// `CORECAST_BIN` and `env`; panics with the output unless it passes.
fn run_node(files: &[String], env: &[(&str, &str)]) {
    let dir = client_dir();
    if !installed(&dir) {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .unwrap_or_else(|e| panic!("the client tests need npm on PATH (`npm ci` in {}): {e}", dir.display()));
        assert!(status.success(), "`npm ci` in {} failed: {status}", dir.display());
    }
    let mut cmd = Command::new("node");
    cmd.arg("--test")
        .arg("--test-reporter=spec")
        .args(files)
        .current_dir(&dir)
        .env("CORECAST_BIN", env!("CARGO_BIN_EXE_corecast"))
        .env_remove("DATABASE_URL")
        .envs(env.iter().copied());
    crate::interop::run_checked(cmd, &format!("node --test {} (clients/js)", files.join(" ")), TIMEOUT);
}

/// The client against corecast without a database: channels, presence, history, tokens,
/// server emit, reconnect and resume.
#[test]
fn corecast_client_js() {
    run_node(&test_files(&client_dir(), false), &[]);
}

/// Table topics and Postgres changes (`test/pg.test.mjs`) against a real PostgreSQL
/// (tests/util/pg.rs; the instance for client tests, as they create roles).
#[test]
fn corecast_client_js_pg() {
    let db = crate::util::pg::TestDb::on(crate::util::pg::clients(), "cc_client_js");
    let (url, psql) = (db.url(), db.pg.psql_path());
    let env = [("DATABASE_URL", url.as_str()), ("CORECAST_SLOT", db.slot()), ("PSQL", psql.to_str().unwrap())];
    run_node(&test_files(&client_dir(), true), &env);
}
