//! The agent config's `[backup]` table: where the pgBackRest repository is (a path, or a
//! repository host served by `pgbackrest server` over TLS), S3-compatible settings passed
//! through, retention, `archive_mode`, how replicas are created, this member's own
//! `pgbackrest server` (what backups from a standby reach the primary through), and the
//! bounds on every pgBackRest call. Validated here so the rest of `backup/` can trust it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::backup_schedule::{Cron, ScheduleEntry, ScheduledKind};

/// `archive_mode` on the data members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveMode {
    /// Only the primary archives.
    On,
    /// Standbys archive what they receive too (pgBackRest skips identical segments), so a
    /// segment the old primary never pushed is in the archive anyway.
    Always,
}

impl ArchiveMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveMode::On => "on",
            ArchiveMode::Always => "always",
        }
    }
}

/// How a new or re-cloned member gets its data, tried in the configured order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaMethod {
    /// `pgbackrest restore --type=standby` from the repository, then archive and streaming.
    Pgbackrest,
    /// `pg_basebackup` from the primary.
    Basebackup,
}

/// A repository host (`pgbackrest server`) reached over TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoHost {
    pub host: String,
    pub port: u16,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The OS user pgBackRest runs as on the repository host.
    pub user: Option<String>,
}

/// This member's `pgbackrest server` (TLS with client certificates), so that a backup
/// taken on a standby can reach whichever member is the primary, and the certificate this
/// member presents to the other members' servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    /// `tls-server-address`: the address to listen on (`*` for every interface).
    pub address: String,
    /// `tls-server-port`.
    pub port: u16,
    /// The server's certificate: its names must cover the host the other members reach
    /// this member's Postgres at (`peers.<name>.postgres`).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA that signed every member's server and client certificates.
    pub ca_file: PathBuf,
    /// The client certificate this member presents; its CN must be this member's name
    /// (the servers authorize the cluster's data members by name).
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    /// More client CNs the server serves besides the data members: a dedicated
    /// repository host that pulls backups from the members (`server_clients`).
    pub extra_clients: Vec<String>,
}

/// The validated `[backup]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupConfig {
    /// The stanza: the cluster's name unless set.
    pub stanza: String,
    /// `repo1-path`: on this host (or mounted), or on the repository host.
    pub repo_path: PathBuf,
    pub repo_host: Option<RepoHost>,
    /// This member's `pgbackrest server`, when configured (`server_port`).
    pub server: Option<ServerTls>,
    /// `repo1-retention-full` (count of full backups kept).
    pub retention_full: u32,
    /// `repo1-retention-diff`, when set.
    pub retention_diff: Option<u32>,
    pub archive_mode: ArchiveMode,
    pub create_replica_methods: Vec<ReplicaMethod>,
    /// Extra pgBackRest options written verbatim into `[global]` (S3 and the like:
    /// `repo1-type = "s3"`, `repo1-s3-bucket = ...`). Secrets belong in the environment
    /// (`PGBACKREST_REPO1_S3_KEY`, ...), not here.
    pub options: BTreeMap<String, String>,
    /// Bound on a backup or a restore.
    pub backup_timeout: Duration,
    /// Bound on every other pgBackRest call (info, check, archive-push, archive-get, ls).
    pub command_timeout: Duration,
    /// Scheduled backups (`schedule = [{ type = "full", cron = "0 2 * * 0" }, ...]`, cron
    /// in UTC): the Raft leader runs each slot once (`backup/schedule.rs`).
    pub schedule: Vec<ScheduleEntry>,
}

/// One `[[backup.schedule]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduleEntry {
    #[serde(rename = "type")]
    kind: ScheduledKind,
    cron: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackup {
    stanza: Option<String>,
    repo_path: Option<PathBuf>,
    repo_host: Option<String>,
    repo_host_port: Option<u16>,
    repo_host_ca_file: Option<PathBuf>,
    repo_host_cert_file: Option<PathBuf>,
    repo_host_key_file: Option<PathBuf>,
    repo_host_user: Option<String>,
    server_port: Option<u16>,
    server_address: Option<String>,
    server_cert_file: Option<PathBuf>,
    server_key_file: Option<PathBuf>,
    tls_ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    #[serde(default)]
    server_clients: Vec<String>,
    retention_full: Option<u32>,
    retention_diff: Option<u32>,
    archive_mode: Option<ArchiveMode>,
    create_replica_methods: Option<Vec<ReplicaMethod>>,
    #[serde(default)]
    options: BTreeMap<String, String>,
    #[serde(default, with = "humantime_serde_opt")]
    backup_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    command_timeout: Option<Duration>,
    #[serde(default)]
    schedule: Vec<RawScheduleEntry>,
}

mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(de)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Options Meridian writes itself: setting them through `options` would contradict it.
const OWNED_OPTIONS: &[&str] = &[
    "repo1-path",
    "repo1-host",
    "repo1-retention-full",
    "repo1-retention-diff",
    "pg1-path",
    "pg1-port",
    "pg1-socket-path",
    "pg1-user",
    "log-path",
    "lock-path",
    "spool-path",
    "stanza",
    "backup-standby",
];

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

impl RawBackup {
    /// Validates the table; `Err((key, reason))` names the offending key under `backup.`.
    pub(crate) fn validate(
        self,
        base: &Path,
        cluster: &str,
    ) -> Result<BackupConfig, (String, String)> {
        let bad = |k: &str, why: String| Err((format!("backup.{k}"), why));
        let stanza = self.stanza.unwrap_or_else(|| cluster.to_string());
        if stanza.is_empty()
            || !stanza
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(
                "stanza",
                format!("{stanza:?} must be letters, digits, '-' or '_'"),
            );
        }
        let Some(repo_path) = self.repo_path else {
            return bad(
                "repo_path",
                "is required: the repository's path (on this host, or on repo_host)".into(),
            );
        };
        if !repo_path.is_absolute() {
            return bad("repo_path", "must be an absolute path".into());
        }
        let repo_host = match self.repo_host {
            None => {
                for (k, set) in [
                    ("repo_host_port", self.repo_host_port.is_some()),
                    ("repo_host_ca_file", self.repo_host_ca_file.is_some()),
                    ("repo_host_cert_file", self.repo_host_cert_file.is_some()),
                    ("repo_host_key_file", self.repo_host_key_file.is_some()),
                    ("repo_host_user", self.repo_host_user.is_some()),
                ] {
                    if set {
                        return bad(k, "only applies with backup.repo_host".into());
                    }
                }
                None
            }
            Some(host) => {
                let files = [
                    ("repo_host_ca_file", self.repo_host_ca_file),
                    ("repo_host_cert_file", self.repo_host_cert_file),
                    ("repo_host_key_file", self.repo_host_key_file),
                ];
                let mut resolved = Vec::new();
                for (k, f) in files {
                    match f {
                        None => {
                            return bad(
                                k,
                                "is required with backup.repo_host (pgbackrest server speaks TLS with client certificates)".into(),
                            )
                        }
                        Some(f) => {
                            let f = resolve(base, f);
                            if !f.is_file() {
                                return bad(k, format!("{} does not exist", f.display()));
                            }
                            resolved.push(f);
                        }
                    }
                }
                let key_file = resolved.pop().unwrap_or_default();
                let cert_file = resolved.pop().unwrap_or_default();
                let ca_file = resolved.pop().unwrap_or_default();
                Some(RepoHost {
                    host,
                    port: self.repo_host_port.unwrap_or(8432),
                    ca_file,
                    cert_file,
                    key_file,
                    user: self.repo_host_user,
                })
            }
        };
        let server = match self.server_port {
            None => {
                for (k, set) in [
                    ("server_address", self.server_address.is_some()),
                    ("server_cert_file", self.server_cert_file.is_some()),
                    ("server_key_file", self.server_key_file.is_some()),
                    ("tls_ca_file", self.tls_ca_file.is_some()),
                    ("client_cert_file", self.client_cert_file.is_some()),
                    ("client_key_file", self.client_key_file.is_some()),
                    ("server_clients", !self.server_clients.is_empty()),
                ] {
                    if set {
                        return bad(
                            k,
                            "only applies with backup.server_port (this member's pgbackrest server)"
                                .into(),
                        );
                    }
                }
                None
            }
            Some(0) => return bad("server_port", "must be 1 to 65535".into()),
            Some(port) => {
                let files = [
                    ("server_cert_file", self.server_cert_file),
                    ("server_key_file", self.server_key_file),
                    ("tls_ca_file", self.tls_ca_file),
                    ("client_cert_file", self.client_cert_file),
                    ("client_key_file", self.client_key_file),
                ];
                let mut resolved = Vec::new();
                for (k, f) in files {
                    match f {
                        None => {
                            return bad(
                                k,
                                "is required with backup.server_port (pgbackrest server speaks TLS with client certificates)".into(),
                            )
                        }
                        Some(f) => {
                            let f = resolve(base, f);
                            if !f.is_file() {
                                return bad(k, format!("{} does not exist", f.display()));
                            }
                            resolved.push(f);
                        }
                    }
                }
                let address = self.server_address.unwrap_or_else(|| "*".into());
                if address.is_empty() || address.chars().any(|c| c.is_whitespace()) {
                    return bad(
                        "server_address",
                        format!("{address:?} is not an address (an IP, a host name or \"*\")"),
                    );
                }
                for (i, cn) in self.server_clients.iter().enumerate() {
                    if cn.is_empty()
                        || cn.len() > 64
                        || !cn
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    {
                        return bad(
                            &format!("server_clients[{i}]"),
                            format!("{cn:?} is not a certificate CN (1 to 64 letters, digits, '-', '_' or '.')"),
                        );
                    }
                }
                let mut it = resolved.into_iter();
                let mut next = || it.next().unwrap_or_default();
                Some(ServerTls {
                    address,
                    port,
                    cert_file: next(),
                    key_file: next(),
                    ca_file: next(),
                    client_cert_file: next(),
                    client_key_file: next(),
                    extra_clients: self.server_clients,
                })
            }
        };
        let retention_full = self.retention_full.unwrap_or(2);
        if retention_full == 0 {
            return bad("retention_full", "must be at least 1".into());
        }
        if self.retention_diff == Some(0) {
            return bad("retention_diff", "must be at least 1".into());
        }
        let methods = self
            .create_replica_methods
            .unwrap_or_else(|| vec![ReplicaMethod::Basebackup]);
        if methods.is_empty() {
            return bad(
                "create_replica_methods",
                "needs at least one of \"pgbackrest\", \"basebackup\"".into(),
            );
        }
        for (i, m) in methods.iter().enumerate() {
            if methods[..i].contains(m) {
                return bad(
                    &format!("create_replica_methods[{i}]"),
                    format!("{m:?} is listed twice"),
                );
            }
        }
        for (k, v) in &self.options {
            if k.is_empty()
                || !k
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return bad(
                    &format!("options.{k}"),
                    "pgBackRest option names are lowercase letters, digits and '-'".into(),
                );
            }
            if OWNED_OPTIONS.contains(&k.as_str()) {
                return bad(
                    &format!("options.{k}"),
                    "is written by Meridian from the [backup] and [postgres] keys".into(),
                );
            }
            if v.contains('\n') || v.contains('\r') {
                return bad(&format!("options.{k}"), "must be one line".into());
            }
        }
        let backup_timeout = self.backup_timeout.unwrap_or(Duration::from_secs(3600));
        let command_timeout = self.command_timeout.unwrap_or(Duration::from_secs(60));
        if backup_timeout.is_zero() {
            return bad("backup_timeout", "must be greater than 0".into());
        }
        if command_timeout.is_zero() {
            return bad("command_timeout", "must be greater than 0".into());
        }
        let mut schedule = Vec::new();
        for (i, e) in self.schedule.into_iter().enumerate() {
            match Cron::parse(&e.cron) {
                Ok(cron) => schedule.push(ScheduleEntry { kind: e.kind, cron }),
                Err(err) => return bad(&format!("schedule[{i}].cron"), err.why),
            }
        }
        Ok(BackupConfig {
            stanza,
            repo_path,
            repo_host,
            server,
            retention_full,
            retention_diff: self.retention_diff,
            archive_mode: self.archive_mode.unwrap_or(ArchiveMode::On),
            create_replica_methods: methods,
            options: self.options,
            backup_timeout,
            command_timeout,
            schedule,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BackupConfig, (String, String)> {
        let raw: RawBackup = toml::from_str(text).expect("toml");
        raw.validate(Path::new("/etc/meridian"), "prod")
    }

    #[test]
    fn defaults_name_the_stanza_after_the_cluster() {
        let c = parse("repo_path = \"/var/lib/pgbackrest\"").unwrap();
        assert_eq!(c.stanza, "prod");
        assert_eq!(c.retention_full, 2);
        assert_eq!(c.archive_mode, ArchiveMode::On);
        assert_eq!(c.create_replica_methods, vec![ReplicaMethod::Basebackup]);
        assert_eq!(c.command_timeout, Duration::from_secs(60));
        assert!(c.repo_host.is_none());
    }

    #[test]
    fn bad_tables_name_the_key() {
        let key = |t: &str| parse(t).unwrap_err().0;
        assert_eq!(key("stanza = \"a b\"\nrepo_path = \"/r\""), "backup.stanza");
        assert_eq!(key("retention_full = 1"), "backup.repo_path");
        assert_eq!(key("repo_path = \"r\""), "backup.repo_path");
        assert_eq!(
            key("repo_path = \"/r\"\nrepo_host_port = 1"),
            "backup.repo_host_port"
        );
        assert_eq!(
            key("repo_path = \"/r\"\nrepo_host = \"h\""),
            "backup.repo_host_ca_file"
        );
        assert_eq!(
            key("repo_path = \"/r\"\ncreate_replica_methods = []"),
            "backup.create_replica_methods"
        );
        assert_eq!(
            key("repo_path = \"/r\"\ncreate_replica_methods = [\"pgbackrest\", \"pgbackrest\"]"),
            "backup.create_replica_methods[1]"
        );
        assert_eq!(
            key("repo_path = \"/r\"\n[options]\n\"repo1-path\" = \"/x\""),
            "backup.options.repo1-path"
        );
        assert_eq!(
            key("repo_path = \"/r\"\n[options]\n\"Repo1_S3\" = \"x\""),
            "backup.options.Repo1_S3"
        );
        assert_eq!(
            key("repo_path = \"/r\"\nretention_full = 0"),
            "backup.retention_full"
        );
    }

    #[test]
    fn the_server_needs_its_certificates_and_a_port() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["s.pem", "s.key", "ca.pem", "c.pem", "c.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let raw = |t: &str| -> Result<BackupConfig, (String, String)> {
            let raw: RawBackup = toml::from_str(t).expect("toml");
            raw.validate(dir.path(), "prod")
        };
        let all = "repo_path = \"/r\"\nserver_port = 8432\nserver_cert_file = \"s.pem\"\n\
                   server_key_file = \"s.key\"\ntls_ca_file = \"ca.pem\"\n\
                   client_cert_file = \"c.pem\"\nclient_key_file = \"c.key\"\n";
        let s = raw(all).unwrap().server.unwrap();
        assert_eq!((s.address.as_str(), s.port), ("*", 8432));
        assert_eq!(s.client_key_file, dir.path().join("c.key"));
        assert_eq!(s.ca_file, dir.path().join("ca.pem"));
        let key = |t: &str| raw(t).unwrap_err().0;
        assert_eq!(
            key(&all.replace("client_key_file = \"c.key\"\n", "")),
            "backup.client_key_file"
        );
        assert_eq!(
            key(&all.replace("\"s.key\"", "\"nope.key\"")),
            "backup.server_key_file"
        );
        assert_eq!(key(&all.replace("8432", "0")), "backup.server_port");
        assert_eq!(
            key("repo_path = \"/r\"\nclient_cert_file = \"c.pem\""),
            "backup.client_cert_file"
        );
        assert_eq!(
            key(&format!("{all}server_address = \"a b\"\n")),
            "backup.server_address"
        );
        assert!(parse("repo_path = \"/r\"").unwrap().server.is_none());
        let s = raw(&format!("{all}server_clients = [\"backup-host\"]\n"))
            .unwrap()
            .server
            .unwrap();
        assert_eq!(s.extra_clients, vec!["backup-host".to_string()]);
        assert_eq!(
            key(&format!("{all}server_clients = [\"a=b\"]\n")),
            "backup.server_clients[0]"
        );
    }

    #[test]
    fn schedules_parse_and_bad_cron_names_the_entry() {
        let c = parse(
            "repo_path = \"/r\"\nschedule = [{ type = \"full\", cron = \"0 2 * * 0\" }, \
             { type = \"incr\", cron = \"0 2 * * 1-6\" }]\n",
        )
        .unwrap();
        assert_eq!(c.schedule.len(), 2);
        assert_eq!(c.schedule[1].kind, ScheduledKind::Incr);
        assert_eq!(c.schedule[1].cron.as_str(), "0 2 * * 1-6");
        let e = parse(
            "repo_path = \"/r\"\nschedule = [{ type = \"full\", cron = \"0 2 * * 0\" }, \
             { type = \"incr\", cron = \"0 25 * * *\" }]\n",
        )
        .unwrap_err();
        assert_eq!(e.0, "backup.schedule[1].cron");
        assert!(e.1.contains("hour: 25"), "{}", e.1);
        assert!(parse("repo_path = \"/r\"").unwrap().schedule.is_empty());
    }

    #[test]
    fn s3_options_pass_through() {
        let c = parse(
            "repo_path = \"/meridian\"\narchive_mode = \"always\"\n\
             create_replica_methods = [\"pgbackrest\", \"basebackup\"]\n\
             [options]\n\"repo1-type\" = \"s3\"\n\"repo1-s3-bucket\" = \"b\"\n",
        )
        .unwrap();
        assert_eq!(c.options.get("repo1-type").map(String::as_str), Some("s3"));
        assert_eq!(c.archive_mode, ArchiveMode::Always);
        assert_eq!(
            c.create_replica_methods,
            vec![ReplicaMethod::Pgbackrest, ReplicaMethod::Basebackup]
        );
    }
}
