//! `meridianctl backup`, `backup list`, `backup check`, `restore`, `restore-point`:
//! disaster recovery through pgBackRest, in pgBackRest's and Patroni users' words. The
//! member that runs each is chosen by the cluster (the primary for a check and a restore
//! point; the answering member for a restore) unless `--from` / `--member` names one; a
//! backup runs on the healthy standby least behind unless `--from` says otherwise. The
//! work itself is `meridian_node::backup::ops`.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use meridian_node::backup::new_cluster::NewCluster;
use meridian_node::backup::ops::{BackupList, CheckResult};
use meridian_node::backup::{BackupKind, BackupOp, RestoreTarget};

use crate::client::Client;
use crate::Failure;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: Option<BackupCommand>,
    /// Backup type.
    #[arg(long = "type", value_enum, default_value_t = KindArg::Full)]
    pub kind: KindArg,
    /// Where the backup runs. `auto`: the healthy standby least behind, else the
    /// primary (also when the members run no pgbackrest server); `standby`: a healthy
    /// standby or nothing; `primary`; or a member name. A backup on a standby copies its
    /// files and starts and stops the backup on the primary through the primary's
    /// `pgbackrest server` (`[backup] server_port` on every data member).
    #[arg(
        long,
        value_name = "auto|standby|primary|MEMBER",
        default_value = "auto"
    )]
    pub from: String,
    /// How long to wait for the backup.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub wait: u64,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    Full,
    Diff,
    Incr,
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// The repository's backups (pgBackRest's info) and the archive's range.
    List,
    /// Proves the archive has no gap from the oldest retained backup to the current
    /// position (segments and timeline history files); exit 1 on a gap.
    Check {
        #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
        wait: u64,
    },
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Where to stop: a timestamp (`2026-12-01 12:00:00+00`), an LSN (`0/3000060`), a
    /// restore point name (`restore-point NAME`), or `latest`.
    #[arg(long, value_name = "TIME|LSN|RESTORE-POINT")]
    pub to: String,
    /// New, empty directory for the restored data (on the member that runs it; never a
    /// member's data directory).
    #[arg(long, value_name = "DIR")]
    pub target_dir: PathBuf,
    /// Port of the standalone instance started there for inspection.
    #[arg(long, value_name = "PORT")]
    pub port: u16,
    /// Member whose host runs the restore [default: the member that answers].
    #[arg(long, value_name = "NAME")]
    pub member: Option<String>,
    /// Once recovered, stop the instance and write the config of a new one-member Meridian
    /// cluster named NAME whose member (named like the restoring one) adopts the directory
    /// and `--port`; printed: how to start it.
    #[arg(long, value_name = "NAME", requires_all = ["new_listen", "new_http_listen"])]
    pub as_new_cluster: Option<String>,
    /// With --as-new-cluster: the new agent's gRPC listen address.
    #[arg(long, value_name = "HOST:PORT", requires = "as_new_cluster")]
    pub new_listen: Option<String>,
    /// With --as-new-cluster: the new agent's HTTP listen address.
    #[arg(long, value_name = "HOST:PORT", requires = "as_new_cluster")]
    pub new_http_listen: Option<String>,
    /// How long to wait for restore and recovery.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub wait: u64,
}

/// `--to` as a restore target: an LSN (`X/Y`, hex), `latest`, a timestamp (starts with a
/// 4-digit year and a dash), else a restore point name.
pub fn parse_target(to: &str) -> Result<RestoreTarget, String> {
    let t = to.trim();
    if t.is_empty() {
        return Err("--to is empty".into());
    }
    if t == "latest" {
        return Ok(RestoreTarget::Latest);
    }
    if let Some((a, b)) = t.split_once('/') {
        if !a.is_empty()
            && !b.is_empty()
            && a.chars().chain(b.chars()).all(|c| c.is_ascii_hexdigit())
        {
            return Ok(RestoreTarget::Lsn(t.to_string()));
        }
    }
    let b = t.as_bytes();
    if b.len() >= 10 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' {
        return Ok(RestoreTarget::Time(t.to_string()));
    }
    Ok(RestoreTarget::Name(t.to_string()))
}

fn when(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or_default());
    humantime::format_rfc3339_seconds(t).to_string()
}

fn bytes(n: u64) -> String {
    const MB: f64 = 1024.0 * 1024.0;
    format!("{:.1} MB", n as f64 / MB)
}

/// The healthy standby least behind the primary: streaming from it, seen recently.
async fn best_standby(client: &Client) -> Result<Option<String>, Failure> {
    let snap = client.status().await?;
    let view = crate::view::cluster_view(&snap.status, &snap.intent);
    let primary = snap.intent.primary.clone();
    Ok(view
        .members
        .iter()
        .filter(|m| m.kind == "data" && m.state == "streaming")
        .filter(|m| primary.is_some() && m.upstream == primary)
        .min_by_key(|m| (m.lag_bytes.unwrap_or(u64::MAX), m.name.clone()))
        .map(|m| m.name.clone()))
}

async fn call_raw(
    client: &Client,
    member: &str,
    op: &BackupOp,
    wait: u64,
) -> anyhow::Result<(String, serde_json::Value)> {
    let json = serde_json::to_string(op)?;
    client
        .backup_op(member, &json, Duration::from_secs(wait))
        .await
}

async fn call(
    client: &Client,
    member: &str,
    op: &BackupOp,
    wait: u64,
) -> Result<(String, serde_json::Value), Failure> {
    let json = serde_json::to_string(op).map_err(|e| Failure::Failed(e.into()))?;
    Ok(client
        .backup_op(member, &json, Duration::from_secs(wait))
        .await?)
}

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

pub async fn backup(client: &Client, args: BackupArgs, json: bool) -> Result<(), Failure> {
    match args.command {
        Some(BackupCommand::List) => return list(client, json).await,
        Some(BackupCommand::Check { wait }) => return check(client, wait, json).await,
        None => {}
    }
    let kind = match args.kind {
        KindArg::Full => BackupKind::Full,
        KindArg::Diff => BackupKind::Diff,
        KindArg::Incr => BackupKind::Incr,
    };
    let op = BackupOp::Backup {
        kind,
        primary: None,
    };
    let from = args.from.trim();
    if from.is_empty() {
        return Err(Failure::Usage(
            "--from is empty (auto, standby, primary or a member name)".into(),
        ));
    }
    let (ran_on, v) = match from {
        "primary" => call(client, "", &op, args.wait).await?,
        "standby" | "auto" => {
            let standby = best_standby(client).await?;
            match (standby, from) {
                (None, "standby") => {
                    return Err(Failure::Failed(anyhow::anyhow!(
                        "no healthy standby to back up from (none streaming from the \
                         primary); use --from primary"
                    )))
                }
                (None, _) => call(client, "", &op, args.wait).await?,
                (Some(s), "standby") => call(client, &s, &op, args.wait).await?,
                (Some(s), _) => match call_raw(client, &s, &op, args.wait).await {
                    Ok(answer) => answer,
                    Err(e)
                        if e.downcast_ref::<crate::client::RpcFailure>()
                            .is_some_and(|f| f.code == tonic::Code::Unimplemented) =>
                    {
                        eprintln!("{s} cannot take a backup as a standby ({e:#}); backing up on the primary");
                        call(client, "", &op, args.wait).await?
                    }
                    Err(e) => return Err(Failure::Failed(e)),
                },
            }
        }
        m => call(client, m, &op, args.wait).await?,
    };
    if json {
        print_json(&v);
    } else {
        println!(
            "{} backup {} taken on {ran_on} in {:.1} s",
            kind.as_str(),
            v["label"].as_str().unwrap_or("?"),
            v["seconds"].as_f64().unwrap_or_default()
        );
    }
    Ok(())
}

async fn list(client: &Client, json: bool) -> Result<(), Failure> {
    let (_, v) = call(client, "", &BackupOp::List, 120).await?;
    if json {
        print_json(&v);
        return Ok(());
    }
    let l: BackupList = serde_json::from_value(v).map_err(|e| Failure::Failed(e.into()))?;
    println!(
        "stanza {} ({}), archive {} .. {}",
        l.stanza,
        l.status,
        l.archive_min.as_deref().unwrap_or("-"),
        l.archive_max.as_deref().unwrap_or("-")
    );
    println!(
        "{:<26} {:<5} {:<21} {:<21} {:>10} {:<25}",
        "LABEL", "TYPE", "STARTED", "FINISHED", "SIZE", "WAL"
    );
    for b in &l.backups {
        println!(
            "{:<26} {:<5} {:<21} {:<21} {:>10} {}..{}{}",
            b.label,
            b.kind,
            when(b.start_unix),
            when(b.stop_unix),
            bytes(b.size_bytes),
            b.wal_start.as_deref().unwrap_or("-"),
            b.wal_stop.as_deref().unwrap_or("-"),
            if b.error { " (error)" } else { "" }
        );
    }
    if l.backups.is_empty() {
        println!("(no backups yet: meridianctl backup)");
    }
    Ok(())
}

async fn check(client: &Client, wait: u64, json: bool) -> Result<(), Failure> {
    let (_, v) = call(client, "", &BackupOp::Check, wait).await?;
    let c: CheckResult =
        serde_json::from_value(v.clone()).map_err(|e| Failure::Failed(e.into()))?;
    if json {
        print_json(&v);
    } else {
        let r = &c.report;
        println!(
            "archive on {} (timeline {}): {} segments {} .. {}{}, history files {:?}",
            c.member,
            c.timeline,
            r.checked,
            r.from,
            r.to,
            if c.from_backup {
                " (from the oldest retained backup)"
            } else {
                " (no backup yet: from the archive's oldest segment)"
            },
            r.histories
        );
    }
    match &c.report.first_missing {
        None => {
            if !json {
                println!("archive_gap: none");
            }
            Ok(())
        }
        Some(first) => Err(Failure::Failed(anyhow::anyhow!(
            "archive gap: {} missing, first {first}",
            c.report.missing_count.max(1)
        ))),
    }
}

pub async fn restore(client: &Client, args: RestoreArgs, json: bool) -> Result<(), Failure> {
    let target = parse_target(&args.to).map_err(Failure::Usage)?;
    if !args.target_dir.is_absolute() {
        return Err(Failure::Usage(
            "--target-dir must be an absolute path".into(),
        ));
    }
    let as_new_cluster = args.as_new_cluster.as_ref().map(|cluster| NewCluster {
        cluster: cluster.clone(),
        listen: args.new_listen.clone().unwrap_or_default(),
        http_listen: args.new_http_listen.clone().unwrap_or_default(),
    });
    let op = BackupOp::Restore {
        target,
        target_dir: args.target_dir.clone(),
        port: args.port,
        as_new_cluster,
    };
    let member = args.member.as_deref().unwrap_or("");
    let (ran_on, v) = call(client, member, &op, args.wait).await?;
    if json {
        print_json(&v);
    } else if let Some(nc) = v.get("new_cluster") {
        println!(
            "restored on {ran_on} into {} up to {}; new cluster {} configured in {} (state dir \
             {}). Start its agent on {ran_on}'s host with:\n  {}",
            args.target_dir.display(),
            v["lsn"].as_str().unwrap_or("?"),
            nc["cluster"].as_str().unwrap_or("?"),
            nc["config"].as_str().unwrap_or("?"),
            nc["state_dir"].as_str().unwrap_or("?"),
            nc["start"].as_str().unwrap_or("?"),
        );
    } else {
        println!(
            "restored on {ran_on} into {} up to {}; a standalone instance for inspection runs \
             on {}:{} (socket dir {}); stop it with pg_ctl -D {} stop",
            args.target_dir.display(),
            v["lsn"].as_str().unwrap_or("?"),
            v["host"].as_str().unwrap_or("?"),
            args.port,
            args.target_dir.display(),
            args.target_dir.display()
        );
    }
    Ok(())
}

pub async fn restore_point(client: &Client, name: &str, json: bool) -> Result<(), Failure> {
    let op = BackupOp::RestorePoint {
        name: name.to_string(),
    };
    let (ran_on, v) = call(client, "", &op, 120).await?;
    if json {
        print_json(&v);
    } else {
        println!(
            "restore point {name:?} at {} on {ran_on}",
            v["lsn"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_targets_are_told_apart() {
        assert_eq!(
            parse_target("0/3000060"),
            Ok(RestoreTarget::Lsn("0/3000060".into()))
        );
        assert_eq!(
            parse_target("2026-12-01 12:00:00+00"),
            Ok(RestoreTarget::Time("2026-12-01 12:00:00+00".into()))
        );
        assert_eq!(
            parse_target("before-migration"),
            Ok(RestoreTarget::Name("before-migration".into()))
        );
        assert_eq!(parse_target("latest"), Ok(RestoreTarget::Latest));
        assert!(parse_target(" ").is_err());
    }
}
