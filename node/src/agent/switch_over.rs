//! Runs one planned switchover on behalf of the agent itself (a graceful stop of the
//! primary's agent, a scheduled switchover or the primary's turn in a rolling restart):
//! the best healthy standby (or the one asked for) is chosen from the leader's status by
//! [`crate::precheck::switchover_candidate`], the switchover is proposed, and the intent
//! is watched until it names the target the primary. Bounded; the leader's core runs the
//! switchover's steps, this only asks and waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_proto::admin_server::Admin;
use meridian_proto::StatusRequest;
use tonic::Request;

use super::admin::AdminService;
use super::join::unix_ms;
use super::member::propose;
use super::Shared;
use crate::raft::intent::{Command, PendingSwitchover, Response};

const POLL: Duration = Duration::from_millis(100);

/// Spacing of the asks while the leader gathers reports.
const GATHER_RETRY: Duration = Duration::from_millis(200);

/// The member a switchover away from the primary would go to now: `candidate` when it is
/// fit, else the best healthy standby. The refusal says why there is none. A refusal for a
/// member that has not reported yet (a leader elected a moment ago holds no reports) is
/// asked again for at most `gather_within` (seen in CI right after a leadership hand-off).
pub async fn choose_target(
    shared: &Arc<Shared>,
    candidate: Option<&str>,
    gather_within: Duration,
) -> Result<String, String> {
    let gather_until = Instant::now() + gather_within;
    loop {
        let status = AdminService::new(shared.clone())
            .status(Request::new(StatusRequest { local: false }))
            .await
            .map_err(|s| format!("reading the cluster's status: {}", s.message()))?
            .into_inner();
        let intent = shared.applied().intent.clone();
        match crate::precheck::switchover_candidate(&status, &intent, candidate) {
            Err(why) if why.contains("has not reported") && Instant::now() < gather_until => {
                tokio::time::sleep(GATHER_RETRY).await;
            }
            other => return other,
        }
    }
}

/// Proposes a switchover from `from` to `to` and waits until the intent names `to` the
/// primary, for at most `within`. An error says what happened instead (refused,
/// abandoned, another member promoted, out of time).
pub async fn run(
    shared: &Arc<Shared>,
    from: &str,
    to: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let begin = Command::BeginSwitchover(PendingSwitchover {
        from: from.to_string(),
        to: to.to_string(),
        started_at_unix_ms: unix_ms(),
        phase: Default::default(),
    });
    if let Response::Refused(r) = propose(shared, begin)
        .await
        .context("requesting the switchover")?
    {
        anyhow::bail!("the switchover was refused: {r}");
    }
    // The proposal may be committed before this member applied it: "no pending
    // switchover" means abandoned only once this member has seen it pending.
    let mut seen_pending = false;
    loop {
        let intent = shared.applied().intent.clone();
        match intent.primary.as_deref() {
            Some(p) if p == to => return Ok(()),
            Some(p) if p != from => anyhow::bail!("{p} became the primary instead of {to}"),
            _ => {}
        }
        match &intent.pending_switchover {
            Some(_) => seen_pending = true,
            None if seen_pending => {
                anyhow::bail!("the switchover from {from} to {to} was abandoned")
            }
            None => {}
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "the switchover to {to} did not finish within {} s",
                within.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
