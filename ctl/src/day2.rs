//! Day-2 commands: `reload`, `restart` (a rolling restart: standbys first, one at a time,
//! each back streaming before the next; the primary last, by one switchover when a healthy
//! candidate exists), `dsn`, `query`, and `--scheduled` of `switchover` and `restart`
//! (recorded in the cluster's intent, started by its leader) with `flush` to cancel.
//!
//! The orchestration of a rolling restart is a bounded loop here; each member's restart
//! is an admin RPC that member's agent executes (`Admin.MemberAction`), and records in the
//! history.

use std::time::{Duration, Instant, SystemTime};

use meridian_node::precheck;
use meridian_node::raft::intent::{Scheduled, ScheduledKind, ScheduledOp};
use meridian_node::raft::Command as IntentCommand;
use serde_json::json;

use crate::client::Client;
use crate::ops::{confirm, failed, print_json, write_stdout};
use crate::view::{self, MemberRow};
use crate::Failure;

macro_rules! outln {
    ($($t:tt)*) => { write_stdout(format_args!($($t)*), true) };
}

/// `--scheduled` at most this far ahead.
const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(24 * 3600);
/// A scheduled time this far in the past is a typo, not "now".
const MAX_SCHEDULE_BEHIND: Duration = Duration::from_secs(60);
const POLL_EVERY: Duration = Duration::from_millis(250);

/// The RFC 3339 time `at` as Unix ms, at most 24 h ahead and 60 s behind.
fn parse_scheduled(at: &str) -> Result<i64, Failure> {
    let when = humantime::parse_rfc3339_weak(at).map_err(|e| {
        Failure::Usage(format!(
            "--scheduled {at:?}: {e}; write it like 2026-12-01T03:00:00Z"
        ))
    })?;
    let now = SystemTime::now();
    match when.duration_since(now) {
        Ok(ahead) if ahead > MAX_SCHEDULE_AHEAD => Err(Failure::Usage(format!(
            "--scheduled {at:?} is more than {} h ahead",
            MAX_SCHEDULE_AHEAD.as_secs() / 3600
        ))),
        Err(e) if e.duration() > MAX_SCHEDULE_BEHIND => Err(Failure::Usage(format!(
            "--scheduled {at:?} is {} s in the past",
            e.duration().as_secs()
        ))),
        _ => Ok(when
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)),
    }
}

/// `switchover|restart --scheduled TIME`: records the operation in the cluster's intent;
/// the Raft leader starts it at that time (`list` shows it, `flush` cancels it).
pub async fn schedule(
    client: &Client,
    at: &str,
    op: ScheduledOp,
    force: bool,
    json: bool,
) -> Result<(), Failure> {
    let at_unix_ms = parse_scheduled(at)?;
    let s = Scheduled {
        at_unix_ms,
        requested_at_unix_ms: crate::ops::now_unix_ms(),
        op,
    };
    let snap = client.status().await?;
    let cmd = IntentCommand::Schedule(s.clone());
    crate::ops::validate_locally(&snap, &cmd)?;
    confirm(&format!("Schedule a {s}?"), force, "schedule it")?;
    let index = client
        .command(&cmd, false)
        .await
        .map_err(|e| failed(format!("scheduling: {e:#}")))?;
    if json {
        return print_json(&json!({"ok": true, "scheduled": s.to_string(),
            "at_unix_ms": at_unix_ms, "log_index": index}));
    }
    outln!(
        "Scheduled: {s}. The cluster's leader starts it then (cancel with `meridianctl flush {}`).",
        s.op.kind()
    );
    Ok(())
}

/// `flush switchover|restart`: cancels the scheduled operation (recorded in the history).
pub async fn flush(client: &Client, what: &str, json: bool) -> Result<(), Failure> {
    let kind = match what {
        "switchover" => ScheduledKind::Switchover,
        _ => ScheduledKind::Restart,
    };
    let snap = client.status().await?;
    let cmd = IntentCommand::ClearScheduled {
        kind,
        fired: false,
        at_unix_ms: crate::ops::now_unix_ms(),
    };
    crate::ops::validate_locally(&snap, &cmd)?;
    client
        .command(&cmd, false)
        .await
        .map_err(|e| failed(format!("cancelling the scheduled {kind}: {e:#}")))?;
    if json {
        return print_json(&json!({"ok": true, "cancelled": kind.as_str()}));
    }
    outln!("Cancelled the scheduled {kind}.");
    Ok(())
}

fn data_members(snap: &crate::client::Snapshot) -> Vec<String> {
    snap.intent
        .members
        .keys()
        .filter(|n| view::is_data(&snap.intent, n))
        .cloned()
        .collect()
}

/// The named members (each must be a data member), or every data member.
fn targets(snap: &crate::client::Snapshot, names: &[String]) -> Result<Vec<String>, Failure> {
    if names.is_empty() {
        return Ok(data_members(snap));
    }
    for n in names {
        if snap.intent.member(n).is_none() {
            return Err(failed(format!("no member named {n:?}")));
        }
        if !view::is_data(&snap.intent, n) {
            return Err(failed(format!("{n} is a witness and runs no Postgres")));
        }
    }
    let mut v = names.to_vec();
    v.sort();
    v.dedup();
    Ok(v)
}

pub async fn reload(
    client: &Client,
    members: &[String],
    force: bool,
    json: bool,
) -> Result<(), Failure> {
    let snap = client.status().await?;
    let targets = targets(&snap, members)?;
    confirm(
        &format!(
            "Reload the Postgres configuration of {}?",
            targets.join(", ")
        ),
        force,
        "reload members",
    )?;
    let mut results = Vec::new();
    let mut failures = 0;
    for m in &targets {
        match client.member_action(m, "reload", client.timeout()).await {
            Ok(r) => {
                if !json {
                    outln!("{m}: {}", r.detail);
                }
                results.push(json!({"member": m, "ok": true, "detail": r.detail}));
            }
            Err(e) => {
                failures += 1;
                if !json {
                    outln!("{m}: failed: {e:#}");
                }
                results.push(json!({"member": m, "ok": false, "error": format!("{e:#}")}));
            }
        }
    }
    if json {
        print_json(&json!({"ok": failures == 0, "results": results}))?;
    }
    if failures > 0 {
        return Err(failed(format!(
            "the reload failed on {failures} of {} members",
            targets.len()
        )));
    }
    Ok(())
}

pub struct RestartArgs {
    pub members: Vec<String>,
    pub pending: bool,
    pub role: Option<String>,
    pub in_place: bool,
    pub force: bool,
    pub wait_s: u64,
}

/// The leader's row of `member` (None when no leader answered).
async fn row_of(client: &Client, member: &str) -> Option<(MemberRow, Option<String>)> {
    let s = client
        .status()
        .await
        .ok()
        .filter(|s| s.status.from_leader)?;
    let v = view::cluster_view(&s.status, &s.intent);
    let r = v.members.into_iter().find(|r| r.name == member)?;
    Some((r, s.intent.primary.clone()))
}

/// Waits (bounded) until `member` is back: streaming from the primary as a standby, or
/// running as the primary, in an observation the leader received after this call began
/// (one from before the restart says nothing).
async fn wait_back(client: &Client, member: &str, wait: Duration) -> Result<Duration, Failure> {
    let started = Instant::now();
    let mut last = String::from("no answer yet");
    while started.elapsed() < wait {
        tokio::time::sleep(POLL_EVERY).await;
        match row_of(client, member).await {
            Some((r, primary)) => {
                let is_primary = primary.as_deref() == Some(member);
                let fresh = r
                    .last_seen_ms
                    .is_some_and(|age| Duration::from_millis(age) < started.elapsed());
                if fresh
                    && ((is_primary && r.state == "running")
                        || (!is_primary && r.state == "streaming"))
                {
                    return Ok(started.elapsed());
                }
                last = format!("state {}", r.state);
            }
            None => last = "no leader answered".into(),
        }
    }
    Err(failed(format!(
        "{member} did not come back within {} s ({last}); the rolling restart stops here",
        wait.as_secs()
    )))
}

async fn restart_one(
    client: &Client,
    member: &str,
    wait: Duration,
    json: bool,
    steps: &mut Vec<serde_json::Value>,
) -> Result<(), Failure> {
    let r = client
        .member_action(member, "restart", wait + client.timeout())
        .await
        .map_err(|e| failed(format!("restart of {member}: {e:#}")))?;
    let back = wait_back(client, member, wait).await?;
    if !json {
        outln!(
            "{member}: {} ({:.1} s until it was back)",
            r.detail,
            back.as_secs_f64()
        );
    }
    steps.push(
        json!({"member": member, "action": "restart", "detail": r.detail,
        "elapsed_ms": r.elapsed_ms, "back_after_ms": back.as_millis() as u64}),
    );
    Ok(())
}

pub async fn restart(client: &Client, a: RestartArgs, json: bool) -> Result<(), Failure> {
    let snap = client.status().await?;
    if !snap.status.from_leader {
        return Err(failed(
            "no leader answered: a rolling restart needs the leader's view of every member",
        ));
    }
    let primary = snap.intent.primary.clone();
    let rows = view::cluster_view(&snap.status, &snap.intent).members;
    let mut chosen: Vec<String> = targets(&snap, &a.members)?
        .into_iter()
        .filter(|m| match a.role.as_deref() {
            Some("primary") => primary.as_deref() == Some(m.as_str()),
            Some(_) => primary.as_deref() != Some(m.as_str()),
            None => true,
        })
        .filter(|m| {
            !a.pending
                || rows
                    .iter()
                    .any(|r| r.name == *m && !r.pending_restart.is_empty())
        })
        .collect();
    if chosen.is_empty() {
        if json {
            return print_json(&json!({"ok": true, "restarted": [], "steps": []}));
        }
        outln!(
            "Nothing to restart{}.",
            if a.pending {
                ": no member waits for a restart"
            } else {
                ""
            }
        );
        return Ok(());
    }
    // Standbys first (by name), the primary last.
    chosen.sort_by_key(|m| (primary.as_deref() == Some(m.as_str()), m.clone()));
    let with_primary = chosen.last().map(String::as_str) == primary.as_deref();
    let candidate = if with_primary && !a.in_place {
        precheck::switchover_candidate(&snap.status, &snap.intent, None).ok()
    } else {
        None
    };
    let plan = match (&primary, with_primary, &candidate) {
        (Some(p), true, Some(c)) => format!(
            "Restart {} one at a time; the primary {p} last, after a switchover to {c}?",
            chosen.join(", ")
        ),
        (Some(p), true, None) => format!(
            "Restart {} one at a time; the primary {p} last, in place (its clients see a short outage)?",
            chosen.join(", ")
        ),
        _ => format!("Restart {} one at a time?", chosen.join(", ")),
    };
    confirm(&plan, a.force, "restart members")?;
    let wait = Duration::from_secs(a.wait_s);
    let mut steps = Vec::new();
    for m in &chosen {
        let is_primary = primary.as_deref() == Some(m.as_str());
        if !is_primary {
            restart_one(client, m, wait, json, &mut steps).await?;
            continue;
        }
        match &candidate {
            Some(c) => {
                // The switchover restarts the old primary as a standby (which applies its
                // pending parameters); restart it again only if something still waits.
                if !json {
                    outln!("{m}: switching over to {c} first");
                }
                crate::ops::switchover_quiet(client, c, a.wait_s).await?;
                steps.push(json!({"member": m, "action": "switchover", "to": c}));
                wait_back(client, m, wait).await?;
                let still = row_of(client, m)
                    .await
                    .map(|(r, _)| r.pending_restart)
                    .unwrap_or_default();
                if a.pending && still.is_empty() {
                    if !json {
                        outln!("{m}: rejoined as a standby of {c}; nothing waits for a restart any more");
                    }
                } else {
                    restart_one(client, m, wait, json, &mut steps).await?;
                }
            }
            None => restart_one(client, m, wait, json, &mut steps).await?,
        }
    }
    if json {
        return print_json(&json!({"ok": true, "restarted": chosen, "steps": steps}));
    }
    outln!("Rolling restart done: {}.", chosen.join(", "));
    Ok(())
}

/// `host:port` of `member`'s Postgres as the answering member's address book has it.
fn pg_addr(snap: &crate::client::Snapshot, member: &str) -> Option<(String, String)> {
    let m = snap.status.members.iter().find(|m| m.name == member)?;
    let (h, p) = m.postgres_addr.rsplit_once(':')?;
    Some((h.trim_matches(['[', ']']).to_string(), p.to_string()))
}

pub async fn dsn(
    client: &Client,
    member: Option<String>,
    role: Option<String>,
    dbname: &str,
    user: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    let snap = client.status().await?;
    let primary = snap.intent.primary.clone();
    let rows = view::cluster_view(&snap.status, &snap.intent).members;
    let (members, attrs): (Vec<String>, Option<&str>) = match (member, role.as_deref()) {
        (Some(m), _) => {
            if !view::is_data(&snap.intent, &m) {
                return Err(failed(format!("{m} is not a data member of this cluster")));
            }
            (vec![m], None)
        }
        (None, Some("primary")) => (
            vec![primary
                .clone()
                .ok_or_else(|| failed("no primary is recorded"))?],
            None,
        ),
        (None, Some("replica")) => {
            let mut s: Vec<&MemberRow> = rows
                .iter()
                .filter(|r| primary.as_deref() != Some(r.name.as_str()) && r.state == "streaming")
                .collect();
            s.sort_by_key(|r| (r.lag_bytes.unwrap_or(u64::MAX), r.name.clone()));
            if s.is_empty() {
                return Err(failed("no standby is streaming"));
            }
            (
                s.into_iter().map(|r| r.name.clone()).collect(),
                Some("standby"),
            )
        }
        // Every data member, the primary first: libpq finds the writable one, also after
        // a failover.
        _ => {
            let mut all = data_members(&snap);
            all.sort_by_key(|m| (primary.as_deref() != Some(m.as_str()), m.clone()));
            (all, Some("read-write"))
        }
    };
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    for m in &members {
        let (h, p) = pg_addr(&snap, m).ok_or_else(|| {
            failed(format!(
                "{} has no address for {m}'s Postgres in its address book ([peers.{m}] postgres)",
                snap.status.answered_by
            ))
        })?;
        hosts.push(h);
        ports.push(p);
    }
    let mut s = format!(
        "host={} port={} dbname={}",
        hosts.join(","),
        ports.join(","),
        meridian_node::pg::quote_conninfo_value(dbname)
    );
    if let Some(u) = user {
        s.push_str(&format!(
            " user={}",
            meridian_node::pg::quote_conninfo_value(u)
        ));
    }
    if let Some(a) = attrs {
        s.push_str(&format!(" target_session_attrs={a}"));
    }
    if json {
        return print_json(&json!({"dsn": s, "members": members}));
    }
    outln!("{s}");
    Ok(())
}

pub async fn query(
    client: &Client,
    sql: &str,
    member: Option<String>,
    role: Option<String>,
    format: &str,
    timeout_s: u64,
    max_rows: u32,
) -> Result<(), Failure> {
    let target = match (member, role.as_deref()) {
        (Some(m), _) => m,
        (None, Some("replica")) => {
            let snap = client.status().await?;
            let primary = snap.intent.primary.clone();
            let mut rows: Vec<MemberRow> = view::cluster_view(&snap.status, &snap.intent)
                .members
                .into_iter()
                .filter(|r| primary.as_deref() != Some(r.name.as_str()) && r.state == "streaming")
                .collect();
            rows.sort_by_key(|r| (r.lag_bytes.unwrap_or(u64::MAX), r.name.clone()));
            rows.first()
                .map(|r| r.name.clone())
                .ok_or_else(|| failed("no standby is streaming"))?
        }
        _ => {
            let snap = client.status().await?;
            snap.intent
                .primary
                .clone()
                .ok_or_else(|| failed("no primary is recorded"))?
        }
    };
    let r = client
        .query(&target, sql, max_rows, Duration::from_secs(timeout_s))
        .await
        .map_err(|e| failed(format!("query on {target}: {e:#}")))?;
    let cell = |row: &meridian_proto::QueryRow, i: usize| -> Option<String> {
        if row.nulls.get(i).copied().unwrap_or(false) {
            None
        } else {
            row.values.get(i).cloned()
        }
    };
    match format {
        "json" => {
            let rows: Vec<serde_json::Map<String, serde_json::Value>> = r
                .rows
                .iter()
                .map(|row| {
                    r.columns
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (c.clone(), json!(cell(row, i))))
                        .collect()
                })
                .collect();
            print_json(&json!({"member": r.answered_by, "columns": r.columns,
                "rows": rows, "truncated": r.truncated}))?;
        }
        "csv" => {
            outln!("{}", csv_line(r.columns.iter().map(|c| Some(c.as_str()))));
            for row in &r.rows {
                let cells: Vec<Option<String>> =
                    (0..r.columns.len()).map(|i| cell(row, i)).collect();
                outln!("{}", csv_line(cells.iter().map(|c| c.as_deref())));
            }
        }
        _ => {
            if r.columns.is_empty() {
                outln!("(no rows; ran on {})", r.answered_by);
            } else {
                let header: Vec<&str> = r.columns.iter().map(String::as_str).collect();
                let rows: Vec<Vec<String>> = r
                    .rows
                    .iter()
                    .map(|row| {
                        (0..r.columns.len())
                            .map(|i| cell(row, i).unwrap_or_else(|| "NULL".into()))
                            .collect()
                    })
                    .collect();
                write_stdout(format_args!("{}", view::table(&header, &rows)), false);
                outln!(
                    "({} row{}{}; ran on {})",
                    r.rows.len(),
                    if r.rows.len() == 1 { "" } else { "s" },
                    if r.truncated { ", cut off" } else { "" },
                    r.answered_by
                );
            }
        }
    }
    if r.truncated && format != "table" {
        eprintln!("warning: more rows than --max-rows {max_rows}: the rest were cut off");
    }
    Ok(())
}

/// One CSV record (RFC 4180): quoted when it holds a comma, quote or line break; NULL is
/// an empty field.
pub fn csv_line<'a>(cells: impl Iterator<Item = Option<&'a str>>) -> String {
    cells
        .map(|c| match c {
            None => String::new(),
            Some(v) if v.contains([',', '"', '\n', '\r']) => {
                format!("\"{}\"", v.replace('"', "\"\""))
            }
            Some(v) => v.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_what_needs_it() {
        assert_eq!(
            csv_line([Some("a"), None, Some("b,c"), Some("say \"hi\"")].into_iter()),
            "a,,\"b,c\",\"say \"\"hi\"\"\""
        );
    }
}
