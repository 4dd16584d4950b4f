//! Scheduled operations (`meridianctl switchover --scheduled TIME`, `restart --scheduled
//! TIME`): what the intent records, its validation, and the leader's pure decision of
//! which of them are due.
//!
//! A schedule lives in the Raft intent, so it survives the `meridianctl` that asked for it,
//! a leader change and a restart; `list` shows it and `flush` cancels it. The leader
//! starts it once its wall clock reaches the time: it first commits
//! [`crate::intent::Command::ClearScheduled`] with `fired` (so a leader change cannot start
//! it twice), then runs the operation. Both steps go to the history.
//!
//! Times are the proposer's wall clock in Unix milliseconds (apply reads no clock).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::intent::{Intent, MemberKind, Refused};

/// A schedule at most this far ahead of its request.
pub const MAX_AHEAD_MS: i64 = 24 * 3600 * 1000;
/// A time this far before its request is a typo, not "now".
pub const MAX_BEHIND_MS: i64 = 60 * 1000;

/// Which kind of operation: at most one of each is scheduled at a time (as in Patroni).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduledKind {
    Switchover,
    Restart,
}

impl ScheduledKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduledKind::Switchover => "switchover",
            ScheduledKind::Restart => "restart",
        }
    }
}

impl fmt::Display for ScheduledKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operation and its arguments, as `meridianctl` would run it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ScheduledOp {
    Switchover {
        /// None: the best healthy standby at that time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        candidate: Option<String>,
    },
    /// A rolling restart: standbys first, one at a time, the primary last (by one
    /// switchover unless `in_place`).
    Restart {
        /// Empty: every data member.
        #[serde(default)]
        members: Vec<String>,
        /// Only members waiting for a restart (`pending_restart`).
        #[serde(default)]
        pending: bool,
        /// `primary` or `replica`: only members in that role at that time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<String>,
        #[serde(default)]
        in_place: bool,
    },
}

impl ScheduledOp {
    pub fn kind(&self) -> ScheduledKind {
        match self {
            ScheduledOp::Switchover { .. } => ScheduledKind::Switchover,
            ScheduledOp::Restart { .. } => ScheduledKind::Restart,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scheduled {
    /// When the leader starts it.
    pub at_unix_ms: i64,
    /// When it was asked for.
    pub requested_at_unix_ms: i64,
    pub op: ScheduledOp,
}

impl fmt::Display for Scheduled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.op.kind(), rfc3339(self.at_unix_ms))?;
        match &self.op {
            ScheduledOp::Switchover { candidate: Some(c) } => write!(f, " to {c}"),
            ScheduledOp::Switchover { candidate: None } => Ok(()),
            ScheduledOp::Restart {
                members,
                pending,
                role,
                in_place,
            } => {
                if members.is_empty() {
                    write!(f, " of every data member")?;
                } else {
                    write!(f, " of {}", members.join(", "))?;
                }
                if let Some(r) = role {
                    write!(f, " ({r} only)")?;
                }
                if *pending {
                    write!(f, " waiting for a restart")?;
                }
                if *in_place {
                    write!(f, ", the primary in place")?;
                }
                Ok(())
            }
        }
    }
}

/// Whether `s` may be added to `intent`: none of its kind yet, a time within
/// [`MAX_BEHIND_MS`] before and [`MAX_AHEAD_MS`] after the request, named members known
/// data members, a role `primary` or `replica`.
pub fn validate(intent: &Intent, s: &Scheduled) -> Result<(), Refused> {
    let kind = s.op.kind();
    if let Some(existing) = intent.scheduled.iter().find(|e| e.op.kind() == kind) {
        return Err(Refused::AlreadyScheduled(existing.to_string()));
    }
    let ahead = s.at_unix_ms.saturating_sub(s.requested_at_unix_ms);
    if !(-MAX_BEHIND_MS..=MAX_AHEAD_MS).contains(&ahead) {
        return Err(Refused::ScheduleOutOfRange {
            at: rfc3339(s.at_unix_ms),
        });
    }
    let data = |name: &str| match intent.member(name) {
        None => Err(Refused::UnknownMember(name.to_string())),
        Some(m) if m.kind != MemberKind::Data => Err(Refused::NotDataMember(name.to_string())),
        Some(_) => Ok(()),
    };
    match &s.op {
        ScheduledOp::Switchover { candidate } => {
            if let Some(c) = candidate {
                data(c)?;
            }
        }
        ScheduledOp::Restart { members, role, .. } => {
            for m in members {
                data(m)?;
            }
            if let Some(r) = role {
                if r != "primary" && r != "replica" {
                    return Err(Refused::InvalidScheduledRole(r.clone()));
                }
            }
        }
    }
    Ok(())
}

/// The scheduled operations whose time has come on the leader's wall clock, oldest first.
/// None while a switchover is in progress: a scheduled one would be refused, a rolling
/// restart would race it; they start once it is over.
pub fn due(intent: &Intent, now_unix_ms: i64) -> Vec<&Scheduled> {
    if intent.pending_switchover.is_some() {
        return Vec::new();
    }
    let mut d: Vec<&Scheduled> = intent
        .scheduled
        .iter()
        .filter(|s| s.at_unix_ms <= now_unix_ms)
        .collect();
    d.sort_by_key(|s| (s.at_unix_ms, s.op.kind()));
    d
}

/// The members a rolling restart restarts, in order: the named ones (or every data
/// member), those in `role` (`primary` / `replica`) when given, those `pending_restart`
/// says wait for a restart when `pending`; standbys first by name, the primary last.
pub fn restart_order(
    intent: &Intent,
    members: &[String],
    role: Option<&str>,
    pending: bool,
    pending_restart: impl Fn(&str) -> bool,
) -> Vec<String> {
    let primary = intent.primary.as_deref();
    let mut chosen: Vec<String> = intent
        .members
        .values()
        .filter(|m| m.kind == MemberKind::Data)
        .filter(|m| members.is_empty() || members.contains(&m.name))
        .filter(|m| match role {
            Some("primary") => primary == Some(m.name.as_str()),
            Some(_) => primary != Some(m.name.as_str()),
            None => true,
        })
        .filter(|m| !pending || pending_restart(&m.name))
        .map(|m| m.name.clone())
        .collect();
    chosen.sort_by_key(|m| (primary == Some(m.as_str()), m.clone()));
    chosen
}

/// `2026-12-01T03:00:00Z` for a Unix time in milliseconds (UTC, whole seconds).
pub fn rfc3339(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::{Command, Member, MemberTags, Response};
    use crate::types::MemberId;

    fn intent() -> Intent {
        let mut i = Intent::default();
        for (n, (name, kind)) in [("a1", MemberKind::Data), ("w", MemberKind::Witness)]
            .into_iter()
            .enumerate()
        {
            i.members.insert(
                name.into(),
                Member {
                    name: name.into(),
                    id: MemberId(n as u64 + 1),
                    region: "east".into(),
                    kind,
                    tags: MemberTags::default(),
                },
            );
        }
        i.primary = Some("a1".into());
        i
    }

    const T0: i64 = 1_796_000_000_000;

    fn switchover(at: i64, candidate: Option<&str>) -> Scheduled {
        Scheduled {
            at_unix_ms: at,
            requested_at_unix_ms: T0,
            op: ScheduledOp::Switchover {
                candidate: candidate.map(str::to_string),
            },
        }
    }

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_000_000_999), "2026-11-30T00:53:20Z");
    }

    #[test]
    fn one_schedule_per_kind_within_a_day_on_known_data_members() {
        let mut i = intent();
        let s = switchover(T0 + 3_600_000, None);
        assert_eq!(validate(&i, &s), Ok(()));
        assert_eq!(i.apply(&Command::Schedule(s.clone())), Response::Applied);
        assert!(matches!(
            validate(&i, &switchover(T0 + 1000, None)),
            Err(Refused::AlreadyScheduled(_))
        ));
        let restart = Scheduled {
            at_unix_ms: T0 + 1000,
            requested_at_unix_ms: T0,
            op: ScheduledOp::Restart {
                members: vec!["a1".into()],
                pending: true,
                role: None,
                in_place: false,
            },
        };
        assert_eq!(validate(&i, &restart), Ok(()), "another kind is fine");
        let mut i = intent();
        assert!(matches!(
            validate(&i, &switchover(T0 + MAX_AHEAD_MS + 1, None)),
            Err(Refused::ScheduleOutOfRange { .. })
        ));
        assert!(matches!(
            validate(&i, &switchover(T0 - MAX_BEHIND_MS - 1, None)),
            Err(Refused::ScheduleOutOfRange { .. })
        ));
        assert_eq!(
            validate(&i, &switchover(T0, Some("w"))),
            Err(Refused::NotDataMember("w".into()))
        );
        assert_eq!(
            validate(&i, &switchover(T0, Some("zz"))),
            Err(Refused::UnknownMember("zz".into()))
        );
        // A refused schedule changes nothing.
        let before = i.clone();
        assert!(matches!(
            i.apply(&Command::Schedule(switchover(T0, Some("zz")))),
            Response::Refused(_)
        ));
        assert_eq!(i, before);
    }

    #[test]
    fn a_rolling_restart_takes_the_standbys_first_and_the_primary_last() {
        let mut i = intent();
        for (n, name) in ["c2", "b2"].into_iter().enumerate() {
            i.members.insert(
                name.into(),
                Member {
                    name: name.into(),
                    id: MemberId(10 + n as u64),
                    region: "east".into(),
                    kind: MemberKind::Data,
                    tags: MemberTags::default(),
                },
            );
        }
        let all = restart_order(&i, &[], None, false, |_| false);
        assert_eq!(all, ["b2", "c2", "a1"]);
        assert_eq!(
            restart_order(&i, &[], Some("replica"), false, |_| false),
            ["b2", "c2"]
        );
        assert_eq!(
            restart_order(&i, &[], Some("primary"), false, |_| false),
            ["a1"]
        );
        assert_eq!(
            restart_order(&i, &[], None, true, |m| m != "b2"),
            ["c2", "a1"]
        );
        assert_eq!(
            restart_order(&i, &["a1".into(), "c2".into()], None, false, |_| false),
            ["c2", "a1"]
        );
    }

    #[test]
    fn due_when_the_clock_reaches_it_and_cleared_once() {
        let mut i = intent();
        i.apply(&Command::Schedule(switchover(T0 + 5000, Some("a1"))));
        assert!(due(&i, T0 + 4999).is_empty());
        assert_eq!(due(&i, T0 + 5000).len(), 1);
        let mut busy = i.clone();
        busy.pending_switchover = Some(crate::intent::PendingSwitchover {
            from: "a1".into(),
            to: "b1".into(),
            started_at_unix_ms: T0,
            phase: Default::default(),
        });
        assert!(due(&busy, T0 + 5000).is_empty(), "not during a switchover");
        let fire = Command::ClearScheduled {
            kind: ScheduledKind::Switchover,
            fired: true,
            at_unix_ms: T0 + 5001,
        };
        assert_eq!(i.apply(&fire), Response::Applied);
        assert!(due(&i, T0 + 9999).is_empty());
        assert!(
            matches!(
                i.apply(&fire),
                Response::Refused(Refused::NothingScheduled(_))
            ),
            "a second leader cannot start it again"
        );
        let h = i.history.last().unwrap();
        assert!(h.reason.contains("started"), "{}", h.reason);
    }
}
