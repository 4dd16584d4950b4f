//! The lease arithmetic (DESIGN §3), pure: what a voter answers to a renewal or to a break
//! request ([`VoterLease`]), when the primary's lease is valid and when it must fence
//! ([`fence_deadline_ms`], [`lease_valid`]), when the lease gate may release commits
//! ([`gate_may_confirm`]), the configured margin between the two
//! ([`check_fence_margin`]), majority counting ([`majority`], [`is_majority`]) and when a
//! membership change may follow the last ([`membership_change_may_proceed`]).
//!
//! Every instant is a millisecond count on the caller's own monotonic clock: the clocks of
//! different members are never compared, each counts its own intervals. The runtime
//! (`node/src/agent/lease.rs`) owns the RPCs, the durable break file and the real clock;
//! the simulation drives the same functions with drifting simulated clocks.

use std::fmt;

use crate::intent::{BreakRound, Intent};
use crate::types::Generation;

/// Majority of `n` voters.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// Whether `granted` answers out of `voters` form a majority.
pub fn is_majority(granted: usize, voters: usize) -> bool {
    granted >= majority(voters)
}

/// The primary's fence deadline: the send time of its last renewal a majority granted (or,
/// before it has one, when it saw itself named primary) plus `fence_after_ms`. Past it the
/// primary's Postgres must not acknowledge a commit. Voters grant `lease_ttl_ms` from when
/// they *received* the renewal, later than it was sent, so the deadline comes first on any
/// clock that drifts less than the configured margin ([`check_fence_margin`]).
pub fn fence_deadline_ms(last_ok_sent_ms: u64, fence_after_ms: u64, lease_ttl_ms: u64) -> u64 {
    if crate::mutant!(FenceAfterLease) {
        // Mutant: fence once the voters' grants could have run out, i.e. too late.
        return last_ok_sent_ms + lease_ttl_ms + lease_ttl_ms / 2;
    }
    let _ = lease_ttl_ms;
    last_ok_sent_ms + fence_after_ms
}

/// Whether the primary holds the lease at `now_ms`: its last counted renewal was sent
/// before the fence deadline.
pub fn lease_valid(
    last_ok_sent_ms: Option<u64>,
    now_ms: u64,
    fence_after_ms: u64,
    lease_ttl_ms: u64,
) -> bool {
    last_ok_sent_ms.is_some_and(|at| now_ms < fence_deadline_ms(at, fence_after_ms, lease_ttl_ms))
}

/// Whether the lease gate may confirm WAL now, releasing the commits that wait on it (the
/// primary's commits wait on the gate when no sync standby gates them): only while this
/// member is named primary and holds the lease at `now_ms`, read when the answer is given.
/// A host frozen past its lease therefore releases nothing on thaw, whatever runs first.
pub fn gate_may_confirm(
    named_primary: bool,
    last_ok_sent_ms: Option<u64>,
    now_ms: u64,
    fence_after_ms: u64,
    lease_ttl_ms: u64,
) -> bool {
    if crate::mutant!(GateIgnoresLease) {
        // Mutant: the gate confirms whatever the lease says (no gate at all).
        return true;
    }
    named_primary && lease_valid(last_ok_sent_ms, now_ms, fence_after_ms, lease_ttl_ms)
}

/// The newest send time of a counted renewal, per generation: renewals may complete out of
/// order, and a renewal of another generation replaces the record.
pub fn newest_renewal(
    current: Option<(u64, Generation)>,
    sent_at_ms: u64,
    generation: Generation,
) -> (u64, Generation) {
    match current {
        Some((at, gen)) if gen == generation && at >= sent_at_ms => (at, gen),
        _ => (sent_at_ms, generation),
    }
}

/// Why `fence_after` and `lease_ttl` do not fit together.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FenceMarginError {
    #[error("fence_after ({fence_after_ms} ms) must be below lease_ttl ({lease_ttl_ms} ms): an isolated primary has to fence itself before its lease can expire")]
    NotBelowTtl {
        fence_after_ms: u64,
        lease_ttl_ms: u64,
    },
    #[error("fence_after ({fence_after_ms} ms) leaves less than 10% of lease_ttl ({lease_ttl_ms} ms) for clock-rate drift and the fence itself")]
    NoDriftMargin {
        fence_after_ms: u64,
        lease_ttl_ms: u64,
    },
}

/// The drift margin the configuration must leave between `fence_after` and `lease_ttl`
/// (10 % of `lease_ttl`): relative clock-rate drift between two members, plus the time
/// the fence itself takes, must fit in it.
pub fn drift_margin_ms(lease_ttl_ms: u64) -> u64 {
    lease_ttl_ms / 10
}

/// Checks the rule the configuration enforces on `timing.fence_after`.
pub fn check_fence_margin(fence_after_ms: u64, lease_ttl_ms: u64) -> Result<(), FenceMarginError> {
    if fence_after_ms >= lease_ttl_ms {
        return Err(FenceMarginError::NotBelowTtl {
            fence_after_ms,
            lease_ttl_ms,
        });
    }
    if lease_ttl_ms - fence_after_ms < drift_margin_ms(lease_ttl_ms) {
        return Err(FenceMarginError::NoDriftMargin {
            fence_after_ms,
            lease_ttl_ms,
        });
    }
    Ok(())
}

/// Why a membership change has to wait.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipWait {
    #[error("the primary {primary} has not reported which members it counts its lease over; a membership change waits until it has")]
    PrimaryNotHeardFrom { primary: String },
    #[error("the primary {primary} still counts its lease over {} while the cluster has {}; a membership change waits until the primary has applied the last one", .counts_over.join(", "), .current.join(", "))]
    PrimaryBehind {
        primary: String,
        counts_over: Vec<String>,
        current: Vec<String>,
    },
}

/// Whether the next membership change may be proposed now.
///
/// The primary counts its lease majority over the members it knows of, and the leader
/// counts a break over the members it knows of. Two member sets one change apart (one
/// member added or removed) always have intersecting majorities, so whatever the primary
/// holds and whatever the leader broke share a voter; two changes apart they need not (a
/// primary counting 2 of {a, b, c} and a break by c, d, e of {a, b, c, d, e}). So a change
/// is proposed only once the primary reported counting over the current set, which keeps
/// the primary at most one change behind the leader. No primary named: no lease to keep.
/// `current` and `reported` are sorted member names.
pub fn membership_change_may_proceed(
    primary: Option<&str>,
    current: &[String],
    reported: Option<&[String]>,
) -> Result<(), MembershipWait> {
    let Some(primary) = primary else {
        return Ok(());
    };
    match reported {
        None => Err(MembershipWait::PrimaryNotHeardFrom {
            primary: primary.to_string(),
        }),
        Some(r) if r == current => Ok(()),
        Some(r) => Err(MembershipWait::PrimaryBehind {
            primary: primary.to_string(),
            counts_over: r.to_vec(),
            current: current.to_vec(),
        }),
    }
}

/// Why a voter refused a renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RenewRefusal {
    /// The lease of that generation was broken here.
    Broken {
        generation: Generation,
        round: BreakRound,
    },
    /// The voter's applied intent names another primary (or another generation).
    NotPrimary {
        member: String,
        generation: Generation,
        intent_primary: Option<String>,
        intent_generation: Generation,
    },
    /// A newly promoted primary: the previous generation's grant may still run here.
    PreviousMayRun { remaining_ms: u64 },
}

impl fmt::Display for RenewRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RenewRefusal::Broken { generation, round } => write!(
                f,
                "the lease of generation {generation} was broken here (round {round})"
            ),
            RenewRefusal::NotPrimary {
                member,
                generation,
                intent_primary,
                intent_generation,
            } => write!(
                f,
                "{member} is not the primary of generation {generation} here (the intent has {} at {intent_generation})",
                intent_primary.as_deref().unwrap_or("no primary")
            ),
            RenewRefusal::PreviousMayRun { remaining_ms } => write!(
                f,
                "the previous primary's lease may run {remaining_ms} ms more here"
            ),
        }
    }
}

/// What a voter answers to a request to break a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BreakDecision {
    /// Broken here before, nothing new to record.
    AlreadyBroken,
    /// Break it (or move a standing break to a newer round): the runtime records
    /// `(generation, round)` durably, then calls [`VoterLease::record_break`], then answers
    /// broken. A restarted voter must not grant it again.
    Record {
        generation: Generation,
        round: BreakRound,
    },
    /// This voter's grant still runs for that long.
    Held { remaining_ms: u64 },
    /// The voter cannot answer (its intent names another primary for that generation, or
    /// the round was released already).
    Refused(String),
}

/// The voter side of the lease: the grants this member gave, on its own monotonic clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoterLease {
    pub ttl_ms: u64,
    /// The generation the fields below are about (0: none seen yet).
    pub generation: Generation,
    /// The last grant in `generation`, or when this voter started counting it (it learned
    /// of the generation, or it started: a grant may have been given before a restart).
    pub since_ms: u64,
    /// Whether this voter granted anything in `generation` since it started counting.
    pub granted: bool,
    /// Until when a grant of an earlier generation may still run here.
    pub previous_until_ms: u64,
    /// Every generation up to this one is broken here, by the round named (or a later
    /// one) — unless the applied intent released the breaks of that round.
    pub broken_upto: Generation,
    pub broken_round: BreakRound,
    /// The highest WAL position `generation`'s primary reported here, and the previous
    /// generation's.
    pub primary_lsn: u64,
    pub previous_primary_lsn: u64,
}

impl VoterLease {
    /// A voter starting at `now_ms`, with the break it recorded durably before (if any).
    /// It counts as having just granted: a grant given before a restart may still run.
    pub fn new(ttl_ms: u64, now_ms: u64, broken: Option<(Generation, BreakRound)>) -> Self {
        let (broken_upto, broken_round) = broken.unwrap_or_default();
        VoterLease {
            ttl_ms,
            generation: Generation(0),
            since_ms: now_ms,
            granted: false,
            previous_until_ms: now_ms + ttl_ms,
            broken_upto,
            broken_round,
            primary_lsn: 0,
            previous_primary_lsn: 0,
        }
    }

    /// Whether `generation`'s lease is broken here: an older generation always is once a
    /// newer one was broken; the newest broken one until the intent releases its round.
    pub fn is_broken(&self, generation: Generation, intent: &Intent) -> bool {
        generation < self.broken_upto
            || (generation == self.broken_upto
                && generation > Generation(0)
                && !intent.lease_break_released(generation, self.broken_round))
    }

    /// The standing break here, if any (for status and metrics).
    pub fn standing_break(&self, intent: &Intent) -> Option<(Generation, BreakRound)> {
        self.is_broken(self.broken_upto, intent)
            .then_some((self.broken_upto, self.broken_round))
    }

    /// Follows the applied intent: a newer generation starts a new count, and whatever was
    /// granted in the older one may run until its grant's end.
    pub fn follow(&mut self, intent: &Intent, now_ms: u64) {
        if intent.generation > self.generation {
            self.previous_until_ms = self.previous_until_ms.max(self.since_ms + self.ttl_ms);
            self.previous_primary_lsn = if intent.generation.0 == self.generation.0 + 1 {
                self.primary_lsn
            } else {
                0
            };
            self.primary_lsn = 0;
            self.generation = intent.generation;
            self.since_ms = now_ms;
            self.granted = false;
        }
    }

    /// A renewal from `member` for `generation`, received at `now_ms`, with the primary's
    /// WAL position (0: unknown). Granted: the grant runs `ttl_ms` from `now_ms` here.
    pub fn renew(
        &mut self,
        member: &str,
        generation: Generation,
        wal_lsn: u64,
        intent: &Intent,
        now_ms: u64,
    ) -> Result<(), RenewRefusal> {
        self.follow(intent, now_ms);
        let skip_generation = crate::mutant!(GrantWithoutGenerationCheck);
        if !skip_generation && self.is_broken(generation, intent) {
            return Err(RenewRefusal::Broken {
                generation,
                round: self.broken_round,
            });
        }
        let generation_differs = !skip_generation && intent.generation != generation;
        if generation_differs || intent.primary.as_deref() != Some(member) {
            return Err(RenewRefusal::NotPrimary {
                member: member.to_string(),
                generation,
                intent_primary: intent.primary.clone(),
                intent_generation: intent.generation,
            });
        }
        if !self.granted && !intent.lease_released && now_ms < self.previous_until_ms {
            return Err(RenewRefusal::PreviousMayRun {
                remaining_ms: self.previous_until_ms - now_ms,
            });
        }
        self.since_ms = now_ms;
        self.granted = true;
        self.primary_lsn = self.primary_lsn.max(wal_lsn);
        Ok(())
    }

    /// The highest WAL position the primary of `generation` reported here (0: none).
    pub fn primary_lsn(&self, generation: Generation) -> u64 {
        if generation == self.generation {
            self.primary_lsn
        } else if generation.0 + 1 == self.generation.0 {
            self.previous_primary_lsn
        } else {
            0
        }
    }

    /// The leader asks to break `member`'s lease of `generation` in `round`.
    pub fn decide_break(
        &mut self,
        member: &str,
        generation: Generation,
        round: BreakRound,
        intent: &Intent,
        now_ms: u64,
    ) -> BreakDecision {
        self.follow(intent, now_ms);
        if generation < self.broken_upto {
            return BreakDecision::AlreadyBroken;
        }
        if self.is_broken(generation, intent) {
            if round > self.broken_round {
                // Still broken: it now counts until the newer round is released.
                return BreakDecision::Record { generation, round };
            }
            return BreakDecision::AlreadyBroken;
        }
        if intent.lease_break_released(generation, round) {
            return BreakDecision::Refused(format!(
                "break round {round} of generation {generation} was already released"
            ));
        }
        let runs_until_ms = if intent.generation > generation {
            // Over here; a grant given just before this voter applied the newer
            // generation may still run.
            self.previous_until_ms
        } else if intent.generation < generation {
            // Not applied here yet, so never granted here: breaking it only means this
            // voter will refuse it once it applies it.
            now_ms
        } else if intent.primary.as_deref() != Some(member) {
            return BreakDecision::Refused(format!(
                "{member} is not the primary of generation {generation} here (the intent has {})",
                intent.primary.as_deref().unwrap_or("no primary")
            ));
        } else {
            self.since_ms + self.ttl_ms
        };
        if now_ms < runs_until_ms {
            return BreakDecision::Held {
                remaining_ms: runs_until_ms - now_ms,
            };
        }
        BreakDecision::Record { generation, round }
    }

    /// Records a break once it is durable (see [`BreakDecision::Record`]).
    pub fn record_break(&mut self, generation: Generation, round: BreakRound) {
        self.broken_upto = generation;
        self.broken_round = round;
    }
}

/// When a break round did not reach a majority: how long until enough of the answering
/// voters' grants run out for one, given the breakers so far and the remaining grant times
/// of the voters that hold it (None: too few answered to tell).
pub fn majority_runs_out_in_ms(broken: usize, mut held_ms: Vec<u64>, voters: usize) -> Option<u64> {
    let need = majority(voters);
    if broken >= need {
        return None;
    }
    held_ms.sort_unstable();
    need.checked_sub(broken + 1)
        .and_then(|i| held_ms.get(i).copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::LeaseBreakRelease;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Every subset of `set` that is a majority of it.
    fn majorities_of(set: &[String]) -> Vec<std::collections::BTreeSet<String>> {
        let n = set.len();
        (0u32..(1 << n))
            .filter(|mask| is_majority(mask.count_ones() as usize, n))
            .map(|mask| {
                (0..n)
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| set[i].clone())
                    .collect()
            })
            .collect()
    }

    fn all_intersect(a: &[String], b: &[String]) -> bool {
        majorities_of(a)
            .iter()
            .all(|x| majorities_of(b).iter().all(|y| !x.is_disjoint(y)))
    }

    #[test]
    fn majorities_one_change_apart_intersect_and_two_apart_need_not() {
        let three = names(&["a", "b", "c"]);
        let four = names(&["a", "b", "c", "d"]);
        let five = names(&["a", "b", "c", "d", "e"]);
        let two = names(&["a", "b"]);
        assert!(all_intersect(&three, &four), "one member added");
        assert!(all_intersect(&four, &three), "one member removed");
        assert!(all_intersect(&four, &five));
        assert!(all_intersect(&two, &three));
        assert!(!all_intersect(&three, &five), "two members added");
        assert!(!all_intersect(&five, &three), "two members removed");
    }

    #[test]
    fn a_membership_change_waits_for_the_primary_to_count_over_the_current_members() {
        let current = names(&["a", "b", "c", "d"]);
        assert_eq!(membership_change_may_proceed(None, &current, None), Ok(()));
        assert_eq!(
            membership_change_may_proceed(Some("a"), &current, Some(&current)),
            Ok(())
        );
        assert_eq!(
            membership_change_may_proceed(Some("a"), &current, None),
            Err(MembershipWait::PrimaryNotHeardFrom {
                primary: "a".into()
            })
        );
        let behind = names(&["a", "b", "c"]);
        let refusal = membership_change_may_proceed(Some("a"), &current, Some(&behind));
        assert_eq!(
            refusal,
            Err(MembershipWait::PrimaryBehind {
                primary: "a".into(),
                counts_over: behind.clone(),
                current: current.clone(),
            })
        );
        assert_eq!(
            refusal.unwrap_err().to_string(),
            "the primary a still counts its lease over a, b, c while the cluster has a, b, c, d; \
             a membership change waits until the primary has applied the last one"
        );
    }

    const TTL: u64 = 2_000;
    const T0: u64 = 100_000;
    const R1: BreakRound = BreakRound { term: 2, seq: 1 };
    const R2: BreakRound = BreakRound { term: 2, seq: 2 };

    fn released(mut i: Intent, upto: BreakRound) -> Intent {
        i.lease_break_release = Some(LeaseBreakRelease {
            generation: i.generation,
            upto,
        });
        i
    }

    fn intent(primary: &str, generation: u64, released: bool) -> Intent {
        Intent {
            primary: Some(primary.into()),
            generation: Generation(generation),
            lease_released: released,
            ..Intent::default()
        }
    }

    /// A voter that has been running for a while (past the start-up wait).
    fn settled() -> VoterLease {
        let mut v = VoterLease::new(TTL, T0, None);
        v.previous_until_ms = T0;
        v.since_ms = T0 - TTL;
        v
    }

    #[test]
    fn majorities() {
        assert_eq!(majority(1), 1);
        assert_eq!(majority(3), 2);
        assert_eq!(majority(4), 3);
        assert_eq!(majority(5), 3);
        assert!(is_majority(3, 5));
        assert!(!is_majority(2, 4));
    }

    #[test]
    fn the_fence_deadline_counts_fence_after_from_the_send_time() {
        assert_eq!(fence_deadline_ms(1_000, 1_500, 2_000), 2_500);
        assert!(lease_valid(Some(1_000), 2_499, 1_500, 2_000));
        assert!(!lease_valid(Some(1_000), 2_500, 1_500, 2_000));
        assert!(!lease_valid(None, 0, 1_500, 2_000));
    }

    #[test]
    fn the_newest_renewal_wins_per_generation() {
        let g1 = Generation(1);
        assert_eq!(newest_renewal(None, 5, g1), (5, g1));
        assert_eq!(newest_renewal(Some((7, g1)), 5, g1), (7, g1));
        assert_eq!(newest_renewal(Some((7, g1)), 9, g1), (9, g1));
        assert_eq!(
            newest_renewal(Some((7, g1)), 5, Generation(2)),
            (5, Generation(2))
        );
    }

    #[test]
    fn the_fence_margin_needs_a_tenth_of_the_ttl() {
        assert_eq!(check_fence_margin(1_500, 2_000), Ok(()));
        assert_eq!(check_fence_margin(1_800, 2_000), Ok(()));
        assert!(matches!(
            check_fence_margin(1_801, 2_000),
            Err(FenceMarginError::NoDriftMargin { .. })
        ));
        assert!(matches!(
            check_fence_margin(2_000, 2_000),
            Err(FenceMarginError::NotBelowTtl { .. })
        ));
    }

    #[test]
    fn a_voter_grants_only_the_intents_primary_of_that_generation() {
        let mut v = settled();
        let i = intent("a1", 3, false);
        assert_eq!(v.renew("a1", Generation(3), 0, &i, T0), Ok(()));
        let e = v.renew("a2", Generation(3), 0, &i, T0).unwrap_err();
        assert!(e.to_string().contains("not the primary"), "{e}");
        let e = v.renew("a1", Generation(2), 0, &i, T0).unwrap_err();
        assert!(matches!(e, RenewRefusal::NotPrimary { .. }), "{e}");
        // A voter that has not applied the promotion yet refuses too.
        let e = v.renew("a1", Generation(4), 0, &i, T0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a1 is not the primary of generation 4 here (the intent has a1 at 3)"
        );
    }

    #[test]
    fn a_held_lease_is_not_broken_and_a_run_out_one_is_broken_for_good() {
        let mut v = settled();
        let i = intent("a1", 3, false);
        v.renew("a1", Generation(3), 0, &i, T0).unwrap();
        assert_eq!(
            v.decide_break("a1", Generation(3), R1, &i, T0 + 500),
            BreakDecision::Held {
                remaining_ms: 1_500
            }
        );
        // Renewed later: the grant runs from the last renewal.
        v.renew("a1", Generation(3), 0, &i, T0 + 1_000).unwrap();
        assert_eq!(
            v.decide_break("a1", Generation(3), R1, &i, T0 + 2_500),
            BreakDecision::Held { remaining_ms: 500 }
        );
        assert_eq!(
            v.decide_break("a1", Generation(3), R1, &i, T0 + 3_000),
            BreakDecision::Record {
                generation: Generation(3),
                round: R1
            }
        );
        v.record_break(Generation(3), R1);
        // Sticky: the primary cannot renew that generation here any more.
        assert_eq!(
            v.renew("a1", Generation(3), 0, &i, T0 + 3_001),
            Err(RenewRefusal::Broken {
                generation: Generation(3),
                round: R1
            })
        );
        assert_eq!(
            v.decide_break("a1", Generation(3), R1, &i, T0 + 3_002),
            BreakDecision::AlreadyBroken
        );
        // A newer round moves the standing break to it.
        assert_eq!(
            v.decide_break("a1", Generation(3), R2, &i, T0 + 3_003),
            BreakDecision::Record {
                generation: Generation(3),
                round: R2
            }
        );
    }

    #[test]
    fn an_expired_but_unbroken_grant_may_be_renewed() {
        let mut v = settled();
        let i = intent("a1", 3, false);
        v.renew("a1", Generation(3), 0, &i, T0).unwrap();
        assert_eq!(v.renew("a1", Generation(3), 0, &i, T0 + 10_000), Ok(()));
    }

    #[test]
    fn a_new_primary_waits_out_the_old_grant_unless_it_was_released() {
        let mut v = settled();
        let old = intent("a1", 3, false);
        v.renew("a1", Generation(3), 0, &old, T0).unwrap();
        // A forced promotion: the old grant may run until T0 + TTL here.
        let new = intent("a2", 4, false);
        assert_eq!(
            v.renew("a2", Generation(4), 0, &new, T0 + 100),
            Err(RenewRefusal::PreviousMayRun {
                remaining_ms: 1_900
            })
        );
        // The old primary is refused at once in the new generation.
        assert!(v.renew("a1", Generation(3), 0, &new, T0 + 100).is_err());
        assert_eq!(v.renew("a2", Generation(4), 0, &new, T0 + TTL), Ok(()));

        // Released (a majority broke the old lease): granted at once.
        let mut v = settled();
        v.renew("a1", Generation(3), 0, &old, T0).unwrap();
        let released = intent("a2", 4, true);
        assert_eq!(v.renew("a2", Generation(4), 0, &released, T0 + 100), Ok(()));
    }

    #[test]
    fn breaking_an_older_generation_waits_for_its_last_grant() {
        let mut v = settled();
        v.renew("a1", Generation(3), 0, &intent("a1", 3, false), T0)
            .unwrap();
        let newer = intent("a2", 4, false);
        assert_eq!(
            v.decide_break("a1", Generation(3), R1, &newer, T0 + 400),
            BreakDecision::Held {
                remaining_ms: 1_600
            }
        );
        assert_eq!(
            v.decide_break("a1", Generation(3), R1, &newer, T0 + TTL),
            BreakDecision::Record {
                generation: Generation(3),
                round: R1
            }
        );
        v.record_break(Generation(3), R1);
        // A generation this voter has not applied yet was never granted here.
        let lagging = intent("a1", 3, false);
        assert_eq!(
            v.decide_break("a2", Generation(5), R1, &lagging, T0 + TTL),
            BreakDecision::Record {
                generation: Generation(5),
                round: R1
            }
        );
        v.record_break(Generation(5), R1);
        let e = v
            .renew("a2", Generation(5), 0, &intent("a2", 5, true), T0 + TTL)
            .unwrap_err();
        assert!(matches!(e, RenewRefusal::Broken { .. }), "{e}");
    }

    #[test]
    fn voters_keep_the_highest_wal_position_per_generation() {
        let mut v = settled();
        let i3 = intent("a1", 3, false);
        v.renew("a1", Generation(3), 500, &i3, T0).unwrap();
        v.renew("a1", Generation(3), 0, &i3, T0).unwrap();
        assert_eq!(v.primary_lsn(Generation(3)), 500);
        // A refused renewal records nothing.
        assert!(v.renew("a2", Generation(3), 900, &i3, T0).is_err());
        assert_eq!(v.primary_lsn(Generation(3)), 500);
        // The next generation keeps the previous one's for the leader's break round.
        let i4 = intent("a2", 4, true);
        v.renew("a2", Generation(4), 700, &i4, T0).unwrap();
        assert_eq!(v.primary_lsn(Generation(4)), 700);
        assert_eq!(v.primary_lsn(Generation(3)), 500);
        assert_eq!(v.primary_lsn(Generation(2)), 0);
    }

    #[test]
    fn a_restarted_voter_counts_as_having_just_granted() {
        let mut v = VoterLease::new(TTL, T0, None);
        let i = intent("a1", 3, false);
        assert_eq!(
            v.decide_break("a1", Generation(3), R1, &i, T0),
            BreakDecision::Held { remaining_ms: TTL }
        );
        // Nor does it grant a primary whose predecessor it may have granted before.
        assert!(v.renew("a1", Generation(3), 0, &i, T0).is_err());
        assert_eq!(v.renew("a1", Generation(3), 0, &i, T0 + TTL * 2), Ok(()));
        // A break recorded before the restart still stands.
        let mut v = VoterLease::new(TTL, T0, Some((Generation(3), R1)));
        assert_eq!(v.standing_break(&i), Some((Generation(3), R1)));
        assert!(matches!(
            v.renew("a1", Generation(3), 0, &i, T0 + TTL * 3),
            Err(RenewRefusal::Broken { .. })
        ));
    }

    #[test]
    fn a_break_no_promotion_followed_is_released_through_the_intent() {
        let mut v = settled();
        let i = intent("a1", 3, false);
        v.renew("a1", Generation(3), 0, &i, T0).unwrap();
        assert!(matches!(
            v.decide_break("a1", Generation(3), R1, &i, T0 + 3_000),
            BreakDecision::Record { .. }
        ));
        v.record_break(Generation(3), R1);
        assert_eq!(v.standing_break(&i), Some((Generation(3), R1)));
        assert!(v.renew("a1", Generation(3), 0, &i, T0 + 3_100).is_err());
        // The cluster released round R1 (no promotion followed): the primary may renew.
        let i = released(i, R1);
        assert_eq!(v.standing_break(&i), None);
        v.renew("a1", Generation(3), 0, &i, T0 + 3_200).unwrap();
        // A late request of the released round breaks nothing.
        assert!(matches!(
            v.decide_break("a1", Generation(3), R1, &i, T0 + 9_000),
            BreakDecision::Refused(_)
        ));
        // A new round breaks it again once the grant ran out.
        assert!(matches!(
            v.decide_break("a1", Generation(3), R2, &i, T0 + 5_300),
            BreakDecision::Record { .. }
        ));
    }

    #[test]
    fn the_time_until_a_majority_runs_out_is_the_right_order_statistic() {
        // 5 voters, 1 broke, 3 hold for 300/100/200 ms: the second-shortest completes 3.
        assert_eq!(
            majority_runs_out_in_ms(1, vec![300, 100, 200], 5),
            Some(200)
        );
        assert_eq!(majority_runs_out_in_ms(3, vec![100], 5), None);
        assert_eq!(majority_runs_out_in_ms(0, vec![100], 5), None);
    }
}
