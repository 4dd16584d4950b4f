//! The runtime of scheduled backups: on the Raft leader, every [`TICK`], ask the pure rule
//! (`meridian_core::backup_schedule::decide`) whether a slot of `[backup] schedule` is due,
//! commit its start (which takes the slot for good), run the backup on the chosen member
//! (here, or over its Admin service), and commit the result, which goes into the history.
//! A run that no result comes back for is recorded as failed by whichever member leads
//! once its deadline passes, so the schedule never stalls on a lost leader.
//!
//! The schedule is read from the leading agent's own `[backup]` table: keep it the same
//! on every data member. A witness runs no `[backup]`: while one leads, slots wait (a
//! missed slot runs once a data member leads again).

use std::sync::Arc;
use std::time::Duration;

use meridian_proto::admin_client::AdminClient;
use meridian_proto::BackupOpRequest;

use super::{BackupKind, BackupOp};
use crate::agent::Shared;
use crate::backup_schedule::{decide, Candidates, ScheduleDecision, ScheduledKind, ScheduledRun};
use crate::raft::intent::{Command, Response};

/// How often the leader looks at the schedule (cron's resolution is a minute).
const TICK: Duration = Duration::from_secs(5);

/// Time allowed beyond `backup_timeout` for the result to come back and be committed.
const RESULT_MARGIN: Duration = Duration::from_secs(60);

/// Set on the Admin request of a scheduled run: the member then records nothing itself
/// (the leader commits the outcome with [`Command::ScheduledBackupFinish`]).
pub const SCHEDULED_HEADER: &str = "x-meridian-scheduled";

fn kind_of(k: ScheduledKind) -> BackupKind {
    match k {
        ScheduledKind::Full => BackupKind::Full,
        ScheduledKind::Diff => BackupKind::Diff,
        ScheduledKind::Incr => BackupKind::Incr,
    }
}

/// The leader's loop; returns at once without a schedule.
pub async fn run(shared: Arc<Shared>) {
    let Some(cfg) = shared.config.backup.clone() else {
        return;
    };
    if cfg.schedule.is_empty() {
        return;
    }
    let bound_ms =
        i64::try_from((cfg.backup_timeout + RESULT_MARGIN).as_millis()).unwrap_or(i64::MAX);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        ticker.tick().await;
        if !shared.believes_leader() || !fresh_quorum(&shared) {
            continue;
        }
        let intent = shared.applied().intent.clone();
        let candidates = Candidates {
            primary: intent.primary.clone(),
            streaming_standbys: streaming_standbys(&shared, intent.primary.as_deref()),
            // Backups from a standby go through the primary's `pgbackrest server`: taken
            // as configured on every data member when it is on this one.
            standby_backups: cfg.server.is_some(),
        };
        let now = crate::agent::join::unix_ms();
        let res = match decide(
            &cfg.schedule,
            &intent.backup_schedule,
            now,
            &candidates,
            bound_ms,
        ) {
            ScheduleDecision::Nothing => Ok(()),
            ScheduleDecision::Start(run) => start(&shared, run).await,
            ScheduleDecision::TimedOut {
                slot_unix_ms,
                member,
            } => {
                let detail = format!(
                    "no result from {member} within {} s of the start",
                    bound_ms / 1000
                );
                finish(&shared, slot_unix_ms, false, detail).await
            }
        };
        if let Err(e) = res {
            let msg = format!("{e:#}");
            if last_error.as_deref() != Some(msg.as_str()) {
                tracing::warn!("scheduled backups: {msg}");
                last_error = Some(msg);
            }
        } else {
            last_error = None;
        }
    }
}

/// Data members streaming from `primary` by a fresh observation (up, in recovery, not
/// fenced), the one that received most first.
fn streaming_standbys(shared: &Shared, primary: Option<&str>) -> Vec<String> {
    let Some(primary) = primary else {
        return Vec::new();
    };
    let stale_after = (shared.config.timing.observe_interval * 4).max(Duration::from_secs(1));
    let now = std::time::Instant::now();
    let mut found: Vec<(u64, String)> = shared
        .observations
        .snapshot()
        .into_iter()
        .filter(|(name, (_, at))| name != primary && now.duration_since(*at) <= stale_after)
        .filter_map(|(name, (o, _))| {
            let p = o.postgres?;
            (p.up
                && p.in_recovery
                && !p.fenced
                && p.upstream == primary
                && p.wal_receiver() == meridian_proto::WalReceiverStatus::Streaming)
                .then_some((p.received_lsn, name))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    found.into_iter().map(|(_, n)| n).collect()
}

fn fresh_quorum(shared: &Shared) -> bool {
    let bound = shared.config.timing.fence_after.as_millis() as u64;
    shared
        .raft_metrics()
        .millis_since_quorum_ack
        .is_none_or(|ms| ms <= bound)
}

/// Commits the start (taking the slot), then runs the backup in its own task: the result
/// is committed even if this member stops leading meanwhile.
async fn start(shared: &Arc<Shared>, run: ScheduledRun) -> anyhow::Result<()> {
    use anyhow::Context;
    match crate::agent::member::propose(shared, Command::ScheduledBackupStart(run.clone()))
        .await
        .context("committing the start of a scheduled backup")?
    {
        Response::Applied => {}
        Response::Refused(r) => anyhow::bail!("starting the scheduled backup was refused: {r}"),
        other => anyhow::bail!("starting the scheduled backup: unexpected answer {other:?}"),
    }
    tracing::info!(
        slot_unix_ms = run.slot_unix_ms,
        member = %run.member,
        "starting the scheduled {} backup",
        run.kind.as_str()
    );
    let shared = shared.clone();
    tokio::spawn(async move {
        let (ok, detail) = match execute(&shared, &run).await {
            Ok(label) => (true, format!("label {label}")),
            Err(e) => (false, format!("{e:#}")),
        };
        // Bounded retries: a leader change may refuse or drop the first attempt.
        for attempt in 0..5 {
            match finish(&shared, run.slot_unix_ms, ok, detail.clone()).await {
                Ok(()) => return,
                Err(e) if attempt == 4 => {
                    tracing::warn!("recording the scheduled backup's result: {e:#}")
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
            }
        }
    });
    Ok(())
}

async fn finish(
    shared: &Shared,
    slot_unix_ms: i64,
    ok: bool,
    detail: String,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let detail: String = detail
        .chars()
        .take(crate::raft::intent::MAX_REASON_LEN / 2)
        .collect();
    let cmd = Command::ScheduledBackupFinish {
        slot_unix_ms,
        ok,
        detail,
        at_unix_ms: crate::agent::join::unix_ms(),
    };
    match crate::agent::member::propose(shared, cmd)
        .await
        .context("committing the end of a scheduled backup")?
    {
        Response::Applied => Ok(()),
        // Another leader already recorded this run (e.g. past its deadline).
        Response::Refused(crate::raft::intent::Refused::NoScheduledBackupRunning(_)) => Ok(()),
        Response::Refused(r) => anyhow::bail!("recording the scheduled backup was refused: {r}"),
        other => anyhow::bail!("recording the scheduled backup: unexpected answer {other:?}"),
    }
}

/// Runs the backup on `run.member`; returns its label.
async fn execute(shared: &Shared, run: &ScheduledRun) -> anyhow::Result<String> {
    use anyhow::Context;
    let cfg = shared.config.backup.as_ref().context("no [backup] table")?;
    let op = BackupOp::Backup {
        kind: kind_of(run.kind),
        primary: None,
    };
    let timeout = cfg.backup_timeout;
    let result: serde_json::Value = if run.member == shared.name() {
        let pg = crate::agent::observe::local_instance_or_why(&shared.config)
            .await
            .map_err(anyhow::Error::msg)?;
        let op = crate::agent::backup_admin::prepared(shared, &pg, op)
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        tokio::time::timeout(timeout, super::ops::execute(&shared.config, &pg, op))
            .await
            .map_err(|_| {
                anyhow::anyhow!("the backup did not finish within {} s", timeout.as_secs())
            })?
            .context("running the backup")?
    } else {
        let ch = shared
            .dialer
            .channel(&run.member)
            .with_context(|| format!("reaching {}", run.member))?;
        let req = BackupOpRequest {
            member: run.member.clone(),
            op_json: serde_json::to_string(&op)?,
            timeout_ms: timeout.as_millis() as u64,
            ..Default::default()
        };
        let mut req = crate::agent::admin::forwarded(req, timeout, "member");
        req.metadata_mut().insert(
            SCHEDULED_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        let r = tokio::time::timeout(timeout, AdminClient::new(ch).backup_op(req))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{} did not finish within {} s",
                    run.member,
                    timeout.as_secs()
                )
            })?
            .map_err(|s| anyhow::anyhow!("{}: {}", run.member, s.message()))?;
        serde_json::from_str(&r.into_inner().result_json).context("decoding the result")?
    };
    Ok(result["label"].as_str().unwrap_or("?").to_string())
}
