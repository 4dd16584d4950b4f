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

/// Whether a member runs a Postgres (`data`) or only votes (`witness`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberKind {
    Data,
    Witness,
}

impl fmt::Display for MemberKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemberKind::Data => "data",
            MemberKind::Witness => "witness",
        })
    }
}

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
}

#[derive(Clone, Debug)]
pub struct PostgresConfig {
    /// Directory holding `initdb`, `pg_ctl`, `postgres`, ...; `None` = auto-detect.
    pub bin_dir: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub listen_addr: IpAddr,
    pub port: u16,
    /// OS user Postgres runs as when the agent runs as root.
    pub os_user: String,
    pub superuser: String,
    pub password: Option<Secret>,
}

#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// gRPC: Raft transport, observations, admin API.
    pub listen: SocketAddr,
    /// HTTP: Patroni-compatible health endpoints and `/metrics`.
    pub http_listen: SocketAddr,
    /// Required by write endpoints and admin commands that change the cluster.
    pub token: Option<Secret>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    bin_dir: Option<PathBuf>,
    data_dir: PathBuf,
    #[serde(default = "default_listen_addr")]
    listen_addr: IpAddr,
    port: u16,
    #[serde(default = "default_os_user")]
    os_user: String,
    #[serde(default = "default_superuser")]
    superuser: String,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
}

fn default_listen_addr() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}
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
        check_name("member.region", &self.member.region)?;

        let postgres = match (self.member.kind, self.postgres) {
            (MemberKind::Data, None) => {
                return refuse("postgres", "a data member needs a [postgres] section")
            }
            (MemberKind::Witness, Some(_)) => {
                return refuse(
                    "postgres",
                    "a witness member manages no Postgres: remove the [postgres] section",
                )
            }
            (MemberKind::Witness, None) => None,
            (MemberKind::Data, Some(pg)) => {
                if pg.port == 0 {
                    return refuse("postgres.port", "must be 1-65535");
                }
                if pg.os_user.is_empty() {
                    return refuse("postgres.os_user", "must not be empty");
                }
                if pg.superuser.is_empty() {
                    return refuse("postgres.superuser", "must not be empty");
                }
                let password = load_secret(
                    base,
                    "postgres.password_env",
                    pg.password_env,
                    "postgres.password_file",
                    pg.password_file,
                )?;
                Some(PostgresConfig {
                    bin_dir: pg.bin_dir.map(|p| resolve_path(base, p)),
                    data_dir: resolve_path(base, pg.data_dir),
                    listen_addr: pg.listen_addr,
                    port: pg.port,
                    os_user: pg.os_user,
                    superuser: pg.superuser,
                    password,
                })
            }
        };

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
            },
            state_dir: resolve_path(base, self.state_dir),
            postgres,
            api: ApiConfig {
                listen: self.api.listen,
                http_listen: self.api.http_listen,
                token,
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
        })
    }
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

[api]
listen = "127.0.0.1:7001"
http_listen = "127.0.0.1:8008"

[raft]
bootstrap = true

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
        assert_eq!(pg.listen_addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(c.peers.len(), 2);
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

    #[test]
    fn example_configs_are_valid() {
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
