//! Start-up and shutdown: bind one `SO_REUSEPORT` listener per shard, wire the mesh, start
//! one pinned glommio executor per shard, and on SIGINT/SIGTERM stop accepting, close every
//! WebSocket with 1001 and return once connections are gone (or a deadline passes).

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

use crate::auth::Verifier;
use crate::bus::{ShardMsg, INBOX_CAPACITY};
use crate::config::{Config, HistoryStore};
use crate::ingest::IngestHandle;
use crate::protocol::phoenix::Topic;
use crate::protocol::ws::CloseCode;
use crate::shard::mesh::{full_mesh, MeshEnds};
use crate::shard::stats::ShardStats;
use crate::shard::{close_slot, conn, Durable, Kind, Shard};
use crate::store::log::{self, Record, RecoveredTopic};
use crate::transport::listener::bind_reuseport;
use crate::transport::poller::Poller;
use crate::transport::tls::Acceptor;

/// How long shutdown waits for connections to close after sending 1001.
const DRAIN: Duration = Duration::from_secs(3);

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot start shard {shard} on CPU {cpu}: {message}{}", hint(message))]
    Executor { shard: usize, cpu: usize, message: String },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the Postgres ingest: {0}")]
    Ingest(String),
    #[error("cannot use the Postgres history store: {0}")]
    History(crate::store::pg::PgStoreError),
    #[error("cannot start cluster mode: {0}")]
    Cluster(String),
    #[error("cannot serve TLS: {0}")]
    Tls(crate::transport::tls::TlsError),
    #[error("cannot create an epoll instance: {0}")]
    Poller(std::io::Error),
    #[error("cannot use the data directory {dir}: {message}")]
    DataDir { dir: String, message: String },
}

/// What to do about a known start-up failure.
fn hint(message: &str) -> &'static str {
    if message.contains("MemLockLimit") {
        " (io_uring needs locked memory: raise the memlock limit, e.g. `ulimit -l unlimited` or \
         LimitMEMLOCK=infinity in systemd; see tuning/README.md)"
    } else {
        ""
    }
}

/// Runs the server until SIGINT/SIGTERM; calls `ready` with the bound address once every
/// shard accepts.
pub fn run(mut cfg: Config, ready: impl FnOnce(std::net::SocketAddr, &str)) -> Result<(), BootError> {
    // First, while this is the only thread: every connection is a descriptor.
    match crate::transport::fds::prepare() {
        Ok(b) if b.soft > b.soft_before => tracing::info!(
            from = b.soft_before,
            to = b.soft,
            table = b.table,
            connections = b.cap,
            "open files: raised the soft limit to the hard limit (one descriptor per connection)"
        ),
        Ok(b) => tracing::info!(
            limit = b.soft,
            table = b.table,
            connections = b.cap,
            "open files (one descriptor per connection)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
    let (node, source) = crate::node::resolve(cfg.node_id.as_deref(), &cfg.data_dir)
        .map_err(|message| BootError::DataDir { dir: cfg.data_dir.display().to_string(), message })?;
    match source {
        crate::node::Source::Generated => {
            tracing::info!(node = %node, dir = %cfg.data_dir.display(), "generated a node id, kept in the data directory")
        }
        crate::node::Source::Unkept => tracing::warn!(
            node = %node,
            dir = %cfg.data_dir.display(),
            "generated a node id but the data directory cannot keep it: the next start gets another (set --node-id)"
        ),
        crate::node::Source::Flag | crate::node::Source::Kept => {}
    }
    crate::protocol::http::set_node_id(&node);
    if cfg.cluster != crate::cluster::Mode::None {
        // Each node reads its own stream: one slot per node.
        cfg.slot = crate::cluster::slot_name(&cfg.slot, &node);
    }
    cfg.node_id = Some(node);
    let cfg = Arc::new(cfg);
    let tls = match &cfg.tls {
        Some((cert, key)) => {
            let acceptor = Acceptor::load(cert, key).map_err(BootError::Tls)?;
            let info = acceptor.info();
            let ktls = crate::transport::tls::kernel_tls();
            tracing::info!(
                cert = %cert.display(),
                subject = %info.subject,
                not_after = %info.not_after,
                chain = info.chain,
                kernel_tls = ktls,
                "TLS: serving HTTPS, WSS and SSE; records are encrypted in user space (rustls)"
            );
            Some(Arc::new(acceptor))
        }
        None => None,
    };
    let (fds, addr) =
        bind_reuseport(cfg.listen, cfg.shards).map_err(|source| BootError::Listen { addr: cfg.listen, source })?;
    let mut pollers =
        (0..cfg.shards).map(|_| Poller::new()).collect::<std::io::Result<Vec<_>>>().map_err(BootError::Poller)?;
    let stop = Arc::new(AtomicBool::new(false));
    install_signals(stop.clone(), tls.clone())?;
    let verifier = Arc::new(Verifier::new(cfg.jwt_secret.as_deref()));
    let stats: Arc<[ShardStats]> = (0..cfg.shards).map(|_| ShardStats::default()).collect();
    let (ready_tx, ready_rx) = mpsc::channel();
    let (inbox_tx, inbox_rx): (Vec<_>, Vec<_>) = (0..cfg.shards).map(|_| flume::bounded(INBOX_CAPACITY)).unzip();
    let postgres = match cfg.history_store {
        HistoryStore::Log | HistoryStore::Stream => None,
        HistoryStore::Postgres => match postgres_history(&cfg, &inbox_tx) {
            Ok(p) => Some(p),
            Err(e) if cfg.history_store_fallback => {
                tracing::error!(
                    error = %e,
                    dir = %cfg.data_dir.display(),
                    "history: cannot use the corecast.history table; persisted messages go to the embedded log \
                     instead (--history-store postgres makes this an error)"
                );
                None
            }
            Err(e) => return Err(e),
        },
    };
    let (_lock, durable, mut recovered) = match postgres {
        Some((durable, recovered)) => (None, durable, recovered),
        // The cluster's stream is the history: what it holds arrives below.
        None if cfg.history_store == HistoryStore::Stream => {
            (None, Durable::Off, (0..cfg.shards).map(|_| Vec::new()).collect())
        }
        None => {
            let (lock, generation, recovered) = prepare_history(&cfg)?;
            (Some(lock), Durable::Log { generation }, recovered)
        }
    };
    let (cluster, inbound) = match &cfg.cluster {
        crate::cluster::Mode::None => (None, None),
        crate::cluster::Mode::Postgres => {
            let url = cfg.database_url.as_deref().unwrap_or_default();
            let pg = crate::ingest::parse_database_url(url).map_err(BootError::Ingest)?;
            let (handle, inbound) = crate::cluster::start_postgres(
                pg,
                cfg.node_id().to_string(),
                cfg.slot.clone(),
                inbox_tx.clone(),
                cfg.ingest_cpu,
                cfg.cluster_slot_ttl,
            )
            .map_err(BootError::Cluster)?;
            tracing::info!(node = %cfg.node_id(), slot = %cfg.slot, "cluster mode: postgres");
            (Some(handle), Some(inbound))
        }
        crate::cluster::Mode::Nats(urls) => {
            let pg = match cfg.database_url.as_deref() {
                Some(url) => Some((
                    crate::ingest::parse_database_url(url).map_err(BootError::Ingest)?,
                    cfg.slot.clone(),
                    cfg.cluster_slot_ttl,
                )),
                None => None,
            };
            let (handle, from_stream) = crate::cluster::nats::start_nats(
                urls.clone(),
                cfg.node_id().to_string(),
                inbox_tx.clone(),
                cfg.ingest_cpu,
                cfg.limits.history(),
                cfg.limits.max_payload_bytes,
                pg,
            )
            .map_err(BootError::Cluster)?;
            tracing::info!(node = %cfg.node_id(), servers = %crate::cluster::nats::redacted(urls), topics = from_stream.len(), "cluster mode: nats");
            recovered = distribute(&cfg, from_stream);
            (Some(handle), None)
        }
    };
    let ingest = match &cfg.database_url {
        Some(_) => Some(crate::ingest::start(&cfg, inbox_tx, inbound).map_err(BootError::Ingest)?),
        None => None,
    };
    let mut handles = Vec::with_capacity(cfg.shards);
    for (id, ((ends, fd), inbox)) in full_mesh(cfg.shards).into_iter().zip(fds).zip(inbox_rx).enumerate() {
        let cpu = cfg.cpus[id];
        let (cfg, verifier, stats, stop, ready_tx) =
            (cfg.clone(), verifier.clone(), stats.clone(), stop.clone(), ready_tx.clone());
        let (ingest, durable, cluster, tls) = (ingest.clone(), durable.clone(), cluster.clone(), tls.clone());
        let recovered = std::mem::take(&mut recovered[id]);
        let poller = pollers.remove(0);
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{id}"))
            .io_memory(256 << 10)
            .ring_depth(1024)
            // glommio's default preempt timer (100 ms). A short one makes glommio 0.9 park with
            // runnable tasks when the timer fires right before a scheduling round (fixed only in
            // the unreleased fork); shards yield on elapsed time themselves (`Shard::relax`).
            .spawn(move || {
                let services = Services { ingest, durable, cluster, tls, poller };
                shard_main(id, cfg, verifier, stats, ends, fd, stop, ready_tx, inbox, services, recovered)
            })
            .map_err(|e| BootError::Executor { shard: id, cpu, message: e.to_string() })?;
        handles.push(h);
    }
    drop(ready_tx);
    let mut started = 0;
    while started < cfg.shards && ready_rx.recv().is_ok() {
        started += 1;
    }
    if started == cfg.shards {
        ready(addr, cfg.node_id());
    }
    let mut failure = None;
    for (shard, h) in handles.into_iter().enumerate() {
        if let Err(e) = h.join() {
            tracing::error!(shard, error = %e, "shard executor failed");
            failure.get_or_insert(BootError::Executor { shard, cpu: cfg.cpus[shard], message: e.to_string() });
        }
    }
    if let Some(c) = &cluster {
        // The others drop this node's members now instead of when the lease lapses.
        c.leave(Duration::from_secs(2));
    }
    match failure {
        // A shard that never started (say, the memlock limit is below glommio's 512 KiB) is a
        // failed start, not a clean exit.
        Some(e) => Err(e),
        None if started < cfg.shards => Err(BootError::Executor {
            shard: started,
            cpu: cfg.cpus[started],
            message: "the shard stopped before it could accept connections".into(),
        }),
        None => Ok(()),
    }
}

/// SIGINT/SIGTERM stop the server (a second one exits at once); SIGHUP reloads the TLS
/// certificate and key.
fn install_signals(stop: Arc<AtomicBool>, tls: Option<Arc<Acceptor>>) -> Result<(), BootError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(BootError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    match &tls {
                        None => tracing::info!("SIGHUP: nothing to reload (no --tls-cert)"),
                        Some(acceptor) => match acceptor.reload() {
                            Ok(info) => tracing::info!(
                                subject = %info.subject,
                                not_after = %info.not_after,
                                "SIGHUP: TLS certificate reloaded; new connections use it, open ones keep theirs"
                            ),
                            Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; still serving the previous certificate"),
                        },
                    }
                    continue;
                }
                if stop.swap(true, Ordering::SeqCst) {
                    tracing::warn!(signal = sig, "second signal: exiting now");
                    std::process::exit(1);
                }
                tracing::info!(signal = sig, "shutting down: closing connections with 1001");
            }
        })
        .map_err(BootError::Signals)?;
    Ok(())
}

/// What a shard is connected to besides its peers.
struct Services {
    ingest: Option<IngestHandle>,
    durable: Durable,
    cluster: Option<crate::cluster::ClusterHandle>,
    tls: Option<Arc<Acceptor>>,
    poller: Poller,
}

#[allow(clippy::too_many_arguments)]
async fn shard_main(
    id: usize,
    cfg: Arc<Config>,
    verifier: Arc<Verifier>,
    stats: Arc<[ShardStats]>,
    ends: MeshEnds,
    fd: RawFd,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<()>,
    inbox: flume::Receiver<ShardMsg>,
    services: Services,
    recovered: Vec<(Topic, RecoveredTopic)>,
) {
    let mesh = ends.connect().await;
    let Services { ingest, durable, cluster, tls, poller } = services;
    let shard =
        Rc::new(Shard::new(id, cfg, verifier, stats, ingest, durable, cluster).with_tls(tls).with_poller(poller));
    for (topic, rt) in recovered {
        shard.restore_topic(topic, rt);
    }
    glommio::spawn_local(shard.clone().log_loop()).detach();
    glommio::spawn_local(shard.clone().inbox_loop(inbox)).detach();
    glommio::spawn_local(shard.clone().flush_loop()).detach();
    glommio::spawn_local(shard.clone().readiness_loop()).detach();
    glommio::spawn_local(shard.clone().presence_flush_loop()).detach();
    for (peer, tx) in mesh.senders.into_iter().enumerate() {
        if let Some(tx) = tx {
            glommio::spawn_local(shard.clone().mesh_send_loop(peer, tx)).detach();
        }
    }
    for (_, rx) in mesh.receivers {
        glommio::spawn_local(shard.clone().mesh_recv_loop(rx)).detach();
    }
    glommio::spawn_local(sweep_loop(shard.clone(), stop)).detach();
    // SAFETY: `fd` is a listening socket created by `bind_reuseport` for this shard alone.
    let listener = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = ready.send(());
    accept_loop(&shard, listener.as_raw_fd()).await;
    drop(listener);
    drain(&shard).await;
}

/// Accepts connections until shutdown: as many as are waiting each time the (non-blocking)
/// listener becomes readable, with `accept4` (the new socket non-blocking and close-on-exec
/// in the same call).
///
/// Past the connection cap ([`crate::transport::fds::admit`]: the open-files limit less a
/// reserve for everything else), a connection is accepted only to be answered `503` with
/// `Retry-After` and closed: clients get a clear refusal at once instead of waiting in the
/// listen queue, `/metrics` counts them, and the log says so at most every
/// [`REFUSAL_LOG_EVERY`]. The reserve keeps descriptors free for that, so `EMFILE` is not the
/// way the limit shows.
async fn accept_loop(shard: &Rc<Shard>, listener: RawFd) {
    let mut refusals = Refusals::default();
    while !shard.shutdown.fired() {
        // SAFETY: accept4 on this shard's listening socket, without the peer's address.
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a new socket that nothing else owns.
            let stream = unsafe { OwnedFd::from_raw_fd(fd) };
            match crate::transport::fds::admit() {
                Some(slot) => {
                    glommio::spawn_local(conn::serve(shard.clone(), stream, slot)).detach();
                }
                None => {
                    refuse(stream, shard.tls.is_none());
                    ShardStats::add(&shard.my_stats().refused_no_fds, 1);
                    refusals.refused(shard.id);
                }
            }
            glommio::yield_if_needed().await;
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => {
                let woke =
                    futures_lite::future::or(async { Some(glommio::net::wait_readable(listener).await) }, async {
                        shard.shutdown.wait().await;
                        None
                    })
                    .await;
                match woke {
                    None => return,
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        tracing::warn!(shard = shard.id, error = %e, "cannot wait for connections");
                        glommio::timer::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            // The connection went away before it was accepted; the next one may be fine.
            Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => {}
            _ => {
                // EMFILE/ENFILE (the reserve ran out after all) and friends: back off
                // instead of spinning.
                refusals.failed(shard.id, &e);
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// How often the accept loop logs refusals and failures (with the count since the last line).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Rate-limited logging for the accept loop.
#[derive(Default)]
struct Refusals {
    last: Option<Instant>,
    refused: u64,
    failed: u64,
}

impl Refusals {
    fn due(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_EVERY) {
            return false;
        }
        self.last = Some(now);
        true
    }

    fn refused(&mut self, shard: usize) {
        self.refused += 1;
        if self.due() {
            tracing::warn!(
                shard,
                refused = std::mem::take(&mut self.refused),
                cap = crate::transport::fds::cap(),
                "at the connection cap (the open-files limit less a reserve): refusing connections with 503; raise the hard open-files limit"
            );
        }
    }

    fn failed(&mut self, shard: usize, e: &std::io::Error) {
        self.failed += 1;
        if self.due() {
            tracing::warn!(shard, error = %e, failures = std::mem::take(&mut self.failed), "accept failed");
        }
    }
}

/// Answers a connection past the cap with `503` (on a plain HTTP listener; a TLS one just
/// closes) and closes it.
fn refuse(fd: OwnedFd, http: bool) {
    if !http {
        return;
    }
    static RESPONSE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let body = r#"{"error":"the server is at its connection limit (open files); retry later"}"#;
        format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n\
             Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    });
    // The request is usually there (`TCP_DEFER_ACCEPT`): read it first, since closing with
    // unread input sends a reset that can destroy the response. Best effort, never blocking: a
    // fresh socket's buffer takes the response whole.
    let _ = crate::transport::poller::recv(fd.as_raw_fd(), &mut [0u8; 4096]);
    // SAFETY: send from a live buffer on the socket just accepted.
    unsafe {
        libc::send(fd.as_raw_fd(), RESPONSE.as_ptr().cast(), RESPONSE.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
    }
}

/// Closes every connection (WebSockets with 1001) and waits for them to go.
async fn drain(shard: &Rc<Shard>) {
    {
        let mut conns = shard.conns.borrow_mut();
        for (_, slot) in conns.iter_mut() {
            close_slot(slot, CloseCode::GoingAway, "server shutting down");
        }
    }
    let deadline = Instant::now() + DRAIN;
    while !shard.conns.borrow().is_empty() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    // Checkpoints let each topic's stream keep its epoch across the restart.
    shard.write_checkpoints();
    shard.log_stop.fire();
    shard.wake_log();
    let _ = glommio::timer::timeout(Duration::from_secs(2), async {
        shard.log_closed.wait().await;
        Ok(())
    })
    .await;
}

/// Recovered topics, per current shard.
type PerShard = Vec<Vec<(Topic, RecoveredTopic)>>;

/// Locks the data directory, recovers the history log, and rewrites it as one compacted
/// snapshot per current shard (topics may move between shards when the shard count changes).
/// Returns the lock (held for the process's life), this process's segment generation and the
/// recovered topics per shard.
fn prepare_history(cfg: &Config) -> Result<(std::fs::File, u64, PerShard), BootError> {
    let dir = &cfg.data_dir;
    let err = |message: String| BootError::DataDir { dir: dir.display().to_string(), message };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let lock = std::fs::File::create(dir.join("LOCK")).map_err(|e| err(e.to_string()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(err("it is in use by another corecast process".into()));
    }
    let rec = log::recover(dir).map_err(|e| err(e.to_string()))?;
    let newest = rec
        .files
        .iter()
        .filter_map(|f| f.file_name()?.to_str()?.split('-').next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let generation = crate::shard::history::unix_ms().max(newest + 1);
    let (topics, records) = (rec.topics.len(), rec.records);
    let per_shard = distribute(cfg, rec.topics);
    // One compacted snapshot per shard: the messages it now owns. No checkpoint goes into it:
    // it describes the previous run's clean end and must not make a later crash of this run
    // look clean (the epoch would continue over lost, non-persisted messages and offsets would
    // be reused).
    for (shard, topics) in per_shard.iter().enumerate() {
        let recs: Vec<Record> = topics
            .iter()
            .flat_map(|(topic, rt)| {
                rt.messages.iter().map(|m| Record::Message { topic: topic.clone(), msg: (**m).clone() })
            })
            .collect();
        if !recs.is_empty() {
            log::write_snapshot(&dir.join(log::segment_name(generation, 0, shard)), &recs)
                .map_err(|e| err(e.to_string()))?;
        }
    }
    log::sync_dir(dir).map_err(|e| err(e.to_string()))?;
    for f in &rec.files {
        let _ = std::fs::remove_file(f);
    }
    log::sync_dir(dir).map_err(|e| err(e.to_string()))?;
    if records > 0 || rec.dropped_bytes > 0 {
        tracing::info!(
            records,
            topics,
            dropped_bytes = rec.dropped_bytes,
            dir = %dir.display(),
            "history: recovered the durable log"
        );
    }
    Ok((lock, generation, per_shard))
}

/// Loads the history from `corecast.history` and starts its writer.
fn postgres_history(cfg: &Config, inboxes: &[flume::Sender<ShardMsg>]) -> Result<(Durable, PerShard), BootError> {
    let url = cfg.database_url.as_deref().unwrap_or_default();
    let pg = crate::ingest::parse_database_url(url).map_err(BootError::Ingest)?;
    let patience = if cfg.history_store_fallback {
        crate::store::pg::AUTO_CONNECT_PATIENCE
    } else {
        crate::store::pg::CONNECT_PATIENCE
    };
    let rec = crate::store::pg::recover(&pg, patience).map_err(BootError::History)?;
    let (records, topics) = (rec.records, rec.topics.len());
    let per_shard = distribute(cfg, rec.topics);
    if records > 0 {
        tracing::info!(records, topics, "history: loaded from corecast.history");
    }
    let writer = crate::store::pg::start_writer(
        pg,
        inboxes.to_vec(),
        cfg.limits.history(),
        cfg.ingest_cpu,
        cfg.cluster != crate::cluster::Mode::None,
    )
    .map_err(BootError::History)?;
    Ok((Durable::Postgres(writer), per_shard))
}

/// Applies the current bounds to recovered topics and hands each to its current owner shard.
fn distribute(cfg: &Config, topics: std::collections::HashMap<Topic, RecoveredTopic>) -> PerShard {
    let now = crate::shard::history::unix_ms();
    let limits = cfg.limits.history();
    let mut per_shard: Vec<Vec<(Topic, RecoveredTopic)>> = (0..cfg.shards).map(|_| Vec::new()).collect();
    for (topic, mut rt) in topics {
        rt.messages.retain(|m| {
            now.saturating_sub(m.created_ms) <= limits.durable_age_ms && m.expires_ms.is_none_or(|e| e > now)
        });
        // The per-topic bound applies to what is recovered too (it may have been lowered).
        rt.messages.sort_by_key(|m| m.offset);
        let excess = rt.messages.len().saturating_sub(limits.durable_messages);
        rt.messages.drain(..excess);
        if !rt.messages.is_empty() || (rt.clean && rt.epoch.is_some()) {
            per_shard[topic.owner(cfg.shards)].push((topic, rt));
        }
    }
    per_shard
}

/// Housekeeping every 100 ms: the shutdown flag, idle timeouts, token expiry.
async fn sweep_loop(shard: Rc<Shard>, stop: Arc<AtomicBool>) {
    let idle = shard.cfg.limits.idle_timeout;
    let mut tick = 0u64;
    let mut actions = Vec::new();
    loop {
        glommio::timer::sleep(Duration::from_millis(100)).await;
        if stop.load(Ordering::Relaxed) {
            shard.shutdown.fire();
            return;
        }
        tick += 1;
        if tick.is_multiple_of(10 * crate::protocol::sse::KEEP_ALIVE_SECS) {
            shard.sse_keep_alive();
        }
        if !tick.is_multiple_of(10) {
            continue;
        }
        shard.expire_topics();
        let now = conn::now();
        let mut expired = Vec::new();
        let mut idle_conns = Vec::new();
        {
            let mut conns = shard.conns.borrow_mut();
            for (index, slot) in conns.iter_mut() {
                let Kind::Ws(ws) = &mut slot.kind else {
                    continue;
                };
                let id = crate::channel::registry::ConnId { index: index as u32, generation: slot.generation };
                if now.mono.saturating_duration_since(slot.last_rx) >= idle {
                    idle_conns.push(id);
                } else if ws.session.poll_timeout().is_some_and(|t| t <= now.unix_secs) {
                    expired.push(id);
                }
            }
        }
        for id in idle_conns {
            shard.close(id, CloseCode::Normal, "idle timeout: no data for 60 s");
        }
        for id in expired {
            shard.with_slot(id, |slot| {
                if let Kind::Ws(ws) = &mut slot.kind {
                    ws.session.handle_timeout(now, &mut actions);
                }
            });
            shard.run_actions(id, &mut actions);
        }
    }
}
