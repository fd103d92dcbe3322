//! The `corecast` binary: parse the configuration, set up logging, run the shards.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use corecast::config::RawConfig;

/// mimalloc, except in a `--features system-alloc` build: that one uses the C allocator, so that
/// heap profilers which hook `malloc` (heaptrack) see every allocation (tuning only).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `RUST_LOG` (default `info`), with glommio's reactor silenced unless `RUST_LOG` names glommio:
/// it logs an ERROR whenever its NVMe-iopoll probe fails for the history log's filesystem (most
/// filesystems), which is harmless (the poll ring is then simply not used) but alarming in a log.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let env = std::env::var("RUST_LOG").unwrap_or_default();
    let base = if env.trim().is_empty() { "info" } else { env.as_str() };
    let spec = if env.contains("glommio") { base.to_owned() } else { format!("{base},glommio::reactor=off") };
    tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,glommio::reactor=off"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter(log_filter()).with_writer(std::io::stderr).init();
    let raw = RawConfig::parse();
    // The CPUs this process may run on (affinity mask, cpusets): shards are pinned to those.
    let mut allowed: Vec<usize> = core_affinity::get_core_ids().unwrap_or_default().into_iter().map(|c| c.id).collect();
    allowed.sort_unstable();
    let cfg = match raw.validate(&allowed) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if cfg.jwt_secret.is_none() {
        tracing::warn!(
            "DEVELOPMENT MODE: no --jwt-secret / CORECAST_JWT_SECRET set. Every apikey is accepted \
             and every private channel join is allowed. Do not expose this server."
        );
    }
    let shards = cfg.shards;
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let result = corecast::shard::boot::run(cfg, |addr, node| {
        tracing::info!(%addr, shards, %node, "ready");
        // One machine-readable line on stdout, for scripts and the test harness.
        println!("corecast listening on {scheme}://{addr} with {shards} shards");
        let _ = std::io::stdout().flush();
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
