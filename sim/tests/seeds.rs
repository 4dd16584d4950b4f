//! The simulation campaign of `cargo test`: many seeds under the real rules, each mutant
//! caught within a bounded number of seeds, exact replay, and the open findings of
//! `sim/FINDINGS.md` as ignored regression tests.
//!
//! `MERIDIAN_SIM_SEED=N cargo test -p meridian-sim` replays seed N alone and prints its
//! schedule and trace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use meridian_core::mutants::{self, Mutation};
use meridian_sim::{run, seed_from_env, Invariant, Outcome, Scenario};

/// Seeds of the campaign (the brief: at least 10,000 in under 2 minutes on 2 cores).
const CAMPAIGN_SEEDS: u64 = 10_000;
/// Campaign seeds that fail on today's rules, each an open finding of `sim/FINDINGS.md`
/// with its own ignored regression test below. Reported, not asserted. (None since F2 and
/// F7b were fixed by the final-position rule.)
const KNOWN_OPEN: &[u64] = &[];
/// Every mutant must be caught within this many seeds.
const MUTANT_BOUND: u64 = 2_000;

/// Runs `count` seeds from `from` on every core with `mutation` active; stops early once
/// `stop` says so. Returns the outcomes in seed order.
fn campaign(
    from: u64,
    count: u64,
    mutation: Option<Mutation>,
    profile: fn(u64) -> Scenario,
    stop: fn(&Outcome) -> bool,
) -> Vec<Outcome> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = AtomicU64::new(from);
    let stopped = AtomicU64::new(u64::MAX);
    let out = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                mutants::set(mutation);
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= from + count || seed > stopped.load(Ordering::Relaxed) {
                        break;
                    }
                    let o = run(&profile(seed), false);
                    if stop(&o) {
                        stopped.fetch_min(seed, Ordering::Relaxed);
                    }
                    out.lock().unwrap_or_else(|e| e.into_inner()).push(o);
                }
                mutants::set(None);
            });
        }
    });
    let mut v = out.into_inner().unwrap_or_else(|e| e.into_inner());
    v.sort_by_key(|o| o.seed);
    v
}

fn replay_and_print(seed: u64) -> Outcome {
    let sc = Scenario::campaign(seed);
    println!("{sc}");
    let out = run(&sc, true);
    for line in &out.trace {
        println!("{line}");
    }
    out
}

fn describe_failures(outcomes: &[Outcome]) -> String {
    outcomes
        .iter()
        .filter(|o| !o.ok())
        .take(10)
        .map(|o| {
            format!(
                "seed {} (replay: MERIDIAN_SIM_SEED={} cargo test -p meridian-sim -- --nocapture):\n{}\n  {}",
                o.seed,
                o.seed,
                Scenario::campaign(o.seed),
                o.violations
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join("\n  ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn ten_thousand_seeds_keep_every_invariant() {
    if let Some(seed) = seed_from_env() {
        let out = replay_and_print(seed);
        assert!(out.ok(), "seed {seed}: {:?}", out.violations);
        return;
    }
    let started = std::time::Instant::now();
    let outcomes = campaign(0, CAMPAIGN_SEEDS, None, Scenario::campaign, |_| false);
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !o.ok() && !KNOWN_OPEN.contains(&o.seed))
        .collect();
    for o in outcomes.iter().filter(|o| KNOWN_OPEN.contains(&o.seed)) {
        println!("known open finding, seed {}: ok = {}", o.seed, o.ok());
    }
    let acked: usize = outcomes.iter().map(|o| o.acked).sum();
    let promotions: u64 = outcomes.iter().map(|o| o.failovers).sum();
    println!(
        "{} seeds in {:.1} s: {} acknowledged commits, {} promotions, {} failing",
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        acked,
        promotions,
        failed.len()
    );
    assert_eq!(outcomes.len() as u64, CAMPAIGN_SEEDS);
    // The campaign must exercise failovers, or it could not fail.
    assert!(
        promotions > CAMPAIGN_SEEDS / 20,
        "only {promotions} promotions"
    );
    let unexpected: Vec<Outcome> = failed.into_iter().cloned().collect();
    assert!(unexpected.is_empty(), "{}", describe_failures(&unexpected));
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 36, 1_000] {
        let a = run(&Scenario::generate(seed), true);
        let b = run(&Scenario::generate(seed), true);
        assert_eq!(a.trace, b.trace, "seed {seed}");
        assert_eq!(a.violations, b.violations, "seed {seed}");
        assert_eq!(a.acked, b.acked, "seed {seed}");
        assert!(!a.trace.is_empty());
    }
}

/// Seeds until the first one that violates `invariant` with `mutation` active.
fn first_catch(mutation: Mutation, invariant: Invariant) -> Option<u64> {
    let outcomes = campaign(0, MUTANT_BOUND, Some(mutation), Scenario::campaign, |o| {
        !o.ok()
    });
    outcomes
        .iter()
        .find(|o| o.violations.iter().any(|v| v.invariant == invariant))
        .map(|o| o.seed)
}

#[test]
fn mutant_promote_without_the_sync_quorum_is_caught() {
    let caught = first_catch(
        Mutation::PromoteWithoutSyncQuorum,
        Invariant::NoAcknowledgedLoss,
    );
    println!("caught at seed {caught:?}");
    assert!(caught.is_some(), "not caught within {MUTANT_BOUND} seeds");
}

#[test]
fn mutant_fence_after_the_lease_is_caught() {
    let caught = first_catch(Mutation::FenceAfterLease, Invariant::OneWriter);
    println!("caught at seed {caught:?}");
    assert!(caught.is_some(), "not caught within {MUTANT_BOUND} seeds");
}

/// Not caught in 2,000 seeds (sim/FINDINGS.md, "Mutant 3"): the fence deadline already
/// keeps an old primary from writing by the time any voter could grant it wrongly, in every
/// fault class the simulation models so far.
#[test]
#[ignore = "mutant 3 survives the modelled fault classes (sim/FINDINGS.md)"]
fn mutant_grant_without_the_generation_check_is_caught() {
    let caught = first_catch(Mutation::GrantWithoutGenerationCheck, Invariant::OneWriter);
    println!("caught at seed {caught:?}");
    assert!(caught.is_some(), "not caught within {MUTANT_BOUND} seeds");
}

#[test]
fn mutant_gate_ignoring_the_lease_is_caught() {
    let caught = first_catch(Mutation::GateIgnoresLease, Invariant::OneWriter);
    println!("caught at seed {caught:?}");
    assert!(caught.is_some(), "not caught within {MUTANT_BOUND} seeds");
}

/// F1 (sim/FINDINGS.md, fixed by the lease gate): a whole-host freeze of the primary under
/// an async policy; after SIGCONT its Postgres acknowledged commits before its agent
/// fenced it.
#[test]
fn f1_a_frozen_async_primary_acknowledges_nothing_after_a_failover() {
    for seed in [36, 317, 652] {
        let out = run(&Scenario::generate(seed), false);
        assert!(out.ok(), "seed {seed}: {:?}", out.violations);
    }
}

/// F3b (sim/FINDINGS.md, fixed by `resume_pending`): a primary resumed in place reported
/// "fenced and down" in the new generation while its resume was under way; the leader
/// promoted another member on that report while the resumed one acknowledged commits.
/// 385 is the wedge the first fix made (a resumed primary fenced again was never resumed
/// anew).
#[test]
fn f3b_a_primary_resuming_in_place_is_not_replaced_on_its_own_fence_report() {
    for seed in [3806, 9904, 385] {
        let out = run(&Scenario::campaign(seed), false);
        assert!(out.ok(), "seed {seed}: {:?}", out.violations);
    }
}

/// F2 (sim/FINDINGS.md): a standby restarted with a stale intent follows the frozen old
/// primary and, after its SIGCONT, confirms its waiting commits. Fixed with F7b: its
/// position counts only from a report made once it could confirm nothing more.
#[test]
fn f2_a_restarted_standby_does_not_confirm_a_deposed_primarys_commits() {
    let out = run(&Scenario::campaign(3254), false);
    assert!(out.ok(), "seed 3254: {:?}", out.violations);
}

/// F7 (sim/FINDINGS.md): sync standbys of a thawed primary confirmed its waiting commits
/// after a majority broke its lease; 380 is the wedge of the first fix.
#[test]
fn f7_a_standby_that_broke_the_lease_confirms_nothing_more() {
    for seed in [13361, 26564, 380] {
        let out = run(&Scenario::campaign(seed), false);
        assert!(out.ok(), "seed {seed}: {:?}", out.violations);
    }
}

/// F7b (sim/FINDINGS.md): a sync standby's report made while it could still confirm the
/// old primary's WAL passed for its final position: one whose agent was paused (28417),
/// one that had not broken the lease (11224), one whose report of a fenced primary's
/// pause arrived late (20066). Fixed: only a report made after its receiver went off in
/// the round the promotion relies on, or after the leader's stop token, counts.
#[test]
fn f7b_only_a_final_position_of_a_sync_standby_counts() {
    for seed in [28417, 11224, 20066] {
        let out = run(&Scenario::campaign(seed), false);
        assert!(out.ok(), "seed {seed}: {:?}", out.violations);
    }
}

/// F8 (sim/FINDINGS.md): the record shrank on a primary's report made just before it
/// applied a wider target, while the member only the wider target named confirmed its
/// commits alone. Fixed by the report naming the target it applied (`sync_target_seq`).
#[test]
fn f8_the_sync_record_shrinks_only_on_a_report_of_the_newest_target() {
    let out = run(&Scenario::campaign(29193), false);
    assert!(out.ok(), "seed 29193: {:?}", out.violations);
}

/// F5 (sim/FINDINGS.md): `preferred` emptied the sync set while the in-region standby was
/// cut off, the primary acknowledged alone, and a standby without those commits was
/// promoted automatically under the default policy (the flapping loss of the chaos
/// campaign). Fixed by the degraded record (`Intent::sync_degraded`).
#[test]
fn f5_a_primary_that_acknowledged_alone_is_not_replaced_automatically() {
    let out = run(&Scenario::campaign(8500), false);
    assert!(out.ok(), "seed 8500: {:?}", out.violations);
}

/// F6 (sim/FINDINGS.md): the recorded set shrank from ANY 1 (e2, w1) to ANY 1 (e2) while e2
/// was down; w1 had acknowledged commits alone, and e2 was promoted without them. The
/// record now shrinks only once k of the new set hold everything the primary wrote.
#[test]
fn f6_a_shrinking_sync_record_does_not_forget_who_acknowledged() {
    let out = run(&Scenario::campaign(280), false);
    assert!(out.ok(), "seed 280: {:?}", out.violations);
}

/// F3 (fixed in `decide::failover::primary_state`): a fence report from before the
/// generation of a resume in place no longer justifies a promotion.
#[test]
fn f3_a_stale_fence_report_does_not_replace_a_resumed_primary() {
    let out = run(&Scenario::campaign(9088), false);
    assert!(out.ok(), "seed 9088: {:?}", out.violations);
}

/// #12 availability: a partial partition in which the primary still reaches every member
/// but its only sync standby reaches nobody else (so no Raft leader, when the leader is not
/// the primary). The standby used to disconnect its WAL receiver once no leader accepted
/// its reports, and the primary's commits waited on it for the whole partition. Its WAL
/// receiver stays on now: the promotion rule counts only final positions, so a standby
/// that keeps confirming cannot make a promotion lose a commit.
#[test]
fn a_sync_standby_cut_off_from_the_leader_keeps_the_primary_writable() {
    use meridian_core::policy::{RegionPolicy, SyncMode};
    use meridian_sim::scenario::timing::CONVERGE_MS;
    use meridian_sim::{Fault, FaultKind, Topology};
    const CUT_MS: u64 = 8_000;
    let mut leader_elsewhere = 0;
    for seed in (0..400)
        .filter(|s| Scenario::generate(*s).topology == Topology::TwoByTwoPlusWitness)
        .take(12)
    {
        let mut sc = Scenario::generate(seed);
        // e1 e2 (east, sync) w1 w2 (west, async) x1: the sync set is ANY 1 (e2).
        sc.policy.regions.clear();
        for (region, mode) in [("east", SyncMode::Sync), ("west", SyncMode::Async)] {
            sc.policy.regions.insert(
                region.to_string(),
                RegionPolicy {
                    mode,
                    ..RegionPolicy::default()
                },
            );
        }
        sc.policy.async_failover = false;
        sc.zero_loss = false;
        sc.loss_permille = 0;
        let links = [2, 3, 4].iter().flat_map(|o| [(1, *o), (*o, 1)]).collect();
        sc.faults = vec![Fault {
            start_ms: 3_000,
            duration_ms: CUT_MS,
            kind: FaultKind::CutLinks { links },
        }];
        sc.heal_ms = 3_000 + CUT_MS;
        sc.end_ms = sc.heal_ms + CONVERGE_MS;
        let out = run(&sc, true);
        assert!(out.ok(), "seed {seed}: {:?}", out.violations);
        // Who led the Raft group when the cut began.
        let leader = out
            .trace
            .iter()
            .rev()
            .filter_map(|l| {
                let (at, rest) = l.trim_start().split_once(" ms  ")?;
                let (who, what) = rest.split_once(": ")?;
                (at.parse::<u64>().ok()? < 3_000 && what.starts_with("elected leader"))
                    .then(|| who.to_string())
            })
            .next();
        if leader.as_deref().is_some_and(|l| l != "e1") {
            leader_elsewhere += 1;
        }
        assert!(
            out.longest_write_gap_ms < 3_000,
            "seed {seed}: no commit acknowledged for {} ms while the primary reached every \
             member (Raft leader at the cut: {leader:?})\n{}",
            out.longest_write_gap_ms,
            out.trace.join("\n")
        );
    }
    // The case that matters must have happened, or the test could not fail.
    assert!(
        leader_elsewhere > 0,
        "the Raft leader was the primary in every run"
    );
}
