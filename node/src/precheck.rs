//! Checks before a switchover or a manual failover, from the leader's status (its
//! observations): is the candidate a healthy standby, how far behind is it, and what could
//! a promotion lose, and which standby a switchover should go to. Used by meridianctl (an
//! operator hears "no, because..." before anything is written) and by the agent's graceful
//! stop (which hands over to the best standby). The cluster validates again when the
//! command is committed.

use meridian_proto::{MemberStatus, PostgresObservation, StatusResponse};

use crate::raft::intent::MemberKind;
use crate::raft::Intent;

/// How old (on the leader's clock) a member's last report may be for these checks to
/// trust it; generous, since a status answer itself takes a round trip to the leader.
pub const STALE_AFTER_MS: i64 = 3_000;

fn pg_of(m: &MemberStatus) -> Option<&PostgresObservation> {
    m.observation.as_ref().and_then(|o| o.postgres.as_ref())
}

fn fresh(m: &MemberStatus) -> bool {
    m.observation.is_some() && (0..=STALE_AFTER_MS).contains(&m.observation_age_ms)
}

/// A standby's position: what it received (it replays that before promoting).
fn standby_lsn(pg: &PostgresObservation) -> u64 {
    pg.received_lsn.max(pg.replayed_lsn)
}

/// Why `m` is not a healthy standby right now, if it is not.
pub fn standby_health(m: &MemberStatus) -> Result<&PostgresObservation, String> {
    if !fresh(m) {
        return Err(match m.observation_age_ms {
            a if a < 0 => "its agent has not reported to the leader".to_string(),
            a => format!("its agent last reported {} ms ago", a),
        });
    }
    let pg = pg_of(m).ok_or("it reports no Postgres")?;
    if pg.fenced {
        return Err("its Postgres is fenced".into());
    }
    if !pg.up {
        return Err(if pg.error.is_empty() {
            "its Postgres is down".to_string()
        } else {
            format!("its Postgres is down ({})", pg.error)
        });
    }
    if !pg.in_recovery {
        return Err("its Postgres is not in recovery (it is not a standby)".into());
    }
    Ok(pg)
}

/// Hard checks any promotion target must pass (no flag overrides them).
fn basic<'a>(
    status: &'a StatusResponse,
    intent: &Intent,
    candidate: &str,
) -> Result<&'a MemberStatus, String> {
    let m = intent
        .member(candidate)
        .ok_or_else(|| format!("no member named {candidate:?}"))?;
    if m.kind != MemberKind::Data {
        return Err(format!(
            "{candidate} is a witness and has no Postgres to promote"
        ));
    }
    if intent.primary.as_deref() == Some(candidate) {
        return Err(format!("{candidate} is already the primary"));
    }
    if !status.from_leader {
        return Err("no leader answered, so the candidate's state is unknown; retry when the cluster has a leader".into());
    }
    status
        .members
        .iter()
        .find(|s| s.name == candidate)
        .ok_or_else(|| format!("the leader reports nothing about {candidate}"))
}

/// A manual failover's assessment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailoverCheck {
    pub candidate: String,
    pub old_primary: Option<String>,
    pub candidate_lsn: Option<u64>,
    /// The furthest position any other member is known to hold.
    pub best_known_lsn: Option<u64>,
    pub possible_loss_bytes: Option<u64>,
    /// Why promoting now may lose data; empty when it is safe. `--allow-data-loss`
    /// overrides these, nothing overrides an `Err` from [`check_failover`].
    pub unsafe_reasons: Vec<String>,
}

pub fn check_failover(
    status: &StatusResponse,
    intent: &Intent,
    candidate: &str,
) -> Result<FailoverCheck, String> {
    let m = basic(status, intent, candidate)?;
    let pg = standby_health(m).map_err(|why| format!("{candidate} cannot be promoted: {why}"))?;
    let mut check = FailoverCheck {
        candidate: candidate.to_string(),
        old_primary: intent.primary.clone(),
        candidate_lsn: Some(standby_lsn(pg)),
        ..FailoverCheck::default()
    };
    let tags = &intent
        .member(candidate)
        .map(|m| m.tags.clone())
        .unwrap_or_default();
    if tags.nofailover {
        check
            .unsafe_reasons
            .push(format!("{candidate} is tagged nofailover"));
    }
    let primary = intent
        .primary
        .as_deref()
        .and_then(|p| status.members.iter().find(|s| s.name == p));
    let primary_pg = primary.filter(|p| fresh(p)).and_then(pg_of);
    if let Some(pp) = primary_pg.filter(|pp| pp.up && !pp.in_recovery && !pp.fenced) {
        check.unsafe_reasons.push(format!(
            "the primary {} is healthy and taking writes; use `meridianctl switchover` for a change without loss",
            intent.primary.as_deref().unwrap_or("?")
        ));
        if pp.timeline > 0 && pg.timeline > 0 && pg.timeline < pp.timeline {
            check.unsafe_reasons.push(format!(
                "{candidate} is on timeline {}, the primary on {}",
                pg.timeline, pp.timeline
            ));
        }
    }
    // The furthest position anyone reported: the old primary's own when it answers.
    let best = status
        .members
        .iter()
        .filter(|s| s.name != candidate && fresh(s))
        .filter_map(pg_of)
        .filter(|p| p.up)
        .map(|p| {
            if p.in_recovery {
                standby_lsn(p)
            } else {
                p.current_lsn
            }
        })
        .max();
    check.best_known_lsn = best;
    let cand_lsn = standby_lsn(pg);
    if let Some(best) = best.filter(|b| *b > cand_lsn) {
        check.possible_loss_bytes = Some(best - cand_lsn);
        check.unsafe_reasons.push(format!(
            "{candidate} is {} bytes behind the furthest known position",
            best - cand_lsn
        ));
    } else if best.is_some() {
        check.possible_loss_bytes = Some(0);
    }
    let primary_lsn_known =
        primary_pg.is_some_and(|pp| pp.up && !pp.in_recovery && pp.current_lsn > 0);
    if !primary_lsn_known && intent.primary.is_some() {
        // The old primary's last position is unknown: only the sync set guarantees it.
        if intent.sync_set.is_empty() {
            check.unsafe_reasons.push(
                "the primary does not answer and replication was async: its last commits may exist nowhere else".into(),
            );
        } else if !intent.sync_set.names.contains(candidate) {
            check.unsafe_reasons.push(format!(
                "{candidate} is not in the sync set ({}): commits acknowledged by the sync standbys may be missing on it",
                intent.sync_set.names.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    Ok(check)
}

/// Sort key of a switchover target, greatest first: same region as the primary, region
/// priority, position, member priority, then name (alphabetically first wins).
type Preference = (bool, i32, u64, i32, std::cmp::Reverse<String>);

/// The standby a switchover should go to: a healthy data standby, preferring the primary's
/// region, then region priority, then position, then member priority, then name.
pub fn switchover_candidate(
    status: &StatusResponse,
    intent: &Intent,
    requested: Option<&str>,
) -> Result<String, String> {
    let primary = intent
        .primary
        .clone()
        .ok_or("no primary is recorded; there is nothing to switch over from")?;
    if let Some(c) = requested {
        let m = basic(status, intent, c)?;
        if intent.member(c).is_some_and(|m| m.tags.nofailover) {
            return Err(format!("{c} is tagged nofailover"));
        }
        standby_health(m).map_err(|why| format!("{c} cannot take over: {why}"))?;
        return Ok(c.to_string());
    }
    if !status.from_leader {
        return Err("no leader answered, so no candidate can be chosen; retry when the cluster has a leader".into());
    }
    let primary_region = intent.member(&primary).map(|m| m.region.clone());
    let mut passed_over = Vec::new();
    let mut best: Option<(Preference, String)> = None;
    for m in intent.members.values() {
        if m.kind != MemberKind::Data || m.name == primary {
            continue;
        }
        if m.tags.nofailover {
            passed_over.push(format!("{}: tagged nofailover", m.name));
            continue;
        }
        let Some(s) = status.members.iter().find(|s| s.name == m.name) else {
            continue;
        };
        match standby_health(s) {
            Ok(pg) => {
                let key = (
                    primary_region.as_deref() == Some(m.region.as_str()),
                    intent.policy.region(&m.region).priority,
                    standby_lsn(pg),
                    m.tags.priority,
                    std::cmp::Reverse(m.name.clone()),
                );
                if best.as_ref().is_none_or(|(k, _)| key > *k) {
                    best = Some((key, m.name.clone()));
                }
            }
            Err(why) => passed_over.push(format!("{}: {why}", m.name)),
        }
    }
    best.map(|(_, n)| n).ok_or_else(|| {
        if passed_over.is_empty() {
            "no standby to switch over to".to_string()
        } else {
            format!(
                "no healthy standby to switch over to ({})",
                passed_over.join("; ")
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::four_member_intent;
    use meridian_proto::Observation;

    fn intent() -> Intent {
        four_member_intent()
    }

    fn member(name: &str, pg: Option<PostgresObservation>) -> MemberStatus {
        MemberStatus {
            name: name.into(),
            observation: Some(Observation {
                postgres: pg,
                ..Observation::default()
            }),
            observation_age_ms: 100,
            ..MemberStatus::default()
        }
    }

    fn standby(lsn: u64) -> Option<PostgresObservation> {
        Some(PostgresObservation {
            up: true,
            in_recovery: true,
            timeline: 1,
            received_lsn: lsn,
            replayed_lsn: lsn,
            ..PostgresObservation::default()
        })
    }

    fn status(primary_up: bool) -> StatusResponse {
        StatusResponse {
            from_leader: true,
            members: vec![
                member(
                    "a1",
                    Some(PostgresObservation {
                        up: primary_up,
                        timeline: 1,
                        current_lsn: if primary_up { 1000 } else { 0 },
                        ..PostgresObservation::default()
                    }),
                ),
                member("a2", standby(1000)),
                member("b1", standby(900)),
                member("w1", None),
            ],
            ..StatusResponse::default()
        }
    }

    #[test]
    fn ineligible_candidates_are_refused_outright() {
        let (s, i) = (status(false), intent());
        assert!(check_failover(&s, &i, "zz")
            .unwrap_err()
            .contains("no member named"));
        assert!(check_failover(&s, &i, "w1")
            .unwrap_err()
            .contains("witness"));
        assert!(check_failover(&s, &i, "a1")
            .unwrap_err()
            .contains("already the primary"));
        let mut down = s.clone();
        down.members[1]
            .observation
            .as_mut()
            .unwrap()
            .postgres
            .as_mut()
            .unwrap()
            .up = false;
        assert!(check_failover(&down, &i, "a2")
            .unwrap_err()
            .contains("Postgres is down"));
        let mut stale = s.clone();
        stale.members[1].observation_age_ms = 60_000;
        assert!(check_failover(&stale, &i, "a2")
            .unwrap_err()
            .contains("60000 ms ago"));
        let mut follower = s;
        follower.from_leader = false;
        assert!(check_failover(&follower, &i, "a2")
            .unwrap_err()
            .contains("no leader"));
    }

    #[test]
    fn a_caught_up_sync_standby_is_safe_and_a_lagging_one_is_not() {
        let mut i = intent();
        i.sync_set.names.insert("a2".into());
        i.sync_set.k = 1;
        let s = status(false);
        let c = check_failover(&s, &i, "a2").unwrap();
        assert!(c.unsafe_reasons.is_empty(), "{c:?}");
        assert_eq!(c.possible_loss_bytes, Some(0));
        let c = check_failover(&s, &i, "b1").unwrap();
        assert_eq!(c.possible_loss_bytes, Some(100));
        assert!(
            c.unsafe_reasons
                .iter()
                .any(|r| r.contains("100 bytes behind")),
            "{c:?}"
        );
        assert!(
            c.unsafe_reasons
                .iter()
                .any(|r| r.contains("not in the sync set")),
            "{c:?}"
        );
        // Async replication with the primary gone: nobody knows what it had.
        let c = check_failover(&s, &intent(), "a2").unwrap();
        assert!(
            c.unsafe_reasons.iter().any(|r| r.contains("async")),
            "{c:?}"
        );
        // A healthy primary: failover is the wrong tool.
        let c = check_failover(&status(true), &i, "a2").unwrap();
        assert!(
            c.unsafe_reasons.iter().any(|r| r.contains("switchover")),
            "{c:?}"
        );
    }

    #[test]
    fn switchover_picks_the_best_healthy_standby() {
        let (s, mut i) = (status(true), intent());
        assert_eq!(switchover_candidate(&s, &i, None).unwrap(), "a2");
        i.members.get_mut("a2").unwrap().tags.nofailover = true;
        assert_eq!(switchover_candidate(&s, &i, None).unwrap(), "b1");
        assert!(switchover_candidate(&s, &i, Some("a2"))
            .unwrap_err()
            .contains("nofailover"));
        assert!(switchover_candidate(&s, &i, Some("w1"))
            .unwrap_err()
            .contains("witness"));
        let mut none = s.clone();
        none.members[2].observation = None;
        none.members[2].observation_age_ms = -1;
        let e = switchover_candidate(&none, &i, None).unwrap_err();
        assert!(
            e.contains("a2: tagged nofailover") && e.contains("b1: its agent has not reported"),
            "{e}"
        );
        i.primary = None;
        assert!(switchover_candidate(&s, &i, None)
            .unwrap_err()
            .contains("no primary"));
    }
}
