//! The agent runtime: turns a loaded [`Config`] into a running member of the Raft group.
//!
//! [`Agent::start`] establishes the member's identity (bootstrap, join, or the id persisted
//! by an earlier run), opens the Raft store, serves gRPC (`Raft`, `Agent`, `Admin`) on
//! `api.listen` and HTTP (health, metrics) on `api.http_listen`, and spawns the background
//! tasks: bootstrap self-registration or admission as a voter, the observation reporter,
//! and the health publisher. [`AgentHandle::shutdown`] stops all of it.
//!
//! Architecture Invariant: cluster changes (member add/admit/remove, commands) go through
//! `client_write` / `change_membership`, which need a quorum; `state == Leader` is only
//! used to route a request, never to decide that a change happened.

pub mod admin;
pub mod admin_ops;
pub mod backup_admin;
pub mod callbacks;
pub mod dial;
pub mod errlog;
pub mod gate;
pub mod handoff;
pub mod http_write;
pub mod join;
pub mod leader;
pub mod lease;
pub mod limits;
pub mod member;
pub mod observe;
pub mod peers;
pub mod pg_access;
pub mod resume;
pub mod scheduled;
pub mod stop;
pub mod switch_over;
pub mod watchdog;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::{RaftMetrics, ServerState};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, MemberKind};
use crate::http::{self, HttpState, NodeHealth, Role};
use crate::metrics::Metrics;
use crate::raft::{
    open_store, raft_config_with_timing, AddressBook, AppliedState, GrpcNetworkFactory, MemberNode,
    MeridianRaft, NodeId, RaftGrpcService,
};

pub use dial::Dialer;
pub use join::Identity;
pub use observe::ObservationStore;

/// Sub-directory of `state_dir` holding the Raft database.
pub const RAFT_DIR: &str = "raft";

/// Bound on stopping the servers and Raft at shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// What every part of the runtime shares.
pub struct Shared {
    pub config: Config,
    pub id: NodeId,
    pub raft: MeridianRaft,
    pub applied: watch::Receiver<Arc<AppliedState>>,
    pub book: AddressBook,
    pub dialer: Dialer,
    pub observations: ObservationStore,
    pub metrics: Arc<Metrics>,
    /// This member's lease as primary (send time of the last counted renewal).
    pub lease: lease::LeaseState,
    /// The lease grants this member gave as a voter.
    pub grants: lease::Grants,
    /// The generation whose resume in place this agent took or gave up (durable).
    pub resume: resume::ResumeSpent,
    /// This agent's probes of the other members' Postgres.
    pub peer_probes: peers::PeerProbes,
    /// The base of the leader's millisecond clock (`now_ms` of the decision core).
    pub epoch: Instant,
    /// What the agent is doing to its Postgres (reported in observations).
    pub activity: Mutex<String>,
    /// The last WAL position of this member's Postgres after it stopped writes for a
    /// switchover (reported while it is down).
    pub final_lsn: Mutex<Option<crate::types::Lsn>>,
    /// The intent's sync target (sequence number and set) this member's Postgres was last
    /// set to as primary, written only once it was applied: the reporter names it when its
    /// probe shows that set (sim F8).
    pub applied_sync_target: Mutex<Option<(u64, crate::decide::SyncSet)>>,
    /// The lease break (generation, round) after which this member's WAL receiver was
    /// disconnected from that primary; cleared before the receiver is pointed anywhere
    /// again. The reporter names it while the break stands (sim F7b).
    pub receiver_off: Mutex<Option<(crate::types::Generation, crate::raft::intent::BreakRound)>>,
    /// The newest stopped-primary token of a leader's answer to this agent's reports: a
    /// probe after it reads a position that primary can no longer add to (sim F7b).
    pub primary_stop_token: Mutex<Option<crate::types::Generation>>,
    /// The local Postgres's `pg_current_wal_lsn` at the last probe while it was a primary
    /// (0: never), sent with lease renewals.
    pub local_wal_lsn: std::sync::atomic::AtomicU64,
    /// Asks the reporter for an observation now (after the member changed its Postgres).
    pub wake_reporter: tokio::sync::Notify,
    /// Asks the leader loop for a round now (an observation arrived).
    pub wake_leader: tokio::sync::Notify,
    /// The local Postgres (data members), once the reporter has built it: the admin
    /// service reads its catalog, reloads it and runs operators' queries on it.
    pub local_pg: std::sync::OnceLock<crate::pg::PgInstance>,
    /// Parameters of the local Postgres whose change waits for a restart (member loop).
    pub pending_restart: Mutex<Vec<String>>,
    /// Restarts asked for through the admin API, executed by the member loop between two
    /// reconcile rounds (so nothing else touches Postgres meanwhile). Capacity 1: a
    /// second request while one waits is refused as busy.
    pub restart_tx: tokio::sync::mpsc::Sender<member::RestartJob>,
    restart_rx: Mutex<Option<tokio::sync::mpsc::Receiver<member::RestartJob>>>,
    /// This member's callbacks (`[callbacks]`).
    pub callbacks: callbacks::Callbacks,
    /// What the callbacks last heard of the local Postgres (observations and the admin
    /// restart both report here, so each change fires once).
    pub transitions: Mutex<callbacks::Transitions>,
}

impl Shared {
    pub fn name(&self) -> &str {
        &self.config.member.name
    }

    /// A copy of the Raft metrics (never hold the watch borrow).
    pub fn raft_metrics(&self) -> RaftMetrics<NodeId, MemberNode> {
        self.raft.metrics().borrow().clone()
    }

    pub fn applied(&self) -> Arc<AppliedState> {
        self.applied.borrow().clone()
    }

    /// The leader this member believes in: id and name (from the Raft membership).
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft_metrics();
        let id = m.current_leader?;
        let name = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.name.clone())?;
        Some((id, name))
    }

    pub fn set_activity(&self, what: &str) {
        let mut a = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        if *a != what {
            if !what.is_empty() {
                tracing::info!(activity = what, "postgres");
            }
            *a = what.to_string();
        }
    }

    pub fn pending_restart(&self) -> Vec<String> {
        self.pending_restart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The receiving end of `restart_tx`, for the member loop (taken once).
    pub fn take_restart_rx(&self) -> Option<tokio::sync::mpsc::Receiver<member::RestartJob>> {
        self.restart_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub fn activity(&self) -> String {
        self.activity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Milliseconds on this agent's monotonic clock (the leader's `now_ms`).
    pub fn ms_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// A ticker every `timing.observe_interval` on one grid from `epoch`: the member loop
    /// and the reporter both tick on it, so their probes of the local Postgres coincide and
    /// one query serves both (`PgInstance::probe` is single-flight). A round that overruns
    /// skips to the next grid point, never later than a fresh `interval` would tick.
    pub fn observe_ticker(&self) -> tokio::time::Interval {
        let period = self.config.timing.observe_interval;
        let mut t = tokio::time::interval_at(tokio::time::Instant::from_std(self.epoch), period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        t
    }

    /// Whether this member believes it leads. Routing only: see the module invariant.
    pub fn believes_leader(&self) -> bool {
        let m = self.raft_metrics();
        m.current_leader == Some(self.id) && m.state == ServerState::Leader
    }

    /// Whether a majority acknowledged this leader within `timing.fence_after`. A leader
    /// frozen past that (a paused VM, SIGSTOP) may already be deposed without knowing it.
    pub fn leader_has_fresh_quorum(&self) -> bool {
        let bound = u64::try_from(self.config.timing.fence_after.as_millis()).unwrap_or(u64::MAX);
        self.raft_metrics()
            .millis_since_quorum_ack
            .is_none_or(|ms| ms <= bound)
    }
}

/// Builds the address book from `[peers]`, resolving `host:port` (first address wins).
pub fn address_book(config: &Config) -> AddressBook {
    let book = AddressBook::default();
    for (name, peer) in &config.peers {
        match peer.api.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(addr)) => book.set(name.clone(), addr),
            Ok(None) | Err(_) => tracing::warn!(
                peer = %name, api = %peer.api,
                "cannot resolve the peer's api address; it stays unreachable until it resolves"
            ),
        }
    }
    book
}

/// The running agent.
pub struct AgentHandle {
    pub shared: Arc<Shared>,
    /// Address the gRPC server listens on.
    pub grpc_addr: SocketAddr,
    /// Address the HTTP server listens on.
    pub http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    /// The data member's reconcile loop and its Postgres, for the graceful stop.
    member_task: Option<JoinHandle<()>>,
    local_pg: Option<crate::pg::PgInstance>,
}

pub struct Agent;

impl Agent {
    /// Starts the member described by `config`. Fails (without leaving anything running)
    /// when the identity cannot be established — e.g. a join refused by the cluster — or a
    /// listener cannot bind.
    pub async fn start(config: Config) -> anyhow::Result<AgentHandle> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
        // Bind first: a port in use fails the start before anything else has begun.
        let grpc_listener = TcpListener::bind(config.api.listen)
            .await
            .with_context(|| format!("binding api.listen {}", config.api.listen))?;
        let http_listener = TcpListener::bind(config.api.http_listen)
            .await
            .with_context(|| format!("binding api.http_listen {}", config.api.http_listen))?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let book = address_book(&config);
        let tls = match &config.tls {
            Some(t) => Some(dial::TlsFiles::load(t).context("loading TLS files")?),
            None => None,
        };
        let http_tls = config
            .api
            .http_tls
            .as_ref()
            .map(http::https_config)
            .transpose()
            .context("loading [api] http_tls_cert_file / http_tls_key_file")?;
        let key = match &config.security.cluster_secret {
            Some(s) => Some(
                crate::auth::ClusterKey::new(s.expose().as_bytes())
                    .map_err(|e| anyhow::anyhow!("[security] cluster secret: {e}"))?,
            ),
            None => None,
        };
        if let Some(path) = &config.security.cluster_secret_file {
            warn_if_readable_by_others(path);
        }
        if config.security.insecure {
            tracing::warn!(
                "[security] insecure = true: member RPCs are not authenticated; anyone who can \
                 reach {} can change this cluster (local demos only)",
                config.api.listen
            );
        }
        let signer = key
            .clone()
            .map(|k| crate::auth::Signer::new(k, &config.member.name));
        let dialer = Dialer::new(book.clone(), tls.as_ref().map(|t| t.client.clone()))
            .with_signer(signer.clone());

        let identity = join::establish_identity(&config, &dialer).await?;
        tracing::info!(
            member = %config.member.name, id = identity.id, cluster = %config.cluster,
            "starting member"
        );

        let (log, sm) = open_store(&config.state_dir.join(RAFT_DIR))?;
        let applied = sm.subscribe();
        let raft_config = raft_config_with_timing(
            &config.cluster,
            millis(config.raft.heartbeat),
            millis(config.raft.election_timeout_min),
            millis(config.raft.election_timeout_max),
        )?;
        let mut network =
            GrpcNetworkFactory::new(identity.id, &config.cluster, book.clone()).with_signer(signer);
        if let Some(t) = &tls {
            network = network.with_tls(t.client.clone());
        }
        let raft = MeridianRaft::new(identity.id, raft_config, network, log, sm)
            .await
            .context("starting raft")?;

        let metrics = Arc::new(Metrics::new());
        metrics.set_info(
            env!("CARGO_PKG_VERSION"),
            &config.cluster,
            &config.member.name,
            &config.member.region,
        );
        let (restart_tx, restart_rx) = tokio::sync::mpsc::channel(1);
        let callbacks = callbacks::Callbacks::spawn(&config, metrics.clone());
        let shared = Arc::new(Shared {
            id: identity.id,
            raft: raft.clone(),
            applied,
            book,
            dialer,
            observations: ObservationStore::default(),
            metrics: metrics.clone(),
            config: config.clone(),
            lease: lease::LeaseState::default(),
            grants: lease::Grants::new(config.timing.lease_ttl, Some(&config.state_dir)),
            resume: resume::ResumeSpent::load(Some(&config.state_dir)),
            peer_probes: peers::PeerProbes::default(),
            epoch: Instant::now(),
            activity: Mutex::new(String::new()),
            final_lsn: Mutex::new(None),
            applied_sync_target: Mutex::new(None),
            receiver_off: Mutex::new(None),
            primary_stop_token: Mutex::new(None),
            local_wal_lsn: std::sync::atomic::AtomicU64::new(0),
            wake_reporter: tokio::sync::Notify::new(),
            wake_leader: tokio::sync::Notify::new(),
            local_pg: std::sync::OnceLock::new(),
            pending_restart: Mutex::new(Vec::new()),
            restart_tx,
            restart_rx: Mutex::new(Some(restart_rx)),
            callbacks,
            transitions: Mutex::new(callbacks::Transitions::default()),
        });
        let (stop, _) = watch::channel(false);
        let mut servers = Vec::new();

        // gRPC: Raft transport, observations, admin API.
        let mut builder = limits::grpc_server(tonic::transport::Server::builder());
        if let Some(t) = &tls {
            builder = builder
                .tls_config(t.server.clone())
                .context("configuring the gRPC server's TLS")?;
        }
        let verifier = key.map(|k| Arc::new(crate::auth::Verifier::new(k, &config.member.name)));
        let names_of = shared.clone();
        let auth = crate::auth::AuthLayer::new(
            verifier,
            config.security.insecure,
            Arc::new(move || member_names(&names_of)),
        );
        let router = builder
            .layer(auth)
            .add_service(RaftGrpcService::new(&config.cluster, raft.clone()).into_server())
            .add_service(observe::AgentService::new(shared.clone()).into_server())
            .add_service(admin::AdminService::new(shared.clone()).into_server());
        let mut stopped = stop.subscribe();
        servers.push(tokio::spawn(async move {
            let incoming = limits::grpc_incoming(grpc_listener);
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
            {
                tracing::error!("gRPC server failed: {e}");
            }
        }));

        // HTTP: health endpoints and metrics.
        let (health_tx, health_rx) = watch::channel(NodeHealth {
            cluster: config.cluster.clone(),
            member: config.member.name.clone(),
            region: config.member.region.clone(),
            role: initial_role(&config),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..NodeHealth::default()
        });
        let app = http::router(HttpState {
            health: health_rx,
            metrics,
            writes: Some(http_write::write_fn(shared.clone())),
            token: config.api.token.as_ref().map(|t| t.expose().to_string()),
            insecure: config.security.insecure,
        });
        let stopped = stop.subscribe();
        servers.push(tokio::spawn(async move {
            if let Err(e) = http::serve(http_listener, app, http_tls, stopped).await {
                tracing::error!("HTTP server failed: {e:#}");
            }
        }));

        let mut tasks = Vec::new();
        if config.raft.bootstrap {
            tasks.push(tokio::spawn(join::bootstrap(shared.clone())));
        }
        if !identity.admitted {
            tasks.push(tokio::spawn(join::seek_admission(shared.clone(), identity)));
        }
        let peer_probes = shared.peer_probes.clone();
        tasks.push(tokio::spawn(peers::run(
            shared.clone(),
            peer_probes.clone(),
        )));
        let reporter = observe::Reporter::new(shared.clone(), peer_probes).await;
        let local = reporter.instance();
        if let Some(pg) = &local {
            let _ = shared.local_pg.set(pg.clone());
        }
        tasks.push(tokio::spawn(reporter.run(health_tx)));
        tasks.push(tokio::spawn(join::sync_tags(shared.clone())));
        tasks.push(tokio::spawn(lease::run(shared.clone(), local.clone())));
        let mut member_task = None;
        if let Some(pg) = local.clone() {
            tasks.push(tokio::spawn(gate::run(shared.clone(), pg.clone())));
            member_task = Some(tokio::spawn(member::run(shared.clone(), pg)));
            // The watchdog enforces the fence deadline even if this process freezes.
            // A deadline left armed by a previous agent is kept only while this member is
            // still the primary in the applied intent: otherwise nothing here takes
            // writes under a lease, and a stale deadline would fence the standby this
            // agent is about to start or rewind.
            let named_primary =
                shared.applied().intent.primary.as_deref() == Some(config.member.name.as_str());
            match watchdog::spawn(&config, named_primary) {
                Ok(mut child) => {
                    std::thread::spawn(move || {
                        let _ = child.wait();
                    });
                }
                Err(e) => tracing::warn!("no fencing watchdog: {e:#}"),
            }
        }
        tasks.push(tokio::spawn(leader::run(shared.clone())));
        tasks.push(tokio::spawn(crate::backup::metrics::run(shared.clone())));
        tasks.push(tokio::spawn(crate::backup::schedule::run(shared.clone())));
        tasks.push(tokio::spawn(crate::backup::server::run(shared.clone())));

        tracing::info!(
            grpc = %grpc_addr, http = %http_addr,
            heartbeat_ms = millis(config.raft.heartbeat),
            election_timeout_ms = %format!("{}-{}", millis(config.raft.election_timeout_min), millis(config.raft.election_timeout_max)),
            tls = config.tls.is_some(),
            "member is serving"
        );
        Ok(AgentHandle {
            shared,
            grpc_addr,
            http_addr,
            stop,
            servers,
            tasks,
            member_task,
            local_pg: local,
        })
    }
}

/// Every member name this agent knows: itself, its address book, the Raft membership and
/// the intent's members (the names a member's TLS certificate may carry).
fn member_names(shared: &Shared) -> Vec<String> {
    let mut names: std::collections::BTreeSet<String> =
        shared.config.peers.keys().cloned().collect();
    names.insert(shared.name().to_string());
    let metrics = shared.raft_metrics();
    for (_, n) in metrics.membership_config.membership().nodes() {
        names.insert(n.name.clone());
    }
    names.extend(shared.applied().intent.members.keys().cloned());
    names.into_iter().collect()
}

/// The cluster secret is as good as a member's identity: warn when others may read it.
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => tracing::warn!(
            file = %path.display(),
            mode = %format!("{:o}", m.permissions().mode() & 0o777),
            "the cluster secret file is readable by group or others; chmod 600 it"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), "cannot check the cluster secret file's permissions: {e}")
        }
    }
}

fn initial_role(config: &Config) -> Role {
    match config.member.kind {
        MemberKind::Witness => Role::Witness,
        MemberKind::Data => Role::Unknown,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl AgentHandle {
    /// Stops on purpose: first hands the primary over or fences it and stops the local
    /// Postgres ([`stop::before_shutdown`]), then the runtime.
    pub async fn stop_gracefully(mut self) {
        stop::before_shutdown(&self.shared, self.member_task.take(), self.local_pg.take()).await;
        self.shutdown().await;
    }

    /// Stops the background tasks, the servers and Raft, each bounded; the local Postgres
    /// is left as it is.
    pub async fn shutdown(self) {
        if let Some(t) = &self.member_task {
            t.abort();
        }
        for t in &self.tasks {
            t.abort();
        }
        self.stop.send_replace(true);
        for s in self.servers {
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, s).await.is_err() {
                tracing::warn!(
                    "a server did not stop within {} ms",
                    SHUTDOWN_TIMEOUT.as_millis()
                );
            }
        }
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, self.shared.raft.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("raft shutdown: {e}"),
            Err(_) => tracing::warn!(
                "raft did not stop within {} ms",
                SHUTDOWN_TIMEOUT.as_millis()
            ),
        }
        tracing::info!("member stopped");
    }
}
