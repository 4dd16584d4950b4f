//! The persisted format (`meridian_core::intent::FORMAT_VERSION`): decodes fixtures of a
//! Raft log (commands) and of a snapshot (the intent) written by format version 1, and
//! checks that replaying the log rebuilds the snapshot. A change to the encoding that
//! breaks these fixtures breaks logs on disk.
//!
//! `MERIDIAN_WRITE_FIXTURES=1 cargo test -p meridian-core --test format` rewrites the
//! fixtures of the *current* version (only when bumping FORMAT_VERSION: keep the old ones).

use meridian_core::decide::SyncSet;
use meridian_core::intent::{
    BreakRound, Command, Intent, MemberTags, Promote, PromotionKind, Response, FORMAT_VERSION,
};
use meridian_core::policy::{Policy, RegionPolicy, SyncMode};
use meridian_core::types::{Generation, Lsn, MemberKind};

const LOG_V1: &str = include_str!("fixtures/log-v1.json");
const SNAPSHOT_V1: &str = include_str!("fixtures/snapshot-v1.json");

/// The log the version-1 fixtures were written from.
fn log() -> Vec<Command> {
    let add = |name: &str, region: &str, kind| Command::AddMember {
        name: name.into(),
        region: region.into(),
        kind,
        tags: MemberTags::default(),
        at_unix_ms: 1_700_000_000_000,
    };
    // Written when the default was true: the fixture stores the value, whatever the
    // default is today.
    let mut policy = Policy {
        async_failover: true,
        ..Policy::default()
    };
    policy.regions.insert(
        "east".into(),
        RegionPolicy {
            mode: SyncMode::Sync,
            ..RegionPolicy::default()
        },
    );
    vec![
        add("e1", "east", MemberKind::Data),
        add("e2", "east", MemberKind::Data),
        add("w1", "west", MemberKind::Data),
        add("x1", "central", MemberKind::Witness),
        Command::SetPolicy {
            policy,
            reason: "fixture".into(),
            at_unix_ms: 1_700_000_000_100,
            expected_version: None,
        },
        Command::Promote(Promote {
            member: "e1".into(),
            generation: Generation(1),
            kind: PromotionKind::Bootstrap,
            force: false,
            reason: "bootstrap".into(),
            at_unix_ms: 1_700_000_000_200,
            old_primary_lsn: None,
            new_primary_lsn: None,
            possible_loss_bytes: None,
            old_lease_released: false,
            lease_break_round: None,
        }),
        Command::RecordSyncSet {
            generation: Generation(1),
            set: SyncSet::new(["e2", "w1"], 1),
            degraded: false,
            degraded_until_lsn: None,
        },
        Command::SetSyncTarget {
            generation: Generation(1),
            set: SyncSet::new(["e2"], 1),
        },
        Command::Promote(Promote {
            member: "e2".into(),
            generation: Generation(2),
            kind: PromotionKind::Failover,
            force: false,
            reason: "lease expired".into(),
            at_unix_ms: 1_700_000_000_900,
            old_primary_lsn: Some(Lsn(0x3_0000_0100)),
            new_primary_lsn: Some(Lsn(0x3_0000_0100)),
            possible_loss_bytes: Some(0),
            old_lease_released: true,
            lease_break_round: Some(BreakRound { term: 4, seq: 2 }),
        }),
        Command::ReleaseLeaseBreaks {
            generation: Generation(2),
            upto: BreakRound { term: 4, seq: 1 },
        },
        Command::SetMaintenance { on: true },
    ]
}

fn replay(log: &[Command]) -> Intent {
    let mut intent = Intent::default();
    for (i, c) in log.iter().enumerate() {
        let r = intent.apply(c);
        assert!(
            !matches!(r, Response::Refused(_)),
            "entry {i} refused: {r:?}"
        );
    }
    intent
}

#[test]
fn the_format_version_is_one() {
    // Bumping it needs fixtures of the new version next to the old ones.
    assert_eq!(FORMAT_VERSION, 1);
}

#[test]
fn a_version_1_log_and_snapshot_decode_and_agree() {
    if std::env::var_os("MERIDIAN_WRITE_FIXTURES").is_some() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let log = log();
        std::fs::write(
            dir.join("log-v1.json"),
            serde_json::to_string_pretty(&log).unwrap() + "\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("snapshot-v1.json"),
            serde_json::to_string_pretty(&replay(&log)).unwrap() + "\n",
        )
        .unwrap();
        return;
    }
    let decoded: Vec<Command> = serde_json::from_str(LOG_V1).expect("the v1 log decodes");
    assert_eq!(decoded, log(), "the v1 log decodes to the same commands");
    let snapshot: Intent = serde_json::from_str(SNAPSHOT_V1).expect("the v1 snapshot decodes");
    // `SyncTarget::seq` came after v1: a v1 snapshot decodes it as 0 where replaying the
    // v1 log counts the targets. A member restored from such a snapshot names lower
    // numbers than the leader until it installs a newer snapshot, which only keeps the
    // sync record from shrinking (the safe side); everything else agrees.
    let mut replayed = replay(&decoded);
    if let Some(t) = &mut replayed.sync_target {
        assert!(t.seq > 0, "replaying the log counts the sync targets");
        t.seq = 0;
    }
    assert_eq!(
        replayed, snapshot,
        "replaying the log rebuilds the snapshot"
    );
    assert_eq!(snapshot.primary.as_deref(), Some("e2"));
    assert_eq!(snapshot.generation, Generation(2));
    assert!(snapshot.maintenance);
}
