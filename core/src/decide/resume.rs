//! Resume in place: when the primary's own agent stopped it and no other member may
//! replace it, the leader hands it a new generation to take writes again in (its data is
//! all there). One rule for the node's leader and the simulation.
//!
//! Also the token of a stopped primary ([`primary_stop_token`]): a fenced primary's
//! standbys learn of its stop from the leader's answers to their reports.
//!
//! Each resume is a new generation, and the agent resumes at most once per generation
//! (`plan::Step::Resume` / `GiveUpResume`): a resumed primary that failed again, or gave
//! up, is resumed again in the next one; one whose resume is still pending is not (its
//! fence is not final, see `Observation::resume_pending`).

use std::collections::BTreeMap;

use super::{Decision, Limits, NoCandidate, Observation, Wait};
use crate::intent::Intent;
use crate::types::Generation;

/// The member to resume and the generation to resume it in, with why nobody else may
/// take over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeInPlace<'a> {
    pub member: &'a str,
    pub generation: Generation,
    pub no_candidate: &'a NoCandidate,
}

/// Whether `decision` (no candidate for the failed primary) should end in a resume in place.
pub fn resume_in_place<'a>(
    decision: &'a Decision,
    intent: &Intent,
    observations: &BTreeMap<String, Observation>,
    limits: &Limits,
    now_ms: u64,
) -> Option<ResumeInPlace<'a>> {
    let Some(Wait::NoCandidate(nc)) = &decision.wait else {
        return None;
    };
    let member = nc.failed_primary.as_str();
    if intent.primary.as_deref() != Some(member) {
        return None;
    }
    let o = observations.get(member)?;
    let fresh = now_ms.saturating_sub(o.received_at_ms) <= limits.stale_after_ms;
    // The report must come from this generation, so "not pending" speaks of it.
    let stopped = o.fenced && !o.postgres_up && o.seen_generation >= intent.generation;
    if !(fresh && stopped) || o.resume_pending {
        return None;
    }
    Some(ResumeInPlace {
        member,
        generation: intent.generation.next(),
        no_candidate: nc,
    })
}

/// The token the leader hands back with every report it accepts: the generation whose
/// primary is known stopped for real (its own agent's fresh report of this generation says
/// fenced and Postgres down or read-only, with no resume pending). An agent that probes after receiving
/// it reads a position that primary can no longer add to (sim finding F7b).
pub fn primary_stop_token(
    intent: &Intent,
    observations: &BTreeMap<String, Observation>,
    limits: &Limits,
    now_ms: u64,
) -> Option<Generation> {
    let primary = intent.primary.as_deref()?;
    let o = observations.get(primary)?;
    let fresh = now_ms.saturating_sub(o.received_at_ms) <= limits.stale_after_ms;
    let stopped = o.writes_stopped() && o.seen_generation >= intent.generation;
    (fresh && stopped && !o.resume_pending).then_some(intent.generation)
}
