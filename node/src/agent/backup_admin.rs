//! `Admin.BackupOp`: which member runs a backup operation (the primary for a backup, a
//! check or a restore point unless the caller names one; the answering member otherwise),
//! forwarding to it once, and running it here through `backup::ops` (a backup on a
//! standby first asks the primary where its `pgbackrest server` is). A finished backup and
//! a restore point are recorded in the cluster history.

use std::sync::Arc;
use std::time::Duration;

use meridian_proto::admin_client::AdminClient;
use meridian_proto::{BackupOpRequest, BackupOpResponse};
use tonic::{Request, Response as GrpcResponse, Status};

use super::admin::FORWARDED_HEADER;
use super::Shared;
use crate::backup::pgbackrest::PrimarySource;
use crate::backup::BackupOp;
use crate::raft::intent::{Command, HistoryEntry, HistoryKind};

/// Default bound when the caller sets none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

fn target_of(shared: &Shared, op: &BackupOp, named: &str) -> Result<String, Status> {
    if !named.is_empty() {
        return Ok(named.to_string());
    }
    let intent = shared.applied().intent.clone();
    if op.on_primary() || shared.config.backup.is_none() {
        return intent
            .primary
            .clone()
            .ok_or_else(|| Status::unavailable("the cluster has no primary"));
    }
    Ok(shared.name().to_string())
}

/// Serves an authorized request (`authorized_by` says how, for a forward).
pub async fn serve(
    shared: Arc<Shared>,
    request: Request<BackupOpRequest>,
    authorized_by: &'static str,
) -> Result<GrpcResponse<BackupOpResponse>, Status> {
    let request_scheduled = request
        .metadata()
        .get(crate::backup::schedule::SCHEDULED_HEADER)
        .cloned();
    let req = request.get_ref();
    let op: BackupOp = serde_json::from_str(&req.op_json)
        .map_err(|e| Status::invalid_argument(format!("decoding op_json: {e}")))?;
    let timeout = match req.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(ms),
    };
    let target = target_of(&shared, &op, &req.member)?;
    if target != shared.name() {
        if request.metadata().get(FORWARDED_HEADER).is_some() {
            return Err(Status::failed_precondition(format!(
                "forwarded here to run on {target}: not forwarded again"
            )));
        }
        let ch = shared
            .dialer
            .channel(&target)
            .map_err(|e| Status::unavailable(format!("cannot reach {target}: {e:#}")))?;
        let mut fwd = BackupOpRequest {
            member: target.clone(),
            ..request.into_inner()
        };
        fwd.timeout_ms = timeout.as_millis() as u64;
        let fwd = super::admin::forwarded(fwd, timeout, authorized_by);
        return tokio::time::timeout(timeout, AdminClient::new(ch).backup_op(fwd))
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "{target} did not finish within {} s",
                    timeout.as_secs()
                )))
            });
    }
    let pg = super::observe::local_instance_or_why(&shared.config)
        .await
        .map_err(Status::failed_precondition)?;
    let op = prepared(&shared, &pg, op).await?;
    let result = tokio::time::timeout(
        timeout,
        crate::backup::ops::execute(&shared.config, &pg, op.clone()),
    )
    .await
    .map_err(|_| {
        Status::deadline_exceeded(format!(
            "{} did not finish within {} s",
            shared.name(),
            timeout.as_secs()
        ))
    })?
    .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
    // A scheduled run's outcome is committed by the leader that started it.
    if request_scheduled.is_none() {
        record(&shared, &op, &result).await;
    }
    Ok(GrpcResponse::new(BackupOpResponse {
        member: shared.name().to_string(),
        result_json: result.to_string(),
    }))
}

/// Bound on asking the primary where a standby's backup reaches it.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(10);

/// A backup runs as it must where it runs: on the primary as it is; on a standby with
/// pgBackRest's `backup-standby`, through the primary's `pgbackrest server`, which this
/// member asks the primary for (a caller's own `primary` is never trusted). A standby
/// without `backup.server_port` answers `Unimplemented`, which meridianctl's default
/// `--from auto` takes as "back up on the primary instead".
pub(crate) async fn prepared(
    shared: &Shared,
    pg: &crate::pg::PgInstance,
    op: BackupOp,
) -> Result<BackupOp, Status> {
    let BackupOp::Backup { kind, .. } = op else {
        return Ok(op);
    };
    let me = shared.name();
    let in_recovery = pg
        .is_in_recovery()
        .await
        .map_err(|e| Status::failed_precondition(format!("{me}: {e}")))?;
    if !in_recovery {
        return Ok(BackupOp::Backup {
            kind,
            primary: None,
        });
    }
    if shared
        .config
        .backup
        .as_ref()
        .is_none_or(|b| b.server.is_none())
    {
        return Err(Status::unimplemented(format!(
            "{me} is a standby without backup.server_port: a backup from a standby needs a \
             pgbackrest server and a client certificate on every data member (docs/backup.md)"
        )));
    }
    let primary = shared
        .applied()
        .intent
        .primary
        .clone()
        .ok_or_else(|| Status::unavailable("the cluster has no primary"))?;
    if primary == me {
        return Err(Status::failed_precondition(format!(
            "{me} is the primary in the cluster's intent but its Postgres is in recovery: \
             try again once it is promoted or fenced"
        )));
    }
    let ch = shared
        .dialer
        .channel(&primary)
        .map_err(|e| Status::unavailable(format!("cannot reach the primary {primary}: {e:#}")))?;
    let req = BackupOpRequest {
        member: primary.clone(),
        op_json: serde_json::to_string(&BackupOp::Source)
            .map_err(|e| Status::internal(e.to_string()))?,
        timeout_ms: SOURCE_TIMEOUT.as_millis() as u64,
        ..Default::default()
    };
    let req = super::admin::forwarded(req, SOURCE_TIMEOUT, "member");
    let answer = tokio::time::timeout(SOURCE_TIMEOUT, AdminClient::new(ch).backup_op(req))
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "the primary {primary} did not say where its pgbackrest server is within {} s",
                SOURCE_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|s| {
            let msg = format!(
                "asking the primary {primary} for its pgbackrest server: {}",
                s.message()
            );
            if s.message().contains("backup.server_port is not set") {
                Status::unimplemented(msg)
            } else {
                Status::new(s.code(), msg)
            }
        })?
        .into_inner();
    let mut source: PrimarySource = serde_json::from_str(&answer.result_json).map_err(|e| {
        Status::internal(format!(
            "{primary} answered an unreadable pgbackrest source: {e}"
        ))
    })?;
    source.host = super::member::pg_addr(shared, &primary)
        .map_err(|e| Status::failed_precondition(format!("{e:#}")))?
        .0;
    Ok(BackupOp::Backup {
        kind,
        primary: Some(source),
    })
}

/// A backup or restore point goes into the cluster history (best effort: the operation
/// itself already succeeded).
async fn record(shared: &Shared, op: &BackupOp, result: &serde_json::Value) {
    let reason = match op {
        BackupOp::Backup { kind, primary } => format!(
            "{} backup {} taken on {}{}",
            kind.as_str(),
            result["label"].as_str().unwrap_or("?"),
            shared.name(),
            if primary.is_some() {
                " (a standby)"
            } else {
                ""
            }
        ),
        BackupOp::RestorePoint { name } => format!(
            "restore point {name:?} at {}",
            result["lsn"].as_str().unwrap_or("?")
        ),
        _ => return,
    };
    let intent = shared.applied().intent.clone();
    let cmd = Command::AppendHistory(HistoryEntry {
        at_unix_ms: super::join::unix_ms(),
        kind: HistoryKind::Note,
        reason,
        old_primary: None,
        new_primary: intent.primary.clone(),
        generation: intent.generation,
        old_primary_lsn: None,
        new_primary_lsn: None,
        possible_loss_bytes: None,
        write_pause_ms: None,
    });
    if let Err(e) = super::member::propose(shared, cmd).await {
        tracing::warn!("recording the backup in the history: {e:#}");
    }
}
