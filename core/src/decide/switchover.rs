//! The planned switchover as a small state machine over recorded phases:
//! `Requested` (target healthy and caught up?) → `StoppingWrites` (primary fenced; target
//! receives its final LSN) → `Promote` (ends the switchover; the old primary then rejoins
//! through the usual housekeeping). Each phase is bounded by
//! `limits.switchover_step_timeout_ms`; giving up after writes stopped goes through
//! `Aborting`, which un-fences the old primary before the switchover is dropped, so the
//! failover rules never mistake the planned fence for a crash.

use super::failover::standby_lsn;
use super::{
    Action, Cx, Decision, PromoteReason, Rejection, SwitchoverAbort, SwitchoverPhase,
    SwitchoverView, SwitchoverWait, Wait,
};
use crate::types::Lsn;
use crate::types::MemberKind;

pub(super) fn step(cx: &Cx, sw: &SwitchoverView) -> Decision {
    let view = cx.view;
    let Some(primary) = &view.primary else {
        return abandon(SwitchoverAbort::NoPrimary);
    };
    let primary = primary.name.as_str();
    let target = sw.target.as_str();
    let remaining_ms = cx.remaining_ms(sw.phase_since_ms, view.limits.switchover_step_timeout_ms);
    let pobs = cx.fresh(primary);
    // A newly elected leader holds only the observations sent to it since: it hears from
    // the two members the switchover is about before judging them (bounded).
    let new_leader_ms = cx.remaining_ms(view.leader_since_ms, view.limits.stale_after_ms);
    let unheard: Vec<String> = [primary, target]
        .into_iter()
        .filter(|m| cx.fresh(m).is_none())
        .map(str::to_string)
        .collect();
    if new_leader_ms > 0 && !unheard.is_empty() {
        return Decision {
            actions: Vec::new(),
            wait: Some(Wait::GatheringObservations {
                missing: unheard,
                remaining_ms: new_leader_ms,
            }),
        };
    }

    match &sw.phase {
        SwitchoverPhase::Requested => {
            let Some(pobs) = pobs.filter(|o| o.writable()) else {
                return abandon(SwitchoverAbort::PrimaryNotHealthy);
            };
            match check_target(cx, target, pobs.wal_lsn.unwrap_or(Lsn::ZERO)) {
                Ok(()) => Decision {
                    actions: vec![Action::SetSwitchoverPhase {
                        phase: SwitchoverPhase::StoppingWrites,
                    }],
                    wait: None,
                },
                Err(r @ (Rejection::NotAMember | Rejection::Witness | Rejection::NoFailover)) => {
                    abandon(SwitchoverAbort::TargetNotEligible(r))
                }
                Err(r) if remaining_ms == 0 => abandon(SwitchoverAbort::TargetNotReady(r)),
                Err(why) => waiting(
                    Vec::new(),
                    SwitchoverWait::TargetNotReady {
                        target: target.to_string(),
                        why,
                        remaining_ms,
                    },
                ),
            }
        }
        SwitchoverPhase::StoppingWrites => {
            let final_lsn = pobs.filter(|o| o.writes_stopped()).and_then(|o| o.wal_lsn);
            let Some(final_lsn) = final_lsn else {
                if remaining_ms == 0 {
                    return aborting(SwitchoverAbort::WritesNotStopped);
                }
                return waiting(
                    Vec::new(),
                    SwitchoverWait::WritesStopping {
                        primary: primary.to_string(),
                        remaining_ms,
                    },
                );
            };
            let tobs = cx.fresh(target).filter(|o| o.postgres_up && o.in_recovery);
            let received_lsn = tobs.and_then(standby_lsn);
            if received_lsn.is_some_and(|l| l >= final_lsn) {
                return Decision {
                    actions: vec![Action::Promote {
                        member: target.to_string(),
                        generation: view.generation.next(),
                        reason: PromoteReason::Switchover,
                        expected_loss_bytes: 0,
                    }],
                    wait: None,
                };
            }
            if remaining_ms == 0 {
                return aborting(SwitchoverAbort::TargetDidNotCatchUp {
                    received_lsn,
                    final_lsn,
                });
            }
            waiting(
                Vec::new(),
                SwitchoverWait::TargetCatchingUp {
                    target: target.to_string(),
                    received_lsn,
                    final_lsn,
                    remaining_ms,
                },
            )
        }
        SwitchoverPhase::Aborting(reason) => {
            // Only a report received since the abort began counts: an older "writable" may
            // predate the fence (e.g. an operator's cancel right after the stop-writes
            // step), and dropping the switchover then would leave a fenced primary that
            // the failover rules replace.
            let resumed =
                pobs.is_some_and(|o| o.writable() && o.received_at_ms >= sw.phase_since_ms);
            if resumed || remaining_ms == 0 {
                // Back to normal, or out of time: the failover rules take over from here.
                return abandon(reason.clone());
            }
            waiting(
                Vec::new(),
                SwitchoverWait::PrimaryResuming {
                    primary: primary.to_string(),
                    remaining_ms,
                },
            )
        }
    }
}

/// Is `target` fit to take over now: healthy, in recovery, and at most
/// `switchover_max_lag_bytes` behind the primary's `primary_lsn`? Region failover mode
/// does not matter here: a switchover is an operator's explicit choice.
fn check_target(cx: &Cx, target: &str, primary_lsn: Lsn) -> Result<(), Rejection> {
    let m = cx.view.members.get(target).ok_or(Rejection::NotAMember)?;
    if m.kind == MemberKind::Witness {
        return Err(Rejection::Witness);
    }
    if m.nofailover {
        return Err(Rejection::NoFailover);
    }
    let obs = cx
        .view
        .observations
        .get(target)
        .ok_or(Rejection::NoObservation)?;
    if !cx.is_fresh(obs) {
        return Err(Rejection::StaleObservation {
            age_ms: cx.age_ms(obs),
        });
    }
    if obs.fenced {
        return Err(Rejection::Fenced);
    }
    if !obs.postgres_up {
        return Err(Rejection::PostgresDown);
    }
    if !obs.in_recovery {
        return Err(Rejection::NotInRecovery);
    }
    let lsn = standby_lsn(obs).ok_or(Rejection::NoLsn)?;
    let lag_bytes = primary_lsn.bytes_after(lsn);
    let max_bytes = cx.view.limits.switchover_max_lag_bytes;
    if lag_bytes > max_bytes {
        return Err(Rejection::LagTooHigh {
            lag_bytes,
            max_bytes,
        });
    }
    Ok(())
}

fn abandon(reason: SwitchoverAbort) -> Decision {
    Decision {
        actions: vec![Action::AbandonSwitchover { reason }],
        wait: None,
    }
}

fn aborting(reason: SwitchoverAbort) -> Decision {
    Decision {
        actions: vec![Action::SetSwitchoverPhase {
            phase: SwitchoverPhase::Aborting(reason),
        }],
        wait: None,
    }
}

fn waiting(actions: Vec<Action>, wait: SwitchoverWait) -> Decision {
    Decision {
        actions,
        wait: Some(Wait::Switchover(wait)),
    }
}
