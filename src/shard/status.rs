//! The status page: `GET /` serves one self-contained HTML page (no external assets) that
//! polls `GET /status.json` every second and draws the last minutes itself. The JSON is this
//! node's figures (every shard's counters, topics, presence, history store, Postgres ingest,
//! cluster members, latency quantiles). With `--jwt-secret` set, the details need a
//! `service_role` token (`Authorization: Bearer`, or `?apikey=`); without one the JSON says
//! only that the node is up.

use serde_json::{json, Value};

use super::stats::ShardStats;
use super::Shard;
use crate::config::HistoryStore;

/// The page.
pub const PAGE: &str = include_str!("status.html");

/// `/status.json`: everything when `details`, else the node's name and `"status": "ok"`.
pub fn json(shard: &Shard, details: bool) -> Vec<u8> {
    let node = shard.cfg.node_id();
    if !details {
        let v = json!({"status": "ok", "node": node, "details": false,
            "reason": "details need a service_role token (Authorization: Bearer <token>, or ?apikey=<token>)"});
        return v.to_string().into_bytes();
    }
    use std::sync::atomic::Ordering::Relaxed;
    let figures = |s: &ShardStats| {
        json!({
            "connections": s.connections.load(Relaxed),
            "websockets": s.websockets.load(Relaxed),
            "sse_streams": s.sse_streams.load(Relaxed),
            "subscriptions": s.subscriptions.load(Relaxed),
            "topics": s.topics.load(Relaxed),
            "presence_members": s.presence_members.load(Relaxed),
            "published": s.published.load(Relaxed),
            "deliveries": s.deliveries.load(Relaxed),
            "frames_sent": s.frames_sent.load(Relaxed),
            "sends": s.sends.load(Relaxed),
            "joins": s.joins.load(Relaxed),
            "slow_consumers": s.slow_consumers.load(Relaxed),
        })
    };
    let shards: Vec<Value> = shard.stats.iter().map(figures).collect();
    let mut totals = serde_json::Map::new();
    for s in &shards {
        for (k, v) in s.as_object().into_iter().flatten() {
            let sum = totals.get(k).and_then(Value::as_i64).unwrap_or(0) + v.as_i64().unwrap_or(0);
            totals.insert(k.clone(), json!(sum));
        }
    }
    let ms = |h: &dyn Fn(&ShardStats) -> &crate::metrics::Histogram, q| {
        crate::metrics::quantile(shard.stats.iter().map(h), q).map(|s| s * 1e3)
    };
    let postgres = shard.ingest.as_ref().map(|i| {
        let g = i.stats();
        json!({
            "sampled": g.sampled.load(Relaxed),
            "lag_bytes": g.lag_bytes.load(Relaxed),
            "retained_wal_bytes": g.retained_bytes.load(Relaxed),
            "lag_seconds": g.commit_delay_us.load(Relaxed) as f64 / 1e6,
            "commit_to_handoff_p99_ms": crate::metrics::quantile(std::iter::once(&g.commit_to_handoff), 0.99).map(|s| s * 1e3),
        })
    });
    let members = shard.cluster.as_ref().map_or_else(|| vec![node.to_string()], |c| c.members());
    let tls = shard.tls.as_ref().map(|a| {
        let info = a.info();
        let sum = |f: fn(&ShardStats) -> u64| shard.stats.iter().map(f).sum::<u64>();
        json!({
            "subject": info.subject,
            "not_after": info.not_after,
            "chain": info.chain,
            "handshakes": sum(|s| s.tls_handshakes.load(Relaxed)),
            "failures": sum(|s| s.tls_failures.load(Relaxed)),
        })
    });
    let v = json!({
        "tls": tls,
        "status": "ok",
        "details": true,
        "node": node,
        "version": env!("CARGO_PKG_VERSION"),
        "cluster": shard.cfg.cluster.name(),
        "members": members,
        "history_store": match shard.cfg.history_store {
            HistoryStore::Log => "log",
            HistoryStore::Postgres => "postgres",
            HistoryStore::Stream => "stream",
        },
        "unix_ms": super::history::unix_ms(),
        "shards": shards,
        "totals": totals,
        "latency_ms": {
            "publish_sequenced_p50": ms(&|s| &s.publish_sequenced, 0.5),
            "publish_sequenced_p99": ms(&|s| &s.publish_sequenced, 0.99),
            "sequenced_to_write_p50": ms(&|s| &s.sequenced_to_write, 0.5),
            "sequenced_to_write_p99": ms(&|s| &s.sequenced_to_write, 0.99),
        },
        "postgres": postgres,
    });
    v.to_string().into_bytes()
}
