//! Messages for people: the `Display` of the decision core's reasons ([`Wait`],
//! [`NoCandidate`], [`Rejection`], [`SwitchoverWait`], [`SwitchoverAbort`], [`Action`]),
//! used in logs, in the history the intent records and in errors the operator reads —
//! never their Rust `Debug` form.

use std::fmt;

use super::{
    Action, NoCandidate, NoCandidateReason, PromoteReason, Rejection, SwitchoverAbort,
    SwitchoverPhase, SwitchoverWait, SyncSet, Wait,
};
use crate::types::Lsn;

/// A list of names, comma separated (`-` when empty).
struct Names<'a, I>(&'a I);

impl<'a, I> fmt::Display for Names<'a, I>
where
    &'a I: IntoIterator<Item = &'a String>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut any = false;
        for (i, n) in self.0.into_iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(n)?;
            any = true;
        }
        if !any {
            f.write_str("-")?;
        }
        Ok(())
    }
}

impl fmt::Display for SyncSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.names.is_empty() {
            f.write_str("none")
        } else {
            write!(f, "ANY {} ({})", self.k, Names(&self.names))
        }
    }
}

impl fmt::Display for PromoteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PromoteReason::PrimaryFenced => "the primary's agent confirmed its Postgres fenced",
            PromoteReason::LeaseExpired => "a majority broke the unreachable primary's lease",
            PromoteReason::Switchover => "planned switchover",
        })
    }
}

fn lsn_or_none(l: &Option<Lsn>) -> String {
    l.map(|l| l.to_string()).unwrap_or_else(|| "nothing".into())
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotAMember => f.write_str("not a member"),
            Rejection::Witness => f.write_str("a witness runs no Postgres"),
            Rejection::NoObservation => f.write_str("its agent has not reported"),
            Rejection::StaleObservation { age_ms } => {
                write!(f, "its agent last reported {age_ms} ms ago")
            }
            Rejection::Fenced => f.write_str("its Postgres is fenced"),
            Rejection::PostgresDown => f.write_str("its Postgres is down"),
            Rejection::NotInRecovery => f.write_str("its Postgres is not a standby"),
            Rejection::NoFailover => f.write_str("tagged nofailover"),
            Rejection::RegionFailoverManual { region } => {
                write!(f, "region {region} fails over only by hand")
            }
            Rejection::NoLsn => f.write_str("its WAL position is unknown"),
            Rejection::OlderTimeline {
                timeline,
                primary_timeline,
            } => write!(
                f,
                "on timeline {timeline}, older than the primary's {primary_timeline}"
            ),
            Rejection::LagTooHigh {
                lag_bytes,
                max_bytes,
            } => write!(f, "{lag_bytes} bytes behind (at most {max_bytes} allowed)"),
            Rejection::BehindSyncQuorum { lsn, quorum_lsn } => write!(
                f,
                "at {lsn}, behind the sync quorum's highest position {quorum_lsn}"
            ),
            Rejection::NotInSyncSet => {
                f.write_str("not in the recorded sync set, and the policy allows no async failover")
            }
            Rejection::SyncQuorumUnknown => f.write_str(
                "in the recorded sync set, but too few of the set answered to know whether it \
                 holds every acknowledged commit",
            ),
        }
    }
}

impl fmt::Display for NoCandidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no member may replace {}: ", self.failed_primary)?;
        match &self.reason {
            NoCandidateReason::SyncQuorumNotAnswering {
                answered,
                needed,
                of,
            } => write!(
                f,
                "{} of the {of} sync standbys answered ({}), {needed} are needed to know the last acknowledged commit",
                answered.len(),
                Names(answered)
            )?,
            NoCandidateReason::NoQualifiedMember => f.write_str("every member was passed over")?,
            NoCandidateReason::AcknowledgedAlone => f.write_str(
                "it may have acknowledged commits with no sync standby (the sync set was degraded), \
                 so only it is known to hold them; bring it back, or set async_failover = true, \
                 or force a member with failover --allow-data-loss",
            )?,
        }
        for (i, (name, why)) in self.rejected.iter().enumerate() {
            f.write_str(if i == 0 { " (" } else { "; " })?;
            write!(f, "{name}: {why}")?;
        }
        if !self.rejected.is_empty() {
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl fmt::Display for SwitchoverWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchoverWait::TargetNotReady {
                target,
                why,
                remaining_ms,
            } => write!(
                f,
                "switchover: target {target} is not ready ({why}); giving up in {remaining_ms} ms"
            ),
            SwitchoverWait::WritesStopping {
                primary,
                remaining_ms,
            } => write!(
                f,
                "switchover: waiting for {primary} to stop writes (at most {remaining_ms} ms more)"
            ),
            SwitchoverWait::TargetCatchingUp {
                target,
                received_lsn,
                final_lsn,
                remaining_ms,
            } => write!(
                f,
                "switchover: {target} has received {} of the final position {final_lsn} (at most {remaining_ms} ms more)",
                lsn_or_none(received_lsn)
            ),
            SwitchoverWait::PrimaryResuming {
                primary,
                remaining_ms,
            } => write!(
                f,
                "switchover abandoned: waiting for {primary} to take writes again (at most {remaining_ms} ms more)"
            ),
        }
    }
}

impl fmt::Display for SwitchoverAbort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchoverAbort::NoPrimary => f.write_str("there is no primary"),
            SwitchoverAbort::PrimaryNotHealthy => f.write_str("the primary is not healthy"),
            SwitchoverAbort::TargetNotEligible(why) => {
                write!(f, "the target can never be promoted: {why}")
            }
            SwitchoverAbort::TargetNotReady(why) => write!(f, "the target is not ready: {why}"),
            SwitchoverAbort::WritesNotStopped => {
                f.write_str("the primary did not confirm its writes stopped in time")
            }
            SwitchoverAbort::TargetDidNotCatchUp {
                received_lsn,
                final_lsn,
            } => write!(
                f,
                "the target received {} of the final position {final_lsn} in time",
                lsn_or_none(received_lsn)
            ),
            SwitchoverAbort::CancelledByOperator => f.write_str("cancelled by the operator"),
        }
    }
}

impl fmt::Display for SwitchoverPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchoverPhase::Requested => f.write_str("requested"),
            SwitchoverPhase::StoppingWrites => f.write_str("stopping writes"),
            SwitchoverPhase::Aborting(why) => write!(f, "aborting: {why}"),
        }
    }
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wait::NoPrimary => f.write_str("no primary is recorded"),
            Wait::PrimaryLeaseValid {
                primary,
                expires_in_ms,
            } => {
                write!(f, "primary {primary} is unreachable but its lease still runs")?;
                match expires_in_ms {
                    Some(ms) => write!(f, " (a majority of grants run out in {ms} ms)"),
                    None => f.write_str(" (no lease break round has answered yet)"),
                }
            }
            Wait::PrimaryWritableForOthers { primary, seen_by } => write!(
                f,
                "primary {primary}'s agent is unreachable, but {} still see its Postgres take writes",
                Names(seen_by)
            ),
            Wait::PrimaryFencing { primary } => write!(
                f,
                "primary {primary}'s Postgres is down; waiting for its agent to confirm the fence"
            ),
            Wait::PrimaryResuming { primary } => write!(
                f,
                "primary {primary} was resumed in place and its agent may still take writes again; \
                 waiting until it does or gives up"
            ),
            Wait::GatheringObservations {
                missing,
                remaining_ms,
            } => write!(
                f,
                "a new leader waits for the first report of {} (at most {remaining_ms} ms more)",
                Names(missing)
            ),
            Wait::SyncPositionsPending {
                primary,
                pending,
                remaining_ms,
            } => {
                write!(
                    f,
                    "{primary} failed; waiting for {} to stop confirming its WAL and report a final position",
                    Names(pending)
                )?;
                match remaining_ms {
                    Some(ms) => write!(f, " (at most {ms} ms more)"),
                    None => write!(f, " (once its lease is broken)"),
                }
            }
            Wait::PrimaryPromoting {
                primary,
                remaining_ms,
            } => write!(
                f,
                "{primary} is finishing its promotion (at most {remaining_ms} ms more)"
            ),
            Wait::NoCandidate(nc) => nc.fmt(f),
            Wait::Switchover(sw) => sw.fmt(f),
            Wait::SyncQuorumShort {
                primary,
                healthy,
                quorum,
                waiting_on,
            } => write!(
                f,
                "durability = required and only {} sync standbys are healthy ({}), {quorum} needed: {primary}'s commits wait on {waiting_on}",
                healthy.len(),
                Names(healthy)
            ),
            Wait::Maintenance {
                suppressed,
                would_wait,
            } => {
                f.write_str("maintenance mode")?;
                if !suppressed.is_empty() {
                    f.write_str(": would ")?;
                    for (i, a) in suppressed.iter().enumerate() {
                        if i > 0 {
                            f.write_str("; ")?;
                        }
                        a.fmt(f)?;
                    }
                }
                if let Some(w) = would_wait {
                    write!(f, " (otherwise: {w})")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Promote {
                member,
                generation,
                reason,
                expected_loss_bytes,
            } => {
                write!(f, "promote {member} in generation {generation} ({reason})")?;
                if *expected_loss_bytes > 0 {
                    write!(f, ", up to {expected_loss_bytes} bytes may be lost")?;
                }
                Ok(())
            }
            Action::BreakLease { member, generation } => {
                write!(f, "break {member}'s lease of generation {generation}")
            }
            Action::RecordSyncSet { set, degraded, .. } => {
                write!(f, "record the sync set {set}")?;
                if *degraded {
                    f.write_str(" (degraded)")?;
                }
                Ok(())
            }
            Action::ApplySyncStandbyNames { primary, set } => {
                write!(f, "set synchronous_standby_names on {primary} to {set}")
            }
            Action::SetSwitchoverPhase { phase } => write!(f, "switchover phase: {phase}"),
            Action::AbandonSwitchover { reason } => write!(f, "abandon the switchover: {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    #[test]
    fn reasons_read_as_sentences_not_debug() {
        let abort = SwitchoverAbort::TargetNotReady(Rejection::LagTooHigh {
            lag_bytes: 34_105_088,
            max_bytes: 16_777_216,
        });
        assert_eq!(
            abort.to_string(),
            "the target is not ready: 34105088 bytes behind (at most 16777216 allowed)"
        );
        let nc = Wait::NoCandidate(NoCandidate {
            failed_primary: "a1".into(),
            reason: NoCandidateReason::NoQualifiedMember,
            rejected: BTreeMap::from([
                ("a2".to_string(), Rejection::PostgresDown),
                (
                    "b1".to_string(),
                    Rejection::StaleObservation { age_ms: 4_000 },
                ),
            ]),
        });
        assert_eq!(
            nc.to_string(),
            "no member may replace a1: every member was passed over \
             (a2: its Postgres is down; b1: its agent last reported 4000 ms ago)"
        );
        let quorum = NoCandidateReason::SyncQuorumNotAnswering {
            answered: BTreeSet::from(["a2".to_string()]),
            needed: 2,
            of: 3,
        };
        let nc = NoCandidate {
            failed_primary: "a1".into(),
            reason: quorum,
            rejected: BTreeMap::new(),
        };
        assert_eq!(
            nc.to_string(),
            "no member may replace a1: 1 of the 3 sync standbys answered (a2), 2 are needed \
             to know the last acknowledged commit"
        );
        for text in [abort.to_string(), nc.to_string()] {
            assert!(!text.contains('{') && !text.contains("::"), "{text}");
        }
        assert_eq!(SyncSet::new(["a2", "b1"], 1).to_string(), "ANY 1 (a2, b1)");
    }
}
