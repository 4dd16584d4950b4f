//! Real agent processes for end-to-end tests: writes one config file per member into a
//! temp dir (free 127.0.0.1 ports, short Raft timings), spawns the built `meridian-node`
//! binary for each, captures each member's log to a file, and kills every process by PID
//! on drop (also when the test panics). Optional mutual TLS with certificates generated
//! at test time (rcgen). Admin helpers talk to the members over gRPC, every call bounded.
//! Members' logs are printed when a test panics (or always with `MERIDIAN_TEST_LOGS=1`),
//! the last 40 lines of each (`MERIDIAN_TEST_LOG_LINES=N` for more).
//!
//! With [`AgentCluster::with_postgres`] every data member's agent creates and manages a real
//! Postgres (free port, data dir under the member's state dir); the fixture kills those
//! servers by the PID in `postmaster.pid` on drop. The other constructors point the agents
//! at an empty `bin_dir` so they manage no Postgres (Raft-only tests stay light).
//!
//! [`AgentCluster::build_with`] with [`Hosts::Netns`] runs every member on its own host
//! (root only): a network namespace with its own address ([`meridian_chaos::netns`]), the
//! address books listing those addresses, partitions by packet filter
//! ([`AgentCluster::hosts`]); the namespaces are removed after the processes on drop.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_chaos::netns::NetnsHosts;
use meridian_node::raft::Command as IntentCommand;
use meridian_proto::admin_client::AdminClient;
use meridian_proto::{RemoveMemberRequest, StatusResponse};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::free_ports;

/// Bound on one admin call from the tests.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The data members' Postgres superuser password (scram-sha-256 from 127.0.0.1, the
/// tests' own sessions; Meridian's roles have their own passwords in files).
pub const SUPERUSER_PASSWORD: &str = "test-superuser-pw";
/// How long [`AgentCluster::command`] retries while the cluster has no leader.
pub const RETRY_WINDOW: Duration = Duration::from_secs(10);
/// How long [`AgentCluster::status`] waits for some member to answer from a leader: a
/// few election timeouts of the test configuration (at most 1 s each).
pub const LEADER_WAIT: Duration = Duration::from_secs(4);
/// Bound on a graceful stop (SIGTERM) before the fixture kills the process.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Data,
    Witness,
}

/// One member to declare: every declared member is in every member's address book.
#[derive(Clone, Debug)]
pub struct MemberSpec {
    pub name: String,
    pub region: String,
    pub kind: Kind,
    pub bootstrap: bool,
    pub join: Vec<String>,
    /// Overrides the cluster name in this member's config (to test refusals).
    pub cluster: Option<String>,
    /// With TLS: present a certificate signed by another CA (to test refusals).
    pub rogue_cert: bool,
}

impl MemberSpec {
    pub fn data(name: &str, region: &str) -> Self {
        MemberSpec {
            name: name.into(),
            region: region.into(),
            kind: Kind::Data,
            bootstrap: false,
            join: Vec::new(),
            cluster: None,
            rogue_cert: false,
        }
    }

    pub fn witness(name: &str, region: &str) -> Self {
        MemberSpec {
            kind: Kind::Witness,
            ..MemberSpec::data(name, region)
        }
    }

    pub fn bootstrap(mut self) -> Self {
        self.bootstrap = true;
        self
    }

    pub fn join(mut self, peer: &str) -> Self {
        self.join = vec![peer.to_string()];
        self
    }

    pub fn cluster(mut self, name: &str) -> Self {
        self.cluster = Some(name.to_string());
        self
    }

    pub fn rogue_cert(mut self) -> Self {
        self.rogue_cert = true;
        self
    }
}

/// One declared member and its process, if running.
pub struct AgentMember {
    pub spec: MemberSpec,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub state_dir: PathBuf,
    /// This member's host address: 127.0.0.1, or its namespace's address.
    pub addr: IpAddr,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Port of this data member's Postgres (0 on a witness).
    pub pg_port: u16,
    child: Option<Child>,
}

impl AgentMember {
    /// The data dir the agent creates its Postgres in.
    pub fn pg_data_dir(&self) -> PathBuf {
        self.state_dir.join("pgdata")
    }

    /// The postmaster's pid from `postmaster.pid`, if the file is there.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.pg_data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// SIGKILL to the postmaster and its process group (the `kill -9` of a crash).
    pub fn kill_postgres(&self) {
        if let Some(pid) = self.postmaster_pid().filter(|p| *p > 0) {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// A libpq connection string to this member's Postgres.
    pub fn pg_conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=2",
            self.addr, self.pg_port
        )
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

/// The test's certificates: a CA, one certificate per member and one for the test client.
struct Pki {
    dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    rogue_ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(dir: &Path) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let ca = new_ca("meridian test CA")?;
        let rogue_ca = new_ca("rogue CA")?;
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca,
            rogue_ca,
        })
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A Postgres server certificate for `name` on 127.0.0.1 and `addr` (its host's
    /// address; IP and DNS names).
    fn issue_server(&self, name: &str, addr: IpAddr) -> anyhow::Result<(PathBuf, PathBuf)> {
        let key = rcgen::KeyPair::generate()?;
        let mut sans = vec![
            name.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ];
        if !addr.is_loopback() {
            sans.push(addr.to_string());
        }
        let mut params = rcgen::CertificateParams::new(sans)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.ca)?;
        let cert_path = self.dir.join(format!("{name}-pg.pem"));
        let key_path = self.dir.join(format!("{name}-pg.key"));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }

    /// Writes `name`'s certificate and key; returns (cert, key) paths.
    fn issue(&self, name: &str, rogue: bool) -> anyhow::Result<(PathBuf, PathBuf)> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = if rogue { &self.rogue_ca } else { &self.ca };
        let cert = params.signed_by(&key, issuer)?;
        let cert_path = self.dir.join(format!("{name}.pem"));
        let key_path = self.dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }
}

fn new_ca(cn: &str) -> anyhow::Result<rcgen::CertifiedIssuer<'static, rcgen::KeyPair>> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(rcgen::CertifiedIssuer::self_signed(
        params,
        rcgen::KeyPair::generate()?,
    )?)
}

/// The admin token of a cluster whose test names none.
pub const DEFAULT_TOKEN: &str = "meridian-test-admin-token";

/// Where the members run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hosts {
    /// Every member on 127.0.0.1.
    #[default]
    Loopback,
    /// Every member in its own network namespace with its own address (root only).
    Netns,
}

/// What [`AgentCluster::build_with`] hands a config hook about the member being written.
pub struct ConfigContext<'a> {
    pub spec: &'a MemberSpec,
    pub addr: IpAddr,
    /// The member's own directory (config, log, state dir below it).
    pub home: &'a Path,
    /// Every declared member's host address, by name.
    pub addrs: &'a BTreeMap<String, IpAddr>,
}

/// Extra config text for one member.
#[derive(Clone, Debug, Default)]
pub struct ConfigExtra {
    /// Lines appended to a data member's `[postgres]` table.
    pub postgres_keys: String,
    /// Lines appended to the `[member]` table (tags such as `nosync = true`).
    pub member_keys: String,
    /// Whole tables (each starting with its `[header]`) appended to the config.
    pub sections: String,
}

/// A hook that adds config text per member (e.g. Postgres TLS, replication roles).
pub type ConfigHook = Arc<dyn Fn(&ConfigContext<'_>) -> anyhow::Result<ConfigExtra> + Send + Sync>;

/// Everything [`AgentCluster::build_with`] can vary.
#[derive(Clone, Default)]
pub struct ClusterSetup {
    /// Mutual TLS on the member links, with certificates made at test time.
    pub tls: bool,
    /// Admin token the members require (and the helpers send).
    pub token: Option<String>,
    /// Data members' agents create and run real Postgres servers.
    pub postgres: bool,
    pub hosts: Hosts,
    pub config_hook: Option<ConfigHook>,
}

/// A set of declared members, some running.
pub struct AgentCluster {
    pub cluster: String,
    pub members: BTreeMap<String, AgentMember>,
    /// Client TLS for the admin helpers (certificate "admin-client"), when TLS is on.
    client_tls: Option<ClientTlsConfig>,
    /// Admin token every member requires and the helpers send.
    pub token: String,
    /// The cluster secret the members sign their RPCs with (without TLS; `None` with TLS,
    /// where the members' certificates authenticate them).
    pub secret: Option<String>,
    dir: TempDir,
    /// The members' hosts with [`Hosts::Netns`]; dropped after the processes.
    hosts: Option<NetnsHosts>,
}

/// Path of the built `meridian-node`: next to the test executable's `deps/` directory.
pub fn node_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target/<profile> directory")?;
    let bin = profile_dir.join("meridian-node");
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    Ok(bin)
}

impl AgentCluster {
    /// Declares `specs` (writes their configs); starts nothing.
    pub fn new(specs: Vec<MemberSpec>, tls: bool) -> anyhow::Result<AgentCluster> {
        Self::with_options(specs, tls, None)
    }

    /// Like [`AgentCluster::new`]; with `token`, every member requires it for admin writes
    /// (read from a `token_file`) and the fixture's helpers send it.
    pub fn with_options(
        specs: Vec<MemberSpec>,
        tls: bool,
        token: Option<&str>,
    ) -> anyhow::Result<AgentCluster> {
        Self::build_with(
            specs,
            ClusterSetup {
                tls,
                token: token.map(str::to_string),
                ..ClusterSetup::default()
            },
        )
    }

    /// Data members' agents create and run real Postgres servers; short lease timings;
    /// with `token`, admin writes (gRPC and HTTP) need it.
    pub fn with_postgres(
        specs: Vec<MemberSpec>,
        token: Option<&str>,
    ) -> anyhow::Result<AgentCluster> {
        Self::build_with(
            specs,
            ClusterSetup {
                token: token.map(str::to_string),
                postgres: true,
                ..ClusterSetup::default()
            },
        )
    }

    /// Declares `specs` as `setup` says (writes their configs, builds their hosts); starts
    /// nothing.
    pub fn build_with(specs: Vec<MemberSpec>, setup: ClusterSetup) -> anyhow::Result<AgentCluster> {
        let ClusterSetup {
            tls,
            token,
            postgres,
            hosts,
            config_hook,
        } = setup;
        let token = token.as_deref();
        let netns = match hosts {
            Hosts::Loopback => None,
            Hosts::Netns => {
                let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
                Some(NetnsHosts::create(&names).context("building one host per member")?)
            }
        };
        let addr_of = |name: &str| -> anyhow::Result<IpAddr> {
            Ok(match &netns {
                Some(h) => IpAddr::V4(h.addr(name)?),
                None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            })
        };
        let dir = tempfile::Builder::new()
            .prefix("meridian-agents-")
            .tempdir()
            .context("creating the cluster's temp dir")?;
        // The Postgres OS user must reach the data dirs below it.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        let no_pg_bin = dir.path().join("no-postgres-bin");
        std::fs::create_dir_all(&no_pg_bin)?;
        let cluster = "test-cluster".to_string();
        let ports = free_ports(specs.len() * 3)?;
        let pki = if tls {
            Some(Pki::new(&dir.path().join("pki"))?)
        } else {
            None
        };
        // Every cluster has an admin token (a default one unless the test names its own)
        // and, without TLS, a cluster secret: as a production config would.
        let token = token.unwrap_or(DEFAULT_TOKEN).to_string();
        let token_path = dir.path().join("admin-token");
        meridian_chaos::cluster::write_private(&token_path, &token)?;
        let token_line = format!("token_file = \"{}\"\n", token_path.display());
        let secret = if tls {
            None
        } else {
            let secret: String = rand::random::<[u8; 32]>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            Some(secret)
        };
        let security = match &secret {
            Some(secret) => {
                let path = dir.path().join("cluster-secret");
                meridian_chaos::cluster::write_private(&path, secret)?;
                format!(
                    "[security]\ncluster_secret_file = \"{}\"\n\n",
                    path.display()
                )
            }
            None => String::new(),
        };
        // Meridian's roles log in with scram-sha-256 and passwords from files, as in
        // production; the superuser's password is for the tests' own sessions.
        let secrets = dir.path().join("secrets");
        std::fs::create_dir_all(&secrets)?;
        let password_file = |name: &str, value: &str| -> anyhow::Result<String> {
            let p = secrets.join(name);
            std::fs::write(&p, format!("{value}\n"))?;
            Ok(p.display().to_string())
        };
        let su_pw = password_file("superuser", SUPERUSER_PASSWORD)?;
        let repl_pw = password_file("replication", "test-replication-pw")?;
        let rewind_pw = password_file("rewind", "test-rewind-pw")?;
        let monitor_pw = password_file("monitor", "test-monitor-pw")?;
        // Postgres serves TLS to the other members, who verify it fully (verify-full
        // against the test CA; the certificates name 127.0.0.1).
        let pg_pki = Pki::new(&dir.path().join("pg-pki"))?;
        let monitor_section = format!(
            "[postgres.monitor]\nuser = \"meridian_monitor\"\npassword_file = \"{monitor_pw}\"\n"
        );
        let mut members = BTreeMap::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let home = dir.path().join(&spec.name);
            std::fs::create_dir_all(&home)?;
            let addr = addr_of(&spec.name)?;
            members.insert(
                spec.name.clone(),
                AgentMember {
                    config_path: home.join("meridian.toml"),
                    log_path: home.join("agent.log"),
                    state_dir: home.join("state"),
                    addr,
                    grpc: SocketAddr::new(addr, ports[3 * i]),
                    http: SocketAddr::new(addr, ports[3 * i + 1]),
                    pg_port: if spec.kind == Kind::Data {
                        ports[3 * i + 2]
                    } else {
                        0
                    },
                    spec,
                    child: None,
                },
            );
        }
        let mut book = String::new();
        for (i, m) in members.values().enumerate() {
            book.push_str(&format!("[peers.{}]\napi = \"{}\"\n", m.spec.name, m.grpc));
            if m.spec.kind == Kind::Data {
                book.push_str(&format!(
                    "postgres = \"{}\"\n",
                    SocketAddr::new(m.addr, ports[3 * i + 2])
                ));
            }
        }
        // Where the tests' own sessions come from: loopback, or the bridge's address.
        let clients: IpAddr = match &netns {
            Some(h) => IpAddr::V4(h.bridge_addr()),
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let addrs: BTreeMap<String, IpAddr> = members
            .values()
            .map(|m| (m.spec.name.clone(), m.addr))
            .collect();
        for (i, m) in members.values().enumerate() {
            let s = &m.spec;
            let extra = match &config_hook {
                Some(hook) => hook(&ConfigContext {
                    spec: s,
                    addr: m.addr,
                    home: m.config_path.parent().unwrap_or(dir.path()),
                    addrs: &addrs,
                })
                .with_context(|| format!("the config hook for {}", s.name))?,
                None => ConfigExtra::default(),
            };
            let mut text = format!(
                "cluster = \"{}\"\nstate_dir = \"{}\"\n\n[member]\nname = \"{}\"\nregion = \"{}\"\nkind = \"{}\"\n\n",
                s.cluster.as_deref().unwrap_or(&cluster),
                m.state_dir.display(),
                s.name,
                s.region,
                if s.kind == Kind::Data { "data" } else { "witness" },
            );
            if !extra.member_keys.is_empty() {
                // After the blank line that ends [member]: still its keys.
                text.truncate(text.trim_end().len() + 1);
                text.push_str(&extra.member_keys);
                text.push('\n');
            }
            if s.kind == Kind::Data {
                text.push_str(&format!(
                    "[postgres]\ndata_dir = \"{}\"\nport = {}\nlisten_addr = \"{}\"\n\
                     password_file = \"{su_pw}\"\n\
                     hba = [\"host all postgres {clients}/32 scram-sha-256\"]\n\
                     max_slot_wal_keep_size = \"1GB\"\n",
                    m.pg_data_dir().display(),
                    ports[3 * i + 2],
                    m.addr
                ));
                if !postgres {
                    text.push_str(&format!("bin_dir = \"{}\"\n", no_pg_bin.display()));
                }
                text.push_str(&extra.postgres_keys);
                let (cert, key) = pg_pki.issue_server(&s.name, m.addr)?;
                text.push_str(&format!(
                    "[postgres.replication]\nuser = \"replicator\"\npassword_file = \"{repl_pw}\"\n\
                     [postgres.rewind]\nuser = \"rewinder\"\npassword_file = \"{rewind_pw}\"\n\
                     {monitor_section}\
                     [postgres.ssl]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\nsslmode = \"verify-full\"\n\n",
                    cert.display(),
                    key.display(),
                    pg_pki.ca_file().display()
                ));
            } else {
                text.push_str(&format!(
                    "{monitor_section}[postgres.ssl]\nsslrootcert = \"{}\"\nsslmode = \"verify-full\"\n\n",
                    pg_pki.ca_file().display()
                ));
            }
            text.push_str(&format!(
                "[api]\nlisten = \"{}\"\nhttp_listen = \"{}\"\n{token_line}\n{security}",
                m.grpc, m.http
            ));
            let join: Vec<String> = s.join.iter().map(|j| format!("\"{j}\"")).collect();
            text.push_str(&format!(
                "[raft]\nbootstrap = {}\njoin = [{}]\nheartbeat = \"100ms\"\nelection_timeout_min = \"500ms\"\nelection_timeout_max = \"1000ms\"\n\n",
                s.bootstrap,
                join.join(", ")
            ));
            text.push_str(
                "[timing]\nobserve_interval = \"200ms\"\npg_probe_timeout = \"500ms\"\n\
                 lease_ttl = \"2000ms\"\nlease_renew_interval = \"250ms\"\nfence_after = \"1500ms\"\n\
                 promote_timeout = \"20s\"\n\n",
            );
            if let Some(pki) = &pki {
                let (cert, key) = pki.issue(&s.name, s.rogue_cert)?;
                text.push_str(&format!(
                    "[tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n",
                    pki.ca_file().display(),
                    cert.display(),
                    key.display()
                ));
            }
            text.push_str(&extra.sections);
            text.push('\n');
            text.push_str(&book);
            std::fs::write(&m.config_path, text)
                .with_context(|| format!("writing {}", m.config_path.display()))?;
        }
        let client_tls = match &pki {
            Some(pki) => {
                let (cert, key) = pki.issue("admin-client", false)?;
                Some(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(std::fs::read(pki.ca_file())?))
                        .identity(Identity::from_pem(
                            std::fs::read(cert)?,
                            std::fs::read(key)?,
                        )),
                )
            }
            None => None,
        };
        Ok(AgentCluster {
            cluster,
            members,
            client_tls,
            token,
            secret,
            dir,
            hosts: netns,
        })
    }

    /// The members' hosts, with [`Hosts::Netns`] (partitions: `isolate`, `cut`, `heal`).
    pub fn hosts(&self) -> Option<&NetnsHosts> {
        self.hosts.as_ref()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn member(&self, name: &str) -> &AgentMember {
        self.members
            .get(name)
            .unwrap_or_else(|| panic!("no member {name} declared"))
    }

    fn member_mut(&mut self, name: &str) -> &mut AgentMember {
        self.members
            .get_mut(name)
            .unwrap_or_else(|| panic!("no member {name} declared"))
    }

    /// Names of the members whose process is running (as far as the fixture knows).
    pub fn running(&self) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.child.is_some())
            .map(|m| m.spec.name.clone())
            .collect()
    }

    /// Spawns `name`'s agent; its stdout and stderr are appended to its log file.
    pub fn start(&mut self, name: &str) -> anyhow::Result<()> {
        let bin = node_binary()?;
        // On its own host the agent runs inside its namespace (`ip netns exec` execs it:
        // the child's PID is the agent's).
        let mut cmd = match &self.hosts {
            Some(h) => h.command(name, &bin)?,
            None => Command::new(bin),
        };
        let m = self.member_mut(name);
        anyhow::ensure!(m.child.is_none(), "{name} is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log_path)
            .with_context(|| format!("opening {}", m.log_path.display()))?;
        let child = cmd
            .arg("--config")
            .arg(&m.config_path)
            .env_remove("RUST_LOG")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning the agent of {name}"))?;
        m.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(mut c) = self.member_mut(name).child.take() {
            c.kill().with_context(|| format!("killing {name}"))?;
            c.wait().with_context(|| format!("reaping {name}"))?;
        }
        Ok(())
    }

    /// SIGTERM and wait (bounded); SIGKILL if it does not stop in time.
    pub fn stop(&mut self, name: &str) -> anyhow::Result<ExitStatus> {
        let Some(mut c) = self.member_mut(name).child.take() else {
            anyhow::bail!("{name} is not running");
        };
        let pid = Pid::from_raw(i32::try_from(c.id())?);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                c.wait()?;
                anyhow::bail!(
                    "{name} did not stop within {} s of SIGTERM",
                    STOP_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for `name`'s process to exit by itself; returns its status.
    pub async fn wait_exit(&mut self, name: &str, within: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let m = self.member_mut(name);
            let c = m.child.as_mut().context("not running")?;
            if let Some(status) = c.try_wait()? {
                m.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                anyhow::bail!("{name} still runs after {} ms", within.as_millis());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An admin client for `name` (TLS when the cluster uses it), connected within bounds.
    pub async fn admin(
        &self,
        name: &str,
    ) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
        let m = self.member(name);
        meridian_chaos::cluster::admin_client(
            name,
            &m.grpc.to_string(),
            self.client_tls.as_ref(),
            CALL_TIMEOUT,
        )
        .await
    }

    /// `Admin.Status` on `name` (forwarded to the leader unless `local`).
    pub async fn status_of(&self, name: &str, local: bool) -> anyhow::Result<StatusResponse> {
        meridian_chaos::cluster::status_via(self.admin(name).await?, name, local, CALL_TIMEOUT)
            .await
    }

    /// The first status answered by the leader, asking the running members in turn.
    /// When none answers from a leader (the leader just stopped and the election is under
    /// way), asks again for at most [`LEADER_WAIT`]: one round is not enough right after
    /// the Raft leader left, as everyone still names it for an election timeout.
    pub async fn status(&self) -> anyhow::Result<StatusResponse> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let mut last = None;
            for name in self.running() {
                match self.status_of(&name, false).await {
                    Ok(s) if s.from_leader => return Ok(s),
                    Ok(s) => {
                        last = Some(anyhow::anyhow!("{name} answered without a leader: {s:?}"))
                    }
                    Err(e) => last = Some(e),
                }
            }
            if Instant::now() >= deadline {
                return Err(last.unwrap_or_else(|| anyhow::anyhow!("no member is running")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Proposes `cmd` through `name` (forwarded to the leader); returns the log index.
    /// Retries while the cluster answers `Unavailable` (no leader yet, leadership moving),
    /// for at most [`RETRY_WINDOW`]: a retried command may apply twice, so use commands
    /// whose repetition is harmless.
    pub async fn command(&self, name: &str, cmd: &IntentCommand) -> anyhow::Result<u64> {
        use meridian_node::admin_client::{submit, SubmitError};
        let deadline = Instant::now() + RETRY_WINDOW;
        let committed = loop {
            let mut c = self.admin(name).await?;
            match submit(&mut c, cmd, &self.token, CALL_TIMEOUT).await {
                Err(e)
                    if e.code() == Some(tonic::Code::Unavailable) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e @ SubmitError::Timeout(_)) => {
                    return Err(
                        anyhow::Error::new(e).context(format!("command via {name}: timed out"))
                    )
                }
                other => break other.with_context(|| format!("command via {name}"))?,
            }
        };
        if let Some(refusal) = committed.refusal() {
            anyhow::bail!("command via {name} was not applied: {refusal}");
        }
        Ok(committed.log_index)
    }

    /// Commits a policy that is the default except for `region` (every region named gets
    /// the same settings), through `via`; panics with the members' logs when refused.
    pub async fn set_region_policy(
        &self,
        via: &str,
        regions: &[&str],
        region: meridian_node::policy::RegionPolicy,
        reason: &str,
    ) {
        let policy = meridian_node::policy::Policy {
            regions: regions
                .iter()
                .map(|r| (r.to_string(), region.clone()))
                .collect(),
            ..meridian_node::policy::Policy::default()
        };
        self.command(
            via,
            &IntentCommand::SetPolicy {
                expected_version: None,
                policy,
                reason: reason.into(),
                at_unix_ms: 1,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", self.logs()));
    }

    /// `Admin.RemoveMember` through `via`.
    pub async fn remove(&self, via: &str, name: &str) -> anyhow::Result<()> {
        let mut c = self.admin(via).await?;
        tokio::time::timeout(
            CALL_TIMEOUT * 3,
            c.remove_member(RemoveMemberRequest {
                name: name.into(),
                token: self.token.clone(),
            }),
        )
        .await
        .with_context(|| format!("removing {name} via {via}: timed out"))?
        .with_context(|| format!("removing {name} via {via}"))?;
        Ok(())
    }

    /// Every member's log, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in self.members.values() {
            let log = m.log();
            let lines = std::env::var("MERIDIAN_TEST_LOG_LINES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(40);
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            out.push_str(&format!(
                "----- {} (last {} lines)\n",
                m.spec.name,
                tail.len()
            ));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for AgentCluster {
    fn drop(&mut self) {
        for m in self.members.values_mut() {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            m.kill_postgres();
        }
        if std::thread::panicking() || std::env::var_os("MERIDIAN_TEST_LOGS").is_some() {
            eprintln!("{}", self.logs());
        }
    }
}
