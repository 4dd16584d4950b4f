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

/// Longest SQL text kept in a history entry (its first line, cut at a character).
const QUERY_NOTE_SQL_CHARS: usize = 200;

/// The history text of a query: the member, the first non-empty line of the SQL (cut to
/// [`QUERY_NOTE_SQL_CHARS`], "…" when there was more) and the outcome.
fn query_note(member: &str, sql: &str, outcome: &str) -> String {
    let mut lines = sql.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    let mut shown: String = first.chars().take(QUERY_NOTE_SQL_CHARS).collect();
    if shown.len() < first.len() || lines.next().is_some() {
        shown.push('…');
    }
    format!("query on {member}: {shown} ({outcome})")
}

/// `text` cut to at most `max` bytes at a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Appends a note to the history, best effort (the action happened either way).
async fn record(shared: &Shared, what: &str) {
    record_as(shared, what, "requested through the admin API").await
}

/// [`record`] with who asked.
async fn record_as(shared: &Shared, what: &str, by: &str) {
    let intent = shared.applied().intent.clone();
    let entry = HistoryEntry {
        at_unix_ms: super::join::unix_ms(),
        kind: HistoryKind::Note,
        reason: cut(
            format!("{what} ({by})"),
            crate::raft::intent::MAX_REASON_LEN,
        ),
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

/// Runs `req.sql` on the local Postgres and records it in the history (who asked, the
/// member, the SQL's first line, the outcome), whether it succeeded or not.
pub async fn query(
    shared: &Shared,
    req: &QueryRequest,
    who: &str,
) -> Result<QueryResponse, Status> {
    if req.sql.trim().is_empty() {
        return Err(Status::invalid_argument("no SQL given"));
    }
    let pg = local_pg(shared)?;
    let max_rows = if req.max_rows == 0 {
        MAX_QUERY_ROWS
    } else {
        req.max_rows.min(MAX_QUERY_ROWS)
    };
    let result = pg
        .query_text(&req.sql, max_rows as usize, query_timeout(req))
        .await;
    let outcome = match &result {
        Ok((_, rows, _)) => format!("{} row(s)", rows.len()),
        Err(e) => format!("failed: {}", super::errlog::one_line(&e.to_string())),
    };
    record_as(
        shared,
        &query_note(shared.name(), &req.sql, &outcome),
        &format!("requested by {who}"),
    )
    .await;
    let (columns, rows, truncated) =
        result.map_err(|e| Status::failed_precondition(format!("on {}: {e}", shared.name())))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_note_keeps_the_first_line_only() {
        assert_eq!(
            query_note("b1", "\n  SELECT 1;\nSELECT 2", "1 row(s)"),
            "query on b1: SELECT 1;… (1 row(s))"
        );
        assert_eq!(
            query_note("b1", "SELECT now()", "failed: boom"),
            "query on b1: SELECT now() (failed: boom)"
        );
        let long = "x".repeat(QUERY_NOTE_SQL_CHARS + 5);
        let note = query_note("b1", &long, "0 row(s)");
        assert!(
            note.contains(&format!("{}…", "x".repeat(QUERY_NOTE_SQL_CHARS))),
            "{note}"
        );
    }
}
