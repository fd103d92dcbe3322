//! Per-shard counters. Each shard writes only its own (relaxed atomics on its own cache line);
//! `/metrics` reads all of them and sums, without locks.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Counters and gauges of one shard.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardStats {
    pub connections: AtomicI64,
    pub accepted: AtomicU64,
    /// Connections refused with a 503 at the connection cap (the open-files limit less a
    /// reserve, `transport::fds`).
    pub refused_no_fds: AtomicU64,
    pub websockets: AtomicI64,
    pub sse_streams: AtomicI64,
    pub subscriptions: AtomicI64,
    pub joins: AtomicU64,
    pub messages_in: AtomicU64,
    pub published: AtomicU64,
    pub deliveries: AtomicU64,
    pub frames_sent: AtomicU64,
    pub sends: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub http_requests: AtomicU64,
    /// TLS handshakes completed, and TLS sessions that failed (bad handshake or record, or
    /// plain HTTP on the TLS port).
    pub tls_handshakes: AtomicU64,
    pub tls_failures: AtomicU64,
    /// Topics this shard owns (refreshed every second).
    pub topics: AtomicI64,
    /// Presence members of the topics this shard owns, every node's (refreshed every second).
    pub presence_members: AtomicI64,
    /// Publish received (parsed on its connection's shard) → sequenced by the topic's owner.
    pub publish_sequenced: crate::metrics::Histogram,
    /// Sequenced by the owner → the first socket write of a flush round that carries it on a
    /// subscriber's shard (sampled: the first delivery of each round).
    pub sequenced_to_write: crate::metrics::Histogram,
}

impl ShardStats {
    /// Adds `v` to a counter.
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }

    /// Moves a gauge by `v`.
    pub fn gauge(c: &AtomicI64, v: i64) {
        c.fetch_add(v, Ordering::Relaxed);
    }
}

/// One metric: name, type, help text and how to read it from a shard.
type Row = (&'static str, &'static str, &'static str, fn(&ShardStats) -> f64);

/// Renders all shards' stats in the Prometheus text format, after `corecast_node_info` naming
/// this node (`node` is a validated node id: nothing to escape).
pub fn render(
    node: &str,
    cluster: &str,
    members: usize,
    all: &[ShardStats],
    ingest: Option<&crate::ingest::IngestStats>,
) -> String {
    let mut out = String::with_capacity(2048);
    let _ = writeln!(
        out,
        "# HELP corecast_node_info This node (always 1)\n# TYPE corecast_node_info gauge\ncorecast_node_info{{node=\"{node}\",cluster=\"{cluster}\"}} 1"
    );
    let _ = writeln!(
        out,
        "# HELP corecast_cluster_members Live cluster members (nodes whose lease holds), this one included\n# TYPE corecast_cluster_members gauge\ncorecast_cluster_members {members}"
    );
    let rows: [Row; 19] = [
        ("corecast_connections", "gauge", "Open TCP connections", |s| s.connections.load(Ordering::Relaxed) as f64),
        ("corecast_connections_accepted_total", "counter", "Connections accepted", |s| {
            s.accepted.load(Ordering::Relaxed) as f64
        }),
        (
            "corecast_connections_refused_no_fds_total",
            "counter",
            "Connections answered 503 and closed at the connection cap (the open-files limit less a reserve)",
            |s| s.refused_no_fds.load(Ordering::Relaxed) as f64,
        ),
        ("corecast_websockets", "gauge", "Open WebSocket sessions", |s| s.websockets.load(Ordering::Relaxed) as f64),
        ("corecast_sse_streams", "gauge", "Open Server-Sent Events streams", |s| {
            s.sse_streams.load(Ordering::Relaxed) as f64
        }),
        ("corecast_subscriptions", "gauge", "Channel subscriptions", |s| {
            s.subscriptions.load(Ordering::Relaxed) as f64
        }),
        ("corecast_joins_total", "counter", "Successful channel joins", |s| s.joins.load(Ordering::Relaxed) as f64),
        ("corecast_messages_in_total", "counter", "Client messages received", |s| {
            s.messages_in.load(Ordering::Relaxed) as f64
        }),
        ("corecast_published_total", "counter", "Broadcasts sequenced by their owner shard", |s| {
            s.published.load(Ordering::Relaxed) as f64
        }),
        ("corecast_deliveries_total", "counter", "Frames queued to subscribers", |s| {
            s.deliveries.load(Ordering::Relaxed) as f64
        }),
        ("corecast_frames_sent_total", "counter", "Frames fully written to sockets", |s| {
            s.frames_sent.load(Ordering::Relaxed) as f64
        }),
        ("corecast_sends_total", "counter", "sendmsg calls (frames_sent / sends = coalescing factor)", |s| {
            s.sends.load(Ordering::Relaxed) as f64
        }),
        ("corecast_slow_consumers_total", "counter", "Connections closed for exceeding the send queue limit", |s| {
            s.slow_consumers.load(Ordering::Relaxed) as f64
        }),
        ("corecast_protocol_errors_total", "counter", "Connections closed for protocol errors", |s| {
            s.protocol_errors.load(Ordering::Relaxed) as f64
        }),
        ("corecast_http_requests_total", "counter", "HTTP requests (REST, health, metrics)", |s| {
            s.http_requests.load(Ordering::Relaxed) as f64
        }),
        ("corecast_tls_handshakes_total", "counter", "TLS handshakes completed", |s| {
            s.tls_handshakes.load(Ordering::Relaxed) as f64
        }),
        (
            "corecast_tls_failures_total",
            "counter",
            "TLS sessions failed (handshake or record errors, plain HTTP on the TLS port)",
            |s| s.tls_failures.load(Ordering::Relaxed) as f64,
        ),
        ("corecast_topics", "gauge", "Topics owned (with a stream, subscribers or presence)", |s| {
            s.topics.load(Ordering::Relaxed) as f64
        }),
        ("corecast_presence_members", "gauge", "Presence members of the owned topics", |s| {
            s.presence_members.load(Ordering::Relaxed) as f64
        }),
    ];
    for (name, kind, help, get) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, s) in all.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(s));
        }
    }
    crate::metrics::render(
        &mut out,
        "corecast_publish_sequenced_seconds",
        "Publish received on its connection's shard to sequenced by the topic's owner (single node)",
        all.iter().map(|s| &s.publish_sequenced),
    );
    crate::metrics::render(
        &mut out,
        "corecast_sequenced_to_first_write_seconds",
        "Sequenced by the owner to the first socket write carrying it on a subscriber's shard (first delivery of each flush round)",
        all.iter().map(|s| &s.sequenced_to_write),
    );
    if let Some(g) = ingest {
        crate::metrics::render(
            &mut out,
            "corecast_pg_commit_to_handoff_seconds",
            "Postgres changes: commit to hand-off to the shards, per delivered batch's newest transaction",
            std::iter::once(&g.commit_to_handoff),
        );
        crate::metrics::render(
            &mut out,
            "corecast_pg_rls_check_seconds",
            "Postgres changes: one row-level security check (an auth context's rows of a batch, retries included)",
            std::iter::once(&g.rls_check),
        );
    }
    if let Some(g) = ingest.filter(|g| g.sampled.load(Ordering::Relaxed)) {
        let gauges: [(&str, &str, f64); 3] = [
            (
                "corecast_pg_replication_lag_bytes",
                "WAL written by the database that corecast has not confirmed yet",
                g.lag_bytes.load(Ordering::Relaxed) as f64,
            ),
            (
                "corecast_pg_slot_retained_wal_bytes",
                "WAL the replication slot keeps on the database server's disk",
                g.retained_bytes.load(Ordering::Relaxed) as f64,
            ),
            (
                "corecast_pg_replication_lag_seconds",
                "Commit to hand-off to the shards of the last transaction delivered (how far behind the database corecast runs)",
                g.commit_delay_us.load(Ordering::Relaxed) as f64 / 1e6,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
    }
    out
}
