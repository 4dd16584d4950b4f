//! The one-line, human `Display` of a Raft [`Command`] (what the leader logs when it
//! commits one), instead of its Rust `Debug` form.

use std::fmt;

use crate::intent::{Command, MemberTags, PromotionKind};

impl fmt::Display for PromotionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PromotionKind::Bootstrap => "bootstrap",
            PromotionKind::Failover => "failover",
            PromotionKind::Switchover => "switchover",
            PromotionKind::Manual => "manual failover",
        })
    }
}

impl fmt::Display for MemberTags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "priority {}, nofailover {}, nosync {}, clonefrom {}",
            self.priority, self.nofailover, self.nosync, self.clonefrom
        )?;
        if let Some(up) = &self.replicatefrom {
            write!(f, ", replicatefrom {up}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::AddMember {
                name, region, kind, ..
            } => write!(f, "add {kind} member {name} in region {region}"),
            Command::RemoveMember { name, .. } => write!(f, "remove member {name}"),
            Command::SetMemberTags { name, tags } => write!(f, "tag {name}: {tags}"),
            Command::Promote(p) => {
                write!(
                    f,
                    "promote {} in generation {} ({}{}): {}",
                    p.member,
                    p.generation,
                    p.kind,
                    if p.force { ", forced" } else { "" },
                    p.reason
                )?;
                if let Some(loss) = p.possible_loss_bytes.filter(|b| *b > 0) {
                    write!(f, "; up to {loss} bytes may be lost")?;
                }
                Ok(())
            }
            Command::SetPolicy { reason, .. } => write!(f, "set the replication policy: {reason}"),
            Command::RecordSyncSet {
                generation,
                set,
                degraded,
                degraded_until_lsn,
            } => {
                write!(f, "record the sync set {set} for generation {generation}")?;
                match (degraded, degraded_until_lsn) {
                    (false, _) => {}
                    (true, None) => f.write_str(" (degraded: the primary may acknowledge alone)")?,
                    (true, Some(lsn)) => write!(
                        f,
                        " (degraded: commits acknowledged alone up to {lsn}, until a sync standby holds them)"
                    )?,
                }
                Ok(())
            }
            Command::SetMaintenance { on: true } => f.write_str("maintenance mode on"),
            Command::SetMaintenance { on: false } => f.write_str("maintenance mode off"),
            Command::BeginSwitchover(sw) => {
                write!(f, "begin a switchover from {} to {}", sw.from, sw.to)
            }
            Command::SetSwitchoverPhase { to, phase } => {
                write!(f, "switchover to {to}: {phase}")
            }
            Command::AbandonSwitchover { to, reason, .. } => {
                write!(f, "abandon the switchover to {to}: {reason}")
            }
            Command::ClearSwitchover { .. } => f.write_str("cancel the switchover"),
            Command::AppendHistory(h) => write!(f, "history note: {}", h.reason),
            Command::SetSyncTarget { generation, set } => write!(
                f,
                "set synchronous_standby_names to {set} for generation {generation}"
            ),
            Command::Reinit { name } => write!(f, "re-clone {name}"),
            Command::ReinitDone { name } => write!(f, "{name} finished its re-clone"),
            Command::ReleaseLeaseBreaks { generation, upto } => write!(
                f,
                "release the breaks of generation {generation}'s lease up to round {upto}"
            ),
            Command::RecordSystemIdentifier {
                member,
                system_identifier,
            } => write!(
                f,
                "record the Postgres system identifier {system_identifier}, reported by {member}"
            ),
            Command::Schedule(sch) => write!(f, "schedule a {sch}"),
            Command::ClearScheduled { kind, fired, .. } => {
                if *fired {
                    write!(f, "start the scheduled {kind}")
                } else {
                    write!(f, "cancel the scheduled {kind}")
                }
            }
            Command::RecordWritePause {
                generation,
                write_pause_ms,
            } => write!(
                f,
                "the switchover of generation {generation} paused writes for {write_pause_ms} ms"
            ),
            Command::Resume {
                member,
                generation,
                reason,
                ..
            } => write!(f, "resume {member} in generation {generation}: {reason}"),
            Command::ScheduledBackupStart(run) => write!(
                f,
                "start the scheduled {} backup of slot {} on {}",
                run.kind.as_str(),
                run.slot_unix_ms,
                run.member
            ),
            Command::ScheduledBackupFinish {
                slot_unix_ms,
                ok,
                detail,
                ..
            } => {
                let how = if *ok { "finished" } else { "failed" };
                write!(
                    f,
                    "the scheduled backup of slot {slot_unix_ms} {how}: {detail}"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{Rejection, SwitchoverAbort};

    #[test]
    fn commands_read_as_sentences() {
        let c = Command::AbandonSwitchover {
            to: "b1".into(),
            reason: SwitchoverAbort::TargetNotReady(Rejection::LagTooHigh {
                lag_bytes: 34_105_088,
                max_bytes: 16_777_216,
            }),
            at_unix_ms: 0,
        };
        assert_eq!(
            c.to_string(),
            "abandon the switchover to b1: the target is not ready: 34105088 bytes behind \
             (at most 16777216 allowed)"
        );
        assert_eq!(
            Command::SetMaintenance { on: true }.to_string(),
            "maintenance mode on"
        );
    }
}
