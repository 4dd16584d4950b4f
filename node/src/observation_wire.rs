//! Converts an agent's report off the wire ([`meridian_proto::Observation`]) into the
//! decision core's [`Observation`]. Lives in the runtime because the core crate has no
//! dependency on the wire types.

use meridian_core::decide::{Observation, PeerProbe, SyncSet};
use meridian_core::intent::BreakRound;
use meridian_core::types::{Generation, Lsn};

/// One agent's report as the decision core reads it, stamped with when the leader
/// received it (its monotonic clock). On the wire an LSN of 0 and an empty upstream
/// mean "none"; a report without its Postgres part reads as Postgres down.
pub fn observation_from_proto(o: &meridian_proto::Observation, received_at_ms: u64) -> Observation {
    let lsn = |v: u64| (v != 0).then_some(Lsn(v));
    let probes = o
        .probes
        .iter()
        .map(|(name, p)| {
            let probe = PeerProbe {
                agent_reachable: p.agent_reachable,
                postgres_writable: p.postgres_writable,
            };
            (name.clone(), probe)
        })
        .collect();
    let mut obs = Observation {
        received_at_ms,
        seen_generation: Generation(o.generation),
        probes,
        resume_pending: o.resume_pending,
        lease_voters: o.lease_voters.clone(),
        ..Observation::default()
    };
    if let Some(pg) = &o.postgres {
        obs.postgres_up = pg.up;
        obs.in_recovery = pg.in_recovery;
        obs.fenced = pg.fenced;
        obs.timeline = pg.timeline;
        obs.wal_lsn = lsn(pg.current_lsn);
        obs.received_lsn = lsn(pg.received_lsn);
        obs.replayed_lsn = lsn(pg.replayed_lsn);
        obs.wal_receiver_streaming =
            pg.wal_receiver() == meridian_proto::WalReceiverStatus::Streaming;
        obs.upstream = (!pg.upstream.is_empty()).then(|| pg.upstream.clone());
        obs.sync_standby_names = pg
            .sync_standby_names
            .as_ref()
            .map(|s| SyncSet::new(s.names.iter().cloned(), s.k));
        obs.sync_target_seq = pg.sync_target_seq;
        obs.receiver_off_since = pg.receiver_off_generation.map(|g| {
            (
                Generation(g),
                BreakRound {
                    term: pg.receiver_off_round_term,
                    seq: pg.receiver_off_round_seq,
                },
            )
        });
        obs.after_primary_stop = pg.after_primary_stop_generation.map(Generation);
    }
    obs
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn observation_from_a_full_report() {
        use meridian_proto as pb;
        let report = pb::Observation {
            cluster: "c".into(),
            member: "e1".into(),
            sent_unix_ms: 123,
            generation: 4,
            postgres: Some(pb::PostgresObservation {
                up: true,
                in_recovery: true,
                timeline: 3,
                current_lsn: 0,
                received_lsn: 0x3_0000_0100,
                replayed_lsn: 0x3_0000_0080,
                wal_receiver: pb::WalReceiverStatus::Streaming as i32,
                fenced: false,
                upstream: "e2".into(),
                sync_standby_names: Some(pb::SyncStandbyNames {
                    names: vec!["w1".into(), "e2".into()],
                    k: 2,
                }),
                sync_target_seq: Some(9),
                receiver_off_generation: Some(4),
                receiver_off_round_term: 7,
                receiver_off_round_seq: 2,
                after_primary_stop_generation: Some(4),
                ..Default::default()
            }),
            probes: [
                (
                    "e2".to_string(),
                    pb::PeerProbe {
                        agent_reachable: true,
                        postgres_writable: true,
                    },
                ),
                (
                    "w1".to_string(),
                    pb::PeerProbe {
                        agent_reachable: false,
                        postgres_writable: false,
                    },
                ),
            ]
            .into_iter()
            .collect(),
            resume_pending: true,
            lease_voters: vec!["e1".into(), "e2".into(), "w1".into()],
            ..Default::default()
        };
        let expected = Observation {
            received_at_ms: 77,
            postgres_up: true,
            in_recovery: true,
            fenced: false,
            timeline: 3,
            wal_lsn: None,
            received_lsn: Some(Lsn(0x3_0000_0100)),
            replayed_lsn: Some(Lsn(0x3_0000_0080)),
            wal_receiver_streaming: true,
            upstream: Some("e2".into()),
            seen_generation: Generation(4),
            sync_standby_names: Some(SyncSet::new(["e2", "w1"], 2)),
            sync_target_seq: Some(9),
            probes: BTreeMap::from([
                (
                    "e2".to_string(),
                    PeerProbe {
                        agent_reachable: true,
                        postgres_writable: true,
                    },
                ),
                ("w1".to_string(), PeerProbe::default()),
            ]),
            resume_pending: true,
            receiver_off_since: Some((Generation(4), BreakRound { term: 7, seq: 2 })),
            after_primary_stop: Some(Generation(4)),
            lease_voters: vec!["e1".into(), "e2".into(), "w1".into()],
        };
        assert_eq!(observation_from_proto(&report, 77), expected);
    }

    #[test]
    fn observation_with_missing_optional_fields() {
        use meridian_proto as pb;
        // No Postgres part at all: reads as down, nothing known.
        let bare = pb::Observation {
            member: "e1".into(),
            generation: 2,
            ..Default::default()
        };
        assert_eq!(
            observation_from_proto(&bare, 5),
            Observation {
                received_at_ms: 5,
                seen_generation: Generation(2),
                ..Observation::default()
            }
        );
        // A fenced primary: zero LSNs, empty upstream and a non-streaming receiver read
        // as none; async sync names (present, empty) differ from unknown (absent).
        let mut pg = pb::PostgresObservation {
            up: false,
            fenced: true,
            timeline: 1,
            current_lsn: 0x100,
            wal_receiver: pb::WalReceiverStatus::Waiting as i32,
            sync_standby_names: Some(pb::SyncStandbyNames::default()),
            ..Default::default()
        };
        let report = pb::Observation {
            generation: 2,
            postgres: Some(pg.clone()),
            ..Default::default()
        };
        let expected = Observation {
            received_at_ms: 9,
            fenced: true,
            timeline: 1,
            wal_lsn: Some(Lsn(0x100)),
            seen_generation: Generation(2),
            sync_standby_names: Some(SyncSet::default()),
            ..Observation::default()
        };
        assert_eq!(observation_from_proto(&report, 9), expected);
        pg.sync_standby_names = None;
        let report = pb::Observation {
            generation: 2,
            postgres: Some(pg),
            ..Default::default()
        };
        assert_eq!(
            observation_from_proto(&report, 9),
            Observation {
                sync_standby_names: None,
                ..expected
            }
        );
    }
}
