//! Runs the scheduled operations of the intent (`switchover --scheduled`, `restart
//! --scheduled`) on the Raft leader, once their time has come
//! (`meridian_core::schedule::due`, checked each leader round).
//!
//! The leader first commits `ClearScheduled { fired: true }` after confirming its
//! leadership, so the operation starts once even across a leader change; then it runs it
//! as `meridianctl` would: a switchover to the requested (or best) healthy standby, or a
//! rolling restart — standbys one at a time (`restart_order`), each back streaming
//! before the next, the primary last by one switchover (unless `in_place` or no candidate).
//! The outcome is appended to the history. Every step is bounded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_core::schedule::{self, Scheduled, ScheduledOp};
use meridian_proto::admin_client::AdminClient;
use meridian_proto::admin_server::Admin;
use meridian_proto::{MemberActionRequest, StatusRequest, WalReceiverStatus};
use tonic::Request;

use super::admin::AdminService;
use super::join::unix_ms;
use super::member::propose;
use super::Shared;
use crate::raft::intent::{Command, HistoryEntry, HistoryKind, Response};

/// How long a freshly elected leader waits for the members' reports before it judges the
/// switchover's target.
const GATHER_BOUND: Duration = Duration::from_secs(3);
/// Bound on a scheduled switchover, from its request to the new primary in the intent.
const SWITCHOVER_WAIT: Duration = Duration::from_secs(60);
/// Bound on a restarted member coming back (streaming, or running as the primary).
const BACK_WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(250);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts `s` (once: refused when another leader started or someone cancelled it) and
/// records how it went.
pub async fn fire(shared: Arc<Shared>, s: Scheduled) {
    let kind = s.op.kind();
    let confirmed = tokio::time::timeout(CONFIRM_TIMEOUT, shared.raft.ensure_linearizable()).await;
    if !matches!(confirmed, Ok(Ok(_))) {
        return;
    }
    let start = Command::ClearScheduled {
        kind,
        fired: true,
        at_unix_ms: unix_ms(),
    };
    match propose(&shared, start).await {
        Ok(Response::Applied) => {}
        Ok(other) => {
            tracing::debug!("scheduled {kind} not started here: {other:?}");
            return;
        }
        Err(e) => {
            tracing::warn!("starting the scheduled {kind}: {e:#}");
            return;
        }
    }
    tracing::info!(scheduled = %s, "starting a scheduled operation");
    let result = match &s.op {
        ScheduledOp::Switchover { candidate } => switchover(&shared, candidate.as_deref()).await,
        ScheduledOp::Restart {
            members,
            pending,
            role,
            in_place,
        } => restart(&shared, members, *pending, role.as_deref(), *in_place).await,
    };
    let text = match &result {
        Ok(done) => format!("scheduled {kind} done: {done}"),
        Err(e) => format!(
            "scheduled {kind} failed: {}",
            super::errlog::one_line(&format!("{e:#}"))
        ),
    };
    match &result {
        Ok(_) => tracing::info!("{text}"),
        Err(_) => tracing::warn!("{text}"),
    }
    note(&shared, &text).await;
}

/// A switchover to `candidate` (or the best healthy standby); Ok once the intent names it
/// the primary.
async fn switchover(shared: &Arc<Shared>, candidate: Option<&str>) -> anyhow::Result<String> {
    let from = shared
        .applied()
        .intent
        .primary
        .clone()
        .context("there is no primary")?;
    let to = super::switch_over::choose_target(shared, candidate, GATHER_BOUND)
        .await
        .map_err(|why| anyhow::anyhow!("switchover refused: {why}"))?;
    super::switch_over::run(shared, &from, &to, SWITCHOVER_WAIT).await?;
    Ok(format!("switched over from {from} to {to}"))
}

/// Whether the leader's latest observation of `member` says a parameter waits for a
/// restart.
fn pending_restart(shared: &Shared, member: &str) -> bool {
    shared
        .observations
        .snapshot()
        .get(member)
        .and_then(|(o, _)| o.postgres.as_ref())
        .is_some_and(|p| !p.pending_restart.is_empty())
}

async fn restart(
    shared: &Arc<Shared>,
    members: &[String],
    pending: bool,
    role: Option<&str>,
    in_place: bool,
) -> anyhow::Result<String> {
    let intent = shared.applied().intent.clone();
    let order = schedule::restart_order(&intent, members, role, pending, |m| {
        pending_restart(shared, m)
    });
    if order.is_empty() {
        return Ok("nothing to restart".into());
    }
    let mut done = Vec::new();
    for m in &order {
        let is_primary = shared.applied().intent.primary.as_deref() == Some(m.as_str());
        if is_primary && !in_place {
            let status = AdminService::new(shared.clone())
                .status(Request::new(StatusRequest { local: false }))
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))
                .context("reading the cluster's status")?
                .into_inner();
            let intent = shared.applied().intent.clone();
            if let Ok(to) = crate::precheck::switchover_candidate(&status, &intent, None) {
                // The old primary rejoins as a standby, which restarts it: with `pending`
                // that is enough when nothing waits any more.
                let since = Instant::now();
                done.push(switchover(shared, Some(&to)).await?);
                wait_back(shared, m, since).await?;
                if pending && !pending_restart(shared, m) {
                    continue;
                }
            }
        }
        let since = Instant::now();
        let detail = restart_member(shared, m).await?;
        wait_back(shared, m, since).await?;
        done.push(detail);
    }
    Ok(done.join("; "))
}

/// `Admin.MemberAction` restart of `member`: run here for this member, else sent to its
/// agent (a member's signed request).
async fn restart_member(shared: &Arc<Shared>, member: &str) -> anyhow::Result<String> {
    let req = MemberActionRequest {
        member: member.to_string(),
        action: "restart".into(),
        token: String::new(),
    };
    if member == shared.name() {
        let r = super::admin_ops::member_action(shared, &req)
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        return Ok(r.detail);
    }
    let channel = shared.dialer.channel(member)?;
    let mut request = Request::new(req);
    request.set_timeout(super::admin_ops::ACTION_TIMEOUT);
    let r = tokio::time::timeout(
        super::admin_ops::ACTION_TIMEOUT,
        AdminClient::new(channel).member_action(request),
    )
    .await
    .with_context(|| format!("the restart of {member} did not answer in time"))?
    .map_err(|s| anyhow::anyhow!("restart of {member}: {}", s.message()))?;
    Ok(r.into_inner().detail)
}

/// Waits until the leader hears, in an observation received after `since`, that
/// `member` is back: running as the primary, or a standby whose WAL receiver streams.
async fn wait_back(shared: &Shared, member: &str, since: Instant) -> anyhow::Result<()> {
    let deadline = Instant::now() + BACK_WAIT;
    loop {
        let primary = shared.applied().intent.primary.as_deref() == Some(member);
        let back = shared
            .observations
            .snapshot()
            .get(member)
            .filter(|(_, at)| *at > since)
            .and_then(|(o, _)| o.postgres.clone())
            .is_some_and(|p| {
                p.up && if primary {
                    !p.in_recovery
                } else {
                    p.in_recovery && p.wal_receiver == WalReceiverStatus::Streaming as i32
                }
            });
        if back {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "{member} did not come back within {} s; the rolling restart stops here",
                BACK_WAIT.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Appends `text` to the history, best effort.
async fn note(shared: &Shared, text: &str) {
    let intent = shared.applied().intent.clone();
    let mut reason = text.to_string();
    if reason.len() > crate::raft::intent::MAX_REASON_LEN {
        let mut end = crate::raft::intent::MAX_REASON_LEN;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let entry = HistoryEntry {
        at_unix_ms: unix_ms(),
        kind: HistoryKind::Note,
        reason,
        old_primary: intent.primary.clone(),
        new_primary: intent.primary.clone(),
        generation: intent.generation,
        old_primary_lsn: None,
        new_primary_lsn: None,
        possible_loss_bytes: None,
        write_pause_ms: None,
    };
    if let Err(e) = propose(shared, Command::AppendHistory(entry)).await {
        tracing::warn!("recording \"{text}\" in the history: {e:#}");
    }
}
