//! A real local Meridian cluster behind the proxy mesh: one `meridian-node` process per
//! member, each with its own config whose address book points at the mesh, so every
//! member-to-member connection (Raft, admin forwarding, observations, Postgres replication)
//! crosses a link proxy that can be delayed or cut. Only a member's own entry is direct.
//!
//! Owns: the topology syntax (`us-east:2,us-west:2,eu-central:w1`), ports, config files,
//! process control (SIGKILL / SIGSTOP / SIGCONT of an agent and of its postmaster, found
//! through `<data_dir>/postmaster.pid`), bounded status polling through the Admin API,
//! the workload's connection strings, and cleanup: dropping a [`Cluster`] (also on error,
//! panic, or when a Ctrl-C handler drops the future that owns it) SIGKILLs every agent it
//! started and every postmaster its data dirs name, then removes the run dir.
//!
//! With [`HostsMode::Netns`] every member instead runs on its own host (a network
//! namespace with its own address, [`crate::netns`]): address books list the other members'
//! real addresses (no proxy on member links), partitions and region loss are packet
//! filters inside the namespaces, and there is no latency injection (no netem here; the
//! proxy's latency needs `--hosts loopback`). The workload (root namespace) dials the
//! members' addresses directly and reaches every host in every partition. Dropping the
//! cluster removes the namespaces after the processes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_node::pg::{pid_alive, RunAs, DEFAULT_OS_USER};
use meridian_node::raft::{Command as IntentCommand, Intent};
use meridian_proto::admin_client::AdminClient;
use meridian_proto::{StatusRequest, StatusResponse, WalReceiverStatus};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{getpgid, Pid};
use tempfile::TempDir;
use tonic::transport::Endpoint;

use crate::mesh::{LatencyMatrix, MemberSpec as MeshMember, Mesh, Service};
use crate::netns::NetnsHosts;

/// Bound on one admin call (connect + answer).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long [`Cluster::command`] retries while the cluster has no reachable leader.
pub const COMMAND_RETRY_WINDOW: Duration = Duration::from_secs(15);
/// A leader whose quorum acknowledged it longer ago than this may be deposed already.
pub const FRESH_QUORUM_ACK_MS: i64 = 1_500;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Data,
    Witness,
}

/// One region of a topology: how many data members and witnesses it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    pub name: String,
    pub data: usize,
    pub witnesses: usize,
}

/// Regions and their members, e.g. `us-east:2,us-west:2,eu-central:w1`: a number is that
/// many data members, `wN` that many witnesses; `2+w1` both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub regions: Vec<RegionSpec>,
}

/// The default: 2 + 2 data members and a witness in a third region.
pub const DEFAULT_TOPOLOGY: &str = "us-east:2,us-west:2,eu-central:w1";

/// At most this many members: every pair gets proxies, and the machine has 2 cores.
pub const MAX_MEMBERS: usize = 9;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad topology {spec:?}: {reason} (write it like {DEFAULT_TOPOLOGY})")]
pub struct TopologyError {
    pub spec: String,
    pub reason: String,
}

impl FromStr for Topology {
    type Err = TopologyError;
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| TopologyError {
            spec: spec.to_string(),
            reason,
        };
        let mut regions: Vec<RegionSpec> = Vec::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, counts) = entry
                .split_once(':')
                .ok_or_else(|| bad(format!("{entry:?} lacks ':'")))?;
            let name = name.trim();
            let name_ok = !name.is_empty()
                && name.len() <= 40
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !name_ok {
                return Err(bad(format!(
                    "region {name:?} must be 1-40 characters of a-z 0-9 '-'"
                )));
            }
            if regions.iter().any(|r| r.name == name) {
                return Err(bad(format!("region {name:?} appears twice")));
            }
            let mut r = RegionSpec {
                name: name.to_string(),
                data: 0,
                witnesses: 0,
            };
            for part in counts.split('+').map(str::trim) {
                let (w, digits) = match part.strip_prefix('w') {
                    Some(d) => (true, d),
                    None => (false, part),
                };
                let n: usize = digits
                    .parse()
                    .map_err(|_| bad(format!("{part:?} is not a count")))?;
                if w {
                    r.witnesses += n;
                } else {
                    r.data += n;
                }
            }
            if r.data + r.witnesses == 0 {
                return Err(bad(format!("region {name:?} has no member")));
            }
            regions.push(r);
        }
        let t = Topology { regions };
        let total: usize = t.regions.iter().map(|r| r.data + r.witnesses).sum();
        if t.regions.iter().all(|r| r.data == 0) {
            return Err(bad("no data member".into()));
        }
        if total > MAX_MEMBERS {
            return Err(bad(format!("{total} members, at most {MAX_MEMBERS}")));
        }
        Ok(t)
    }
}

impl Default for Topology {
    fn default() -> Self {
        DEFAULT_TOPOLOGY
            .parse()
            .expect("the default topology parses")
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .regions
            .iter()
            .map(|r| match (r.data, r.witnesses) {
                (d, 0) => format!("{}:{d}", r.name),
                (0, w) => format!("{}:w{w}", r.name),
                (d, w) => format!("{}:{d}+w{w}", r.name),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Topology {
    /// Members in declaration order: `<region>-<n>` numbered per region, data members first.
    pub fn members(&self) -> Vec<(String, String, Kind)> {
        let mut out = Vec::new();
        for r in &self.regions {
            let kinds = std::iter::repeat_n(Kind::Data, r.data)
                .chain(std::iter::repeat_n(Kind::Witness, r.witnesses));
            for (i, kind) in kinds.enumerate() {
                out.push((format!("{}-{}", r.name, i + 1), r.name.clone(), kind));
            }
        }
        out
    }
}

/// Where the members run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HostsMode {
    /// Every member on 127.0.0.1; every member link through the proxy mesh (latency,
    /// partitions, resets).
    #[default]
    Loopback,
    /// Every member in its own network namespace with its own address (root only);
    /// member links direct; partitions by packet filter; no latency injection.
    Netns,
}

impl HostsMode {
    pub fn name(self) -> &'static str {
        match self {
            HostsMode::Loopback => "loopback",
            HostsMode::Netns => "netns",
        }
    }
}

impl fmt::Display for HostsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HostsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "loopback" => Ok(HostsMode::Loopback),
            "netns" => Ok(HostsMode::Netns),
            _ => Err(format!("unknown hosts mode {s:?} (known: loopback, netns)")),
        }
    }
}

/// Agent timing written into every config (humantime strings); `None` keeps the agent's
/// defaults (DESIGN §4).
#[derive(Clone, Debug, Default)]
pub struct AgentTiming {
    pub heartbeat: Option<String>,
    pub election_timeout_min: Option<String>,
    pub election_timeout_max: Option<String>,
    pub observe_interval: Option<String>,
    pub lease_ttl: Option<String>,
    pub lease_renew_interval: Option<String>,
    pub fence_after: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub topology: Topology,
    pub matrix: LatencyMatrix,
    /// Drives the proxies' jitter.
    pub seed: u64,
    /// Directory holding `meridian-node`; default: next to the running executable.
    pub bin_dir: Option<PathBuf>,
    pub cluster_name: String,
    pub timing: AgentTiming,
    /// Keep the run dir (logs, configs) instead of removing it on drop.
    pub keep_dir: bool,
    /// `RUST_LOG` for the agents (their default filter when `None`).
    pub agent_log_filter: Option<String>,
    pub hosts: HostsMode,
    /// A pgBackRest repository (owned by the Postgres OS user): the data members archive
    /// into it and the scorecard gets `archive_gap` (`archive.rs`).
    pub backup_repo: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            topology: Topology::default(),
            matrix: LatencyMatrix::default(),
            seed: 1,
            bin_dir: None,
            cluster_name: "chaos".into(),
            timing: AgentTiming::default(),
            keep_dir: false,
            agent_log_filter: None,
            hosts: HostsMode::Loopback,
            backup_repo: None,
        }
    }
}

/// The admin token of the clusters this harness runs (written to each member's
/// `admin-token` file; the harness's commands send it).
pub const ADMIN_TOKEN: &str = "meridian-chaos-admin-token";

/// Writes `text` to a new file readable by its owner only (secrets, tokens).
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// An admin client for member `name` at `addr` (`host:port`; TLS when `tls` is given,
/// checked against `name`), connected within `timeout`. Shared with the tests' launcher.
pub async fn admin_client(
    name: &str,
    addr: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
    timeout: Duration,
) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if let Some(tls) = tls {
        ep = ep.tls_config(tls.clone().domain_name(name))?;
    }
    let ch = tokio::time::timeout(timeout, ep.connect())
        .await
        .with_context(|| format!("connecting to {name}: timed out"))?
        .with_context(|| format!("connecting to {name}"))?;
    Ok(AdminClient::new(ch))
}

/// `Admin.Status` through `client` (forwarded to the leader unless `local`), bounded.
pub async fn status_via(
    mut client: AdminClient<tonic::transport::Channel>,
    name: &str,
    local: bool,
    timeout: Duration,
) -> anyhow::Result<StatusResponse> {
    let r = tokio::time::timeout(timeout, client.status(StatusRequest { local }))
        .await
        .with_context(|| format!("status of {name}: timed out"))?
        .with_context(|| format!("status of {name}"))?;
    Ok(r.into_inner())
}

/// One member and its processes.
pub struct Member {
    pub name: String,
    pub region: String,
    pub kind: Kind,
    /// This member's host address (127.0.0.1, or its namespace's address).
    pub addr: IpAddr,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Data members only.
    pub pg_port: Option<u16>,
    pub home: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub state_dir: PathBuf,
    pub data_dir: Option<PathBuf>,
    child: Option<Child>,
    /// The agent was SIGSTOPped and not yet continued.
    agent_stopped: bool,
    /// Postmaster pids this harness froze (SIGSTOP) and has not continued.
    pg_stopped: Option<i32>,
    /// A whole-host freeze: the agent's processes (agent, watchdog) and Postgres' (the
    /// postmaster and its children) this harness SIGSTOPped and has not continued.
    host_frozen: Option<(Vec<i32>, Vec<i32>)>,
}

impl Member {
    pub fn agent_pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    pub fn agent_running(&self) -> bool {
        self.child.is_some()
    }

    /// The postmaster's pid from its pid file, if the file names a live process.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let dir = self.data_dir.as_ref()?;
        let text = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        pid_alive(pid).then_some(pid)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A direct (not proxied) superuser connection string to this member's Postgres.
    pub fn direct_conninfo(&self) -> Option<String> {
        self.pg_port.map(|p| {
            format!(
                "host={} port={p} user=postgres dbname=postgres connect_timeout=2",
                self.addr
            )
        })
    }
}

/// What a status poll found, parsed.
#[derive(Clone, Debug)]
pub struct ClusterStatus {
    pub raw: StatusResponse,
    pub intent: Intent,
}

impl ClusterStatus {
    pub fn leader(&self) -> Option<&str> {
        Some(self.raw.leader.as_str()).filter(|l| !l.is_empty())
    }

    pub fn primary(&self) -> Option<&str> {
        Some(self.raw.primary.as_str()).filter(|p| !p.is_empty())
    }

    pub fn member(&self, name: &str) -> Option<&meridian_proto::MemberStatus> {
        self.raw.members.iter().find(|m| m.name == name)
    }

    /// The Postgres observation the leader holds for `name`, if any.
    pub fn postgres(&self, name: &str) -> Option<&meridian_proto::PostgresObservation> {
        self.member(name)?.observation.as_ref()?.postgres.as_ref()
    }

    /// The primary's timeline, when its agent reports its Postgres up and writable.
    pub fn primary_timeline(&self) -> Option<u32> {
        let pg = self.postgres(self.primary()?)?;
        (pg.up && !pg.in_recovery).then_some(pg.timeline)
    }

    /// Data members (other than the primary) that stream from the primary on its timeline.
    pub fn streaming_standbys(&self) -> BTreeSet<String> {
        let (Some(primary), Some(tl)) = (self.primary(), self.primary_timeline()) else {
            return BTreeSet::new();
        };
        self.raw
            .members
            .iter()
            .filter(|m| m.kind == "data" && m.name != primary)
            .filter(|m| {
                self.postgres(&m.name).is_some_and(|pg| {
                    pg.up
                        && pg.in_recovery
                        && pg.timeline == tl
                        && pg.wal_receiver == WalReceiverStatus::Streaming as i32
                        && (pg.upstream.is_empty() || pg.upstream == primary)
                })
            })
            .map(|m| m.name.clone())
            .collect()
    }
}

/// A running cluster. See the module doc for what dropping it does.
pub struct Cluster {
    pub options: ClusterOptions,
    pub mesh: Mesh,
    members: BTreeMap<String, Member>,
    node_bin: PathBuf,
    run_as: RunAs,
    dir: Option<TempDir>,
    /// The members' hosts in [`HostsMode::Netns`]; dropped after every process is gone.
    netns: Option<NetnsHosts>,
}

/// `meridian-node` next to the running executable (or one level up, for test binaries in
/// `target/<profile>/deps/`), or in `bin_dir`, or in `$MERIDIAN_BIN_DIR`.
pub fn find_node_binary(bin_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(d) = bin_dir {
        candidates.push(d.join("meridian-node"));
    } else {
        if let Some(d) = std::env::var_os("MERIDIAN_BIN_DIR") {
            candidates.push(PathBuf::from(d).join("meridian-node"));
        }
        let exe = std::env::current_exe().context("locate the running executable")?;
        if let Some(d) = exe.parent() {
            candidates.push(d.join("meridian-node"));
            if let Some(up) = d.parent() {
                candidates.push(up.join("meridian-node"));
            }
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "meridian-node not found (looked at {}); build it (cargo build -p meridian-node) or pass --bin-dir",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

impl Cluster {
    /// Declares the members, starts the mesh and writes every config; starts no agent.
    pub async fn declare(options: ClusterOptions) -> anyhow::Result<Cluster> {
        let node_bin = find_node_binary(options.bin_dir.as_deref())?;
        let run_as = RunAs::resolve(DEFAULT_OS_USER).context("choose the Postgres OS user")?;
        let dir = tempfile::Builder::new()
            .prefix("meridian-chaos-")
            .tempdir()
            .context("create the run dir")?;
        let declared = options.topology.members();
        let netns = match options.hosts {
            HostsMode::Loopback => None,
            HostsMode::Netns => {
                let names: Vec<String> = declared.iter().map(|(n, _, _)| n.clone()).collect();
                Some(
                    NetnsHosts::create(&names)
                        .context("build one host (network namespace) per member")?,
                )
            }
        };
        // Below the ephemeral range, so neither the mesh's ~100 listeners nor any outgoing
        // connection can be handed a port meant for an agent or a Postgres.
        let ports = crate::ports::free_ports(declared.len() * 3).context("pick free ports")?;
        let mut members = BTreeMap::new();
        let mut specs = Vec::new();
        for (i, (name, region, kind)) in declared.iter().enumerate() {
            let home = dir.path().join(name);
            std::fs::create_dir_all(&home).with_context(|| format!("create {}", home.display()))?;
            let addr = match &netns {
                Some(h) => IpAddr::V4(h.addr(name)?),
                None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            };
            let grpc = SocketAddr::new(addr, ports[3 * i]);
            let http = SocketAddr::new(addr, ports[3 * i + 1]);
            let pg_port = (*kind == Kind::Data).then_some(ports[3 * i + 2]);
            let mut upstreams = BTreeMap::from([(Service::Api, grpc)]);
            if let Some(p) = pg_port {
                upstreams.insert(Service::Postgres, SocketAddr::new(addr, p));
            }
            // Separate hosts reach each other directly: no proxy on member links.
            if netns.is_none() {
                specs.push(MeshMember {
                    name: name.clone(),
                    region: region.clone(),
                    upstreams,
                });
            }
            let state_dir = home.join("state");
            members.insert(
                name.clone(),
                Member {
                    name: name.clone(),
                    region: region.clone(),
                    kind: *kind,
                    addr,
                    grpc,
                    http,
                    pg_port,
                    config_path: home.join("meridian.toml"),
                    log_path: home.join("agent.log"),
                    data_dir: pg_port.map(|_| state_dir.join("pgdata")),
                    state_dir,
                    home,
                    child: None,
                    agent_stopped: false,
                    pg_stopped: None,
                    host_frozen: None,
                },
            );
        }
        let mesh = Mesh::start(specs, options.matrix.clone(), options.seed)
            .await
            .context("start the proxy mesh")?;
        let cluster = Cluster {
            options,
            mesh,
            members,
            node_bin,
            run_as,
            dir: Some(dir),
            netns,
        };
        cluster.write_configs()?;
        // Postgres (as the unprivileged OS user) must traverse the run dir to its data dir.
        cluster
            .run_as
            .chown_recursive(cluster.dir())
            .context("give the run dir to the Postgres OS user")?;
        Ok(cluster)
    }

    /// Declares the cluster, starts the first data member (which bootstraps), waits until
    /// it leads, then starts the others (which join through it).
    pub async fn start(options: ClusterOptions) -> anyhow::Result<Cluster> {
        let mut c = Cluster::declare(options).await?;
        let first = c.bootstrap_member().to_string();
        c.start_agent(&first)?;
        let f = first.clone();
        crate::wait::wait_for(
            &format!("{first} to bootstrap and lead"),
            Duration::from_secs(60),
            || {
                let c = &c;
                let f = f.clone();
                async move {
                    let s = c.status_of(&f, false).await.ok()?;
                    (s.from_leader && s.leader == f).then_some(())
                }
            },
        )
        .await
        .with_context(|| c.log_tails(30))?;
        let rest: Vec<String> = c.members.keys().filter(|n| **n != first).cloned().collect();
        for name in rest {
            c.start_agent(&name)?;
        }
        Ok(c)
    }

    fn bootstrap_member(&self) -> &str {
        let (name, _, _) = self
            .options
            .topology
            .members()
            .into_iter()
            .find(|(_, _, k)| *k == Kind::Data)
            .expect("a topology has a data member");
        self.members
            .get_key_value(&name)
            .map(|(k, _)| k.as_str())
            .expect("declared")
    }

    fn write_configs(&self) -> anyhow::Result<()> {
        let first = self.bootstrap_member().to_string();
        let t = &self.options.timing;
        // Meridian's roles log in with scram-sha-256 and passwords from files; the
        // workload's and the checker's sessions are the superuser's, admitted from the
        // proxies' loopback address by an explicit trust line.
        let secrets = self.dir().join("secrets");
        std::fs::create_dir_all(&secrets).context("create the secrets dir")?;
        let mut roles = String::new();
        for (section, user) in [
            ("replication", "replicator"),
            ("rewind", "rewinder"),
            ("monitor", "meridian_monitor"),
        ] {
            let p = secrets.join(section);
            std::fs::write(&p, format!("chaos-{section}-pw\n"))
                .with_context(|| format!("write {}", p.display()))?;
            roles.push_str(&format!(
                "[postgres.{section}]\nuser = \"{user}\"\npassword_file = \"{}\"\n",
                p.display()
            ));
        }
        let monitor_only = roles[roles.find("[postgres.monitor]").unwrap_or(0)..].to_string();
        // One cluster secret per run, the same for every member; one admin token.
        let secret: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        // Where the workload's sessions come from: the proxies (loopback) or, on separate
        // hosts, the root namespace's bridge address.
        let clients: IpAddr = match &self.netns {
            Some(h) => IpAddr::V4(h.bridge_addr()),
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        for m in self.members.values() {
            let secret_file = m.home.join("cluster-secret");
            write_private(&secret_file, &secret)?;
            let token_file = m.home.join("admin-token");
            write_private(&token_file, ADMIN_TOKEN)?;
            let how = if self.netns.is_some() {
                "at their hosts' own addresses"
            } else {
                "through the proxy mesh"
            };
            let mut text = format!(
                "# Written by meridian-chaos: peers are reached {how}.\n\
                 cluster = \"{}\"\nstate_dir = \"{}\"\n\n[member]\nname = \"{}\"\nregion = \"{}\"\nkind = \"{}\"\n\n",
                self.options.cluster_name,
                m.state_dir.display(),
                m.name,
                m.region,
                if m.kind == Kind::Data { "data" } else { "witness" },
            );
            if let (Some(port), Some(data_dir)) = (m.pg_port, &m.data_dir) {
                text.push_str(&format!(
                    "[postgres]\ndata_dir = \"{}\"\nlisten_addr = \"{}\"\nport = {port}\nos_user = \"{DEFAULT_OS_USER}\"\n\
                     hba = [\"host all postgres {clients}/32 trust\"]\n{roles}\n",
                    data_dir.display(),
                    m.addr
                ));
                if let Some(repo) = &self.options.backup_repo {
                    text.push_str(&crate::archive::backup_section(repo));
                }
            } else {
                text.push_str(&format!("{monitor_only}\n"));
            }
            text.push_str(&format!(
                "[api]\nlisten = \"{}\"\nhttp_listen = \"{}\"\ntoken_file = \"{}\"\n\n\
                 [security]\ncluster_secret_file = \"{}\"\n\n",
                m.grpc,
                m.http,
                token_file.display(),
                secret_file.display()
            ));
            let bootstrap = m.name == first;
            // Only the bootstrap member: the others do not serve before they registered,
            // and a joiner rotating through them waits out a timeout on each.
            let join: Vec<String> = if bootstrap {
                Vec::new()
            } else {
                vec![format!("\"{first}\"")]
            };
            text.push_str(&format!(
                "[raft]\nbootstrap = {bootstrap}\njoin = [{}]\n",
                join.join(", ")
            ));
            for (k, v) in [
                ("heartbeat", &t.heartbeat),
                ("election_timeout_min", &t.election_timeout_min),
                ("election_timeout_max", &t.election_timeout_max),
            ] {
                if let Some(v) = v {
                    text.push_str(&format!("{k} = \"{v}\"\n"));
                }
            }
            text.push_str("\n[timing]\n");
            for (k, v) in [
                ("observe_interval", &t.observe_interval),
                ("lease_ttl", &t.lease_ttl),
                ("lease_renew_interval", &t.lease_renew_interval),
                ("fence_after", &t.fence_after),
            ] {
                if let Some(v) = v {
                    text.push_str(&format!("{k} = \"{v}\"\n"));
                }
            }
            text.push('\n');
            for peer in self.members.values() {
                let (api, pg) = if self.netns.is_some() {
                    (
                        peer.grpc,
                        peer.pg_port.map(|p| SocketAddr::new(peer.addr, p)),
                    )
                } else {
                    (
                        self.mesh
                            .member_addr(&m.name, &peer.name, Service::Api)
                            .context("mesh has no api link")?,
                        self.mesh
                            .member_addr(&m.name, &peer.name, Service::Postgres),
                    )
                };
                text.push_str(&format!("[peers.{}]\napi = \"{api}\"\n", peer.name));
                if let Some(pg) = pg {
                    text.push_str(&format!("postgres = \"{pg}\"\n"));
                }
                text.push('\n');
            }
            std::fs::write(&m.config_path, text)
                .with_context(|| format!("write {}", m.config_path.display()))?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the run dir lives until drop")
            .path()
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn member(&self, name: &str) -> anyhow::Result<&Member> {
        self.members
            .get(name)
            .with_context(|| format!("no member {name:?}"))
    }

    fn member_mut(&mut self, name: &str) -> anyhow::Result<&mut Member> {
        self.members
            .get_mut(name)
            .with_context(|| format!("no member {name:?}"))
    }

    pub fn data_members(&self) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.kind == Kind::Data)
            .map(|m| m.name.clone())
            .collect()
    }

    pub fn members_of(&self, region: &str) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.region == region)
            .map(|m| m.name.clone())
            .collect()
    }

    pub fn regions(&self) -> BTreeSet<String> {
        self.members.values().map(|m| m.region.clone()).collect()
    }

    pub fn node_binary(&self) -> &Path {
        &self.node_bin
    }

    pub fn hosts_mode(&self) -> HostsMode {
        self.options.hosts
    }

    /// The members' hosts, in [`HostsMode::Netns`].
    pub fn netns(&self) -> Option<&NetnsHosts> {
        self.netns.as_ref()
    }

    /// Cuts `name` off from the other members: the mesh's member links and other regions'
    /// client links, or (netns) packet filters between its host and every other host.
    pub fn isolate_member(&self, name: &str) -> anyhow::Result<usize> {
        self.member(name)?;
        Ok(match &self.netns {
            Some(h) => h.isolate(name)?,
            None => self.mesh.isolate_member(name)?,
        })
    }

    /// Cuts the member links between `a` and `b`, both ways (a partial partition is made
    /// of such cuts); clients still reach both.
    pub fn cut_members(&self, a: &str, b: &str) -> anyhow::Result<usize> {
        self.member(a)?;
        self.member(b)?;
        Ok(match &self.netns {
            Some(h) => h.cut(a, b)?,
            None => self.mesh.cut_members(a, b)?,
        })
    }

    /// Cuts every link between a region of `a` and a region of `b`, both ways.
    pub fn partition(&self, a: &[&str], b: &[&str]) -> anyhow::Result<usize> {
        let Some(h) = &self.netns else {
            return Ok(self.mesh.partition(a, b)?);
        };
        let regions = self.regions();
        if let Some(r) = a.iter().chain(b).find(|r| !regions.contains(**r)) {
            anyhow::bail!("unknown region {r:?}");
        }
        let of = |rs: &[&str]| -> Vec<String> {
            self.members
                .values()
                .filter(|m| rs.contains(&m.region.as_str()))
                .map(|m| m.name.clone())
                .collect()
        };
        let (xa, xb) = (of(a), of(b));
        let ra: Vec<&str> = xa.iter().map(String::as_str).collect();
        let rb: Vec<&str> = xb.iter().map(String::as_str).collect();
        Ok(h.partition(&ra, &rb)?)
    }

    /// Removes every partition (and, on loopback, every latency change).
    pub fn heal_all(&self) -> anyhow::Result<()> {
        match &self.netns {
            Some(h) => h.heal().context("flush the packet filters")?,
            None => self.mesh.heal_all(),
        }
        Ok(())
    }

    /// Multiplies every link's latency (loopback only: separate hosts have no latency
    /// injection, this kernel has no netem).
    pub fn latency_spike(&self, factor: f64, jitter: Duration) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.netns.is_none(),
            "latency injection needs the proxy mesh (--hosts loopback); separate hosts have none"
        );
        self.mesh.latency_spike(factor, jitter);
        Ok(())
    }

    /// Spawns `name`'s agent (stdout and stderr appended to its log).
    pub fn start_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let bin = self.node_bin.clone();
        let filter = self.options.agent_log_filter.clone();
        // On its own host the agent (and so its Postgres) runs inside its namespace;
        // `ip netns exec` execs it, so the child's PID is the agent's.
        let mut cmd = match &self.netns {
            Some(h) => h.command(name, &bin)?,
            None => Command::new(bin),
        };
        let m = self.member_mut(name)?;
        // An agent that exited by itself (a graceful stop) is reaped and started again.
        if let Some(c) = m.child.as_mut() {
            if c.try_wait().ok().flatten().is_some() {
                m.child = None;
            }
        }
        if m.child.is_some() {
            return Ok(());
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log_path)
            .with_context(|| format!("open {}", m.log_path.display()))?;
        cmd.arg("--config")
            .arg(&m.config_path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        match filter {
            Some(f) => cmd.env("RUST_LOG", f),
            None => cmd.env_remove("RUST_LOG"),
        };
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn the agent of {name}"))?;
        m.child = Some(child);
        m.agent_stopped = false;
        Ok(())
    }

    /// SIGKILL `name`'s agent and reap it; a no-op when it is not running.
    pub fn kill_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let m = self.member_mut(name)?;
        if let Some(mut c) = m.child.take() {
            c.kill()
                .with_context(|| format!("kill the agent of {name}"))?;
            c.wait()
                .with_context(|| format!("reap the agent of {name}"))?;
        }
        m.agent_stopped = false;
        Ok(())
    }

    /// SIGTERM `name`'s agent (a graceful stop: it hands over or fences, then exits by
    /// itself; `revive_all` reaps it).
    pub fn term_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let m = self.member_mut(name)?;
        let pid = m
            .agent_pid()
            .with_context(|| format!("{name}'s agent is not running"))?;
        kill(Pid::from_raw(pid), Signal::SIGTERM).with_context(|| format!("SIGTERM {name}"))?;
        Ok(())
    }

    /// Removes `name` from the membership through any responsive member (forwarded to the
    /// Raft leader), retrying for a bounded window. Returns the member that did it, or
    /// `Err(refusal)` inside `Ok` when the cluster refused the change as it stands (e.g. the
    /// member is in the recorded sync set): a refusal changes nothing.
    pub async fn remove_member(&self, name: &str) -> anyhow::Result<Result<String, String>> {
        self.member(name)?;
        let deadline = Instant::now() + COMMAND_RETRY_WINDOW;
        let mut last = anyhow::anyhow!("no member is running");
        loop {
            for via in self.responsive().into_iter().filter(|v| v != name) {
                let attempt = async {
                    let mut c = self.admin(&via).await?;
                    let r = tokio::time::timeout(
                        CALL_TIMEOUT * 4,
                        c.remove_member(meridian_proto::RemoveMemberRequest {
                            name: name.to_string(),
                            token: ADMIN_TOKEN.to_string(),
                        }),
                    )
                    .await
                    .with_context(|| format!("removing {name} via {via}: timed out"))?;
                    anyhow::Ok(r)
                };
                match attempt.await {
                    Ok(Ok(_)) => return Ok(Ok(via)),
                    Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                        return Ok(Err(status.message().to_string()));
                    }
                    Ok(Err(status)) => {
                        last = anyhow::anyhow!("removing {name} via {via}: {}", status.message())
                    }
                    Err(e) => last = e,
                }
            }
            if Instant::now() >= deadline {
                return Err(last.context(format!(
                    "no member removed {name} within {} s",
                    COMMAND_RETRY_WINDOW.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGSTOP `name`'s agent (a frozen process: sockets open, nothing answers).
    pub fn stop_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let m = self.member_mut(name)?;
        let pid = m
            .agent_pid()
            .with_context(|| format!("{name}'s agent is not running"))?;
        kill(Pid::from_raw(pid), Signal::SIGSTOP).with_context(|| format!("SIGSTOP {name}"))?;
        m.agent_stopped = true;
        Ok(())
    }

    /// SIGCONT `name`'s agent.
    pub fn cont_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let m = self.member_mut(name)?;
        if let Some(pid) = m.agent_pid() {
            kill(Pid::from_raw(pid), Signal::SIGCONT).with_context(|| format!("SIGCONT {name}"))?;
        }
        m.agent_stopped = false;
        Ok(())
    }

    /// A whole-host freeze (a VM pause): SIGSTOP of `name`'s agent and its children (the
    /// watchdog) and of its postmaster and every child (backends, walsenders, ...).
    pub fn freeze_host(&mut self, name: &str) -> anyhow::Result<usize> {
        let m = self.member(name)?;
        let mut agent = Vec::new();
        if let Some(pid) = m.agent_pid() {
            agent.push(pid);
            agent.extend(children_of(pid));
        }
        let mut pg = Vec::new();
        if let Some(pid) = m.postmaster_pid() {
            pg.push(pid);
            pg.extend(children_of(pid));
        }
        anyhow::ensure!(
            !agent.is_empty() || !pg.is_empty(),
            "{name} runs neither an agent nor a Postgres to freeze"
        );
        for p in agent.iter().chain(pg.iter()) {
            let _ = kill(Pid::from_raw(*p), Signal::SIGSTOP);
        }
        let n = agent.len() + pg.len();
        let m = self.member_mut(name)?;
        m.agent_stopped = true;
        m.host_frozen = Some((agent, pg));
        Ok(n)
    }

    /// Ends a [`Cluster::freeze_host`]: Postgres first, the agent `agent_after` later (the
    /// worst order a scheduler may choose: backends run before anything can fence them).
    pub async fn thaw_host(&mut self, name: &str, agent_after: Duration) -> anyhow::Result<()> {
        let Some((agent, pg)) = self.member_mut(name)?.host_frozen.take() else {
            return Ok(());
        };
        for p in &pg {
            let _ = kill(Pid::from_raw(*p), Signal::SIGCONT);
        }
        tokio::time::sleep(agent_after).await;
        for p in &agent {
            let _ = kill(Pid::from_raw(*p), Signal::SIGCONT);
        }
        self.member_mut(name)?.agent_stopped = false;
        Ok(())
    }

    /// Sends `sig` to `name`'s postmaster (its whole process group when it leads one, so
    /// backends go too). Returns false when no postmaster runs.
    fn signal_postgres(&self, name: &str, sig: Signal) -> anyhow::Result<Option<i32>> {
        let m = self.member(name)?;
        let Some(pid) = m.postmaster_pid() else {
            return Ok(None);
        };
        signal_postmaster(pid, sig);
        Ok(Some(pid))
    }

    /// SIGKILL `name`'s Postgres (postmaster and backends). Returns whether one was running.
    pub fn kill_postgres(&mut self, name: &str) -> anyhow::Result<bool> {
        let killed = self.signal_postgres(name, Signal::SIGKILL)?;
        self.member_mut(name)?.pg_stopped = None;
        Ok(killed.is_some())
    }

    /// SIGSTOP `name`'s Postgres.
    pub fn stop_postgres(&mut self, name: &str) -> anyhow::Result<bool> {
        let pid = self.signal_postgres(name, Signal::SIGSTOP)?;
        self.member_mut(name)?.pg_stopped = pid;
        Ok(pid.is_some())
    }

    /// SIGCONT `name`'s Postgres.
    pub fn cont_postgres(&mut self, name: &str) -> anyhow::Result<bool> {
        let pid = self.member(name)?.pg_stopped;
        if let Some(pid) = pid {
            signal_postmaster(pid, Signal::SIGCONT);
        }
        self.member_mut(name)?.pg_stopped = None;
        Ok(pid.is_some())
    }

    /// A host crash: SIGKILL the agent, then its Postgres.
    pub fn kill_member(&mut self, name: &str) -> anyhow::Result<()> {
        self.kill_agent(name)?;
        self.kill_postgres(name)?;
        Ok(())
    }

    /// The host comes back: start the agent (it brings its Postgres back itself).
    pub fn restart_member(&mut self, name: &str) -> anyhow::Result<()> {
        self.start_agent(name)
    }

    /// Kills every member of `region`; returns their names.
    pub fn kill_region(&mut self, region: &str) -> anyhow::Result<Vec<String>> {
        let names = self.members_of(region);
        anyhow::ensure!(!names.is_empty(), "no member in region {region:?}");
        for n in &names {
            self.kill_member(n)?;
        }
        Ok(names)
    }

    /// Continues everything frozen and starts every agent that is not running.
    pub fn revive_all(&mut self) -> anyhow::Result<Vec<String>> {
        let names: Vec<String> = self.members.keys().cloned().collect();
        let mut started = Vec::new();
        for n in names {
            if self.member(&n)?.pg_stopped.is_some() {
                self.cont_postgres(&n)?;
            }
            if self.member(&n)?.agent_stopped {
                self.cont_agent(&n)?;
            }
            // An agent that exited by itself (e.g. refused to start) is reaped here too.
            let m = self.member_mut(&n)?;
            if let Some(c) = m.child.as_mut() {
                if c.try_wait().ok().flatten().is_some() {
                    m.child = None;
                }
            }
            if !self.member(&n)?.agent_running() {
                self.start_agent(&n)?;
                started.push(n);
            }
        }
        Ok(started)
    }

    /// Members whose agent runs and is not frozen: the ones worth asking.
    pub fn responsive(&self) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.agent_running() && !m.agent_stopped)
            .map(|m| m.name.clone())
            .collect()
    }

    /// An admin client for `name`, dialled directly (the harness is outside the mesh).
    pub async fn admin(
        &self,
        name: &str,
    ) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
        let m = self.member(name)?;
        admin_client(name, &m.grpc.to_string(), None, CALL_TIMEOUT).await
    }

    /// `Admin.Status` on `name`, bounded.
    pub async fn status_of(&self, name: &str, local: bool) -> anyhow::Result<StatusResponse> {
        status_via(self.admin(name).await?, name, local, CALL_TIMEOUT).await
    }

    /// The freshest leader's status: every responsive member is asked at once (bounded);
    /// among answers from a leader, the one with the highest term and a quorum ack younger
    /// than [`FRESH_QUORUM_ACK_MS`] wins, so an isolated old leader is not believed.
    pub async fn status(&self) -> anyhow::Result<ClusterStatus> {
        let names = self.responsive();
        anyhow::ensure!(!names.is_empty(), "no agent is running");
        let answers =
            futures::future::join_all(names.iter().map(|n| self.status_of(n, false))).await;
        let mut best: Option<StatusResponse> = None;
        let mut last_err = None;
        for a in answers {
            match a {
                Ok(s)
                    if s.from_leader
                        && s.quorum_ack_age_ms.clamp(0, i64::MAX) <= FRESH_QUORUM_ACK_MS =>
                {
                    let better = match &best {
                        None => true,
                        Some(b) => s.term > b.term,
                    };
                    if better {
                        best = Some(s);
                    }
                }
                Ok(s) => {
                    last_err = Some(anyhow::anyhow!(
                        "{} answered without a fresh leader (leader {:?}, quorum ack {} ms ago)",
                        s.answered_by,
                        s.leader,
                        s.quorum_ack_age_ms
                    ))
                }
                Err(e) => last_err = Some(e),
            }
        }
        let raw = best.ok_or_else(|| {
            last_err.unwrap_or_else(|| anyhow::anyhow!("no member answered with a leader"))
        })?;
        let intent: Intent = serde_json::from_str(&raw.intent_json)
            .with_context(|| format!("parse the intent from {}", raw.answered_by))?;
        Ok(ClusterStatus { raw, intent })
    }

    /// [`Cluster::status`], retried for at most `within` (bounded, 200 ms apart): a loaded
    /// host can delay the leader's heartbeats past [`FRESH_QUORUM_ACK_MS`] for a moment,
    /// and a step that needs the primary's name should wait that out rather than fail.
    pub async fn status_within(&self, within: Duration) -> anyhow::Result<ClusterStatus> {
        let deadline = Instant::now() + within;
        loop {
            match self.status().await {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Proposes `cmd` through the responsive members (forwarded to the leader), retrying
    /// while no leader answers for at most [`COMMAND_RETRY_WINDOW`]. Returns the log index;
    /// a refusal is an error carrying its reason.
    pub async fn command(&self, cmd: &IntentCommand) -> anyhow::Result<u64> {
        let deadline = Instant::now() + COMMAND_RETRY_WINDOW;
        let mut last = anyhow::anyhow!("no member is running");
        loop {
            for name in self.responsive() {
                let attempt = async {
                    let mut c = self.admin(&name).await?;
                    meridian_node::admin_client::submit(&mut c, cmd, ADMIN_TOKEN, CALL_TIMEOUT * 4)
                        .await
                        .with_context(|| format!("command via {name}"))
                };
                match attempt.await {
                    Ok(committed) => {
                        if let Some(refusal) = committed.refusal() {
                            anyhow::bail!("command {} was refused: {refusal}", cmd);
                        }
                        return Ok(committed.log_index);
                    }
                    Err(e) => last = e,
                }
            }
            if Instant::now() >= deadline {
                return Err(last.context(format!(
                    "no leader applied the command within {} s",
                    COMMAND_RETRY_WINDOW.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits (bounded) until every member is in the Raft group with a fresh leader.
    pub async fn wait_raft_formed(&self, within: Duration) -> anyhow::Result<ClusterStatus> {
        let n = self.members.len();
        crate::wait::wait_for(
            "every member to be a voter under one leader",
            within,
            || async {
                let s = self.status().await.ok()?;
                let voters = s.raw.members.iter().filter(|m| m.voter).count();
                (voters == n && s.leader().is_some()).then_some(s)
            },
        )
        .await
        .with_context(|| self.log_tails(20))
    }

    /// Waits (bounded) until the cluster has converged: a fresh leader, a primary whose
    /// Postgres is up and writable, and every other data member streaming from it on its
    /// timeline.
    pub async fn wait_converged(&self, within: Duration) -> anyhow::Result<ClusterStatus> {
        let data: BTreeSet<String> = self.data_members().into_iter().collect();
        crate::wait::wait_for(
            "one primary with every data member streaming from it",
            within,
            || async {
                let s = self.status().await.ok()?;
                let primary = s.primary()?.to_string();
                s.primary_timeline()?;
                // A member removed from the membership (a scenario may remove one) is
                // no longer expected to stream.
                let mut expected: BTreeSet<String> = data
                    .iter()
                    .filter(|n| s.member(n).is_some())
                    .cloned()
                    .collect();
                expected.remove(&primary);
                (s.streaming_standbys() == expected).then_some(s)
            },
        )
        .await
    }

    /// Multi-host connection string for clients in `region`: every data member through the
    /// region's client proxies (on separate hosts: at its host's address),
    /// `target_session_attrs=read-write`, the region's own members
    /// first (as an application there would list them: libpq tries hosts in order, each up
    /// to `connect_timeout`, so unreachable remote hosts first would hold up every
    /// reconnect by seconds).
    pub fn client_conninfo(&self, region: &str) -> anyhow::Result<String> {
        let mut ports = Vec::new();
        let mut data: Vec<&Member> = self
            .members
            .values()
            .filter(|m| m.kind == Kind::Data)
            .collect();
        data.sort_by_key(|m| (m.region != region, m.name.clone()));
        let mut hosts = Vec::new();
        for m in data {
            let a = match (&self.netns, m.pg_port) {
                (Some(_), Some(p)) => SocketAddr::new(m.addr, p),
                _ => self
                    .mesh
                    .client_addr(region, &m.name, Service::Postgres)
                    .with_context(|| format!("no client link from {region} to {}", m.name))?,
            };
            hosts.push(a.ip().to_string());
            ports.push(a.port().to_string());
        }
        let hosts = hosts.join(",");
        Ok(format!(
            "host={hosts} port={} user=postgres dbname=postgres target_session_attrs=read-write connect_timeout=2",
            ports.join(",")
        ))
    }

    /// The last `lines` lines of every member's log.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for m in self.members.values() {
            let log = m.log();
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            out.push_str(&format!("----- {} ({})\n", m.name, m.log_path.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Stops everything now (what drop does); idempotent.
    pub fn shutdown(&mut self) {
        for m in self.members.values_mut() {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Twice: an agent killed while starting its Postgres may have left a postmaster
        // that wrote its pid file just after the first pass.
        for pass in 0..2 {
            let pids: Vec<i32> = self
                .members
                .values()
                .filter_map(Member::postmaster_pid)
                .collect();
            for pid in &pids {
                signal_postmaster(*pid, Signal::SIGKILL);
            }
            for _ in 0..200 {
                if !pids.iter().any(|p| pid_alive(*p)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if pass == 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// SIGCONT first when killing, so a frozen process group dies too; the group when the
/// postmaster leads one.
fn signal_postmaster(pid: i32, sig: Signal) {
    let p = Pid::from_raw(pid);
    let leads_group = getpgid(Some(p)).is_ok_and(|g| g == p);
    if sig == Signal::SIGKILL {
        if leads_group {
            let _ = killpg(p, Signal::SIGCONT);
        } else {
            let _ = kill(p, Signal::SIGCONT);
        }
    }
    if leads_group {
        let _ = killpg(p, sig);
    }
    let _ = kill(p, sig);
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(dir) = self.dir.take() {
            if self.options.keep_dir {
                let kept = dir.keep();
                eprintln!("meridian-chaos: kept run dir {}", kept.display());
            } else {
                let _ = dir.close();
            }
        }
    }
}

/// The pids whose parent is `parent` (from /proc; empty where there is none).
pub fn children_of(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_parses_and_names_members() {
        let t = Topology::default();
        assert_eq!(t.to_string(), DEFAULT_TOPOLOGY);
        let names: Vec<(String, Kind)> = t.members().into_iter().map(|(n, _, k)| (n, k)).collect();
        assert_eq!(
            names,
            vec![
                ("us-east-1".into(), Kind::Data),
                ("us-east-2".into(), Kind::Data),
                ("us-west-1".into(), Kind::Data),
                ("us-west-2".into(), Kind::Data),
                ("eu-central-1".into(), Kind::Witness),
            ]
        );
        let t: Topology = "a:1+w1, b:w2".parse().unwrap();
        assert_eq!(t.to_string(), "a:1+w1,b:w2");
        assert_eq!(t.members().len(), 4);
        for bad in ["", "a", "a:x", "a:0", "a:w1", "a:1,a:1", "A:1", "a:10"] {
            assert!(bad.parse::<Topology>().is_err(), "{bad}");
        }
    }
}
