//! Scheduled backups, as pure functions: the cron expressions of `[backup] schedule`
//! (five fields, UTC), the schedule state the intent keeps (the newest slot a run was
//! started for, the run in flight), and the leader's rule [`decide`]: given the schedule,
//! that state, the wall clock and who could run a backup, either nothing, "start a run of
//! type T for slot S on member M", or "the run in flight is past its deadline".
//!
//! One run per slot: a slot is taken by committing [`crate::intent::Command::
//! ScheduledBackupStart`], which is refused for a slot at or before the recorded one, so a
//! new leader never runs a slot its predecessor started. Slots missed while there was no
//! leader collapse into one run of the newest missed slot.

use serde::{Deserialize, Serialize};

/// Milliseconds in a minute: cron's resolution.
const MINUTE_MS: i64 = 60_000;

/// How far back [`Cron::latest_at_or_before`] looks for a slot (a yearly expression
/// still finds its slot; nothing older is ever run).
pub const MAX_LOOKBACK_DAYS: i64 = 400;

/// pgBackRest's backup types, in the order a slot prefers them (a full backup covers
/// a differential or incremental one due at the same minute).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduledKind {
    Incr,
    Diff,
    Full,
}

impl ScheduledKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduledKind::Full => "full",
            ScheduledKind::Diff => "diff",
            ScheduledKind::Incr => "incr",
        }
    }
}

/// A five-field cron expression (minute hour day-of-month month day-of-week), in UTC.
/// Fields take `*`, `N`, `A-B`, steps (`*/N`, `A-B/N`) and lists (`,`); day-of-week is
/// 0-7 with 0 and 7 both Sunday. As in Vixie cron, when both day fields are restricted a
/// day matches either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    text: String,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_restricted: bool,
    weekdays_restricted: bool,
}

/// Why a cron expression was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cron expression {text:?}: {why}")]
pub struct CronError {
    pub text: String,
    pub why: String,
}

fn parse_field(field: &str, name: &str, lo: u32, hi: u32) -> Result<u64, String> {
    let mut mask = 0u64;
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| format!("{name}: step {s:?} is not a number"))?;
                if step == 0 {
                    return Err(format!("{name}: step must be at least 1"));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let num = |s: &str| -> Result<u32, String> {
            let v: u32 = s
                .parse()
                .map_err(|_| format!("{name}: {s:?} is not a number"))?;
            if v < lo || v > hi {
                return Err(format!("{name}: {v} is outside {lo}-{hi}"));
            }
            Ok(v)
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(format!("{name}: range {a}-{b} goes backwards"));
            }
            (a, b)
        } else {
            let a = num(range)?;
            // `N/step` means N to the end, as in Vixie cron.
            (a, if step > 1 { hi } else { a })
        };
        let mut v = a;
        while v <= b {
            mask |= 1 << v;
            v += step;
        }
    }
    Ok(mask)
}

impl Cron {
    pub fn parse(text: &str) -> Result<Cron, CronError> {
        let err = |why: String| CronError {
            text: text.to_string(),
            why,
        };
        let f: Vec<&str> = text.split_whitespace().collect();
        if f.len() != 5 {
            return Err(err(format!(
                "needs 5 fields (minute hour day-of-month month day-of-week), got {}",
                f.len()
            )));
        }
        let mut weekdays = parse_field(f[4], "day-of-week", 0, 7).map_err(err)?;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & !(1 << 7);
        }
        Ok(Cron {
            text: f.join(" "),
            minutes: parse_field(f[0], "minute", 0, 59).map_err(err)?,
            hours: parse_field(f[1], "hour", 0, 23).map_err(err)?,
            days: parse_field(f[2], "day-of-month", 1, 31).map_err(err)?,
            months: parse_field(f[3], "month", 1, 12).map_err(err)?,
            weekdays,
            days_restricted: !f[2].starts_with('*'),
            weekdays_restricted: !f[4].starts_with('*'),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn day_matches(&self, day: i64) -> bool {
        let (_, month, dom) = civil_from_days(day);
        if self.months & (1 << month) == 0 {
            return false;
        }
        let dow = (day + 4).rem_euclid(7) as u32; // 1970-01-01 was a Thursday.
        let dom_ok = self.days & (1 << dom) != 0;
        let dow_ok = self.weekdays & (1 << dow) != 0;
        if self.days_restricted && self.weekdays_restricted {
            dom_ok || dow_ok
        } else {
            dom_ok && dow_ok
        }
    }

    /// The newest minute at or before `now_unix_ms` the expression matches and that is
    /// after `after_unix_ms` (when given), within [`MAX_LOOKBACK_DAYS`]; in Unix ms.
    pub fn latest_at_or_before(&self, now_unix_ms: i64, after_unix_ms: Option<i64>) -> Option<i64> {
        let floor = now_unix_ms.div_euclid(MINUTE_MS) - MAX_LOOKBACK_DAYS * 1440;
        let floor = match after_unix_ms {
            Some(a) => floor.max(a.div_euclid(MINUTE_MS) + 1),
            None => floor,
        };
        let mut t = now_unix_ms.div_euclid(MINUTE_MS);
        // Each step skips a non-matching day, hour or minute: bounded by the lookback.
        while t >= floor {
            let day = t.div_euclid(1440);
            let minute_of_day = t.rem_euclid(1440);
            if !self.day_matches(day) {
                t = day * 1440 - 1;
                continue;
            }
            let hour = minute_of_day / 60;
            if self.hours & (1 << hour) == 0 {
                t = day * 1440 + hour * 60 - 1;
                continue;
            }
            if self.minutes & (1 << (minute_of_day % 60)) == 0 {
                t -= 1;
                continue;
            }
            return Some(t * MINUTE_MS);
        }
        None
    }
}

/// (year, month 1-12, day 1-31) of a day counted from 1970-01-01 (the proleptic
/// Gregorian calendar's days-to-civil conversion).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A slot as people read it: `2026-12-06 02:00 UTC`.
pub fn slot_text(unix_ms: i64) -> String {
    let t = unix_ms.div_euclid(MINUTE_MS);
    let (y, m, d) = civil_from_days(t.div_euclid(1440));
    let mod_ = t.rem_euclid(1440);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", mod_ / 60, mod_ % 60)
}

/// One `[backup] schedule` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleEntry {
    pub kind: ScheduledKind,
    pub cron: Cron,
}

/// A scheduled backup that was started (recorded in the intent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledRun {
    /// The schedule slot (a cron minute, Unix ms) this run is for.
    pub slot_unix_ms: i64,
    pub kind: ScheduledKind,
    pub member: String,
    /// The proposing leader's wall clock.
    pub started_at_unix_ms: i64,
    /// Past this (wall clock), any leader records the run as failed.
    pub deadline_unix_ms: i64,
}

impl ScheduledRun {
    /// The history text of this run's end.
    pub fn outcome(&self, ok: bool, detail: &str) -> String {
        let what = format!(
            "scheduled {} backup (slot {}) on {}",
            self.kind.as_str(),
            slot_text(self.slot_unix_ms),
            self.member
        );
        if ok {
            format!("{what}: finished, {detail}")
        } else {
            format!("{what}: failed: {detail}")
        }
    }
}

/// The intent's schedule state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduleState {
    /// The newest slot a run was started for: no slot at or before it runs again.
    pub last_slot_unix_ms: Option<i64>,
    pub running: Option<ScheduledRun>,
}

impl ScheduleState {
    pub fn is_empty(&self) -> bool {
        *self == ScheduleState::default()
    }
}

/// Who could run a backup now, as the leader sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidates {
    /// The current primary, when it is up and taking writes.
    pub primary: Option<String>,
    /// Healthy standbys streaming from the primary, best first.
    pub streaming_standbys: Vec<String>,
    /// Whether a standby can take a backup (pgBackRest's backup-standby needs the primary
    /// reachable through `pgbackrest server`).
    pub standby_backups: bool,
}

/// What the leader does about the schedule this round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScheduleDecision {
    Nothing,
    /// Commit the start of this run, then run it.
    Start(ScheduledRun),
    /// The run in flight passed its deadline: record it as failed.
    TimedOut {
        slot_unix_ms: i64,
        member: String,
    },
}

/// The leader's schedule rule. `run_bound_ms` bounds a run (the backup timeout plus a
/// margin for the result to come back).
pub fn decide(
    schedule: &[ScheduleEntry],
    state: &ScheduleState,
    now_unix_ms: i64,
    candidates: &Candidates,
    run_bound_ms: i64,
) -> ScheduleDecision {
    if let Some(r) = &state.running {
        if now_unix_ms > r.deadline_unix_ms {
            return ScheduleDecision::TimedOut {
                slot_unix_ms: r.slot_unix_ms,
                member: r.member.clone(),
            };
        }
        return ScheduleDecision::Nothing;
    }
    // The newest due slot over all entries; at one minute, the strongest type.
    let mut due: Option<(i64, ScheduledKind)> = None;
    for e in schedule {
        if let Some(slot) = e
            .cron
            .latest_at_or_before(now_unix_ms, state.last_slot_unix_ms)
        {
            let better = match due {
                None => true,
                Some((s, k)) => slot > s || (slot == s && e.kind > k),
            };
            if better {
                due = Some((slot, e.kind));
            }
        }
    }
    let Some((slot, kind)) = due else {
        return ScheduleDecision::Nothing;
    };
    let member = match (
        candidates.standby_backups,
        candidates.streaming_standbys.first(),
        &candidates.primary,
    ) {
        // A standby backup still reads WAL positions from the primary: it must be up.
        (true, Some(s), Some(_)) => s.clone(),
        (_, _, Some(p)) => p.clone(),
        // No primary: the slot waits for one (it is not lost).
        (_, _, None) => return ScheduleDecision::Nothing,
    };
    ScheduleDecision::Start(ScheduledRun {
        slot_unix_ms: slot,
        kind,
        member,
        started_at_unix_ms: now_unix_ms,
        deadline_unix_ms: now_unix_ms.saturating_add(run_bound_ms.max(0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-06 (a Sunday) 00:00 UTC in Unix ms.
    const SUN: i64 = 1_796_515_200_000;
    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    fn entry(kind: ScheduledKind, cron: &str) -> ScheduleEntry {
        ScheduleEntry {
            kind,
            cron: Cron::parse(cron).unwrap(),
        }
    }

    fn weekly() -> Vec<ScheduleEntry> {
        vec![
            entry(ScheduledKind::Full, "0 2 * * 0"),
            entry(ScheduledKind::Incr, "0 2 * * 1-6"),
        ]
    }

    fn primary_only() -> Candidates {
        Candidates {
            primary: Some("a".into()),
            ..Candidates::default()
        }
    }

    fn started(d: ScheduleDecision) -> ScheduledRun {
        match d {
            ScheduleDecision::Start(r) => r,
            other => panic!("expected a start, got {other:?}"),
        }
    }

    #[test]
    fn calendar_is_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(SUN / DAY), (2026, 12, 6));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!((SUN / DAY + 4).rem_euclid(7), 0, "2026-12-06 is a Sunday");
    }

    #[test]
    fn slots_read_as_utc_minutes() {
        assert_eq!(
            slot_text(SUN + 2 * HOUR + 5 * 60_000),
            "2026-12-06 02:05 UTC"
        );
    }

    #[test]
    fn cron_fields_parse_and_refuse() {
        let c = Cron::parse("*/15 2,14 1-7 * 1-5").unwrap();
        assert_eq!(c.minutes, 1 | 1 << 15 | 1 << 30 | 1 << 45);
        assert_eq!(c.hours, 1 << 2 | 1 << 14);
        assert_eq!(Cron::parse("0 0 * * 7").unwrap().weekdays, 1);
        for bad in [
            "* * * *",
            "60 * * * *",
            "* * 0 * *",
            "*/0 * * * *",
            "5-1 * * * *",
            "x * * * *",
        ] {
            assert!(Cron::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn latest_slot_follows_the_calendar() {
        let full = Cron::parse("0 2 * * 0").unwrap();
        // Wednesday noon: the last Sunday 02:00.
        let wed = SUN + 3 * DAY + 12 * HOUR;
        assert_eq!(full.latest_at_or_before(wed, None), Some(SUN + 2 * HOUR));
        // Exactly at the slot, it is due.
        assert_eq!(
            full.latest_at_or_before(SUN + 2 * HOUR, None),
            Some(SUN + 2 * HOUR)
        );
        // Nothing after the recorded slot yet.
        assert_eq!(full.latest_at_or_before(wed, Some(SUN + 2 * HOUR)), None);
        // Both day fields restricted: either matches (the 1st, or any Friday).
        let c = Cron::parse("0 0 1 * 5").unwrap();
        // 2026-12-06 Sunday: last Friday is 2026-12-04, the 1st was Tuesday 2026-12-01.
        assert_eq!(c.latest_at_or_before(SUN, None), Some(SUN - 2 * DAY));
        assert_eq!(
            c.latest_at_or_before(SUN - 2 * DAY - 1, None),
            Some(SUN - 5 * DAY)
        );
        // Every minute.
        let m = Cron::parse("* * * * *").unwrap();
        assert_eq!(
            m.latest_at_or_before(SUN + 61_500, None),
            Some(SUN + 60_000)
        );
    }

    #[test]
    fn due_slot_starts_once_with_the_right_type() {
        let s = weekly();
        let mut state = ScheduleState::default();
        // Monday 02:00:30: the incremental slot of Monday.
        let mon = SUN + DAY + 2 * HOUR + 30_000;
        let r = started(decide(&s, &state, mon, &primary_only(), HOUR));
        assert_eq!(r.slot_unix_ms, SUN + DAY + 2 * HOUR);
        assert_eq!(r.kind, ScheduledKind::Incr);
        assert_eq!(r.member, "a");
        assert_eq!(r.deadline_unix_ms, mon + HOUR);
        // While it runs: nothing; past its deadline: timed out.
        state.last_slot_unix_ms = Some(r.slot_unix_ms);
        state.running = Some(r.clone());
        assert_eq!(
            decide(&s, &state, mon + 1000, &primary_only(), HOUR),
            ScheduleDecision::Nothing
        );
        assert_eq!(
            decide(&s, &state, mon + HOUR + 1, &primary_only(), HOUR),
            ScheduleDecision::TimedOut {
                slot_unix_ms: r.slot_unix_ms,
                member: "a".into()
            }
        );
        // Finished: the same slot never runs again, the next one does.
        state.running = None;
        assert_eq!(
            decide(&s, &state, mon + 2 * HOUR, &primary_only(), HOUR),
            ScheduleDecision::Nothing
        );
        let next = started(decide(&s, &state, mon + DAY, &primary_only(), HOUR));
        assert_eq!(next.slot_unix_ms, SUN + 2 * DAY + 2 * HOUR);
    }

    #[test]
    fn not_due_before_the_first_slot_after_the_recorded_one() {
        let s = weekly();
        let state = ScheduleState {
            last_slot_unix_ms: Some(SUN + 2 * HOUR),
            running: None,
        };
        // Sunday 23:00 and Monday 01:59: no new slot yet.
        for now in [SUN + 23 * HOUR, SUN + DAY + 2 * HOUR - 1] {
            assert_eq!(
                decide(&s, &state, now, &primary_only(), HOUR),
                ScheduleDecision::Nothing
            );
        }
    }

    #[test]
    fn slots_missed_without_a_leader_run_once_as_the_newest() {
        let s = weekly();
        let state = ScheduleState {
            last_slot_unix_ms: Some(SUN - 6 * DAY + 2 * HOUR),
            running: None,
        };
        // No leader from last Monday until Sunday 05:00: six incremental slots and the
        // full one were missed; one full backup for Sunday's slot runs.
        let r = started(decide(&s, &state, SUN + 5 * HOUR, &primary_only(), HOUR));
        assert_eq!(r.slot_unix_ms, SUN + 2 * HOUR);
        assert_eq!(r.kind, ScheduledKind::Full);
    }

    #[test]
    fn a_full_backup_wins_its_minute() {
        let s = vec![
            entry(ScheduledKind::Incr, "0 * * * *"),
            entry(ScheduledKind::Full, "0 2 * * *"),
        ];
        let r = started(decide(
            &s,
            &ScheduleState::default(),
            SUN + 2 * HOUR,
            &primary_only(),
            HOUR,
        ));
        assert_eq!(r.kind, ScheduledKind::Full);
    }

    #[test]
    fn the_member_is_a_streaming_standby_when_standby_backups_work() {
        let s = weekly();
        let now = SUN + 3 * HOUR;
        let mut c = Candidates {
            primary: Some("a".into()),
            streaming_standbys: vec!["b".into(), "c".into()],
            standby_backups: false,
        };
        let st = ScheduleState::default();
        assert_eq!(started(decide(&s, &st, now, &c, HOUR)).member, "a");
        c.standby_backups = true;
        assert_eq!(started(decide(&s, &st, now, &c, HOUR)).member, "b");
        c.streaming_standbys.clear();
        assert_eq!(started(decide(&s, &st, now, &c, HOUR)).member, "a");
        // No primary: the slot waits, even with standbys.
        c.primary = None;
        c.streaming_standbys = vec!["b".into()];
        assert_eq!(decide(&s, &st, now, &c, HOUR), ScheduleDecision::Nothing);
    }

    #[test]
    fn the_intent_takes_each_slot_once() {
        use crate::intent::{Command, HistoryKind, Intent, MemberKind, Refused, Response};
        let mut i = Intent::default();
        for (name, kind) in [("a", MemberKind::Data), ("w", MemberKind::Witness)] {
            let add = Command::AddMember {
                name: name.into(),
                region: "r".into(),
                kind,
                tags: Default::default(),
                at_unix_ms: 0,
            };
            assert!(matches!(i.apply(&add), Response::MemberAdded(_)));
        }
        let run = |slot: i64, member: &str| ScheduledRun {
            slot_unix_ms: slot,
            kind: ScheduledKind::Full,
            member: member.into(),
            started_at_unix_ms: slot,
            deadline_unix_ms: slot + HOUR,
        };
        let start = |r: ScheduledRun| Command::ScheduledBackupStart(r);
        assert_eq!(
            i.apply(&start(run(SUN, "w"))),
            Response::Refused(Refused::NotDataMember("w".into()))
        );
        assert_eq!(i.apply(&start(run(SUN, "a"))), Response::Applied);
        // A second leader's start of any slot while it runs is refused.
        assert!(matches!(
            i.apply(&start(run(SUN + DAY, "a"))),
            Response::Refused(Refused::ScheduledBackupRunning { .. })
        ));
        let finish = |slot: i64, ok: bool| Command::ScheduledBackupFinish {
            slot_unix_ms: slot,
            ok,
            detail: if ok {
                "label 20261206-000000F".into()
            } else {
                "pgbackrest: boom".into()
            },
            at_unix_ms: slot + 1000,
        };
        assert_eq!(
            i.apply(&finish(SUN - DAY, true)),
            Response::Refused(Refused::NoScheduledBackupRunning(SUN - DAY))
        );
        assert_eq!(i.apply(&finish(SUN, true)), Response::Applied);
        let h = i.history.last().unwrap();
        assert_eq!(h.kind, HistoryKind::Backup);
        assert!(h.reason.contains("scheduled full backup"), "{}", h.reason);
        assert!(
            h.reason.ends_with("finished, label 20261206-000000F"),
            "{}",
            h.reason
        );
        // The same slot again (a new leader that missed the commit): refused.
        assert!(matches!(
            i.apply(&start(run(SUN, "a"))),
            Response::Refused(Refused::ScheduleSlotTaken { .. })
        ));
        // A failed run is recorded with its error.
        assert_eq!(i.apply(&start(run(SUN + DAY, "a"))), Response::Applied);
        assert_eq!(i.apply(&finish(SUN + DAY, false)), Response::Applied);
        assert!(i
            .history
            .last()
            .unwrap()
            .reason
            .ends_with("failed: pgbackrest: boom"));
        // The state survives a snapshot round trip; an empty one is not serialized.
        let json = serde_json::to_string(&i).unwrap();
        assert_eq!(serde_json::from_str::<Intent>(&json).unwrap(), i);
        let empty = serde_json::to_string(&Intent::default()).unwrap();
        assert!(!empty.contains("backup_schedule"), "{empty}");
    }
}
