//! The admin operations behind `meridianctl backup|backup list|backup check|restore-point|
//! restore`, carried out by the agent of the member that runs them (the admin service picks
//! the member and forwards; see `agent/admin.rs`). Each returns a JSON value for the CLI.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::pg::{PgAccess, PgInstance, RunAs, FENCE_MARKER};

use super::archive::{check_continuity, parse_history, ArchiveListing, ArchiveReport, Segment};
use super::pgbackrest::Pgbackrest;

/// pgBackRest's backup types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    Full,
    Diff,
    Incr,
}

impl BackupKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Diff => "diff",
            BackupKind::Incr => "incr",
        }
    }
}

/// Where a point-in-time recovery stops.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreTarget {
    /// A timestamp Postgres parses (`2026-12-01 12:00:00+00`).
    Time(String),
    Lsn(String),
    /// A restore point made with `meridianctl restore-point NAME`.
    Name(String),
    /// The end of the archive.
    Latest,
}

impl RestoreTarget {
    fn pgbackrest_args(&self) -> Vec<String> {
        let (kind, target) = match self {
            RestoreTarget::Time(t) => ("time", Some(t)),
            RestoreTarget::Lsn(l) => ("lsn", Some(l)),
            RestoreTarget::Name(n) => ("name", Some(n)),
            RestoreTarget::Latest => ("default", None),
        };
        let mut v = vec![format!("--type={kind}")];
        if let Some(t) = target {
            v.push(format!("--target={t}"));
            v.push("--target-action=promote".into());
        }
        v
    }
}

/// One admin operation; where it runs is [`BackupOp::on_primary`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum BackupOp {
    Backup {
        kind: BackupKind,
        /// Filled by the agent that runs the backup on a standby (what it asked the
        /// primary for); whatever a caller sends here is replaced.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        primary: Option<super::pgbackrest::PrimarySource>,
    },
    /// Where a standby's backup reaches this member as the primary (its
    /// `pgbackrest server`); asked member to member.
    Source,
    List,
    Check,
    RestorePoint {
        name: String,
    },
    /// Restore into `target_dir` (never a member's data dir) and start a standalone
    /// instance there on `port` for inspection.
    Restore {
        target: RestoreTarget,
        target_dir: PathBuf,
        port: u16,
        /// `--as-new-cluster`: once recovered, stop the instance and write the config of
        /// a new one-member cluster adopting it (`new_cluster.rs`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        as_new_cluster: Option<super::new_cluster::NewCluster>,
    },
}

impl BackupOp {
    /// Runs on the primary unless a member is named (a backup reads the primary's data;
    /// check and restore points need its WAL position).
    pub fn on_primary(&self) -> bool {
        matches!(
            self,
            BackupOp::Backup { .. }
                | BackupOp::Source
                | BackupOp::Check
                | BackupOp::RestorePoint { .. }
        )
    }

    /// Writes to the repository or starts a server: needs an authorized caller.
    pub fn is_write(&self) -> bool {
        !matches!(self, BackupOp::List)
    }
}

/// One row of `meridianctl backup list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRow {
    pub label: String,
    pub kind: String,
    pub start_unix: i64,
    pub stop_unix: i64,
    pub size_bytes: u64,
    pub repo_size_bytes: Option<u64>,
    pub wal_start: Option<String>,
    pub wal_stop: Option<String>,
    pub lsn_start: Option<String>,
    pub lsn_stop: Option<String>,
    pub prior: Option<String>,
    pub error: bool,
}

/// `meridianctl backup list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupList {
    pub stanza: String,
    pub status: String,
    pub archive_min: Option<String>,
    pub archive_max: Option<String>,
    pub backups: Vec<BackupRow>,
}

/// `meridianctl backup check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub member: String,
    pub timeline: u32,
    /// Whether `from` is the oldest retained backup's start (else the archive's oldest
    /// segment: no backup yet).
    pub from_backup: bool,
    pub report: ArchiveReport,
}

/// Runs `op` on this member. `pg` is the local instance (for SQL).
pub async fn execute(
    config: &Config,
    pg: &PgInstance,
    op: BackupOp,
) -> anyhow::Result<serde_json::Value> {
    let br = Pgbackrest::from_config(config)
        .ok_or_else(|| anyhow::anyhow!("{} has no [backup] configured", config.member.name))?
        .context("setting up pgBackRest")?;
    let member = config.member.name.clone();
    match op {
        BackupOp::Backup { kind, primary } => {
            let started = Instant::now();
            match &primary {
                None => {
                    br.stanza_create().await.context("creating the stanza")?;
                    if let Err(e) = br.backup(kind.as_str()).await {
                        let what = format!("{} backup on {member}", kind.as_str());
                        if br.cfg.repo_host.is_some()
                            && e.to_string().contains("must be run on the repository host")
                        {
                            return Err(anyhow::Error::new(e).context(format!(
                                "{what}: this pgBackRest takes backups only on the repository \
                                 host (backup.repo_host); run `pgbackrest backup` there, with \
                                 the data members as pgN-host, or use a shared repo_path or S3"
                            )));
                        }
                        return Err(anyhow::Error::new(e).context(what));
                    }
                }
                Some(p) => br
                    .backup_from_standby(kind.as_str(), p)
                    .await
                    .with_context(|| {
                        format!(
                            "{} backup on standby {member} (primary's pgbackrest server {}:{})",
                            kind.as_str(),
                            p.host,
                            p.server_port
                        )
                    })?,
            }
            let info = br.info().await.context("reading the repository")?;
            let label = info.backup.last().map(|b| b.label.clone());
            Ok(serde_json::json!({
                "member": member,
                "kind": kind.as_str(),
                "label": label,
                "seconds": started.elapsed().as_secs_f64(),
            }))
        }
        BackupOp::Source => {
            let source = br.source().with_context(|| {
                format!("{member} runs no pgbackrest server (backup.server_port is not set)")
            })?;
            Ok(serde_json::to_value(source)?)
        }
        BackupOp::List => Ok(serde_json::to_value(list(&br).await?)?),
        BackupOp::Check => Ok(serde_json::to_value(check(&br, pg, &member).await?)?),
        BackupOp::RestorePoint { name } => {
            anyhow::ensure!(
                !name.is_empty() && name.len() < 64,
                "a restore point name is 1 to 63 characters"
            );
            let client = pg.connect().await.context("connecting to the primary")?;
            let row = tokio::time::timeout(
                br.cfg.command_timeout,
                client.query_one(
                    "SELECT pg_create_restore_point($1)::text, pg_walfile_name(pg_switch_wal())",
                    &[&name],
                ),
            )
            .await
            .context("creating the restore point timed out")?
            .context("creating the restore point")?;
            Ok(serde_json::json!({
                "member": member,
                "name": name,
                "lsn": row.get::<_, String>(0),
            }))
        }
        BackupOp::Restore {
            target,
            target_dir,
            port,
            as_new_cluster,
        } => {
            let v = restore(config, &br, pg, target, &target_dir, port).await?;
            match as_new_cluster {
                None => Ok(v),
                Some(nc) => adopt_as_new_cluster(config, pg, v, &nc, &target_dir, port).await,
            }
        }
    }
}

async fn list(br: &Pgbackrest) -> anyhow::Result<BackupList> {
    let info = br.info().await.context("reading the repository")?;
    let archive = info.archive.last();
    Ok(BackupList {
        stanza: info.name.clone(),
        status: info.status.message.clone(),
        archive_min: archive.and_then(|a| a.min.clone()),
        archive_max: archive.and_then(|a| a.max.clone()),
        backups: info
            .backup
            .iter()
            .map(|b| BackupRow {
                label: b.label.clone(),
                kind: b.kind.clone(),
                start_unix: b.timestamp.start,
                stop_unix: b.timestamp.stop,
                size_bytes: b.info.size,
                repo_size_bytes: b.info.repository.as_ref().and_then(|r| r.size),
                wal_start: b.archive.start.clone(),
                wal_stop: b.archive.stop.clone(),
                lsn_start: b.lsn.as_ref().map(|l| l.start.clone()),
                lsn_stop: b.lsn.as_ref().map(|l| l.stop.clone()),
                prior: b.prior.clone(),
                error: b.error,
            })
            .collect(),
    })
}

/// Polling interval while waiting for a segment to reach the repository.
const ARCHIVE_POLL: Duration = Duration::from_millis(500);

async fn check(br: &Pgbackrest, pg: &PgInstance, member: &str) -> anyhow::Result<CheckResult> {
    br.check().await.context("pgbackrest check")?;
    let client = pg.connect().await.context("connecting to the primary")?;
    let row = tokio::time::timeout(
        br.cfg.command_timeout,
        client.query_one(
            "SELECT pg_walfile_name(pg_switch_wal()), \
             (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), \
             pg_is_in_recovery()",
            &[],
        ),
    )
    .await
    .context("switching WAL timed out")?
    .context("switching WAL")?;
    let last: String = row.get(0);
    let segment_size = row.get::<_, i64>(1) as u64;
    anyhow::ensure!(
        !row.get::<_, bool>(2),
        "{member} is in recovery: the check runs on the primary"
    );
    let to = Segment::parse(&last, segment_size)
        .ok_or_else(|| anyhow::anyhow!("Postgres named WAL file {last:?}"))?;
    // The switched segment reaches the repository within the archiver's pace.
    let deadline = Instant::now() + br.cfg.command_timeout;
    let listing = loop {
        let files = br.archive_files().await.context("listing the archive")?;
        let listing = ArchiveListing::from_names(files.iter().map(String::as_str), segment_size);
        if listing.segments.contains(&to) || Instant::now() >= deadline {
            break listing;
        }
        tokio::time::sleep(ARCHIVE_POLL).await;
    };
    let history = if to.timeline > 1 {
        let name = format!("{:08X}.history", to.timeline);
        let dest = br.scratch_dir().join(&name);
        br.archive_get(&name, &dest)
            .await
            .with_context(|| format!("fetching {name} from the archive"))?;
        let text = std::fs::read_to_string(&dest)
            .with_context(|| format!("reading {}", dest.display()))?;
        let _ = std::fs::remove_file(&dest);
        parse_history(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?
    } else {
        Vec::new()
    };
    let info = br.info().await.context("reading the repository")?;
    let oldest_backup = info
        .backup
        .iter()
        .filter(|b| !b.error)
        .filter_map(|b| b.archive.start.as_deref())
        .filter_map(|s| Segment::parse(s, segment_size))
        .min_by_key(|s| s.number);
    let (from, from_backup) = match oldest_backup {
        Some(s) => (s, true),
        None => {
            let min = info
                .archive
                .last()
                .and_then(|a| a.min.as_deref())
                .and_then(|s| Segment::parse(s, segment_size))
                .ok_or_else(|| anyhow::anyhow!("the archive is empty"))?;
            (min, false)
        }
    };
    let report = check_continuity(&listing, to.timeline, &history, from, to, segment_size);
    Ok(CheckResult {
        member: member.to_string(),
        timeline: to.timeline,
        from_backup,
        report,
    })
}

/// Settings of the restored instance that win over everything it brought along
/// (`postgresql.auto.conf` is read last): its own port, socket and hba, no archiving into
/// the cluster's stanza, no replication settings of the member it came from.
fn restored_overrides(dir: &Path, port: u16, listen: &str) -> String {
    let q = |s: &str| crate::pg::quote_conf_value(s);
    let path = |n: &str| q(&dir.join(n).display().to_string());
    format!(
        "\n{}\n\
         port = {port}\n\
         listen_addresses = {}\n\
         unix_socket_directories = {}\n\
         hba_file = {}\n\
         ident_file = {}\n\
         cluster_name = 'meridian-restore'\n\
         archive_mode = off\n\
         synchronous_standby_names = ''\n\
         primary_conninfo = ''\n\
         primary_slot_name = ''\n",
        super::new_cluster::INSPECTION_MARKER,
        q(listen),
        q(&dir.display().to_string()),
        path("pg_hba.conf"),
        path("pg_ident.conf"),
    )
}

/// After a restore: stops the inspection instance, strips its overrides and writes the
/// new cluster's agent config beside this member's own (relative paths in it keep
/// resolving), with a state dir beside the data dir.
async fn adopt_as_new_cluster(
    config: &Config,
    pg: &PgInstance,
    mut v: serde_json::Value,
    nc: &super::new_cluster::NewCluster,
    dir: &Path,
    port: u16,
) -> anyhow::Result<serde_json::Value> {
    use super::new_cluster::{new_cluster_config, strip_inspection_overrides};
    let restored = PgInstance::new(
        pg.bin().clone(),
        dir,
        port,
        "meridian-restore",
        pg.run_as().clone(),
    )
    .with_timeouts(pg.timeouts());
    restored
        .stop(crate::pg::StopMode::Fast, Duration::from_secs(120))
        .await
        .context("stopping the restored instance")?;
    let auto = dir.join("postgresql.auto.conf");
    let text =
        std::fs::read_to_string(&auto).with_context(|| format!("reading {}", auto.display()))?;
    pg.run_as()
        .write_file(&auto, strip_inspection_overrides(&text).as_bytes(), 0o600)
        .with_context(|| format!("writing {}", auto.display()))?;
    let mut state = dir.as_os_str().to_owned();
    state.push(".meridian");
    let state_dir = PathBuf::from(state);
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let original = std::fs::read_to_string(&config.source)
        .with_context(|| format!("reading {}", config.source.display()))?;
    let new_text =
        new_cluster_config(&original, nc, dir, port, &state_dir).map_err(anyhow::Error::msg)?;
    let conf_dir = config.source.parent().unwrap_or(Path::new("."));
    let conf_path = conf_dir.join(format!("{}.toml", nc.cluster));
    anyhow::ensure!(
        !conf_path.exists(),
        "{} exists already: choose another cluster name or move it",
        conf_path.display()
    );
    std::fs::write(&conf_path, new_text)
        .with_context(|| format!("writing {}", conf_path.display()))?;
    tracing::info!(config = %conf_path.display(), cluster = %nc.cluster, "point-in-time restore: new cluster config written");
    v["new_cluster"] = serde_json::json!({
        "cluster": nc.cluster,
        "member": config.member.name,
        "config": conf_path,
        "state_dir": state_dir,
        "start": format!("meridian-node --config {}", conf_path.display()),
    });
    Ok(v)
}

async fn restore(
    config: &Config,
    br: &Pgbackrest,
    pg: &PgInstance,
    target: RestoreTarget,
    dir: &Path,
    port: u16,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(dir.is_absolute(), "--target-dir must be an absolute path");
    let own = pg.data_dir();
    anyhow::ensure!(
        !dir.starts_with(own) && !own.starts_with(dir),
        "{} overlaps this member's data directory {}: a restore never goes over a member",
        dir.display(),
        own.display()
    );
    if dir.exists() {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        anyhow::ensure!(
            entries.next().is_none(),
            "{} is not empty: a restore goes into a new directory",
            dir.display()
        );
    }
    let listen = pg
        .access()
        .listen_addresses
        .first()
        .cloned()
        .unwrap_or_else(|| std::net::Ipv4Addr::LOCALHOST.to_string());
    let bind_host = if listen == "*" {
        "0.0.0.0"
    } else {
        listen.as_str()
    };
    std::net::TcpListener::bind((bind_host, port))
        .with_context(|| format!("port {port} on {listen} is not free"))?;
    let run_as: &RunAs = pg.run_as();
    run_as
        .create_private_dir(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let mut args = target.pgbackrest_args();
    args.push("--archive-mode=off".into());
    tracing::info!(target_dir = %dir.display(), ?target, "point-in-time restore: restoring");
    br.restore(dir, &args).await.context("restoring")?;
    for f in ["standby.signal", FENCE_MARKER, "postmaster.pid"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let auto = dir.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
    text.push_str(&restored_overrides(dir, port, &listen));
    run_as
        .write_file(&auto, text.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", auto.display()))?;
    let access = PgAccess {
        socket_dir: Some(dir.to_path_buf()),
        ..pg.access().clone()
    };
    let restored = PgInstance::new(
        pg.bin().clone(),
        dir,
        port,
        "meridian-restore",
        run_as.clone(),
    )
    .with_timeouts(pg.timeouts())
    .with_access(access)
    .context("setting up the restored instance")?;
    let start = br.cfg.backup_timeout.min(Duration::from_secs(600));
    restored
        .start(start)
        .await
        .context("starting the restored instance")?;
    // Recovery replays up to the target, then promotes.
    let deadline = Instant::now() + start;
    let lsn = loop {
        let state = async {
            let c = restored.connect().await?;
            let row = c
                .query_one(
                    "SELECT pg_is_in_recovery(), \
                     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text \
                          ELSE pg_current_wal_lsn()::text END",
                    &[],
                )
                .await
                .map_err(|e| crate::pg::PgError::sql("restored instance: probe", e))?;
            Ok::<_, crate::pg::PgError>((row.get::<_, bool>(0), row.get::<_, String>(1)))
        }
        .await;
        if state.is_err() && !restored.is_running() {
            let log = std::fs::read_to_string(restored.log_file()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(6).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!(
                "the restored instance stopped during recovery (is the WAL up to the target \
                 archived yet?); its log ({}) ends: {}",
                restored.log_file().display(),
                tail.join(" | ")
            );
        }
        match state {
            Ok((false, lsn)) => break lsn,
            Ok((true, _)) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(ARCHIVE_POLL).await;
            }
            Ok((true, lsn)) => anyhow::bail!(
                "the restored instance is still recovering at {lsn} after {} s (log: {})",
                start.as_secs(),
                restored.log_file().display()
            ),
            Err(e) => return Err(e).context("the restored instance does not answer"),
        }
    };
    tracing::info!(target_dir = %dir.display(), %lsn, port, "point-in-time restore: recovered, running for inspection");
    Ok(serde_json::json!({
        "member": config.member.name,
        "target_dir": dir,
        "host": listen,
        "port": port,
        "socket_dir": dir,
        "lsn": lsn,
        "log": restored.log_file(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_as_json() {
        let op = BackupOp::Restore {
            target: RestoreTarget::Time("2026-12-01 12:00:00+00".into()),
            target_dir: "/srv/restore".into(),
            port: 6543,
            as_new_cluster: None,
        };
        let json = serde_json::to_string(&op).unwrap();
        assert_eq!(serde_json::from_str::<BackupOp>(&json).unwrap(), op);
        assert!(BackupOp::Check.on_primary());
        assert!(!BackupOp::List.is_write());
    }

    #[test]
    fn restore_targets_map_to_pgbackrest_options() {
        assert_eq!(
            RestoreTarget::Lsn("0/3000000".into()).pgbackrest_args(),
            [
                "--type=lsn",
                "--target=0/3000000",
                "--target-action=promote"
            ]
        );
        assert_eq!(RestoreTarget::Latest.pgbackrest_args(), ["--type=default"]);
    }
}
