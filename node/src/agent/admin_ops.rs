//! The day-2 admin RPCs a member serves on its own Postgres (the admin service routes each
//! request to the member it names): `PgCatalog` (the `pg_settings` rows `edit-config`
//! validates parameters against), `MemberAction` (reload, restart — the restart runs in
//! the member loop, between two reconcile rounds) and `Query` (`meridianctl query`).
//! Reloads and restarts are recorded in the history.

use std::time::{Duration, Instant};

use meridian_proto::{
    MemberActionRequest, MemberActionResponse, PgCatalogRequest, PgCatalogResponse, QueryRequest,
    QueryResponse, QueryRow,
};
use tonic::Status;

use super::Shared;
use crate::raft::intent::{Command, HistoryEntry, HistoryKind};

/// Bound on a restart request end to end (stop, start, first answer), forwarding included.
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(75);
/// Most rows `Query` returns.
pub const MAX_QUERY_ROWS: u32 = 10_000;
/// Default and longest bound on one query.
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_QUERY_TIMEOUT: Duration = Duration::from_secs(300);
/// Most parameter names one catalog request may ask for.
const MAX_CATALOG_NAMES: usize = 256;

pub fn has_running_pg(shared: &Shared) -> bool {
    shared.local_pg.get().is_some_and(|pg| pg.is_running())
}

fn local_pg(shared: &Shared) -> Result<&crate::pg::PgInstance, Status> {
    let pg = shared.local_pg.get().ok_or_else(|| {
        Status::failed_precondition(format!(
            "{} manages no Postgres (a witness member)",
            shared.name()
        ))
    })?;
    if !pg.is_running() {
        return Err(Status::failed_precondition(format!(
            "{}'s Postgres is not running",
            shared.name()
        )));
    }
    Ok(pg)
}

pub async fn pg_catalog(
    shared: &Shared,
    req: &PgCatalogRequest,
) -> Result<PgCatalogResponse, Status> {
    if req.names.len() > MAX_CATALOG_NAMES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_CATALOG_NAMES} names per request"
        )));
    }
    let pg = local_pg(shared)?;
    let names: Vec<String> = req.names.iter().map(|n| n.to_ascii_lowercase()).collect();
    let entries = pg
        .catalog(&names)
        .await
        .map_err(|e| Status::unavailable(format!("reading pg_settings: {e}")))?;
    Ok(PgCatalogResponse {
        entries_json: serde_json::to_string(&entries)
            .map_err(|e| Status::internal(format!("encoding the catalog: {e}")))?,
        answered_by: shared.name().to_string(),
    })
}

pub async fn member_action(
    shared: &Shared,
    req: &MemberActionRequest,
) -> Result<MemberActionResponse, Status> {
    let started = Instant::now();
    let pg = local_pg(shared)?;
    let me = shared.name().to_string();
    let detail = match req.action.as_str() {
        "reload" => {
            pg.reload()
                .await
                .map_err(|e| Status::unavailable(format!("reloading {me}'s Postgres: {e}")))?;
            format!("reloaded {me}'s Postgres configuration")
        }
        "restart" => {
            let (reply, answer) = tokio::sync::oneshot::channel();
            shared
                .restart_tx
                .try_send(super::member::RestartJob {
                    reply,
                    // Leaves the restart itself (stop, start, answer) time to finish.
                    start_by: Instant::now() + Duration::from_secs(20),
                })
                .map_err(|_| {
                    Status::unavailable(format!("a restart of {me}'s Postgres is already waiting"))
                })?;
            match tokio::time::timeout(ACTION_TIMEOUT - Duration::from_secs(5), answer).await {
                Ok(Ok(Ok(d))) => d,
                Ok(Ok(Err(why))) => {
                    return Err(Status::failed_precondition(format!(
                        "restart of {me}'s Postgres: {why}"
                    )))
                }
                Ok(Err(_)) => {
                    return Err(Status::unavailable(format!(
                        "{me}'s member loop stopped before restarting its Postgres"
                    )))
                }
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "the restart of {me}'s Postgres did not finish in time"
                    )))
                }
            }
        }
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown action {other:?}; known: reload, restart"
            )))
        }
    };
    record(shared, &detail).await;
    Ok(MemberActionResponse {
        detail,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// Appends a note to the history, best effort (the action happened either way).
async fn record(shared: &Shared, what: &str) {
    let intent = shared.applied().intent.clone();
    let entry = HistoryEntry {
        at_unix_ms: super::join::unix_ms(),
        kind: HistoryKind::Note,
        reason: format!("{what} (requested through the admin API)"),
        old_primary: intent.primary.clone(),
        new_primary: intent.primary.clone(),
        generation: intent.generation,
        old_primary_lsn: None,
        new_primary_lsn: None,
        possible_loss_bytes: None,
        write_pause_ms: None,
    };
    if let Err(e) = super::member::propose(shared, Command::AppendHistory(entry)).await {
        tracing::warn!("recording \"{what}\" in the history: {e:#}");
    }
}

pub fn query_timeout(req: &QueryRequest) -> Duration {
    if req.timeout_ms == 0 {
        DEFAULT_QUERY_TIMEOUT
    } else {
        Duration::from_millis(req.timeout_ms).min(MAX_QUERY_TIMEOUT)
    }
}

pub async fn query(shared: &Shared, req: &QueryRequest) -> Result<QueryResponse, Status> {
    if req.sql.trim().is_empty() {
        return Err(Status::invalid_argument("no SQL given"));
    }
    let pg = local_pg(shared)?;
    let max_rows = if req.max_rows == 0 {
        MAX_QUERY_ROWS
    } else {
        req.max_rows.min(MAX_QUERY_ROWS)
    };
    let (columns, rows, truncated) = pg
        .query_text(&req.sql, max_rows as usize, query_timeout(req))
        .await
        .map_err(|e| Status::failed_precondition(format!("on {}: {e}", shared.name())))?;
    Ok(QueryResponse {
        columns,
        rows: rows
            .into_iter()
            .map(|r| QueryRow {
                nulls: r.iter().map(Option::is_none).collect(),
                values: r.into_iter().map(Option::unwrap_or_default).collect(),
            })
            .collect(),
        truncated,
        answered_by: shared.name().to_string(),
    })
}
