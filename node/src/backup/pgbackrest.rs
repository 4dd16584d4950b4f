//! pgBackRest as Meridian runs it: the `pgbackrest.conf` this agent owns (in
//! `state_dir/pgbackrest/`, beside its log, lock and spool dirs), the `archive_command` /
//! `restore_command` settings, and every pgBackRest call — bounded by a timeout, run as the
//! Postgres OS user when the agent is root, failing with the step and pgBackRest's message.
//! Nothing pgBackRest does is re-implemented here: backups, restores, the archive and its
//! listing all go through the tool.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{Config, PostgresConfig};
use crate::pg::{quote_conf_value, PgError, RunAs, ToolOutput};

use super::config::BackupConfig;

/// Sub-directory of `state_dir` for pgBackRest's config, log, lock and spool.
pub const PGBACKREST_SUBDIR: &str = "pgbackrest";

/// pgBackRest for one data member.
#[derive(Clone, Debug)]
pub struct Pgbackrest {
    pub cfg: BackupConfig,
    bin: PathBuf,
    dir: PathBuf,
    run_as: RunAs,
    /// The local Postgres: data dir, port, socket dir, superuser.
    pg_path: PathBuf,
    pg_port: u16,
    pg_socket: PathBuf,
    pg_user: String,
    /// The libpq passfile pgBackRest's sessions to the local Postgres use.
    passfile: PathBuf,
}

/// Where a standby's backup finds the primary: its `pgbackrest server` and, for the
/// remote pgBackRest that server runs, the primary's own config, data directory and
/// Postgres socket. The primary answers all but `host`, which the standby fills from its
/// address book (`peers.<name>.postgres`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrimarySource {
    #[serde(default)]
    pub host: String,
    pub server_port: u16,
    pub pg_path: PathBuf,
    pub pg_port: u16,
    pub pg_socket: PathBuf,
    pub pg_user: String,
    pub config_path: PathBuf,
}

/// The pgBackRest binary: the first `pgbackrest` on PATH (else the bare name).
fn find_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("pgbackrest");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("pgbackrest")
}

impl Pgbackrest {
    /// pgBackRest for this member's config; None without `[backup]` or without Postgres.
    pub fn from_config(config: &Config) -> Option<Result<Pgbackrest, PgError>> {
        let cfg = config.backup.clone()?;
        let pg = config.postgres.as_ref()?;
        Some(Self::new(config, pg, cfg))
    }

    fn new(config: &Config, pg: &PostgresConfig, cfg: BackupConfig) -> Result<Pgbackrest, PgError> {
        let run_as = RunAs::resolve(&pg.os_user)?;
        Ok(Pgbackrest {
            cfg,
            bin: find_binary(),
            dir: config.state_dir.join(PGBACKREST_SUBDIR),
            run_as,
            pg_path: pg.data_dir.clone(),
            pg_port: pg.port,
            pg_socket: pg.socket_dir.clone(),
            pg_user: pg.superuser.clone(),
            passfile: config
                .state_dir
                .join(crate::agent::pg_access::PG_FILES_SUBDIR)
                .join("pgpass"),
        })
    }

    pub fn stanza(&self) -> &str {
        &self.cfg.stanza
    }

    /// The directory this agent keeps pgBackRest's config, logs, locks and spool in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The libpq passfile pgBackRest's sessions use, when it exists.
    pub fn passfile(&self) -> Option<&Path> {
        self.passfile.is_file().then_some(self.passfile.as_path())
    }

    /// What a standby's backup needs to reach this member as the primary through its
    /// `pgbackrest server`; None without `server_port`.
    pub fn source(&self) -> Option<PrimarySource> {
        let tls = self.cfg.server.as_ref()?;
        Some(PrimarySource {
            host: String::new(),
            server_port: tls.port,
            pg_path: self.pg_path.clone(),
            pg_port: self.pg_port,
            pg_socket: self.pg_socket.clone(),
            pg_user: self.pg_user.clone(),
            config_path: self.conf_path(),
        })
    }

    /// The `pg2-*` options that name the primary as a remote pgBackRest host over TLS.
    fn pg2_args(&self, primary: &PrimarySource) -> Result<Vec<String>, PgError> {
        let tls = self.cfg.server.as_ref().ok_or_else(|| PgError::State {
            step: "pgbackrest backup (from a standby)",
            what: "this member has no backup.server_port (nor its client certificate)".into(),
        })?;
        Ok(vec![
            format!("--pg2-host={}", primary.host),
            "--pg2-host-type=tls".into(),
            format!("--pg2-host-port={}", primary.server_port),
            format!("--pg2-host-ca-file={}", tls.ca_file.display()),
            format!("--pg2-host-cert-file={}", tls.client_cert_file.display()),
            format!("--pg2-host-key-file={}", tls.client_key_file.display()),
            format!("--pg2-host-config={}", primary.config_path.display()),
            format!("--pg2-path={}", primary.pg_path.display()),
            format!("--pg2-port={}", primary.pg_port),
            format!("--pg2-socket-path={}", primary.pg_socket.display()),
            format!("--pg2-user={}", primary.pg_user),
        ])
    }

    /// `stanza-create` and `backup --backup-standby` from this standby: files copied here,
    /// the backup started and stopped on `primary` through its server.
    pub async fn backup_from_standby(
        &self,
        kind: &str,
        primary: &PrimarySource,
    ) -> Result<(), PgError> {
        let pg2 = self.pg2_args(primary)?;
        let mut create = vec!["stanza-create".to_string()];
        create.extend(pg2.iter().cloned());
        self.run("pgbackrest stanza-create", &create, self.short())
            .await?;
        let mut args = vec![
            "backup".to_string(),
            format!("--type={kind}"),
            "--backup-standby".into(),
        ];
        args.extend(pg2);
        self.run(
            "pgbackrest backup (from a standby)",
            &args,
            self.cfg.backup_timeout,
        )
        .await
        .map(|_| ())
    }

    #[cfg(test)]
    pub fn for_tests(stanza: &str, dir: PathBuf) -> Pgbackrest {
        Pgbackrest {
            cfg: BackupConfig {
                stanza: stanza.into(),
                repo_path: "/repo".into(),
                repo_host: None,
                server: None,
                retention_full: 2,
                retention_diff: None,
                archive_mode: super::ArchiveMode::On,
                create_replica_methods: vec![super::ReplicaMethod::Basebackup],
                options: Default::default(),
                backup_timeout: Duration::from_secs(60),
                command_timeout: Duration::from_secs(10),
                schedule: vec![],
            },
            bin: "pgbackrest".into(),
            run_as: RunAs::CurrentUser,
            pg_path: "/data".into(),
            pg_port: 5432,
            pg_socket: "/run/pg".into(),
            pg_user: "postgres".into(),
            passfile: dir.join("pgpass"),
            dir,
        }
    }

    pub fn conf_path(&self) -> PathBuf {
        self.dir.join("pgbackrest.conf")
    }

    pub fn run_as(&self) -> &RunAs {
        &self.run_as
    }

    /// A scratch directory owned by the Postgres OS user (archive-get targets).
    pub fn scratch_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// The contents of `pgbackrest.conf`.
    pub fn render_conf(&self) -> String {
        let c = &self.cfg;
        let mut s = String::from(
            "# Written by Meridian from its [backup] config; rewritten at every start.\n[global]\n",
        );
        let mut kv = |k: &str, v: String| s.push_str(&format!("{k}={v}\n"));
        kv("repo1-path", c.repo_path.display().to_string());
        if let Some(h) = &c.repo_host {
            kv("repo1-host", h.host.clone());
            kv("repo1-host-type", "tls".into());
            kv("repo1-host-port", h.port.to_string());
            kv("repo1-host-ca-file", h.ca_file.display().to_string());
            kv("repo1-host-cert-file", h.cert_file.display().to_string());
            kv("repo1-host-key-file", h.key_file.display().to_string());
            if let Some(u) = &h.user {
                kv("repo1-host-user", u.clone());
            }
        }
        kv("repo1-retention-full", c.retention_full.to_string());
        if let Some(d) = c.retention_diff {
            kv("repo1-retention-diff", d.to_string());
        }
        kv("log-path", self.dir.join("log").display().to_string());
        kv("lock-path", self.dir.join("lock").display().to_string());
        kv("spool-path", self.dir.join("spool").display().to_string());
        kv("log-level-console", "warn".into());
        kv("log-level-file", "info".into());
        kv("start-fast", "y".into());
        kv("compress-type", "lz4".into());
        for (k, v) in &c.options {
            kv(k, v.clone());
        }
        s.push_str(&format!("\n[{}]\n", c.stanza));
        let mut kv = |k: &str, v: String| s.push_str(&format!("{k}={v}\n"));
        kv("pg1-path", self.pg_path.display().to_string());
        kv("pg1-port", self.pg_port.to_string());
        kv("pg1-socket-path", self.pg_socket.display().to_string());
        kv("pg1-user", self.pg_user.clone());
        s
    }

    /// Writes `pgbackrest.conf` and creates the log, lock, spool and scratch dirs, all
    /// owned by the Postgres OS user (archive_command runs as that user).
    pub fn write_conf(&self) -> Result<(), PgError> {
        const STEP: &str = "write pgbackrest.conf";
        for d in [
            self.dir.clone(),
            self.dir.join("log"),
            self.dir.join("lock"),
            self.dir.join("spool"),
            self.scratch_dir(),
        ] {
            self.run_as
                .create_private_dir(&d)
                .map_err(|e| PgError::io(STEP, d.clone(), e))?;
        }
        let p = self.conf_path();
        self.run_as
            .write_file(&p, self.render_conf().as_bytes(), 0o600)
            .map_err(|e| PgError::io(STEP, p.clone(), e))
    }

    fn base_command(&self) -> String {
        format!(
            "{} --config={} --stanza={}",
            self.bin.display(),
            self.conf_path().display(),
            self.cfg.stanza
        )
    }

    /// `archive_command`: every data member archives whenever it is the primary (and, with
    /// `archive_mode = always`, as a standby too).
    pub fn archive_command(&self) -> String {
        format!("{} archive-push \"%p\"", self.base_command())
    }

    /// `restore_command`: a standby that fell behind what its primary kept reads the
    /// archive instead of being re-cloned.
    pub fn restore_command(&self) -> String {
        format!("{} archive-get %f \"%p\"", self.base_command())
    }

    /// The server settings for `meridian.conf`.
    pub fn pg_settings(&self) -> Vec<(String, String)> {
        vec![
            (
                "archive_mode".into(),
                self.cfg.archive_mode.as_str().to_string(),
            ),
            (
                "archive_command".into(),
                quote_conf_value(&self.archive_command()),
            ),
            (
                "restore_command".into(),
                quote_conf_value(&self.restore_command()),
            ),
        ]
    }

    /// Runs `pgbackrest --config --stanza <args>` as the Postgres OS user, bounded.
    pub async fn run(
        &self,
        step: &'static str,
        args: &[String],
        timeout: Duration,
    ) -> Result<ToolOutput, PgError> {
        let mut all = vec![
            format!("--config={}", self.conf_path().display()),
            format!("--stanza={}", self.cfg.stanza),
        ];
        all.extend(args.iter().cloned());
        let pf = self.passfile.display().to_string();
        let env: Vec<(&str, &str)> = if self.passfile.is_file() {
            vec![("PGPASSFILE", pf.as_str())]
        } else {
            vec![]
        };
        crate::pg::run_tool(step, &self.bin, &all, &self.run_as, &env, timeout).await
    }

    fn short(&self) -> Duration {
        self.cfg.command_timeout
    }

    /// `stanza-create` (a no-op for an existing stanza of this cluster).
    pub async fn stanza_create(&self) -> Result<(), PgError> {
        self.run(
            "pgbackrest stanza-create",
            &["stanza-create".into()],
            self.short(),
        )
        .await
        .map(|_| ())
    }

    /// `check`: the configuration is sound and a forced WAL switch reaches the archive.
    pub async fn check(&self) -> Result<(), PgError> {
        self.run("pgbackrest check", &["check".into()], self.short())
            .await
            .map(|_| ())
    }

    /// `backup --type=<kind>` of the local Postgres (it must be the primary).
    pub async fn backup(&self, kind: &str) -> Result<(), PgError> {
        self.run(
            "pgbackrest backup",
            &["backup".into(), format!("--type={kind}")],
            self.cfg.backup_timeout,
        )
        .await
        .map(|_| ())
    }

    /// `info --output=json` for this stanza.
    pub async fn info(&self) -> Result<StanzaInfo, PgError> {
        const STEP: &str = "pgbackrest info";
        let out = self
            .run(STEP, &["info".into(), "--output=json".into()], self.short())
            .await?;
        let mut all: Vec<StanzaInfo> = serde_json::from_str(&out.stdout).map_err(|e| {
            PgError::state(STEP, format!("unexpected JSON from pgbackrest info: {e}"))
        })?;
        all.pop()
            .ok_or_else(|| PgError::state(STEP, "pgbackrest info listed no stanza"))
    }

    /// Every file name under the stanza's archive (relative paths), from `repo-ls`.
    pub async fn archive_files(&self) -> Result<Vec<String>, PgError> {
        const STEP: &str = "pgbackrest repo-ls";
        let out = self
            .run(
                STEP,
                &[
                    "repo-ls".into(),
                    format!("archive/{}", self.cfg.stanza),
                    "--recurse".into(),
                    "--output=json".into(),
                ],
                self.short(),
            )
            .await?;
        let map: std::collections::BTreeMap<String, serde_json::Value> =
            serde_json::from_str(&out.stdout).map_err(|e| {
                PgError::state(
                    STEP,
                    format!("unexpected JSON from pgbackrest repo-ls: {e}"),
                )
            })?;
        Ok(map
            .into_iter()
            .filter(|(_, v)| v["type"] == "file")
            .map(|(k, _)| k)
            .collect())
    }

    /// `archive-get <name>` into `dest` (owned by the Postgres OS user).
    pub async fn archive_get(&self, name: &str, dest: &Path) -> Result<(), PgError> {
        self.run(
            "pgbackrest archive-get",
            &[
                "archive-get".into(),
                name.into(),
                dest.display().to_string(),
            ],
            self.short(),
        )
        .await
        .map(|_| ())
    }

    /// `archive-push <path>` of one WAL file of the local data dir.
    pub async fn archive_push(&self, path: &Path) -> Result<(), PgError> {
        self.run(
            "pgbackrest archive-push",
            &["archive-push".into(), path.display().to_string()],
            self.short(),
        )
        .await
        .map(|_| ())
    }

    /// `restore` into `pg_path` (missing or empty) with extra options (`--type=...`).
    pub async fn restore(&self, pg_path: &Path, extra: &[String]) -> Result<(), PgError> {
        let mut args = vec![
            "restore".to_string(),
            format!("--pg1-path={}", pg_path.display()),
        ];
        args.extend(extra.iter().cloned());
        self.run("pgbackrest restore", &args, self.cfg.backup_timeout)
            .await
            .map(|_| ())
    }
}

/// One stanza of `pgbackrest info --output=json` (the fields Meridian reads).
#[derive(Clone, Debug, Deserialize)]
pub struct StanzaInfo {
    pub name: String,
    #[serde(default)]
    pub archive: Vec<ArchiveInfo>,
    #[serde(default)]
    pub backup: Vec<BackupInfo>,
    pub status: InfoStatus,
}

#[derive(Clone, Debug, Deserialize)]
pub struct InfoStatus {
    pub code: i64,
    pub message: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ArchiveInfo {
    pub id: String,
    pub min: Option<String>,
    pub max: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct BackupInfo {
    pub label: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub error: bool,
    pub archive: BackupArchive,
    pub lsn: Option<BackupLsn>,
    pub timestamp: BackupTimes,
    pub info: BackupSize,
    pub prior: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct BackupArchive {
    pub start: Option<String>,
    pub stop: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct BackupLsn {
    pub start: String,
    pub stop: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct BackupTimes {
    pub start: i64,
    pub stop: i64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct BackupSize {
    pub size: u64,
    pub repository: Option<RepoSize>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RepoSize {
    pub size: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = r#"[{"archive":[{"database":{"id":1,"repo-key":1},"id":"15-1","max":"000000010000000000000004","min":"000000010000000000000001"}],"backup":[{"archive":{"start":"000000010000000000000002","stop":"000000010000000000000003"},"backrest":{"format":5,"version":"2.45"},"database":{"id":1,"repo-key":1},"error":false,"info":{"delta":22992549,"repository":{"delta":3043453,"size":3043453},"size":22992549},"label":"20261201-122036F","lsn":{"start":"0/2000028","stop":"0/3000050"},"prior":null,"reference":null,"timestamp":{"start":1796127636,"stop":1796127646},"type":"full"}],"cipher":"none","db":[{"id":1,"repo-key":1,"system-id":7714309417565677602,"version":"15"}],"name":"s1","repo":[{"cipher":"none","key":1,"status":{"code":0,"message":"ok"}}],"status":{"code":0,"lock":{"backup":{"held":false}},"message":"ok"}}]"#;

    #[test]
    fn info_json_of_pgbackrest_2_45_parses() {
        let v: Vec<StanzaInfo> = serde_json::from_str(INFO).unwrap();
        let s = &v[0];
        assert_eq!(s.name, "s1");
        assert_eq!(
            s.archive[0].min.as_deref(),
            Some("000000010000000000000001")
        );
        let b = &s.backup[0];
        assert_eq!(b.label, "20261201-122036F");
        assert_eq!(b.kind, "full");
        assert_eq!(b.archive.start.as_deref(), Some("000000010000000000000002"));
        assert_eq!(b.timestamp.stop, 1796127646);
        assert_eq!(b.info.size, 22992549);
    }
}
