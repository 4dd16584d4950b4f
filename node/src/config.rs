//! The agent's configuration file: its TOML schema, loading, and validation.
//!
//! Owns every rule about what a valid `meridian-node --config FILE.toml` is. Loading
//! either yields a [`Config`] that the rest of the agent can trust (timings coherent,
//! secrets resolved, addresses parsed) or a [`ConfigError`] that names the file, the
//! key and the reason. Nothing is started before a config has loaded.
//!
//! Durations are strings in humantime form (`"250ms"`, `"2s"`, `"1m"`). Secrets (the
//! Postgres password, the admin token) are never written in the file itself: the file
//! names an environment variable (`*_env`) or a file (`*_file`) that holds them, and
//! [`Secret`]'s `Debug` never prints the value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read the file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        /// Dotted path of the offending key, e.g. `timing.fence_after`.
        key: String,
        reason: String,
    },
}

/// A secret value (password, token). Its `Debug` and `Display` never reveal it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; call only where it is handed to a library, never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Whether a member runs a Postgres (`data`) or only votes (`witness`); part of the
/// persisted model, so it lives in the core crate.
pub use meridian_core::types::MemberKind;

/// A loaded, validated agent configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Path the configuration was loaded from (for messages).
    pub source: PathBuf,
    /// Name of the cluster; agents of another cluster are refused.
    pub cluster: String,
    pub member: MemberConfig,
    /// Where the agent keeps its own state (Raft log, snapshots).
    pub state_dir: PathBuf,
    /// Present exactly when `member.kind` is `data`.
    pub postgres: Option<PostgresConfig>,
    pub api: ApiConfig,
    pub raft: RaftConfig,
    /// The address book: how *this* agent reaches each member, by member name.
    pub peers: BTreeMap<String, PeerAddrs>,
    pub timing: TimingConfig,
    pub tls: Option<TlsConfig>,
    /// Credentials and TLS of Meridian's sessions to Postgres (all members).
    pub pg_client: PgClientConfig,
    pub shutdown: ShutdownConfig,
    /// How members prove themselves to each other (see `crate::auth`).
    pub security: SecurityConfig,
    /// `[backup]`: WAL archiving, backups and restores through pgBackRest (`backup/`).
    pub backup: Option<crate::backup::BackupConfig>,
    /// `[callbacks]`: programs run on Postgres start, stop and role change.
    pub callbacks: CallbacksConfig,
}

/// `[callbacks]`: like Patroni's, each an executable and its leading arguments; Meridian
/// appends the action (`on_start`, `on_stop`, `on_role_change`), the role (`primary`,
/// `replica`), the cluster and the member name. Run one at a time per member, each
/// bounded by `timeout`.
#[derive(Clone, Debug, Default)]
pub struct CallbacksConfig {
    pub on_start: Option<Vec<String>>,
    pub on_stop: Option<Vec<String>>,
    pub on_role_change: Option<Vec<String>>,
    /// A callback still running after this is killed (and counted as failed).
    pub timeout: Duration,
}

/// What a primary's agent does with its Postgres when it is stopped on purpose (SIGTERM,
/// `systemctl stop`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPrimaryStop {
    /// Hand over first: a switchover to the best healthy standby (bounded by
    /// `shutdown.switchover_timeout`), then stop Postgres; without a candidate, as `fence`.
    Switchover,
    /// Fence Postgres at once and tell the leader, so that a failover follows at once
    /// where a member is known to hold every acknowledged commit.
    Fence,
}

#[derive(Clone, Debug)]
pub struct ShutdownConfig {
    pub on_primary_stop: OnPrimaryStop,
    /// Bound on the hand-over switchover of a stopping primary.
    pub switchover_timeout: Duration,
}

/// `[security]`: the cluster secret members sign requests with, or the explicit choice of
/// running without member authentication.
#[derive(Clone, Debug, Default)]
pub struct SecurityConfig {
    /// At least `auth::MIN_SECRET_BYTES` bytes; the same on every member.
    pub cluster_secret: Option<Secret>,
    /// The file it was read from (its permissions are checked at start).
    pub cluster_secret_file: Option<PathBuf>,
    /// No member authentication at all (local demos only; `/health` and `list` say so).
    pub insecure: bool,
}

#[derive(Clone, Debug)]
pub struct MemberConfig {
    pub name: String,
    pub region: String,
    pub kind: MemberKind,
    /// Higher is preferred among otherwise equal failover candidates.
    pub priority: i32,
    /// Never promote this member automatically.
    pub nofailover: bool,
    /// Take no read traffic: `/replica` (and `/read-only` as a standby) answer 503.
    pub noloadbalance: bool,
    /// Never a synchronous standby.
    pub nosync: bool,
    /// Preferred source when another member clones its Postgres.
    pub clonefrom: bool,
    /// Cascading replication: stream from this member while it is a streaming standby.
    pub replicatefrom: Option<String>,
}

#[derive(Clone, Debug)]
pub struct PostgresConfig {
    /// Directory holding `initdb`, `pg_ctl`, `postgres`, ...; `None` = auto-detect.
    pub bin_dir: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// Where Postgres listens (`listen_addresses`); never empty.
    pub listen_addr: Vec<ListenAddr>,
    pub port: u16,
    /// Unix socket directory; the agent's own sessions to its Postgres use it.
    pub socket_dir: PathBuf,
    /// OS user Postgres runs as when the agent runs as root.
    pub os_user: String,
    pub superuser: String,
    pub password: Option<Secret>,
    /// `pg_hba.conf` method of Meridian's roles over the unix socket (`peer` by default).
    pub local_auth_method: String,
    /// `pg_hba.conf` method of the replication, rewind and monitor roles from the other
    /// members (`scram-sha-256` by default).
    pub auth_method: String,
    /// Where the other members connect from; empty = derived from the address book.
    pub replication_cidrs: Vec<String>,
    /// The user's own `pg_hba.conf` lines, validated.
    pub hba: Vec<String>,
    /// `max_slot_wal_keep_size`, as Postgres reads it (`"4GB"`, `-1` = unbounded).
    pub max_slot_wal_keep_size: String,
    pub replication: RoleConfig,
    pub rewind: RoleConfig,
    /// Postgres' own TLS (`ssl = on`); None = off.
    pub server_ssl: Option<ServerSslConfig>,
    /// `[postgres.parameters]`: this member's overrides of the cluster's Postgres
    /// parameters (lowercase names, values as Postgres reads them).
    pub parameters: BTreeMap<String, String>,
    /// Whether, while this member is the primary and no synchronous standby gates its
    /// commits, they wait for the local lease gate (`pg::gate`), which confirms only under
    /// a valid lease. Default on: without it a primary frozen past its lease acknowledges
    /// commits on thaw before the fence ends it.
    pub lease_gate: bool,
}

/// One address in `postgres.listen_addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// `"*"`: every interface.
    Any,
    Ip(IpAddr),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Any => f.write_str("*"),
            ListenAddr::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A role Meridian logs in as, with its password.
#[derive(Clone, Debug)]
pub struct RoleConfig {
    pub user: String,
    pub password: Option<Secret>,
}

/// How Meridian's sessions to other members' Postgres authenticate and encrypt; every
/// member has one (a witness probes the data members too).
#[derive(Clone, Debug)]
pub struct PgClientConfig {
    /// The least-privilege role of probes (`pg_monitor`).
    pub monitor: RoleConfig,
    /// `sslmode`; `prefer` (libpq's default) when `[postgres.ssl]` is absent.
    pub sslmode: crate::pg::SslMode,
    /// CA bundle for `verify-ca` / `verify-full`.
    pub sslrootcert: Option<PathBuf>,
}

/// `[postgres.ssl]`'s server side.
#[derive(Clone, Debug)]
pub struct ServerSslConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// gRPC: Raft transport, observations, admin API.
    pub listen: SocketAddr,
    /// HTTP: Patroni-compatible health endpoints and `/metrics`.
    pub http_listen: SocketAddr,
    /// Required by write endpoints and admin commands that change the cluster.
    pub token: Option<Secret>,
    /// HTTPS for `http_listen` (both set, or neither).
    pub http_tls: Option<HttpTlsConfig>,
}

#[derive(Clone, Debug)]
pub struct HttpTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Clone, Debug)]
pub struct RaftConfig {
    /// Create a new one-member cluster if this member has no Raft state yet.
    pub bootstrap: bool,
    /// Members (names from the address book) to ask for admission when this member
    /// has no Raft state yet.
    pub join: Vec<String>,
    pub heartbeat: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAddrs {
    /// `host:port` of the member's gRPC API.
    pub api: String,
    /// `host:port` of the member's Postgres, for data members.
    pub postgres: Option<String>,
}

#[derive(Clone, Debug)]
pub struct TimingConfig {
    /// How often the agent reports its observations to the leader.
    pub observe_interval: Duration,
    /// How long a primary's lease lasts on the leader after its last renewal.
    pub lease_ttl: Duration,
    /// How often the primary's agent renews its lease.
    pub lease_renew_interval: Duration,
    /// A primary that cannot confirm a majority for this long fences itself.
    pub fence_after: Duration,
    /// Bound on one probe of the local Postgres.
    pub pg_probe_timeout: Duration,
    /// Bound on promoting a standby (replay, `pg_promote`, writable check).
    pub promote_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(path, &text)
    }

    /// Parses and validates `text`; `path` is only used in messages and to resolve
    /// relative paths (relative to the file's directory).
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        let de = toml::de::Deserializer::parse(text)
            .map_err(|e| invalid("(syntax)".into(), one_line(&e.to_string())))?;
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." {
                "(top level)".into()
            } else {
                key
            };
            invalid(key, one_line(&e.into_inner().to_string()))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = raw
            .validate(base)
            .map_err(|Refusal { key, reason }| invalid(key, reason))?;
        config.source = path.to_path_buf();
        Ok(config)
    }
}

/// toml's messages span several lines with a source excerpt; a log line wants one.
fn one_line(msg: &str) -> String {
    let lines: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.starts_with("-->"))
        .filter(|l| !l.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .collect();
    if lines.is_empty() {
        msg.trim().to_string()
    } else {
        lines.join("; ")
    }
}

struct Refusal {
    key: String,
    reason: String,
}

fn refuse<T>(key: &str, reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal {
        key: key.to_string(),
        reason: reason.into(),
    })
}

// ---------------------------------------------------------------- raw (as written) schema

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster: String,
    state_dir: PathBuf,
    member: RawMember,
    postgres: Option<RawPostgres>,
    api: RawApi,
    #[serde(default)]
    raft: RawRaft,
    #[serde(default)]
    peers: BTreeMap<String, RawPeer>,
    #[serde(default)]
    timing: RawTiming,
    tls: Option<RawTls>,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    security: RawSecurity,
    backup: Option<crate::backup::config::RawBackup>,
    #[serde(default)]
    callbacks: RawCallbacks,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawCallbacks {
    on_start: Option<Vec<String>>,
    on_stop: Option<Vec<String>>,
    on_role_change: Option<Vec<String>>,
    #[serde(deserialize_with = "opt_duration")]
    timeout: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawShutdown {
    on_primary_stop: OnPrimaryStop,
    #[serde(deserialize_with = "duration")]
    switchover_timeout: Duration,
}

impl Default for RawShutdown {
    fn default() -> Self {
        RawShutdown {
            on_primary_stop: OnPrimaryStop::Switchover,
            switchover_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawSecurity {
    cluster_secret_env: Option<String>,
    cluster_secret_file: Option<PathBuf>,
    insecure: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    name: String,
    region: String,
    kind: MemberKind,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    nofailover: bool,
    #[serde(default)]
    noloadbalance: bool,
    #[serde(default)]
    nosync: bool,
    #[serde(default)]
    clonefrom: bool,
    #[serde(default)]
    replicatefrom: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    bin_dir: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    listen_addr: Option<OneOrMany>,
    port: Option<u16>,
    socket_dir: Option<PathBuf>,
    os_user: Option<String>,
    superuser: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    local_auth_method: Option<String>,
    auth_method: Option<String>,
    replication_cidrs: Option<Vec<String>>,
    hba: Option<Vec<String>>,
    max_slot_wal_keep_size: Option<String>,
    replication: Option<RawRole>,
    rewind: Option<RawRole>,
    monitor: Option<RawRole>,
    ssl: Option<RawPgSsl>,
    parameters: Option<BTreeMap<String, toml::Value>>,
    lease_gate: Option<bool>,
}

/// A string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRole {
    user: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPgSsl {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    sslmode: Option<String>,
    sslrootcert: Option<PathBuf>,
}

/// Default `postgres.listen_addr`: the loopback address only (a real deployment names
/// its host's address).
fn default_listen_addr() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}
/// Sub-directory of `state_dir` for Postgres' unix socket when `postgres.socket_dir` is
/// not set.
pub const DEFAULT_SOCKET_SUBDIR: &str = "pg-socket";
pub const DEFAULT_REPLICATION_USER: &str = "replicator";
pub const DEFAULT_REWIND_USER: &str = "rewinder";
pub const DEFAULT_MONITOR_USER: &str = "meridian_monitor";
pub const DEFAULT_MAX_SLOT_WAL_KEEP_SIZE: &str = "4GB";
/// A unix socket path (`<dir>/.s.PGSQL.<port>`) must fit in `sun_path` (108 bytes).
const MAX_SOCKET_DIR_LEN: usize = 90;
fn default_os_user() -> String {
    "postgres".into()
}
fn default_superuser() -> String {
    "postgres".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: SocketAddr,
    http_listen: SocketAddr,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    http_tls_cert_file: Option<PathBuf>,
    http_tls_key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRaft {
    bootstrap: bool,
    join: Vec<String>,
    #[serde(deserialize_with = "duration")]
    heartbeat: Duration,
    #[serde(deserialize_with = "duration")]
    election_timeout_min: Duration,
    #[serde(deserialize_with = "duration")]
    election_timeout_max: Duration,
}

impl Default for RawRaft {
    fn default() -> Self {
        // Cross-region round trips are 20-90 ms: LAN defaults (50 ms / 150-300 ms) flap.
        RawRaft {
            bootstrap: false,
            join: Vec::new(),
            heartbeat: Duration::from_millis(250),
            election_timeout_min: Duration::from_millis(1000),
            election_timeout_max: Duration::from_millis(2000),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    api: String,
    postgres: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTiming {
    #[serde(deserialize_with = "duration")]
    observe_interval: Duration,
    #[serde(deserialize_with = "duration")]
    lease_ttl: Duration,
    #[serde(deserialize_with = "duration")]
    lease_renew_interval: Duration,
    #[serde(deserialize_with = "duration")]
    fence_after: Duration,
    #[serde(deserialize_with = "duration")]
    pg_probe_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    promote_timeout: Duration,
}

impl Default for RawTiming {
    fn default() -> Self {
        // DESIGN §4: a 2 s lease renewed every few hundred ms replaces a vanished node in
        // under 3 s yet survives a x10 latency spike (700 ms round trips).
        RawTiming {
            observe_interval: Duration::from_millis(250),
            lease_ttl: Duration::from_millis(2000),
            lease_renew_interval: Duration::from_millis(300),
            fence_after: Duration::from_millis(1500),
            pg_probe_timeout: Duration::from_millis(1000),
            promote_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// serde adapter: a humantime duration string such as `"250ms"` or `"2s"`.
fn duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(de)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {s:?} ({e}); write it like \"250ms\", \"2s\" or \"1m\""
        ))
    })
}

/// serde adapter: an optional humantime duration (absent = None).
fn opt_duration<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
    duration(de).map(Some)
}

// ---------------------------------------------------------------- validation

fn check_name(key: &str, value: &str) -> Result<(), Refusal> {
    if value.is_empty() {
        return refuse(key, "must not be empty");
    }
    if value.len() > 63 {
        return refuse(key, format!("{value:?} is longer than 63 characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        return refuse(
            key,
            format!("{value:?} may only hold lowercase letters, digits, '-' and '_'"),
        );
    }
    Ok(())
}

fn check_host_port(key: &str, value: &str) -> Result<(), Refusal> {
    let Some((host, port)) = value.rsplit_once(':') else {
        return refuse(key, format!("{value:?} is not host:port"));
    };
    if host.is_empty() {
        return refuse(key, format!("{value:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => refuse(key, format!("{value:?} has no valid port (1-65535)")),
    }
}

fn resolve_path(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

/// Reads a secret named by an `*_env` or `*_file` key; at most one may be set.
fn load_secret(
    base: &Path,
    env_key: &str,
    env: Option<String>,
    file_key: &str,
    file: Option<PathBuf>,
) -> Result<Option<Secret>, Refusal> {
    match (env, file) {
        (Some(_), Some(_)) => refuse(
            env_key,
            format!("set either {env_key} or {file_key}, not both"),
        ),
        (Some(var), None) => match std::env::var(&var) {
            Ok(v) if !v.is_empty() => Ok(Some(Secret(v))),
            Ok(_) => refuse(env_key, format!("environment variable {var} is empty")),
            Err(_) => refuse(env_key, format!("environment variable {var} is not set")),
        },
        (None, Some(file)) => {
            let file = resolve_path(base, file);
            match std::fs::read_to_string(&file) {
                Ok(v) => {
                    let v = v.trim_end_matches(['\n', '\r']).to_string();
                    if v.is_empty() {
                        refuse(file_key, format!("{} is empty", file.display()))
                    } else {
                        Ok(Some(Secret(v)))
                    }
                }
                Err(e) => refuse(file_key, format!("cannot read {}: {e}", file.display())),
            }
        }
        (None, None) => Ok(None),
    }
}

impl RawConfig {
    fn validate(self, base: &Path) -> Result<Config, Refusal> {
        check_name("cluster", &self.cluster)?;
        check_name("member.name", &self.member.name)?;
        if self.member.name == crate::pg::gate::GATE_APPLICATION_NAME {
            return refuse(
                "member.name",
                format!(
                    "{:?} is reserved: the lease gate streams from the primary under that application_name",
                    self.member.name
                ),
            );
        }
        if let Some(up) = &self.member.replicatefrom {
            check_name("member.replicatefrom", up)?;
            if up == &self.member.name {
                return refuse("member.replicatefrom", "names this member itself");
            }
        }
        check_name("member.region", &self.member.region)?;

        let state_dir = resolve_path(base, self.state_dir);
        let (postgres, pg_client) =
            validate_postgres(base, &state_dir, self.member.kind, self.postgres)?;

        if self.api.listen.port() == 0 {
            return refuse("api.listen", "needs a fixed port");
        }
        if self.api.http_listen.port() == 0 {
            return refuse("api.http_listen", "needs a fixed port");
        }
        if self.api.listen == self.api.http_listen {
            return refuse("api.http_listen", "must differ from api.listen");
        }
        let token = load_secret(
            base,
            "api.token_env",
            self.api.token_env,
            "api.token_file",
            self.api.token_file,
        )?;

        let mut peers = BTreeMap::new();
        for (name, peer) in self.peers {
            check_name(&format!("peers.{name}"), &name)?;
            check_host_port(&format!("peers.{name}.api"), &peer.api)?;
            if let Some(pg) = &peer.postgres {
                check_host_port(&format!("peers.{name}.postgres"), pg)?;
            }
            peers.insert(
                name,
                PeerAddrs {
                    api: peer.api,
                    postgres: peer.postgres,
                },
            );
        }

        let raft = self.raft;
        if raft.bootstrap && !raft.join.is_empty() {
            return refuse(
                "raft.join",
                "a member either bootstraps a new cluster or joins one, not both",
            );
        }
        for (i, name) in raft.join.iter().enumerate() {
            if name == &self.member.name {
                return refuse(&format!("raft.join[{i}]"), "a member cannot join itself");
            }
            if !peers.contains_key(name) {
                return refuse(
                    &format!("raft.join[{i}]"),
                    format!("{name:?} is not in the address book [peers]"),
                );
            }
        }
        if raft.heartbeat.is_zero() {
            return refuse("raft.heartbeat", "must be greater than 0");
        }
        if raft.election_timeout_min < raft.heartbeat * 3 {
            return refuse(
                "raft.election_timeout_min",
                format!(
                    "{} must be at least 3 x raft.heartbeat ({}), or followers call elections between heartbeats",
                    fmt_dur(raft.election_timeout_min),
                    fmt_dur(raft.heartbeat)
                ),
            );
        }
        if raft.election_timeout_max <= raft.election_timeout_min {
            return refuse(
                "raft.election_timeout_max",
                format!(
                    "{} must be greater than raft.election_timeout_min ({})",
                    fmt_dur(raft.election_timeout_max),
                    fmt_dur(raft.election_timeout_min)
                ),
            );
        }

        let t = self.timing;
        for (key, d) in [
            ("timing.observe_interval", t.observe_interval),
            ("timing.lease_ttl", t.lease_ttl),
            ("timing.lease_renew_interval", t.lease_renew_interval),
            ("timing.fence_after", t.fence_after),
            ("timing.pg_probe_timeout", t.pg_probe_timeout),
            ("timing.promote_timeout", t.promote_timeout),
            (
                "shutdown.switchover_timeout",
                self.shutdown.switchover_timeout,
            ),
        ] {
            if d.is_zero() {
                return refuse(key, "must be greater than 0");
            }
        }
        // The old primary must be fenced before the leader may consider its lease
        // expired, with room for clock-rate drift between the two machines.
        if t.fence_after >= t.lease_ttl {
            return refuse(
                "timing.fence_after",
                format!(
                    "{} must be below timing.lease_ttl ({}): an isolated primary has to fence itself before its lease can expire",
                    fmt_dur(t.fence_after),
                    fmt_dur(t.lease_ttl)
                ),
            );
        }
        let drift_margin = t.lease_ttl / 10;
        if t.lease_ttl - t.fence_after < drift_margin {
            return refuse(
                "timing.fence_after",
                format!(
                    "{} leaves less than 10% of timing.lease_ttl ({}) for clock-rate drift and the fence itself",
                    fmt_dur(t.fence_after),
                    fmt_dur(t.lease_ttl)
                ),
            );
        }
        if t.lease_renew_interval * 2 > t.fence_after {
            return refuse(
                "timing.lease_renew_interval",
                format!(
                    "{} must be at most half of timing.fence_after ({}), so one lost renewal does not fence the primary",
                    fmt_dur(t.lease_renew_interval),
                    fmt_dur(t.fence_after)
                ),
            );
        }
        if t.observe_interval >= t.lease_ttl {
            return refuse(
                "timing.observe_interval",
                format!(
                    "{} must be below timing.lease_ttl ({})",
                    fmt_dur(t.observe_interval),
                    fmt_dur(t.lease_ttl)
                ),
            );
        }
        if t.pg_probe_timeout >= t.lease_ttl {
            return refuse(
                "timing.pg_probe_timeout",
                format!(
                    "{} must be below timing.lease_ttl ({})",
                    fmt_dur(t.pg_probe_timeout),
                    fmt_dur(t.lease_ttl)
                ),
            );
        }

        let http_tls = match (self.api.http_tls_cert_file, self.api.http_tls_key_file) {
            (None, None) => None,
            (Some(_), None) => {
                return refuse(
                    "api.http_tls_key_file",
                    "http_tls_cert_file needs a key file too",
                )
            }
            (None, Some(_)) => {
                return refuse(
                    "api.http_tls_cert_file",
                    "http_tls_key_file needs a certificate file too",
                )
            }
            (Some(c), Some(k)) => {
                let t = HttpTlsConfig {
                    cert_file: resolve_path(base, c),
                    key_file: resolve_path(base, k),
                };
                for (key, p) in [
                    ("api.http_tls_cert_file", &t.cert_file),
                    ("api.http_tls_key_file", &t.key_file),
                ] {
                    if !p.is_file() {
                        return refuse(key, format!("{} does not exist", p.display()));
                    }
                }
                Some(t)
            }
        };

        let tls = self.tls.map(|t| TlsConfig {
            ca_file: resolve_path(base, t.ca_file),
            cert_file: resolve_path(base, t.cert_file),
            key_file: resolve_path(base, t.key_file),
        });
        if let Some(tls) = &tls {
            for (key, p) in [
                ("tls.ca_file", &tls.ca_file),
                ("tls.cert_file", &tls.cert_file),
                ("tls.key_file", &tls.key_file),
            ] {
                if !p.is_file() {
                    return refuse(key, format!("{} does not exist", p.display()));
                }
            }
        }

        let callbacks = load_callbacks(base, self.callbacks)?;
        let sec = self.security;
        let cluster_secret = load_secret(
            base,
            "security.cluster_secret_env",
            sec.cluster_secret_env.clone(),
            "security.cluster_secret_file",
            sec.cluster_secret_file.clone(),
        )?;
        let cluster_secret_file = sec.cluster_secret_file.map(|p| resolve_path(base, p));
        if let Some(secret) = &cluster_secret {
            if let Err(reason) = crate::auth::ClusterKey::new(secret.expose().as_bytes()) {
                let key = if sec.cluster_secret_env.is_some() {
                    "security.cluster_secret_env"
                } else {
                    "security.cluster_secret_file"
                };
                return refuse(key, reason);
            }
        }
        if sec.insecure && (cluster_secret.is_some() || tls.is_some()) {
            return refuse(
                "security.insecure",
                "insecure = true is only for a cluster with neither a cluster secret nor [tls]; remove it",
            );
        }
        if !sec.insecure && cluster_secret.is_none() && tls.is_none() {
            return refuse(
                "security",
                "no member authentication is configured: anyone who can reach api.listen could \
                 send Raft, lease and admin RPCs. Set [security] cluster_secret_file (or \
                 cluster_secret_env) to a file holding at least 32 random bytes, or configure \
                 [tls]; for a local demo only, [security] insecure = true",
            );
        }
        let security = SecurityConfig {
            cluster_secret,
            cluster_secret_file: if sec.cluster_secret_env.is_some() {
                None
            } else {
                cluster_secret_file
            },
            insecure: sec.insecure,
        };

        let backup = match self.backup {
            None => None,
            Some(_) if self.member.kind == MemberKind::Witness => {
                return refuse(
                    "backup",
                    "a witness runs no Postgres: it has nothing to archive",
                )
            }
            Some(raw) => Some(
                raw.validate(base, &self.cluster)
                    .map_err(|(key, reason)| Refusal { key, reason })?,
            ),
        };

        Ok(Config {
            source: PathBuf::new(),
            cluster: self.cluster,
            member: MemberConfig {
                name: self.member.name,
                region: self.member.region,
                kind: self.member.kind,
                priority: self.member.priority,
                nofailover: self.member.nofailover,
                noloadbalance: self.member.noloadbalance,
                nosync: self.member.nosync,
                clonefrom: self.member.clonefrom,
                replicatefrom: self.member.replicatefrom,
            },
            state_dir,
            postgres,
            api: ApiConfig {
                listen: self.api.listen,
                http_listen: self.api.http_listen,
                token,
                http_tls,
            },
            raft: RaftConfig {
                bootstrap: raft.bootstrap,
                join: raft.join,
                heartbeat: raft.heartbeat,
                election_timeout_min: raft.election_timeout_min,
                election_timeout_max: raft.election_timeout_max,
            },
            peers,
            timing: TimingConfig {
                observe_interval: t.observe_interval,
                lease_ttl: t.lease_ttl,
                lease_renew_interval: t.lease_renew_interval,
                fence_after: t.fence_after,
                pg_probe_timeout: t.pg_probe_timeout,
                promote_timeout: t.promote_timeout,
            },
            tls,
            shutdown: ShutdownConfig {
                on_primary_stop: self.shutdown.on_primary_stop,
                switchover_timeout: self.shutdown.switchover_timeout,
            },
            pg_client,
            security,
            backup,
            callbacks,
        })
    }
}

/// Default bound on one callback run.
pub const DEFAULT_CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest bound a callback may be given (a callback must never hold the queue for long).
pub const MAX_CALLBACK_TIMEOUT: Duration = Duration::from_secs(300);

fn load_callbacks(base: &Path, raw: RawCallbacks) -> Result<CallbacksConfig, Refusal> {
    let one = |key: &str, v: Option<Vec<String>>| -> Result<Option<Vec<String>>, Refusal> {
        let Some(mut argv) = v else { return Ok(None) };
        let Some(first) = argv.first_mut() else {
            return refuse(
                key,
                "needs at least the executable, e.g. [\"/usr/local/bin/vip\"]",
            );
        };
        let exe = resolve_path(base, PathBuf::from(first.as_str()));
        if !exe.is_file() {
            return refuse(key, format!("{} does not exist", exe.display()));
        }
        *first = exe.display().to_string();
        Ok(Some(argv))
    };
    let on_start = one("callbacks.on_start", raw.on_start)?;
    let on_stop = one("callbacks.on_stop", raw.on_stop)?;
    let on_role_change = one("callbacks.on_role_change", raw.on_role_change)?;
    let timeout = raw.timeout.unwrap_or(DEFAULT_CALLBACK_TIMEOUT);
    if timeout.is_zero() || timeout > MAX_CALLBACK_TIMEOUT {
        return refuse(
            "callbacks.timeout",
            format!(
                "must be between 1 ms and {} s",
                MAX_CALLBACK_TIMEOUT.as_secs()
            ),
        );
    }
    Ok(CallbacksConfig {
        on_start,
        on_stop,
        on_role_change,
        timeout,
    })
}

/// `[postgres.parameters]`: names checked like the cluster's (Meridian's own refused),
/// values TOML strings, integers, floats or booleans, kept as Postgres reads them.
fn load_parameters(
    raw: Option<BTreeMap<String, toml::Value>>,
) -> Result<BTreeMap<String, String>, Refusal> {
    let mut out = BTreeMap::new();
    for (name, v) in raw.unwrap_or_default() {
        let key = format!("postgres.parameters.{name}");
        let value = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => if b { "on" } else { "off" }.to_string(),
            _ => return refuse(&key, "expected a string, a number or a boolean"),
        };
        if let Err(e) = crate::pgparams::check_offline(&name, &value) {
            return refuse(&key, e.to_string());
        }
        out.insert(name.to_ascii_lowercase(), value);
    }
    Ok(out)
}

fn load_role(
    base: &Path,
    key: &str,
    raw: Option<RawRole>,
    default_user: &str,
) -> Result<RoleConfig, Refusal> {
    let raw = raw.unwrap_or_default();
    let user = raw.user.unwrap_or_else(|| default_user.to_string());
    check_role_name(&format!("{key}.user"), &user)?;
    let password = load_secret(
        base,
        &format!("{key}.password_env"),
        raw.password_env,
        &format!("{key}.password_file"),
        raw.password_file,
    )?;
    Ok(RoleConfig { user, password })
}

/// A Postgres role name Meridian may create and quote everywhere without surprises.
fn check_role_name(key: &str, value: &str) -> Result<(), Refusal> {
    if value.is_empty() || value.len() > 63 {
        return refuse(key, format!("{value:?} must be 1-63 characters"));
    }
    let first_ok = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if !first_ok
        || !value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return refuse(
            key,
            format!("{value:?} may only hold lowercase letters, digits and '_', not starting with a digit"),
        );
    }
    Ok(())
}

/// Postgres' size syntax for `max_slot_wal_keep_size`: `-1` or a number with kB, MB, GB
/// or TB.
fn check_size(key: &str, value: &str) -> Result<(), Refusal> {
    if value == "-1" {
        return Ok(());
    }
    let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &value[digits.len()..];
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return refuse(key, format!("{value:?} is not a size like \"4GB\" or -1"));
    }
    if !matches!(unit, "kB" | "MB" | "GB" | "TB") {
        return refuse(
            key,
            format!("{value:?}: the unit must be kB, MB, GB or TB (or -1 for unbounded)"),
        );
    }
    Ok(())
}

const AUTH_METHODS: &[&str] = &["scram-sha-256", "md5", "trust", "cert"];
const LOCAL_AUTH_METHODS: &[&str] = &["peer", "scram-sha-256", "md5", "trust"];

/// The `[postgres]` section: its full form on a data member, only `monitor` and `ssl`'s
/// client keys on a witness.
fn validate_postgres(
    base: &Path,
    state_dir: &Path,
    kind: MemberKind,
    raw: Option<RawPostgres>,
) -> Result<(Option<PostgresConfig>, PgClientConfig), Refusal> {
    use crate::pg::SslMode;
    let pg = match (kind, raw) {
        (MemberKind::Data, None) => {
            return refuse("postgres", "a data member needs a [postgres] section")
        }
        (MemberKind::Witness, None) => {
            return Ok((
                None,
                PgClientConfig {
                    monitor: RoleConfig {
                        user: DEFAULT_MONITOR_USER.into(),
                        password: None,
                    },
                    sslmode: SslMode::Prefer,
                    sslrootcert: None,
                },
            ))
        }
        (_, Some(pg)) => pg,
    };
    let ssl = pg.ssl.unwrap_or_default();
    let has_ssl_section = ssl.cert_file.is_some()
        || ssl.key_file.is_some()
        || ssl.ca_file.is_some()
        || ssl.sslmode.is_some()
        || ssl.sslrootcert.is_some();
    let ca_file = ssl.ca_file.map(|p| resolve_path(base, p));
    let sslrootcert = ssl
        .sslrootcert
        .map(|p| resolve_path(base, p))
        .or_else(|| ca_file.clone());
    let sslmode = match ssl.sslmode.as_deref() {
        Some(m) => SslMode::parse(m).ok_or_else(|| Refusal {
            key: "postgres.ssl.sslmode".into(),
            reason: format!("{m:?} is not one of disable, prefer, require, verify-ca, verify-full"),
        })?,
        None if !has_ssl_section => SslMode::Prefer,
        None if sslrootcert.is_some() => SslMode::VerifyFull,
        None => SslMode::Require,
    };
    if matches!(sslmode, SslMode::VerifyCa | SslMode::VerifyFull) && sslrootcert.is_none() {
        return refuse(
            "postgres.ssl.sslrootcert",
            format!(
                "sslmode {} needs the CA that signed the servers' certificates (sslrootcert or ca_file)",
                sslmode.as_str()
            ),
        );
    }
    for (key, p) in [
        ("postgres.ssl.sslrootcert", &sslrootcert),
        ("postgres.ssl.ca_file", &ca_file),
    ] {
        if let Some(p) = p {
            if !p.is_file() {
                return refuse(key, format!("{} does not exist", p.display()));
            }
        }
    }
    let monitor = load_role(base, "postgres.monitor", pg.monitor, DEFAULT_MONITOR_USER)?;
    let client = PgClientConfig {
        monitor,
        sslmode,
        sslrootcert,
    };
    if kind == MemberKind::Witness {
        let data_keys = pg.bin_dir.is_some()
            || pg.data_dir.is_some()
            || pg.listen_addr.is_some()
            || pg.port.is_some()
            || pg.socket_dir.is_some()
            || pg.os_user.is_some()
            || pg.superuser.is_some()
            || pg.password_env.is_some()
            || pg.password_file.is_some()
            || pg.local_auth_method.is_some()
            || pg.auth_method.is_some()
            || pg.replication_cidrs.is_some()
            || pg.hba.is_some()
            || pg.max_slot_wal_keep_size.is_some()
            || pg.replication.is_some()
            || pg.rewind.is_some()
            || pg.parameters.is_some()
            || pg.lease_gate.is_some()
            || ssl.cert_file.is_some()
            || ssl.key_file.is_some();
        if data_keys {
            return refuse(
                "postgres",
                "a witness member manages no Postgres: only [postgres.monitor] and the client keys of [postgres.ssl] (sslmode, sslrootcert, ca_file) may be set",
            );
        }
        return Ok((None, client));
    }

    let Some(data_dir) = pg.data_dir else {
        return refuse("postgres", "missing field `data_dir`");
    };
    let Some(port) = pg.port else {
        return refuse("postgres", "missing field `port`");
    };
    if port == 0 {
        return refuse("postgres.port", "must be 1-65535");
    }
    let os_user = pg.os_user.unwrap_or_else(default_os_user);
    if os_user.is_empty() {
        return refuse("postgres.os_user", "must not be empty");
    }
    let superuser = pg.superuser.unwrap_or_else(default_superuser);
    if superuser.is_empty() {
        return refuse("postgres.superuser", "must not be empty");
    }
    let password = load_secret(
        base,
        "postgres.password_env",
        pg.password_env,
        "postgres.password_file",
        pg.password_file,
    )?;
    let listen_strings = match pg.listen_addr {
        None => vec![default_listen_addr().to_string()],
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if listen_strings.is_empty() {
        return refuse("postgres.listen_addr", "lists no address");
    }
    let mut listen_addr = Vec::new();
    for (i, a) in listen_strings.iter().enumerate() {
        let key = if listen_strings.len() == 1 {
            "postgres.listen_addr".to_string()
        } else {
            format!("postgres.listen_addr[{i}]")
        };
        let parsed = if a == "*" {
            ListenAddr::Any
        } else {
            match a.parse::<IpAddr>() {
                Ok(ip) => ListenAddr::Ip(ip),
                Err(_) => {
                    return refuse(&key, format!("{a:?} is not an IP address or \"*\""));
                }
            }
        };
        if listen_addr.contains(&parsed) {
            return refuse(&key, format!("{a:?} is listed twice"));
        }
        listen_addr.push(parsed);
    }
    if listen_addr.len() > 1 && listen_addr.contains(&ListenAddr::Any) {
        return refuse(
            "postgres.listen_addr",
            "\"*\" already means every address: list it alone",
        );
    }
    let socket_dir = match pg.socket_dir {
        Some(p) => resolve_path(base, p),
        None => state_dir.join(DEFAULT_SOCKET_SUBDIR),
    };
    if socket_dir.as_os_str().len() > MAX_SOCKET_DIR_LEN {
        return refuse(
            "postgres.socket_dir",
            format!(
                "{} is longer than {MAX_SOCKET_DIR_LEN} bytes: the socket path would not fit a unix socket address; set a shorter postgres.socket_dir",
                socket_dir.display()
            ),
        );
    }
    let local_auth_method = pg.local_auth_method.unwrap_or_else(|| "peer".into());
    if !LOCAL_AUTH_METHODS.contains(&local_auth_method.as_str()) {
        return refuse(
            "postgres.local_auth_method",
            format!(
                "{local_auth_method:?} is not one of {}",
                LOCAL_AUTH_METHODS.join(", ")
            ),
        );
    }
    let auth_method = pg.auth_method.unwrap_or_else(|| "scram-sha-256".into());
    if !AUTH_METHODS.contains(&auth_method.as_str()) {
        return refuse(
            "postgres.auth_method",
            format!("{auth_method:?} is not one of {}", AUTH_METHODS.join(", ")),
        );
    }
    let mut replication_cidrs = Vec::new();
    for (i, c) in pg
        .replication_cidrs
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        if crate::pg::parse_cidr(&c).is_none() {
            return refuse(
                &format!("postgres.replication_cidrs[{i}]"),
                format!("{c:?} is not a CIDR like \"10.0.0.0/24\""),
            );
        }
        replication_cidrs.push(c);
    }
    let hba = pg.hba.unwrap_or_default();
    for (i, line) in hba.iter().enumerate() {
        if let Err(why) = crate::pg::validate_hba_line(line) {
            return refuse(&format!("postgres.hba[{i}]"), format!("{line:?} {why}"));
        }
    }
    let parameters = load_parameters(pg.parameters)?;
    let max_slot_wal_keep_size = pg
        .max_slot_wal_keep_size
        .unwrap_or_else(|| DEFAULT_MAX_SLOT_WAL_KEEP_SIZE.into());
    check_size("postgres.max_slot_wal_keep_size", &max_slot_wal_keep_size)?;
    let replication = load_role(
        base,
        "postgres.replication",
        pg.replication,
        DEFAULT_REPLICATION_USER,
    )?;
    let rewind = load_role(base, "postgres.rewind", pg.rewind, DEFAULT_REWIND_USER)?;
    let names = [
        ("postgres.replication.user", &replication.user),
        ("postgres.rewind.user", &rewind.user),
        ("postgres.monitor.user", &client.monitor.user),
    ];
    for (key, name) in names {
        if **name == superuser {
            return refuse(
                key,
                format!("{name:?} is the superuser: Meridian's roles must each be less than that"),
            );
        }
    }
    if replication.user == rewind.user || replication.user == client.monitor.user {
        return refuse(
            "postgres.replication.user",
            "must differ from the rewind and monitor roles",
        );
    }
    if rewind.user == client.monitor.user {
        return refuse("postgres.rewind.user", "must differ from the monitor role");
    }
    if auth_method != "trust" && auth_method != "cert" {
        for (key, role) in [
            ("postgres.replication", &replication),
            ("postgres.rewind", &rewind),
            ("postgres.monitor", &client.monitor),
        ] {
            if role.password.is_none() {
                return refuse(
                    key,
                    format!(
                        "needs password_file or password_env: the other members log in as {} with {auth_method}",
                        role.user
                    ),
                );
            }
        }
    }
    if local_auth_method != "peer" && local_auth_method != "trust" && password.is_none() {
        return refuse(
            "postgres.local_auth_method",
            format!("{local_auth_method} over the unix socket needs the superuser's password (postgres.password_file or password_env)"),
        );
    }
    let server_ssl = match (ssl.cert_file, ssl.key_file) {
        (Some(c), Some(k)) => {
            let cert_file = resolve_path(base, c);
            let key_file = resolve_path(base, k);
            for (key, p) in [
                ("postgres.ssl.cert_file", &cert_file),
                ("postgres.ssl.key_file", &key_file),
            ] {
                if !p.is_file() {
                    return refuse(key, format!("{} does not exist", p.display()));
                }
            }
            Some(ServerSslConfig {
                cert_file,
                key_file,
                ca_file: ca_file.clone(),
            })
        }
        (None, None) if has_ssl_section => {
            return refuse(
                "postgres.ssl.cert_file",
                "a data member's [postgres.ssl] needs cert_file and key_file: its Postgres serves TLS to the other members",
            )
        }
        (None, None) => None,
        (Some(_), None) => return refuse("postgres.ssl.key_file", "cert_file needs key_file"),
        (None, Some(_)) => return refuse("postgres.ssl.cert_file", "key_file needs cert_file"),
    };
    Ok((
        Some(PostgresConfig {
            bin_dir: pg.bin_dir.map(|p| resolve_path(base, p)),
            data_dir: resolve_path(base, data_dir),
            listen_addr,
            port,
            socket_dir,
            os_user,
            superuser,
            password,
            local_auth_method,
            auth_method,
            replication_cidrs,
            hba,
            max_slot_wal_keep_size,
            replication,
            rewind,
            server_ssl,
            parameters,
            lease_gate: pg.lease_gate.unwrap_or(true),
        }),
        client,
    ))
}

/// Fails unless every address this member listens on belongs to this host: each one is
/// bound once with port 0 and released. `"*"` and the unspecified addresses always pass.
pub fn check_local_addresses(config: &Config) -> Result<(), ConfigError> {
    let mut checks: Vec<(String, IpAddr)> = vec![
        ("api.listen".into(), config.api.listen.ip()),
        ("api.http_listen".into(), config.api.http_listen.ip()),
    ];
    if let Some(pg) = &config.postgres {
        for (i, a) in pg.listen_addr.iter().enumerate() {
            if let ListenAddr::Ip(ip) = a {
                let key = if pg.listen_addr.len() == 1 {
                    "postgres.listen_addr".to_string()
                } else {
                    format!("postgres.listen_addr[{i}]")
                };
                checks.push((key, *ip));
            }
        }
    }
    for (key, ip) in checks {
        if ip.is_unspecified() {
            continue;
        }
        if let Err(e) = std::net::TcpListener::bind(SocketAddr::new(ip, 0)) {
            let why = if e.kind() == std::io::ErrorKind::AddrNotAvailable {
                "is not an address of this host".to_string()
            } else {
                format!("cannot be bound on this host: {e}")
            };
            return Err(ConfigError::Invalid {
                path: config.source.clone(),
                key,
                reason: format!("{ip} {why}"),
            });
        }
    }
    Ok(())
}

fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cluster = "prod"
state_dir = "/var/lib/meridian/east-1"

[member]
name = "east-1"
region = "us-east"
kind = "data"
priority = 10

[postgres]
data_dir = "/var/lib/meridian/east-1/pgdata"
port = 5432

# Any set, non-empty variable stands in for a secret here.
[postgres.replication]
password_env = "PATH"
[postgres.rewind]
password_env = "PATH"
[postgres.monitor]
password_env = "PATH"

[api]
listen = "127.0.0.1:7001"
http_listen = "127.0.0.1:8008"

[raft]
bootstrap = true

[security]
insecure = true

[peers.east-1]
api = "127.0.0.1:7001"
postgres = "127.0.0.1:5432"

[peers.west-1]
api = "127.0.0.1:7003"
postgres = "127.0.0.1:5434"
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("/etc/meridian/test.toml"), text)
    }

    fn expect_invalid(text: &str, want_key: &str, want_reason_part: &str) {
        match load(text) {
            Err(ConfigError::Invalid { path, key, reason }) => {
                assert_eq!(path, Path::new("/etc/meridian/test.toml"));
                assert_eq!(key, want_key, "reason was: {reason}");
                assert!(
                    reason.contains(want_reason_part),
                    "reason {reason:?} lacks {want_reason_part:?}"
                );
            }
            Err(e) => panic!("unexpected error kind: {e}"),
            Ok(_) => panic!("config was accepted"),
        }
    }

    #[test]
    fn good_config_loads_with_defaults() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.member.name, "east-1");
        assert_eq!(c.member.kind, MemberKind::Data);
        assert_eq!(c.member.priority, 10);
        assert_eq!(c.raft.heartbeat, Duration::from_millis(250));
        assert_eq!(c.timing.lease_ttl, Duration::from_secs(2));
        let pg = c.postgres.unwrap();
        assert_eq!(pg.os_user, "postgres");
        assert_eq!(
            pg.listen_addr,
            vec![ListenAddr::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST))]
        );
        assert_eq!(
            pg.socket_dir,
            Path::new("/var/lib/meridian/east-1/pg-socket")
        );
        assert_eq!(pg.local_auth_method, "peer");
        assert_eq!(pg.auth_method, "scram-sha-256");
        assert_eq!(pg.max_slot_wal_keep_size, "4GB");
        assert_eq!(pg.replication.user, "replicator");
        assert_eq!(pg.rewind.user, "rewinder");
        assert_eq!(c.pg_client.monitor.user, "meridian_monitor");
        assert_eq!(c.pg_client.sslmode, crate::pg::SslMode::Prefer);
        assert!(pg.server_ssl.is_none());
        assert_eq!(c.peers.len(), 2);
    }

    fn with_pg(extra: &str) -> String {
        GOOD.replace("port = 5432\n", &format!("port = 5432\n{extra}\n"))
    }

    #[test]
    fn replicatefrom_names_another_member() {
        let tagged = |v: &str| {
            GOOD.replace(
                "priority = 10\n",
                &format!("priority = 10\nreplicatefrom = \"{v}\"\n"),
            )
        };
        let c = load(&tagged("west-1")).unwrap();
        assert_eq!(c.member.replicatefrom.as_deref(), Some("west-1"));
        assert_eq!(load(GOOD).unwrap().member.replicatefrom, None);
        expect_invalid(&tagged("east-1"), "member.replicatefrom", "itself");
        expect_invalid(&tagged(""), "member.replicatefrom", "must not be empty");
    }

    #[test]
    fn listen_addr_takes_one_many_or_any() {
        let c = load(&with_pg("listen_addr = [\"10.0.0.1\", \"::1\"]")).unwrap();
        let pg = c.postgres.unwrap();
        assert_eq!(
            pg.listen_addr,
            vec![
                ListenAddr::Ip("10.0.0.1".parse().unwrap()),
                ListenAddr::Ip("::1".parse().unwrap())
            ]
        );
        let c = load(&with_pg("listen_addr = \"*\"")).unwrap();
        assert_eq!(c.postgres.unwrap().listen_addr, vec![ListenAddr::Any]);
        expect_invalid(
            &with_pg("listen_addr = [\"10.0.0.1\", \"db-host\"]"),
            "postgres.listen_addr[1]",
            "\"db-host\" is not an IP address",
        );
        expect_invalid(
            &with_pg("listen_addr = [\"*\", \"10.0.0.1\"]"),
            "postgres.listen_addr",
            "list it alone",
        );
    }

    #[test]
    fn addresses_not_on_this_host_are_named() {
        // 192.0.2.0/24 is TEST-NET-1: never an address of this machine.
        let c = load(&with_pg("listen_addr = [\"127.0.0.1\", \"192.0.2.1\"]")).unwrap();
        match check_local_addresses(&c) {
            Err(ConfigError::Invalid { key, reason, .. }) => {
                assert_eq!(key, "postgres.listen_addr[1]");
                assert!(
                    reason.contains("192.0.2.1 is not an address of this host"),
                    "{reason}"
                );
            }
            other => panic!("unexpected: {other:?}"),
        }
        let c = load(&GOOD.replace("listen = \"127.0.0.1:7001\"", "listen = \"192.0.2.1:7001\""))
            .unwrap();
        match check_local_addresses(&c) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "api.listen"),
            other => panic!("unexpected: {other:?}"),
        }
        check_local_addresses(&load(GOOD).unwrap()).unwrap();
        check_local_addresses(&load(&with_pg("listen_addr = \"*\"")).unwrap()).unwrap();
    }

    #[test]
    fn hba_lines_and_cidrs_are_validated() {
        let c = load(&with_pg(
            "hba = [\"host all app 10.0.0.0/8 scram-sha-256\"]\nreplication_cidrs = [\"10.1.0.0/16\"]",
        ))
        .unwrap();
        let pg = c.postgres.unwrap();
        assert_eq!(pg.hba, vec!["host all app 10.0.0.0/8 scram-sha-256"]);
        assert_eq!(pg.replication_cidrs, vec!["10.1.0.0/16"]);
        expect_invalid(
            &with_pg("hba = [\"host all app 10.0.0.0/8 scram-sha-256\", \"host all app 10.0.0.0/8 sram\"]"),
            "postgres.hba[1]",
            "method \"sram\"",
        );
        expect_invalid(
            &with_pg("replication_cidrs = [\"10.1.0.0\"]"),
            "postgres.replication_cidrs[0]",
            "not a CIDR",
        );
    }

    #[test]
    fn wal_keep_size_is_a_postgres_size() {
        let c = load(&with_pg("max_slot_wal_keep_size = \"512MB\"")).unwrap();
        assert_eq!(c.postgres.unwrap().max_slot_wal_keep_size, "512MB");
        load(&with_pg("max_slot_wal_keep_size = \"-1\"")).unwrap();
        expect_invalid(
            &with_pg("max_slot_wal_keep_size = \"4 GB\""),
            "postgres.max_slot_wal_keep_size",
            "not a size",
        );
        expect_invalid(
            &with_pg("max_slot_wal_keep_size = \"4gb\""),
            "postgres.max_slot_wal_keep_size",
            "unit must be",
        );
    }

    #[test]
    fn roles_need_passwords_unless_trust_is_asked_for() {
        let text = GOOD.replace(
            "[postgres.rewind]\npassword_env = \"PATH\"\n",
            "[postgres.rewind]\nuser = \"pg_rewinder\"\n",
        );
        expect_invalid(
            &text,
            "postgres.rewind",
            "needs password_file or password_env",
        );
        let c =
            load(&text.replace("port = 5432\n", "port = 5432\nauth_method = \"trust\"\n")).unwrap();
        assert_eq!(c.postgres.unwrap().rewind.user, "pg_rewinder");
        expect_invalid(
            &GOOD.replace(
                "[postgres.monitor]\n",
                "[postgres.monitor]\nuser = \"postgres\"\n",
            ),
            "postgres.monitor.user",
            "is the superuser",
        );
        expect_invalid(
            &GOOD.replace(
                "[postgres.monitor]\n",
                "[postgres.monitor]\nuser = \"Bad-Name\"\n",
            ),
            "postgres.monitor.user",
            "lowercase",
        );
    }

    #[test]
    fn ssl_settings() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "server.pem", "server.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let text = format!(
            "{GOOD}\n[postgres.ssl]\ncert_file = \"server.pem\"\nkey_file = \"server.key\"\nca_file = \"ca.pem\"\n"
        )
        .replace("[api]", "[api]");
        // [postgres.ssl] after [peers] is still the postgres table in TOML.
        let c = Config::from_toml(&dir.path().join("m.toml"), &text).unwrap();
        assert_eq!(c.pg_client.sslmode, crate::pg::SslMode::VerifyFull);
        assert_eq!(c.pg_client.sslrootcert, Some(dir.path().join("ca.pem")));
        let ssl = c.postgres.unwrap().server_ssl.unwrap();
        assert_eq!(ssl.key_file, dir.path().join("server.key"));
        let no_key = text.replace("key_file = \"server.key\"\n", "");
        match Config::from_toml(&dir.path().join("m.toml"), &no_key) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "postgres.ssl.key_file"),
            other => panic!("unexpected: {other:?}"),
        }
        let bad_mode = format!("{GOOD}\n[postgres.ssl]\nsslmode = \"verify-full\"\n");
        expect_invalid(&bad_mode, "postgres.ssl.sslrootcert", "needs the CA");
    }

    #[test]
    fn witness_may_carry_monitor_credentials() {
        let start = GOOD.find("[postgres]").unwrap();
        let end = GOOD.find("[api]").unwrap();
        let witness = format!(
            "{}[postgres.monitor]\nuser = \"probe\"\npassword_env = \"PATH\"\n\n{}",
            &GOOD[..start],
            &GOOD[end..]
        )
        .replace("kind = \"data\"", "kind = \"witness\"");
        let c = load(&witness).unwrap();
        assert!(c.postgres.is_none());
        assert_eq!(c.pg_client.monitor.user, "probe");
        assert!(c.pg_client.monitor.password.is_some());
    }

    #[test]
    fn unknown_key_is_named() {
        let text = GOOD.replace("[raft]\n", "[raft]\nheartbeet = \"1s\"\n");
        expect_invalid(&text, "raft.heartbeet", "unknown field");
    }

    #[test]
    fn missing_key_is_named() {
        let text = GOOD.replace("port = 5432\n", "");
        expect_invalid(&text, "postgres", "missing field `port`");
    }

    #[test]
    fn bad_duration_is_named() {
        let text = GOOD.replace("[raft]\n", "[raft]\nheartbeat = \"fast\"\n");
        expect_invalid(&text, "raft.heartbeat", "invalid duration \"fast\"");
    }

    #[test]
    fn fence_must_be_below_lease() {
        let text = format!("{GOOD}\n[timing]\nlease_ttl = \"2s\"\nfence_after = \"2s\"\n");
        expect_invalid(&text, "timing.fence_after", "below timing.lease_ttl");
    }

    #[test]
    fn fence_needs_drift_margin() {
        let text = format!("{GOOD}\n[timing]\nlease_ttl = \"2s\"\nfence_after = \"1950ms\"\n");
        expect_invalid(&text, "timing.fence_after", "clock-rate drift");
    }

    #[test]
    fn renewal_must_fit_twice_in_fence_window() {
        let text = format!("{GOOD}\n[timing]\nlease_renew_interval = \"1s\"\n");
        expect_invalid(
            &text,
            "timing.lease_renew_interval",
            "half of timing.fence_after",
        );
    }

    #[test]
    fn election_timeout_must_exceed_heartbeats() {
        let text = GOOD.replace(
            "[raft]\n",
            "[raft]\nheartbeat = \"500ms\"\nelection_timeout_min = \"1s\"\n",
        );
        expect_invalid(&text, "raft.election_timeout_min", "3 x raft.heartbeat");
    }

    #[test]
    fn witness_with_postgres_is_refused() {
        let text = GOOD.replace("kind = \"data\"", "kind = \"witness\"");
        expect_invalid(&text, "postgres", "witness");
    }

    #[test]
    fn backup_section_is_validated_and_named_after_the_cluster() {
        let text = format!("{GOOD}\n[backup]\nrepo_path = \"/var/lib/pgbackrest\"\n");
        let c = load(&text).unwrap();
        let b = c.backup.expect("[backup] loaded");
        assert_eq!(b.stanza, c.cluster);
        expect_invalid(
            &format!("{GOOD}\n[backup]\nrepo_path = \"relative\"\n"),
            "backup.repo_path",
            "absolute",
        );
    }

    #[test]
    fn data_member_needs_postgres() {
        let start = GOOD.find("[postgres]").unwrap();
        let end = GOOD.find("[api]").unwrap();
        let text = format!("{}{}", &GOOD[..start], &GOOD[end..]);
        expect_invalid(&text, "postgres", "needs a [postgres] section");
    }

    #[test]
    fn bad_kind_is_named() {
        let text = GOOD.replace("kind = \"data\"", "kind = \"arbiter\"");
        expect_invalid(&text, "member.kind", "unknown variant");
    }

    #[test]
    fn join_must_name_a_peer() {
        let text = GOOD.replace("bootstrap = true", "join = [\"nowhere\"]");
        expect_invalid(&text, "raft.join[0]", "not in the address book");
    }

    #[test]
    fn bootstrap_and_join_conflict() {
        let text = GOOD.replace("bootstrap = true", "bootstrap = true\njoin = [\"west-1\"]");
        expect_invalid(&text, "raft.join", "not both");
    }

    #[test]
    fn bad_peer_address_is_named() {
        let text = GOOD.replace("api = \"127.0.0.1:7003\"", "api = \"127.0.0.1\"");
        expect_invalid(&text, "peers.west-1.api", "not host:port");
    }

    #[test]
    fn missing_secret_env_is_named_not_printed() {
        let text = GOOD.replace(
            "port = 5432\n",
            "port = 5432\npassword_env = \"MERIDIAN_TEST_SURELY_UNSET_VAR\"\n",
        );
        expect_invalid(
            &text,
            "postgres.password_env",
            "MERIDIAN_TEST_SURELY_UNSET_VAR is not set",
        );
    }

    #[test]
    fn secret_from_file_is_redacted_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "hunter2\n").unwrap();
        let text = GOOD.replace("port = 5432\n", "port = 5432\npassword_file = \"pw\"\n");
        let c = Config::from_toml(&dir.path().join("m.toml"), &text).unwrap();
        let pw = c.postgres.as_ref().unwrap().password.as_ref().unwrap();
        assert_eq!(pw.expose(), "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn syntax_error_is_reported_on_one_line() {
        match load("cluster = \n") {
            Err(ConfigError::Invalid { key, reason, .. }) => {
                assert_eq!(key, "(syntax)");
                assert!(!reason.contains('\n'), "{reason}");
            }
            other => panic!("unexpected: {other:?}"),
        }
    }

    /// GOOD with its `[security]` table replaced by `security` (TOML lines).
    fn with_security(security: &str) -> String {
        GOOD.replace("[security]\ninsecure = true\n", security)
    }

    #[test]
    fn member_authentication_is_required() {
        expect_invalid(
            &with_security(""),
            "security",
            "[security] cluster_secret_file",
        );
        expect_invalid(
            &with_security("[security]\ninsecure = false\n"),
            "security",
            "insecure = true",
        );
    }

    #[test]
    fn cluster_secret_is_loaded_checked_and_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let good = "0123456789abcdef0123456789abcdef\n";
        std::fs::write(dir.path().join("secret"), good).unwrap();
        std::fs::write(dir.path().join("short"), "0123456789\n").unwrap();
        let path = dir.path().join("m.toml");
        let text = with_security("[security]\ncluster_secret_file = \"secret\"\n");
        let c = Config::from_toml(&path, &text).unwrap();
        let s = c.security.cluster_secret.as_ref().unwrap();
        assert_eq!(s.expose(), good.trim_end());
        assert_eq!(
            c.security.cluster_secret_file,
            Some(dir.path().join("secret"))
        );
        assert!(!c.security.insecure);
        assert!(!format!("{c:?}").contains("0123456789abcdef"));

        let text = with_security("[security]\ncluster_secret_file = \"short\"\n");
        match Config::from_toml(&path, &text) {
            Err(ConfigError::Invalid { key, reason, .. }) => {
                assert_eq!(key, "security.cluster_secret_file");
                assert!(reason.contains("at least 32"), "{reason}");
            }
            other => panic!("a short secret was accepted: {other:?}"),
        }
        let text = with_security("[security]\ncluster_secret_file = \"secret\"\ninsecure = true\n");
        match Config::from_toml(&path, &text) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "security.insecure"),
            other => panic!("insecure with a secret was accepted: {other:?}"),
        }
        expect_invalid(
            &with_security("[security]\ncluster_secret_env = \"MERIDIAN_TEST_SURELY_UNSET_VAR\"\n"),
            "security.cluster_secret_env",
            "is not set",
        );
    }

    #[test]
    fn http_tls_needs_both_files() {
        let text = GOOD.replace(
            "http_listen = \"127.0.0.1:8008\"\n",
            "http_listen = \"127.0.0.1:8008\"\nhttp_tls_cert_file = \"/nonexistent/c.pem\"\n",
        );
        expect_invalid(&text, "api.http_tls_key_file", "needs a key file");
        let text = GOOD.replace(
            "http_listen = \"127.0.0.1:8008\"\n",
            "http_listen = \"127.0.0.1:8008\"\nhttp_tls_cert_file = \"/nonexistent/c.pem\"\nhttp_tls_key_file = \"/nonexistent/k.pem\"\n",
        );
        expect_invalid(&text, "api.http_tls_cert_file", "does not exist");
    }

    #[test]
    fn example_configs_are_valid() {
        // The examples read the cluster secret and the admin token from the environment.
        std::env::set_var(
            "MERIDIAN_CLUSTER_SECRET",
            "an-example-secret-of-at-least-32-bytes!",
        );
        std::env::set_var("MERIDIAN_TOKEN", "an-example-token");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 5, "expected an example per member, found {n}");
    }
}
