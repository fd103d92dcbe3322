//! Configuration: command-line flags and `CORECAST_*` environment variables, parsed once at
//! start into a validated, immutable [`Config`]. A bad value is a clear error message and exit
//! code 2, never a panic.
//!
//! Every flag documents its default and trade-off; the README's configuration table is the
//! user-facing copy of these docs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Raw flags as the user typed them (`RawConfig` → [`Config`] is "parse, don't validate").
#[derive(Debug, Parser)]
#[command(
    name = "corecast",
    version,
    about = "Thread-per-core realtime server (WebSocket + SSE) for Postgres-backed apps"
)]
pub struct RawConfig {
    /// Address to listen on (HTTP, WebSocket and SSE share it).
    #[arg(long, env = "CORECAST_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,

    /// TLS certificate chain (PEM, leaf first). With --tls-key the port serves only TLS:
    /// HTTPS, WSS and SSE. Reloaded on SIGHUP (open connections keep theirs).
    #[arg(long, env = "CORECAST_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1) for --tls-cert.
    #[arg(long, env = "CORECAST_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Number of shards (one pinned executor each). Default: one per CPU, one fewer when the
    /// Postgres ingest core runs (at least 1).
    #[arg(long, env = "CORECAST_SHARDS")]
    pub shards: Option<usize>,

    /// CPUs to pin shards to, e.g. `0,2` or `0-3` (default: CPUs 0..shards). The Postgres
    /// ingest thread takes the next CPU after the shards' when there is one.
    #[arg(long, env = "CORECAST_CPUS")]
    pub cpus: Option<String>,

    /// HS256 secret for apikeys and access tokens. Unset: development mode (any apikey is
    /// accepted; every private join is allowed).
    #[arg(long, env = "CORECAST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Postgres URL (also read from `DATABASE_URL`). Enables Postgres changes.
    #[arg(long, env = "CORECAST_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Publication to stream changes from (created `FOR ALL TABLES` if missing).
    #[arg(long, env = "CORECAST_PUBLICATION", default_value = "corecast")]
    pub publication: String,

    /// Logical replication slot (created if missing).
    #[arg(long, env = "CORECAST_SLOT", default_value = "corecast")]
    pub slot: String,

    /// When corecast starts with changes waiting in its slot (it was down while the database
    /// was written), streaming waits this long (milliseconds from the moment its replication
    /// slot is ready, when joins can first be subscribed to Postgres changes) so that clients
    /// reconnecting after the restart have rejoined and receive what they missed. 0 streams at
    /// once (changes committed while corecast was down then reach only clients already back).
    #[arg(long, env = "CORECAST_PG_RESUME_GRACE_MS", default_value_t = 3000)]
    pub pg_resume_grace_ms: u64,

    /// Cluster mode: `none` (one node, everything in process), `postgres` (every node with
    /// the same --database-url and `--cluster postgres` serves one set of channels: one order
    /// per topic, cluster-wide offsets, presence across nodes; see the README) or
    /// `nats://HOST:PORT[,…]` (the same over a NATS server with JetStream, which also keeps
    /// the history).
    #[arg(long, env = "CORECAST_CLUSTER", default_value = "none", value_parser = crate::cluster::parse_mode)]
    pub cluster: crate::cluster::Mode,

    /// Cluster mode: a node whose lease has lapsed for this long loses its replication slot
    /// (a live node drops it), so the database stops retaining WAL for a node gone for good.
    /// A node that comes back later starts a new slot: Postgres changes committed in between
    /// are not delivered to it.
    #[arg(long, env = "CORECAST_CLUSTER_SLOT_TTL_SECS", default_value_t = 300)]
    pub cluster_slot_ttl_secs: u64,

    /// This node's name (1 to 64 of `A-Z a-z 0-9 . _ -`), shown in the log, `GET /health`,
    /// `/metrics` and the `X-Corecast-Node` response header. Default: generated on the first
    /// start and kept in `--data-dir` (`node-id`).
    #[arg(long, env = "CORECAST_NODE_ID")]
    pub node_id: Option<String>,

    /// Directory for the durable history log.
    #[arg(long, env = "CORECAST_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Where persisted messages are kept: `log` (the embedded log under --data-dir),
    /// `postgres` (the table `corecast.history` in the database, shared by every node that
    /// uses it), or `auto`: postgres when a database URL is set and the table can be used,
    /// the log otherwise.
    #[arg(long, env = "CORECAST_HISTORY_STORE", value_enum, default_value = "auto")]
    pub history_store: HistoryStoreArg,

    /// Largest WebSocket frame payload accepted (bytes); larger closes the socket with 1009.
    #[arg(long, env = "CORECAST_MAX_FRAME_BYTES", default_value_t = 4 << 20)]
    pub max_frame_bytes: usize,

    /// Largest reassembled WebSocket message and HTTP request body accepted (bytes); larger
    /// closes the socket with 1009 (WebSocket) or gets 413 (HTTP).
    #[arg(long, env = "CORECAST_MAX_MESSAGE_BYTES", default_value_t = 4 << 20)]
    pub max_message_bytes: usize,

    /// Largest broadcast payload (bytes). A larger one is refused with the error reply
    /// `payload_size_exceeded` (413 over REST) while the connection carries on. Supabase's
    /// default is 3,000 KB.
    #[arg(long, env = "CORECAST_MAX_PAYLOAD_BYTES", default_value_t = 3_000_000)]
    pub max_payload_bytes: usize,

    /// Channels one connection may join at once (more: `ChannelRateLimitReached`).
    #[arg(long, env = "CORECAST_MAX_CHANNELS_PER_CONNECTION", default_value_t = 100)]
    pub max_channels_per_connection: usize,

    /// Bytes queued for one connection before it counts as a slow consumer and is closed with
    /// 1008. Larger tolerates longer stalls per subscriber at the cost of memory under stalls.
    #[arg(long, env = "CORECAST_MAX_QUEUE_BYTES", default_value_t = 4 << 20)]
    pub max_queue_bytes: usize,

    /// Joins per second one connection may make (burst of the same size).
    #[arg(long, env = "CORECAST_JOINS_PER_SECOND", default_value_t = 100)]
    pub joins_per_second: u32,

    /// Seconds without inbound data after which a WebSocket is closed (Phoenix: 60).
    #[arg(long, env = "CORECAST_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,

    /// Presence entries one channel may hold (more tracks are refused).
    #[arg(long, env = "CORECAST_PRESENCE_MAX_ENTRIES", default_value_t = 20_000)]
    pub presence_max_entries: usize,

    /// Largest presence state one tracked entry may carry (JSON bytes).
    #[arg(long, env = "CORECAST_PRESENCE_MAX_BYTES", default_value_t = 4096)]
    pub presence_max_bytes: usize,

    /// Presence track/untrack calls one connection may make per 30 s.
    #[arg(long, env = "CORECAST_PRESENCE_CALLS_PER_30S", default_value_t = 10)]
    pub presence_calls_per_30s: u32,

    /// Window over which presence diffs are coalesced (milliseconds).
    #[arg(long, env = "CORECAST_PRESENCE_DIFF_MS", default_value_t = 20)]
    pub presence_diff_ms: u64,

    /// Persisted (`persist`) messages kept per topic in the durable history.
    #[arg(long, env = "CORECAST_HISTORY_MAX_MESSAGES", default_value_t = 1000)]
    pub history_max_messages: usize,

    /// Seconds a persisted message is kept (unless its own `ttl` is shorter).
    #[arg(long, env = "CORECAST_HISTORY_MAX_AGE_SECS", default_value_t = 72 * 3600)]
    pub history_max_age_secs: u64,

    /// Messages per topic in the recent window that backs resume for every message (persisted
    /// or not). Memory: up to this many messages per active topic.
    #[arg(long, env = "CORECAST_WINDOW_MESSAGES", default_value_t = 256)]
    pub window_messages: usize,

    /// Seconds a message stays in the recent window.
    #[arg(long, env = "CORECAST_WINDOW_AGE_SECS", default_value_t = 300)]
    pub window_age_secs: u64,

    /// Largest HTTP request head (bytes).
    #[arg(long, env = "CORECAST_MAX_HEAD_BYTES", default_value_t = 16 << 10)]
    pub max_head_bytes: usize,
}

/// `--history-store` as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HistoryStoreArg {
    Auto,
    Log,
    Postgres,
}

/// Where persisted messages are kept (see [`RawConfig::history_store`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryStore {
    /// The embedded log under `data_dir`.
    Log,
    /// The `corecast.history` table in `database_url`.
    Postgres,
    /// The cluster's JetStream stream (`--cluster nats://…`): it holds every node's messages.
    Stream,
}

/// Validated configuration, shared read-only by every shard.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `--tls-cert` and `--tls-key`, when the listener serves TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub shards: usize,
    /// CPU for each shard, `cpus[i]` for shard `i`.
    pub cpus: Vec<usize>,
    /// CPU for the Postgres ingest thread, if one is free.
    pub ingest_cpu: Option<usize>,
    pub jwt_secret: Option<String>,
    pub database_url: Option<String>,
    pub publication: String,
    pub slot: String,
    /// See [`RawConfig::pg_resume_grace_ms`].
    pub pg_resume_grace: Duration,
    /// `--node-id` as given; the boot resolves the default (see [`crate::node::resolve`]) and
    /// stores the result here, so it is `Some` for every running shard.
    pub node_id: Option<String>,
    pub cluster: crate::cluster::Mode,
    /// See [`RawConfig::cluster_slot_ttl_secs`].
    pub cluster_slot_ttl: Duration,
    pub data_dir: PathBuf,
    pub history_store: HistoryStore,
    /// `--history-store auto` chose Postgres: if the table cannot be used at start (no
    /// privilege to create it, database unreachable), fall back to the log instead of failing.
    pub history_store_fallback: bool,
    pub limits: Limits,
}

/// Limits, each documented on the corresponding [`RawConfig`] flag.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_message_bytes: usize,
    pub max_payload_bytes: usize,
    pub max_channels_per_connection: usize,
    pub max_queue_bytes: usize,
    pub joins_per_second: u32,
    pub idle_timeout: Duration,
    pub presence_max_entries: usize,
    pub presence_max_bytes: usize,
    pub presence_calls_per_30s: u32,
    pub presence_diff: Duration,
    pub history_max_messages: usize,
    pub history_max_age: Duration,
    pub window_messages: usize,
    pub window_age: Duration,
    pub max_head_bytes: usize,
}

impl Limits {
    /// The history bounds in the form the channel layer uses.
    pub fn history(&self) -> crate::channel::history::HistoryLimits {
        crate::channel::history::HistoryLimits {
            window_messages: self.window_messages,
            window_age_ms: self.window_age.as_millis() as u64,
            durable_messages: self.history_max_messages,
            durable_age_ms: self.history_max_age.as_millis() as u64,
        }
    }
}

impl Config {
    /// This node's id ("" before the boot resolved it, e.g. in unit tests).
    pub fn node_id(&self) -> &str {
        self.node_id.as_deref().unwrap_or("")
    }
}

/// A configuration value that parsed but makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--tls-cert and --tls-key go together: give both (or neither, for plain HTTP)")]
    TlsHalf,
    #[error("--shards must be at least 1")]
    ZeroShards,
    #[error("--cpus `{0}` is not a CPU list like `0,2` or `0-3`")]
    BadCpuList(String),
    #[error("--cpus lists {listed} CPUs but {shards} shards need one each")]
    TooFewCpus { listed: usize, shards: usize },
    #[error("--{0} must be greater than 0")]
    Zero(&'static str),
    #[error("--max-frame-bytes ({frame}) cannot exceed --max-message-bytes ({message})")]
    FrameOverMessage { frame: usize, message: usize },
    #[error("--jwt-secret is empty; unset it for development mode")]
    EmptySecret,
    #[error("--node-id {0:?} is not a node id: use 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadNodeId(String),
    #[error("the database URL is empty")]
    EmptyDatabaseUrl,
    #[error("--history-store postgres needs a database: set --database-url (DATABASE_URL)")]
    HistoryStoreWithoutDatabase,
    #[error("--cluster postgres needs a database: set --database-url (DATABASE_URL) to the one every node shares")]
    ClusterWithoutDatabase,
    #[error("--cluster postgres keeps history in the shared database: --history-store log cannot be used with it")]
    ClusterWithLog,
    #[error(
        "--cluster nats://… keeps history in the JetStream stream every node shares: leave --history-store at auto"
    )]
    NatsWithHistoryStore,
}

impl RawConfig {
    /// Validates and derives the final configuration. `allowed` lists the CPUs this process may
    /// run on (its affinity mask): shards are pinned to those by default.
    pub fn validate(self, allowed: &[usize]) -> Result<Config, ConfigError> {
        let fallback = [0];
        let allowed = if allowed.is_empty() { &fallback[..] } else { allowed };
        let available_cpus = allowed.len();
        let database_url = self.database_url.or_else(|| std::env::var("DATABASE_URL").ok());
        if database_url.as_deref().is_some_and(|u| u.trim().is_empty()) {
            return Err(ConfigError::EmptyDatabaseUrl);
        }
        let listed = match &self.cpus {
            Some(s) => Some(parse_cpu_list(s).ok_or_else(|| ConfigError::BadCpuList(s.clone()))?),
            None => None,
        };
        let default_shards = {
            let n = listed.as_ref().map_or(available_cpus, Vec::len);
            if database_url.is_some() {
                n.saturating_sub(1).max(1)
            } else {
                n.max(1)
            }
        };
        let shards = self.shards.unwrap_or(default_shards);
        if shards == 0 {
            return Err(ConfigError::ZeroShards);
        }
        let (cpus, ingest_cpu) = match listed {
            Some(l) => {
                if l.len() < shards {
                    return Err(ConfigError::TooFewCpus { listed: l.len(), shards });
                }
                let ingest = l.get(shards).copied();
                (l[..shards].to_vec(), ingest)
            }
            None => {
                let cpus: Vec<usize> = (0..shards).map(|i| allowed[i % available_cpus]).collect();
                let ingest = allowed.get(shards).copied();
                (cpus, ingest)
            }
        };
        if self.jwt_secret.as_deref() == Some("") {
            return Err(ConfigError::EmptySecret);
        }
        for (name, v) in [
            ("max-frame-bytes", self.max_frame_bytes),
            ("max-message-bytes", self.max_message_bytes),
            ("max-payload-bytes", self.max_payload_bytes),
            ("max-channels-per-connection", self.max_channels_per_connection),
            ("max-queue-bytes", self.max_queue_bytes),
            ("joins-per-second", self.joins_per_second as usize),
            ("idle-timeout-secs", self.idle_timeout_secs as usize),
            ("presence-max-entries", self.presence_max_entries),
            ("presence-max-bytes", self.presence_max_bytes),
            ("presence-calls-per-30s", self.presence_calls_per_30s as usize),
            ("history-max-messages", self.history_max_messages),
            ("window-messages", self.window_messages),
            ("max-head-bytes", self.max_head_bytes),
            ("cluster-slot-ttl-secs", self.cluster_slot_ttl_secs as usize),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        let nats = matches!(self.cluster, crate::cluster::Mode::Nats(_));
        if nats && self.history_store != HistoryStoreArg::Auto {
            return Err(ConfigError::NatsWithHistoryStore);
        }
        let history_store = match (self.history_store, database_url.is_some()) {
            _ if nats => HistoryStore::Stream,
            (HistoryStoreArg::Log, _) | (HistoryStoreArg::Auto, false) => HistoryStore::Log,
            (HistoryStoreArg::Postgres, true) | (HistoryStoreArg::Auto, true) => HistoryStore::Postgres,
            (HistoryStoreArg::Postgres, false) => return Err(ConfigError::HistoryStoreWithoutDatabase),
        };
        if self.cluster == crate::cluster::Mode::Postgres {
            if database_url.is_none() {
                return Err(ConfigError::ClusterWithoutDatabase);
            }
            if history_store == HistoryStore::Log {
                return Err(ConfigError::ClusterWithLog);
            }
        }
        if let Some(id) = self.node_id.as_deref().filter(|id| !crate::node::valid(id)) {
            return Err(ConfigError::BadNodeId(id.to_string()));
        }
        if self.max_frame_bytes > self.max_message_bytes {
            return Err(ConfigError::FrameOverMessage { frame: self.max_frame_bytes, message: self.max_message_bytes });
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(ConfigError::TlsHalf),
        };
        Ok(Config {
            listen: self.listen,
            tls,
            shards,
            cpus,
            ingest_cpu,
            jwt_secret: self.jwt_secret,
            database_url,
            publication: self.publication,
            slot: self.slot,
            pg_resume_grace: Duration::from_millis(self.pg_resume_grace_ms),
            node_id: self.node_id,
            // Nodes must share the history: no silent fall-back to a local log in a cluster.
            history_store_fallback: self.history_store == HistoryStoreArg::Auto
                && self.cluster == crate::cluster::Mode::None,
            cluster: self.cluster,
            cluster_slot_ttl: Duration::from_secs(self.cluster_slot_ttl_secs),
            data_dir: self.data_dir,
            history_store,
            limits: Limits {
                max_frame_bytes: self.max_frame_bytes,
                max_message_bytes: self.max_message_bytes,
                max_payload_bytes: self.max_payload_bytes,
                max_channels_per_connection: self.max_channels_per_connection,
                max_queue_bytes: self.max_queue_bytes,
                joins_per_second: self.joins_per_second,
                idle_timeout: Duration::from_secs(self.idle_timeout_secs),
                presence_max_entries: self.presence_max_entries,
                presence_max_bytes: self.presence_max_bytes,
                presence_calls_per_30s: self.presence_calls_per_30s,
                presence_diff: Duration::from_millis(self.presence_diff_ms),
                history_max_messages: self.history_max_messages,
                history_max_age: Duration::from_secs(self.history_max_age_secs),
                window_messages: self.window_messages,
                window_age: Duration::from_secs(self.window_age_secs),
                max_head_bytes: self.max_head_bytes,
            },
        })
    }
}

/// Parses `0,2,4-6` into `[0, 2, 4, 5, 6]`.
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(args: &[&str]) -> RawConfig {
        let mut v = vec!["corecast"];
        v.extend_from_slice(args);
        RawConfig::try_parse_from(v).unwrap()
    }

    #[test]
    fn defaults() {
        let c = raw(&[]).validate(&[0, 1, 2, 3]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:4000");
        assert_eq!(c.shards, 4);
        assert_eq!(c.limits.max_channels_per_connection, 100);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn tls_flags_go_together() {
        assert_eq!(raw(&["--tls-cert", "c.pem"]).validate(&[0]).unwrap_err(), ConfigError::TlsHalf);
        assert_eq!(raw(&["--tls-key", "k.pem"]).validate(&[0]).unwrap_err(), ConfigError::TlsHalf);
        let c = raw(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).validate(&[0]).unwrap();
        assert_eq!(c.tls, Some(("c.pem".into(), "k.pem".into())));
        assert_eq!(raw(&[]).validate(&[0]).unwrap().tls, None);
    }

    #[test]
    fn database_takes_a_core() {
        let c = raw(&["--database-url", "postgres://x"]).validate(&[0, 1, 2, 3]).unwrap();
        assert_eq!((c.shards, c.ingest_cpu), (3, Some(3)));
    }

    #[test]
    fn cluster_mode_needs_the_shared_database() {
        use crate::cluster::Mode;
        assert_eq!(raw(&[]).validate(&[0]).unwrap().cluster, Mode::None);
        assert_eq!(raw(&["--cluster", "postgres"]).validate(&[0]).unwrap_err(), ConfigError::ClusterWithoutDatabase);
        let db = ["--cluster", "postgres", "--database-url", "postgres://u@h/db"];
        let c = raw(&db).validate(&[0, 1]).unwrap();
        assert_eq!(
            (c.cluster, c.history_store, c.history_store_fallback),
            (Mode::Postgres, HistoryStore::Postgres, false)
        );
        let mut log = db.to_vec();
        log.extend(["--history-store", "log"]);
        assert_eq!(raw(&log).validate(&[0]).unwrap_err(), ConfigError::ClusterWithLog);
        // NATS: the stream is the history, with or without a database for Postgres changes.
        let nats = ["--cluster", "nats://127.0.0.1:4222"];
        let c = raw(&nats).validate(&[0]).unwrap();
        assert_eq!(
            (c.cluster, c.history_store),
            (Mode::Nats(vec!["nats://127.0.0.1:4222".into()]), HistoryStore::Stream)
        );
        let mut with_db = nats.to_vec();
        with_db.extend(["--database-url", "postgres://u@h/db"]);
        assert_eq!(raw(&with_db).validate(&[0]).unwrap().history_store, HistoryStore::Stream);
        with_db.extend(["--history-store", "postgres"]);
        assert_eq!(raw(&with_db).validate(&[0]).unwrap_err(), ConfigError::NatsWithHistoryStore);
    }

    #[test]
    fn history_store_follows_the_database() {
        let with_db = |extra: &[&str]| {
            let mut a = vec!["--database-url", "postgres://x"];
            a.extend_from_slice(extra);
            raw(&a).validate(&[0, 1]).map(|c| c.history_store)
        };
        assert_eq!(with_db(&[]), Ok(HistoryStore::Postgres));
        assert_eq!(with_db(&["--history-store", "log"]), Ok(HistoryStore::Log));
        assert_eq!(raw(&["--history-store", "auto"]).validate(&[0]).unwrap().history_store, HistoryStore::Log);
        assert_eq!(
            raw(&["--history-store", "postgres"]).validate(&[0]).unwrap_err(),
            ConfigError::HistoryStoreWithoutDatabase
        );
    }

    #[test]
    fn rejects_bad_values() {
        assert_eq!(raw(&["--shards", "0"]).validate(&[0, 1]).unwrap_err(), ConfigError::ZeroShards);
        assert!(matches!(raw(&["--cpus", "a"]).validate(&[0, 1]), Err(ConfigError::BadCpuList(_))));
        assert!(matches!(
            raw(&["--shards", "3", "--cpus", "0,1"]).validate(&[0, 1]),
            Err(ConfigError::TooFewCpus { .. })
        ));
        assert!(matches!(
            raw(&["--max-frame-bytes", "10", "--max-message-bytes", "5"]).validate(&[0, 1]),
            Err(ConfigError::FrameOverMessage { .. })
        ));
        assert!(RawConfig::try_parse_from(["corecast", "--listen", "nope"]).is_err());
        assert!(RawConfig::try_parse_from(["corecast", "--bogus"]).is_err());
    }

    #[test]
    fn default_pinning_follows_the_affinity_mask() {
        let c = raw(&[]).validate(&[2, 3, 6]).unwrap();
        assert_eq!((c.shards, c.cpus.clone(), c.ingest_cpu), (3, vec![2, 3, 6], None));
        let c = raw(&["--database-url", "postgres://x"]).validate(&[2, 3, 6]).unwrap();
        assert_eq!((c.shards, c.cpus.clone(), c.ingest_cpu), (2, vec![2, 3], Some(6)));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,2,4-6"), Some(vec![0, 2, 4, 5, 6]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list(""), None);
    }
}
