//! `kuberaft-node`: the server. Hosts many Raft groups, serves the client,
//! peer and admin gRPC services on one port and health/metrics over HTTP.
//!
//! Configuration comes from flags, `KUBERAFT_*` environment variables and an
//! optional file (`--config`, lines of `flag-name = value`); a flag given on
//! the command line wins over the file, and the file over the environment.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use kuberaft_node::http;
use kuberaft_node::rpc::liveness::LivenessOptions;
use kuberaft_node::rpc::{self, Services, peer::PeerTransport};
use kuberaft_node::server::group::GroupOptions;
use kuberaft_node::server::node::{Node, NodeOptions};
use kuberaft_node::storage::GroupStorageOptions;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    name = "kuberaft-node",
    version,
    about = "kuberaft server: a multi-group Raft node",
    args_override_self = true
)]
struct Args {
    /// A file of `flag-name = value` lines (e.g. `data-dir = /var/lib/kuberaft`).
    #[arg(long, env = "KUBERAFT_CONFIG")]
    config: Option<PathBuf>,
    /// Where the member id and every group's log and snapshots live.
    #[arg(long, env = "KUBERAFT_DATA_DIR", default_value = "kuberaft-data")]
    data_dir: PathBuf,
    /// gRPC listen address (clients, peers and admins).
    #[arg(long, env = "KUBERAFT_LISTEN", default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// host:port others reach this node at (e.g. the pod's DNS name);
    /// defaults to --listen.
    #[arg(long, env = "KUBERAFT_ADVERTISE")]
    advertise: Option<String>,
    /// Local IP address that connections to peers leave from (hosts with
    /// several addresses); by default the system picks one.
    #[arg(long, env = "KUBERAFT_SOURCE_ADDRESS")]
    source_address: Option<IpAddr>,
    /// HTTP listen address for /livez, /readyz, /metrics and /status.
    #[arg(long, env = "KUBERAFT_HTTP_LISTEN", default_value = "127.0.0.1:7100")]
    http_listen: SocketAddr,
    /// Length of one consensus tick.
    #[arg(long, env = "KUBERAFT_TICK_MS", default_value_t = 50)]
    tick_ms: u64,
    /// Minimum election timeout; the maximum is twice this.
    #[arg(long, env = "KUBERAFT_ELECTION_TIMEOUT_MS", default_value_t = 1000)]
    election_timeout_ms: u64,
    #[arg(long, env = "KUBERAFT_HEARTBEAT_MS", default_value_t = 100)]
    heartbeat_ms: u64,
    /// Let idle groups go quiet: no heartbeats and no election timers until
    /// a write, a read or a peer's failure wakes them (one ping per peer
    /// pair watches liveness instead). `false` heartbeats every group always.
    #[arg(long, env = "KUBERAFT_QUIESCE", default_value_t = true, action = clap::ArgAction::Set)]
    quiesce: bool,
    /// Serve linearizable reads from a leader lease (needs bounded clock drift).
    #[arg(long, env = "KUBERAFT_LEADER_LEASE")]
    leader_lease: bool,
    /// Snapshot a group after this many applied entries...
    #[arg(long, env = "KUBERAFT_SNAPSHOT_THRESHOLD", default_value_t = 10_000)]
    snapshot_threshold: u64,
    /// ... or after this many bytes of applied entries, whichever comes
    /// first (a group holds its entries since the last snapshot in memory).
    #[arg(long, env = "KUBERAFT_SNAPSHOT_THRESHOLD_BYTES", default_value_t = 256 << 20)]
    snapshot_threshold_bytes: u64,
    /// Exactly-once window of retried writes. The leader's value travels
    /// with each logged call and, once every member runs a version that
    /// knows it (cluster level 2), decides on every member alike.
    #[arg(long, env = "KUBERAFT_RETRY_TTL_MS", default_value_t = 60_000)]
    retry_ttl_ms: u64,
    /// The cluster level this node reports. Only for tests of mixed-version
    /// groups: a lower level makes the node behave, towards its group, as a
    /// version that knows no newer level.
    #[arg(long, hide = true, default_value_t = kuberaft_node::core::FEATURE_LEVEL)]
    feature_level: u32,
    /// Requests a group holds pending before refusing with ResourceUnavailable.
    #[arg(long, env = "KUBERAFT_MAX_PENDING_REQUESTS", default_value_t = 8192)]
    max_pending_requests: u64,
    #[arg(long, env = "KUBERAFT_MAX_PENDING_BYTES", default_value_t = 64 << 20)]
    max_pending_bytes: u64,
    /// A group's log segment file is closed at this size (smaller segments
    /// let a purge free space sooner; larger ones mean fewer files).
    #[arg(long, env = "KUBERAFT_SEGMENT_SIZE_MAX_BYTES", default_value_t = 32 << 20, value_parser = clap::value_parser!(u64).range(4096..))]
    segment_size_max_bytes: u64,
    /// Log entries a group keeps on disk behind its snapshot, so that a
    /// follower that far behind catches up by entries read back from the
    /// log instead of a full snapshot (purges drop whole segments, so a
    /// little more may be kept).
    #[arg(long, env = "KUBERAFT_PURGE_KEEP_ENTRIES", default_value_t = 1024)]
    purge_keep_entries: u64,
    /// A runtime stall longer than this makes leaders step down.
    #[arg(long, env = "KUBERAFT_STALL_THRESHOLD_MS", default_value_t = 1000)]
    stall_threshold_ms: u64,
    /// Threads writing and fsyncing the groups' logs, shared by all groups
    /// (one log is written by one thread at a time).
    #[arg(long, env = "KUBERAFT_LOG_THREADS", default_value_t = 8)]
    log_threads: usize,
    /// Log line format on stdout.
    #[arg(long, env = "KUBERAFT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// Arguments with the config file's settings placed before the command
/// line's, so the command line wins.
fn args_with_config_file() -> anyhow::Result<Args> {
    let argv: Vec<String> = std::env::args().collect();
    let first = Args::parse_from(&argv);
    let Some(path) = &first.config else {
        return Ok(first);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let mut merged = vec![argv[0].clone()];
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            bail!(
                "{}:{}: expected `flag-name = value`, got {line:?}",
                path.display(),
                n + 1
            );
        };
        let (k, v) = (k.trim(), v.trim());
        if v == "true" {
            merged.push(format!("--{k}"));
        } else if v != "false" {
            merged.push(format!("--{k}={v}"));
        }
    }
    merged.extend(argv.into_iter().skip(1));
    Args::try_parse_from(merged).with_context(|| format!("in config file {}", path.display()))
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KUBERAFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stdout);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn options(a: &Args) -> anyhow::Result<NodeOptions> {
    let advertise = match &a.advertise {
        Some(s) => s.clone(),
        None if a.listen.ip().is_unspecified() => {
            bail!(
                "--listen {} is a wildcard address; set --advertise to the host:port peers reach this node at",
                a.listen
            )
        }
        None => a.listen.to_string(),
    };
    let tick = a.tick_ms.max(1);
    let min = (a.election_timeout_ms / tick).max(3);
    let group = GroupOptions {
        tick: Duration::from_millis(tick),
        election_timeout_min_ticks: min,
        election_timeout_max_ticks: min * 2,
        heartbeat_interval_ticks: (a.heartbeat_ms / tick).clamp(1, min - 1),
        leader_lease: a.leader_lease,
        quiesce: a.quiesce,
        snapshot_threshold: a.snapshot_threshold.max(1),
        snapshot_threshold_bytes: a.snapshot_threshold_bytes.max(1),
        retry_ttl_ms: a.retry_ttl_ms,
        max_pending_requests: a.max_pending_requests,
        max_pending_bytes: a.max_pending_bytes,
        stall_threshold: Duration::from_millis(a.stall_threshold_ms),
        feature_level: a.feature_level.clamp(1, kuberaft_node::core::FEATURE_LEVEL),
        ..GroupOptions::default()
    };
    group.validate().map_err(|e| {
        anyhow::anyhow!(
            "{e} (from --tick-ms {tick}, --election-timeout-ms {}, --leader-lease {})",
            a.election_timeout_ms,
            a.leader_lease
        )
    })?;
    let mut storage = GroupStorageOptions::default();
    storage.log.purge_keep_entries = a.purge_keep_entries;
    storage.log.segment_size_max_bytes = a.segment_size_max_bytes;
    Ok(NodeOptions {
        data_dir: a.data_dir.clone(),
        advertise,
        group,
        storage,
        log_threads: a.log_threads.max(1),
    })
}

async fn run(a: Args) -> anyhow::Result<()> {
    let opts = options(&a)?;
    let grpc = TcpListener::bind(a.listen).await.with_context(|| {
        format!(
            "cannot listen for gRPC on {} (in use? pick another --listen)",
            a.listen
        )
    })?;
    let web = TcpListener::bind(a.http_listen).await.with_context(|| {
        format!(
            "cannot listen for HTTP on {} (in use? pick another --http-listen)",
            a.http_listen
        )
    })?;
    let source = a.source_address;
    // Peers are pinged every heartbeat interval and taken for dead after
    // half the minimum election timeout: a quiet group whose leader died
    // then elects within about the time a busy group takes.
    let g = &opts.group;
    let liveness = LivenessOptions {
        interval: g.tick * g.heartbeat_interval_ticks as u32,
        dead_after: g.tick * (g.election_timeout_min_ticks / 2).max(1) as u32,
    };
    let node = Node::open(opts.clone(), |id, router| {
        PeerTransport::with_options(id, router, source, liveness)
    })
    .context("cannot open the data directory")?;
    tracing::info!(
        member_id = node.id,
        grpc = %a.listen,
        http = %a.http_listen,
        advertise = %node.opts.advertise,
        groups = node.groups().len(),
        "kuberaft-node serving"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut grpc_stop = stop_rx.clone();
    let services = Services { node: node.clone() };
    let grpc_task = tokio::spawn(rpc::serve(services, grpc, async move {
        let _ = grpc_stop.wait_for(|s| *s).await;
    }));
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(
        axum::serve(web, http::router(node.clone()))
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .into_future(),
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: handing over leadership, then stopping"),
        _ = int.recv() => tracing::info!("SIGINT: handing over leadership, then stopping"),
        r = grpc_task => {
            r??;
            bail!("the gRPC server stopped");
        }
    }
    node.shutdown().await;
    let _ = stop_tx.send(true);
    let _ = http_task.await;
    tracing::info!("stopped");
    Ok(())
}

fn main() {
    let args = match args_with_config_file() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kuberaft-node: {e:#}");
            std::process::exit(2);
        }
    };
    init_logging(&args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("kuberaft-node: {e:#}");
        std::process::exit(1);
    }
}
