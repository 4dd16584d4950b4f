//! The leader loop: on the Raft leader, every `timing.observe_interval`, keep the
//! [`LeaderBookkeeping`] on this agent's monotonic clock, build the [`ClusterView`] from
//! the intent and the observations, run the pure decision core and carry out its Raft
//! actions with `client_write` — after confirming leadership with a bounded
//! `ensure_linearizable` (DESIGN invariant 3), one write at a time, stopping at the first
//! failure. Actions for agents (fence, re-point, rejoin) need no message: each member
//! derives them from the intent it reconciles toward (see `member.rs`);
//! `ApplySyncStandbyNames` becomes the intent's sync target for the current generation.
//! `BreakLease` runs a bounded break round in the background (one at a time, spaced by
//! what the voters said about their grants); its result feeds the next rounds' view.
//!
//! Waits and refusals are logged when they change, not every round.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::join::unix_ms;
use super::Shared;
use crate::decide::{
    cluster_view, decide, observation_from_proto, Action, LeaderBookkeeping, LeaseView, Limits,
    PromoteReason, SwitchoverPhase,
};
use crate::raft::intent::{BreakRound, Command, Intent, Promote, PromotionKind, Response};
use crate::types::Generation;

/// Bound on one Raft write of the leader loop.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Rounds are at least this far apart, however many observations arrive.
const MIN_ROUND_SPACING: Duration = Duration::from_millis(20);
/// Bound on confirming leadership before a write.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// What the leader tracks between rounds.
#[derive(Default)]
struct Tracker {
    /// (term) this member last led in.
    led_term: Option<u64>,
    elected_at: Option<Instant>,
    generation: Option<(Generation, Instant)>,
    switchover: Option<((String, SwitchoverPhase), Instant)>,
    last_wait: Option<String>,
    last_refusal: Option<String>,
    lease_break: Arc<Mutex<LeaseBreak>>,
    /// (target, when this leader committed the switchover's stop-writes phase, in ms of
    /// its monotonic clock): the start of the write pause recorded once the target takes
    /// writes. Only the leader that committed the phase knows it; after a leader change
    /// the pause goes unrecorded (meridianctl then reports what it observed).
    writes_stopped: Option<(String, u64)>,
    /// The scheduled operation this leader is running (one at a time).
    scheduled: Option<tokio::task::JoinHandle<()>>,
}

/// Break rounds for one primary and generation.
#[derive(Default)]
struct LeaseBreak {
    key: Option<(String, Generation)>,
    in_flight: bool,
    /// The last round's result and when it finished.
    last: Option<(super::lease::BreakResult, Instant)>,
    /// No new round before this.
    next_at: Option<Instant>,
    /// This leader's round counter (never reset while it leads, so round ids only grow).
    seq: u64,
    /// The last round: its id and when it started.
    round: Option<(BreakRound, Instant)>,
    /// The newest round since the last release in which any voter broke the lease.
    breaks_since_release: Option<(BreakRound, Instant)>,
    /// The round `last` answered for, and when this leader first saw it broken.
    last_round: Option<BreakRound>,
    broken_since: Option<Instant>,
    /// No re-ask of a broken round before this.
    reask_at: Option<Instant>,
}

/// Spacing of the re-asks of a broken round while sync members' positions are not final.
const REASK_SPACING: Duration = Duration::from_millis(250);

/// How long a break round's majority may justify a promotion, from the round's start.
/// Voters keep their breaks until the cluster releases them through Raft
/// ([`Command::ReleaseLeaseBreaks`]), which this leader commits once a round with breaks
/// is older than this and no promotion followed; log order then decides: a promotion
/// relying on a released round is refused.
fn break_valid(t: &crate::config::TimingConfig) -> Duration {
    (t.lease_ttl * 2).max(Duration::from_secs(2))
}

/// Spacing of break rounds when the voters' answers give no better hint.
const BREAK_RETRY: Duration = Duration::from_millis(100);

/// How long after the stop-writes phase a write pause is still worth recording; past
/// that the switchover was abandoned or the promotion stalled, and the start is dropped.
const WRITE_PAUSE_HORIZON_MS: u64 = 120_000;

pub async fn run(shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(shared.config.timing.observe_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tr = Tracker::default();
    let mut handoff = super::handoff::Handoff::default();
    let mut applied = shared.applied.clone();
    loop {
        // Each tick, and as soon as an observation or a commit arrives, at most one round
        // per MIN_ROUND_SPACING.
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.wake_leader.notified() => {}
            r = applied.changed() => if r.is_err() { ticker.tick().await; },
        }
        tokio::time::sleep(MIN_ROUND_SPACING).await;
        if handoff.step(&shared) {
            continue;
        }
        if !shared.believes_leader() {
            tr.led_term = None;
            continue;
        }
        if let Err(e) = round(&shared, &mut tr).await {
            let msg = format!("{e:#}");
            if tr.last_refusal.as_deref() != Some(msg.as_str()) {
                tracing::warn!("leader: {msg}");
                tr.last_refusal = Some(msg);
            }
        }
    }
}

/// The decision core's bounds from this member's timing config (also shown in
/// `Admin.Status`, so clients judge freshness as the leader does).
pub(crate) fn limits(shared: &Shared) -> Limits {
    let t = &shared.config.timing;
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Limits {
        stale_after_ms: ms((t.observe_interval * 4).max(Duration::from_millis(1000))),
        promote_timeout_ms: ms(t.promote_timeout),
        ..Limits::default()
    }
}

async fn round(shared: &Arc<Shared>, tr: &mut Tracker) -> anyhow::Result<()> {
    let started = Instant::now();
    let term = shared.raft_metrics().current_term;
    if tr.led_term != Some(term) {
        tr.led_term = Some(term);
        tr.elected_at = Some(started);
        tracing::info!(term, "leading: running the decision core");
    }
    // The shared snapshot, not a deep copy: the history alone holds up to 1,000 entries.
    let applied_now = shared.applied();
    let intent = &applied_now.intent;
    if intent.generation == Generation(0) {
        // Bootstrap is the bootstrap member's job.
        return Ok(());
    }
    let elected_at = tr.elected_at.unwrap_or(started);
    if tr.generation.as_ref().map(|g| g.0) != Some(intent.generation) {
        tr.generation = Some((intent.generation, started));
    }
    let generation_seen_at = tr.generation.as_ref().map_or(started, |g| g.1);
    let sw_key = intent
        .pending_switchover
        .as_ref()
        .map(|sw| (sw.to.clone(), sw.phase.clone()));
    match (&sw_key, &tr.switchover) {
        (Some(k), Some((prev, _))) if k == prev => {}
        (Some(k), _) => tr.switchover = Some((k.clone(), started)),
        (None, _) => tr.switchover = None,
    }
    let ms = |at: Instant| shared.ms_since_epoch(at);
    let valid = break_valid(&shared.config.timing);
    let lease = lease_view(tr, intent, &ms, valid);
    let book = LeaderBookkeeping {
        elected_at_ms: ms(elected_at),
        lease,
        generation_seen_at_ms: ms(generation_seen_at),
        switchover_phase_since_ms: tr.switchover.as_ref().map_or(0, |s| ms(s.1)),
    };
    let snapshot = shared.observations.snapshot();
    let observations: BTreeMap<_, _> = snapshot
        .iter()
        .map(|(name, (o, at))| (name.clone(), observation_from_proto(o, ms(*at))))
        .collect();
    // Round trips measured by the current primary's agent (µs on the wire).
    let rtt = intent
        .primary
        .as_deref()
        .and_then(|p| snapshot.get(p))
        .map(|(o, _)| {
            o.rtt_us
                .iter()
                .map(|(n, us)| (n.clone(), us.div_ceil(1000)))
                .collect()
        })
        .unwrap_or_default();
    let view = cluster_view(intent, &book, &observations, rtt, limits(shared));
    let now_ms = ms(Instant::now());
    let decision = decide(&view, now_ms);
    let wait = decision.wait.as_ref().map(|w| w.to_string());
    // Logged when the kind of wait changes, not when only its countdowns move.
    let wait_key = wait.as_ref().map(|w| {
        w.chars()
            .filter(|c| !c.is_ascii_digit())
            .collect::<String>()
    });
    if wait_key != tr.last_wait {
        match &wait {
            Some(w) => tracing::info!("leader waits: {w}"),
            None => tracing::info!("leader: nothing to wait for"),
        }
        tr.last_wait = wait_key;
    }
    for a in &decision.actions {
        if let Action::BreakLease { member, generation } = a {
            start_break_round(shared, tr, intent, member, *generation, valid);
        }
    }
    let usable_round = lease.broken.then(|| current_round(tr)).flatten();
    let mut commands: Vec<Command> = decision
        .actions
        .iter()
        .filter_map(|a| command_for(a, intent, &observations, lease.primary_lsn, usable_round))
        .collect();
    let promoting = commands.iter().any(|c| matches!(c, Command::Promote(_)));
    if !promoting {
        commands.extend(break_releases(tr, intent, term, valid));
    }
    if let Some(cmd) = resume_in_place(&decision, intent, &observations, &view.limits, now_ms) {
        commands.push(cmd);
    }
    if tr
        .writes_stopped
        .as_ref()
        .is_some_and(|(_, since)| now_ms.saturating_sub(*since) > WRITE_PAUSE_HORIZON_MS)
    {
        tr.writes_stopped = None;
    }
    if let Some(cmd) = tr
        .writes_stopped
        .as_ref()
        .and_then(|(to, since)| write_pause(to, *since, intent, &observations))
    {
        commands.push(cmd);
    }
    // A scheduled switchover or restart whose time has come (wall clock: the schedule is
    // a wall-clock time), one at a time, in the background: it waits on other rounds.
    let running = tr.scheduled.as_ref().is_some_and(|t| !t.is_finished());
    if !running {
        if let Some(s) = meridian_core::schedule::due(intent, unix_ms()).first() {
            tr.scheduled = Some(tokio::spawn(super::scheduled::fire(
                shared.clone(),
                (*s).clone(),
            )));
        }
    }
    let mut wrote = false;
    for cmd in commands {
        if !wrote {
            tokio::time::timeout(CONFIRM_TIMEOUT, shared.raft.ensure_linearizable())
                .await
                .context("leadership not confirmed in time")?
                .context("confirming leadership")?;
            wrote = true;
        }
        let what = cmd.to_string();
        let w = tokio::time::timeout(WRITE_TIMEOUT, shared.raft.client_write(cmd.clone()))
            .await
            .context("the write was not committed in time")?
            .context("raft write")?;
        match w.data {
            Response::Applied => {
                tracing::info!(command = %what, "leader committed");
                match &cmd {
                    Command::SetSwitchoverPhase {
                        to,
                        phase: SwitchoverPhase::StoppingWrites,
                    } => tr.writes_stopped = Some((to.clone(), ms(Instant::now()))),
                    Command::RecordWritePause { .. } => tr.writes_stopped = None,
                    _ => {}
                }
                if let Command::Promote(p) = &cmd {
                    match p.kind {
                        PromotionKind::Switchover => shared.metrics.switchovers.inc(),
                        _ => shared.metrics.failovers.inc(),
                    };
                }
            }
            Response::Refused(r) => anyhow::bail!("{what} refused: {r}"),
            other => anyhow::bail!("{what}: unexpected answer {other:?}"),
        };
    }
    tr.last_refusal = None;
    shared
        .metrics
        .decision_latency_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(())
}

/// The last break round's result for the intent's primary and generation (reset when
/// they change).
fn lease_view(
    tr: &Tracker,
    intent: &Intent,
    ms: &dyn Fn(Instant) -> u64,
    valid: Duration,
) -> LeaseView {
    let key = intent.primary.clone().map(|p| (p, intent.generation));
    let mut lb = tr.lease_break.lock().unwrap_or_else(|e| e.into_inner());
    if lb.key != key {
        *lb = LeaseBreak {
            key,
            seq: lb.seq,
            ..LeaseBreak::default()
        };
    }
    let round_usable = lb.round.is_some_and(|(round, started)| {
        started.elapsed() < valid && !intent.lease_break_released(intent.generation, round)
    });
    match &lb.last {
        Some((r, at)) => LeaseView {
            broken: r.broken && round_usable,
            majority_runs_out_at_ms: r.majority_runs_out_in.map(|d| ms(*at + d)),
            primary_lsn: r.primary_lsn,
            round: lb.last_round,
            broken_since_ms: lb.broken_since.filter(|_| r.broken).map(ms),
        },
        None => LeaseView::default(),
    }
}

/// Starts a break round for `member`'s lease of `generation` unless one is running or
/// the last one said to wait.
fn start_break_round(
    shared: &Arc<Shared>,
    tr: &Tracker,
    intent: &Intent,
    member: &str,
    generation: Generation,
    valid: Duration,
) {
    let key = Some((member.to_string(), generation));
    {
        let mut lb = tr.lease_break.lock().unwrap_or_else(|e| e.into_inner());
        // A broken round stands while it may still justify a promotion; once stale or
        // released, a new round is needed.
        let standing = lb.round.is_some_and(|(round, started)| {
            started.elapsed() < valid && !intent.lease_break_released(generation, round)
        });
        let broken = lb.last.as_ref().is_some_and(|(r, _)| r.broken);
        if lb.key == key && !lb.in_flight && broken && standing {
            // The decision asks again for a broken round: some sync members' positions
            // are not final yet. The same round goes out again, answers not awaited.
            let now = Instant::now();
            if lb.reask_at.is_some_and(|at| now < at) {
                return;
            }
            lb.reask_at = Some(now + REASK_SPACING);
            let Some((round, _)) = lb.round else { return };
            drop(lb);
            let shared = shared.clone();
            let member = member.to_string();
            let timeout = shared
                .config
                .timing
                .fence_after
                .max(Duration::from_millis(500));
            tokio::spawn(async move {
                super::lease::ask_again(&shared, &member, generation, round, timeout).await;
            });
            return;
        }
        if lb.key != key
            || lb.in_flight
            || broken && standing
            || lb.next_at.is_some_and(|at| Instant::now() < at)
        {
            return;
        }
        lb.in_flight = true;
        lb.seq += 1;
        lb.round = Some((
            BreakRound {
                term: shared.raft_metrics().current_term,
                seq: lb.seq,
            },
            Instant::now(),
        ));
    }
    let Some((round, round_started)) = tr
        .lease_break
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .round
    else {
        return;
    };
    let shared = shared.clone();
    let state = tr.lease_break.clone();
    let member = member.to_string();
    let t = &shared.config.timing;
    let timeout = t.fence_after.max(Duration::from_millis(500));
    tokio::spawn(async move {
        let r = super::lease::break_round(&shared, &member, generation, round, timeout).await;
        let now = Instant::now();
        if r.broken {
            tracing::info!(primary = %member, %generation, %round, by = ?r.broken_by, "a majority broke the primary's lease");
        }
        let mut lb = state.lock().unwrap_or_else(|e| e.into_inner());
        lb.in_flight = false;
        // Even a round nobody answered "broken" in time may have left breaks: a voter that
        // was paused handles the request late (sim seed 380). Releasing it costs nothing.
        if lb.key == Some((member.clone(), generation)) {
            lb.breaks_since_release = Some((round, round_started));
        }
        if lb.key == Some((member, generation)) {
            let wait = r
                .majority_runs_out_in
                .unwrap_or(BREAK_RETRY)
                .clamp(Duration::from_millis(20), timeout);
            lb.next_at = Some(now + wait);
            let still = r.broken
                && lb.last_round == Some(round)
                && lb.last.as_ref().is_some_and(|(p, _)| p.broken);
            if !still {
                lb.broken_since = r.broken.then_some(now);
            }
            lb.last_round = Some(round);
            lb.last = Some((r, now));
        }
        drop(lb);
        shared.wake_leader.notify_one();
    });
}

/// The round of the last break round (for the promotion that relies on it).
fn current_round(tr: &Tracker) -> Option<BreakRound> {
    let lb = tr.lease_break.lock().unwrap_or_else(|e| e.into_inner());
    lb.round.map(|(r, _)| r)
}

/// Releases of lease breaks that no promotion followed: once per leadership, every round
/// of earlier terms (this leader knows nothing of them); and this leader's own rounds with
/// breaks once the newest of them is older than `valid`.
fn break_releases(tr: &Tracker, intent: &Intent, term: u64, valid: Duration) -> Vec<Command> {
    let generation = intent.generation;
    let mut out = Vec::new();
    if intent.primary.is_none() {
        return out;
    }
    let older_terms = BreakRound {
        term: term.saturating_sub(1),
        seq: u64::MAX,
    };
    if term > 0 && !intent.lease_break_released(generation, older_terms) {
        out.push(Command::ReleaseLeaseBreaks {
            generation,
            upto: older_terms,
        });
    }
    let lb = tr.lease_break.lock().unwrap_or_else(|e| e.into_inner());
    let key = intent.primary.clone().map(|p| (p, generation));
    if let Some((round, started)) = lb.breaks_since_release.filter(|_| lb.key == key) {
        if !lb.in_flight
            && started.elapsed() >= valid
            && !intent.lease_break_released(generation, round)
        {
            out.push(Command::ReleaseLeaseBreaks {
                generation,
                upto: round,
            });
        }
    }
    out
}

/// No member may replace a primary whose own agent reports its Postgres stopped and
/// fenced: rather than staying without a primary, resume it in place in a new generation
/// (its Postgres holds every commit it acknowledged; the bump refuses any promotion
/// decided on the old generation). The rule is the core's; this stamps the command.
fn resume_in_place(
    decision: &crate::decide::Decision,
    intent: &Intent,
    observations: &BTreeMap<String, crate::decide::Observation>,
    limits: &Limits,
    now_ms: u64,
) -> Option<Command> {
    let r = crate::decide::resume_in_place(decision, intent, observations, limits, now_ms)?;
    Some(Command::Resume {
        member: r.member.to_string(),
        generation: r.generation,
        reason: format!(
            "{} stopped and no member may replace it ({}): resumed in place",
            r.member, r.no_candidate
        ),
        at_unix_ms: unix_ms(),
    })
}

/// The write pause of the switchover to `to` whose stop-writes phase this leader committed
/// at `stopped_at_ms`: once `to` is the primary and the leader received its first report
/// of taking writes in that generation (the observation's receipt, on the same clock).
fn write_pause(
    to: &str,
    stopped_at_ms: u64,
    intent: &Intent,
    observations: &BTreeMap<String, crate::decide::Observation>,
) -> Option<Command> {
    if intent.primary.as_deref() != Some(to) {
        return None;
    }
    intent.switchover_entry_awaiting_pause()?;
    let o = observations.get(to)?;
    if !o.writable() || o.seen_generation < intent.generation || o.received_at_ms < stopped_at_ms {
        return None;
    }
    Some(Command::RecordWritePause {
        generation: intent.generation,
        write_pause_ms: o.received_at_ms - stopped_at_ms,
    })
}

/// The Raft command for a core action; None for actions members derive from the intent.
fn command_for(
    action: &Action,
    intent: &Intent,
    observations: &BTreeMap<String, crate::decide::Observation>,
    lease_lsn: Option<crate::types::Lsn>,
    break_round: Option<BreakRound>,
) -> Option<Command> {
    match action {
        Action::Promote {
            member,
            generation,
            reason,
            expected_loss_bytes,
        } => {
            let old = intent.primary.as_deref();
            // Its own last report, or what it told the voters with its renewals.
            let old_lsn = old
                .and_then(|o| observations.get(o))
                .and_then(|o| o.best_lsn())
                .max(lease_lsn);
            let new_lsn = observations.get(member).and_then(|o| o.best_lsn());
            let (kind, why) = match reason {
                PromoteReason::PrimaryFenced => (
                    PromotionKind::Failover,
                    format!("{} is down and fenced", old.unwrap_or("?")),
                ),
                PromoteReason::LeaseExpired => (
                    PromotionKind::Failover,
                    format!("{} unreachable and its lease expired", old.unwrap_or("?")),
                ),
                PromoteReason::Switchover => (
                    PromotionKind::Switchover,
                    format!("planned switchover from {}", old.unwrap_or("?")),
                ),
            };
            Some(Command::Promote(Promote {
                member: member.clone(),
                generation: *generation,
                kind,
                force: false,
                reason: why,
                at_unix_ms: unix_ms(),
                old_primary_lsn: old_lsn,
                new_primary_lsn: new_lsn,
                // When nothing at all is known of the old primary's WAL, neither is the
                // loss: the history says so rather than claiming a figure.
                possible_loss_bytes: old_lsn.map(|_| *expected_loss_bytes),
                // Each reason means the old primary takes no more writes: its lease was
                // broken by a majority, or its agent confirmed it stopped.
                old_lease_released: true,
                lease_break_round: match reason {
                    PromoteReason::LeaseExpired => break_round,
                    _ => None,
                },
            }))
        }
        Action::RecordSyncSet {
            set,
            degraded,
            degraded_until_lsn,
        } => Some(Command::RecordSyncSet {
            generation: intent.generation,
            set: set.clone(),
            degraded: *degraded,
            degraded_until_lsn: *degraded_until_lsn,
        }),
        Action::ApplySyncStandbyNames { set, .. } => {
            let current = intent
                .sync_target
                .as_ref()
                .filter(|t| t.generation == intent.generation);
            if current.is_some_and(|t| t.set == *set) {
                // Already asked; the primary's agent is applying it.
                return None;
            }
            Some(Command::SetSyncTarget {
                generation: intent.generation,
                set: set.clone(),
            })
        }
        Action::SetSwitchoverPhase { phase } => {
            let to = intent.pending_switchover.as_ref()?.to.clone();
            Some(Command::SetSwitchoverPhase {
                to,
                phase: phase.clone(),
            })
        }
        Action::AbandonSwitchover { reason } => {
            let to = intent.pending_switchover.as_ref()?.to.clone();
            Some(Command::AbandonSwitchover {
                to,
                reason: reason.clone(),
                at_unix_ms: unix_ms(),
            })
        }
        Action::BreakLease { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Observation;
    use crate::raft::intent::{HistoryEntry, HistoryKind};

    /// b1 became the primary at generation 2 by a switchover from a1, pause not recorded.
    fn switched_over() -> Intent {
        let mut i = Intent {
            primary: Some("b1".into()),
            generation: Generation(2),
            ..Intent::default()
        };
        i.history.push(HistoryEntry {
            at_unix_ms: 1,
            kind: HistoryKind::Switchover,
            reason: "planned switchover from a1".into(),
            old_primary: Some("a1".into()),
            new_primary: Some("b1".into()),
            generation: Generation(2),
            old_primary_lsn: None,
            new_primary_lsn: None,
            possible_loss_bytes: Some(0),
            write_pause_ms: None,
        });
        i
    }

    fn b1(writable: bool, generation: u64, received_at_ms: u64) -> BTreeMap<String, Observation> {
        BTreeMap::from([(
            "b1".to_string(),
            Observation {
                received_at_ms,
                postgres_up: true,
                in_recovery: !writable,
                seen_generation: Generation(generation),
                ..Observation::default()
            },
        )])
    }

    #[test]
    fn the_write_pause_runs_from_the_stop_to_the_first_writable_report() {
        let i = switched_over();
        assert_eq!(
            write_pause("b1", 1_000, &i, &b1(true, 2, 1_420)),
            Some(Command::RecordWritePause {
                generation: Generation(2),
                write_pause_ms: 420
            })
        );
        // Not yet writable, a report from before the promotion, or one older than the stop.
        assert_eq!(write_pause("b1", 1_000, &i, &b1(false, 2, 1_420)), None);
        assert_eq!(write_pause("b1", 1_000, &i, &b1(true, 1, 1_420)), None);
        assert_eq!(write_pause("b1", 1_000, &i, &b1(true, 2, 900)), None);
        // Another target, or a pause already recorded.
        assert_eq!(write_pause("a2", 1_000, &i, &b1(true, 2, 1_420)), None);
        let mut done = i.clone();
        done.history[0].write_pause_ms = Some(420);
        assert_eq!(write_pause("b1", 1_000, &done, &b1(true, 2, 1_500)), None);
    }
}
