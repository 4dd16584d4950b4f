//! Tests of the redb Raft storage: openraft's conformance suite, and what must survive a
//! restart (vote, entries, committed id, purge and truncation, snapshots and the intent).

use std::collections::BTreeSet;

use openraft::entry::RaftEntry;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, Entry, EntryPayload, Membership, RaftLogReader};
use openraft::{RaftSnapshotBuilder, StorageIOError};
use tempfile::TempDir;

use super::intent::{Command, MemberKind, MemberTags, Promote, PromotionKind, Refused};
use super::*;
use crate::types::{Generation, MemberId};

struct RedbStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RedbStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir =
            tempfile::tempdir().map_err(|e| StorageIOError::write(openraft::AnyError::new(&e)))?;
        let (log, sm) = open_store(dir.path()).map_err(|e| StorageIOError::write(any_error(e)))?;
        Ok((dir, log, sm))
    }
}

/// openraft's own storage conformance suite; each case gets a fresh temp dir.
#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(RedbStoreBuilder).expect("openraft storage suite");
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn blank(term: u64, index: u64) -> Entry<TypeConfig> {
    Entry::new_blank(log_id(term, index))
}

fn normal(term: u64, index: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(cmd),
    }
}

fn add_member(name: &str, kind: MemberKind) -> Command {
    Command::AddMember {
        name: name.into(),
        region: "r1".into(),
        kind,
        tags: MemberTags::default(),
        at_unix_ms: 1,
    }
}

fn promote(member: &str, generation: u64) -> Command {
    Command::Promote(Promote {
        member: member.into(),
        generation: Generation(generation),
        kind: PromotionKind::Bootstrap,
        force: false,
        reason: "bootstrap".into(),
        at_unix_ms: 2,
        old_primary_lsn: None,
        new_primary_lsn: None,
        possible_loss_bytes: None,
        old_lease_released: false,
        lease_break_round: None,
    })
}

#[tokio::test]
async fn log_state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = open_store(dir.path()).unwrap();
        log.save_vote(&Vote::new(3, 1)).await.unwrap();
        log.blocking_append((1..=10).map(|i| blank(2, i)))
            .await
            .unwrap();
        log.save_committed(Some(log_id(2, 7))).await.unwrap();
        log.purge(log_id(2, 3)).await.unwrap();
        log.truncate(log_id(2, 9)).await.unwrap();
    }
    let (mut log, _sm) = open_store(dir.path()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 7)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(2, 3)));
    assert_eq!(state.last_log_id, Some(log_id(2, 8)));
    let indexes: Vec<u64> = log
        .try_get_log_entries(0..100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.log_id.index)
        .collect();
    assert_eq!(indexes, (4..=8).collect::<Vec<_>>());

    // Purging everything leaves the purge marker as the last log id.
    log.purge(log_id(2, 8)).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(2, 8)));
    assert!(log.try_get_log_entries(0..100).await.unwrap().is_empty());
    // An older purge does not move the marker back.
    log.purge(log_id(2, 5)).await.unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap().last_purged_log_id,
        Some(log_id(2, 8))
    );
}

#[tokio::test]
async fn database_is_exclusive_per_process() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open_store(dir.path()).unwrap();
    assert!(open_store(dir.path()).is_err(), "a second open must fail");
}

#[tokio::test]
async fn state_machine_applies_commands_and_reports_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open_store(dir.path()).unwrap();
    let mut rx = sm.subscribe();
    let mem = Membership::new(vec![BTreeSet::from([1u64])], None);
    let responses = sm
        .apply([
            Entry {
                log_id: log_id(1, 1),
                payload: EntryPayload::Membership(mem),
            },
            normal(1, 2, add_member("a1", MemberKind::Data)),
            normal(1, 3, add_member("a1", MemberKind::Data)),
            normal(1, 4, add_member("w1", MemberKind::Witness)),
            normal(1, 5, promote("w1", 1)),
            normal(1, 6, promote("a1", 1)),
        ])
        .await
        .unwrap();
    assert_eq!(
        responses,
        vec![
            Response::Empty,
            Response::MemberAdded(MemberId(1)),
            Response::Refused(Refused::MemberExists("a1".into())),
            Response::MemberAdded(MemberId(2)),
            Response::Refused(Refused::NotDataMember("w1".into())),
            Response::Applied,
        ]
    );
    assert!(rx.has_changed().unwrap());
    let applied = rx.borrow_and_update().clone();
    assert_eq!(applied.last_applied, Some(log_id(1, 6)));
    assert_eq!(applied.intent.primary.as_deref(), Some("a1"));
    assert_eq!(applied.intent.generation, Generation(1));
    assert_eq!(applied.intent.members.len(), 2);
    assert_eq!(
        sm.applied_state().await.unwrap().1.log_id(),
        &Some(log_id(1, 1))
    );
}

#[tokio::test]
async fn snapshot_restores_intent_after_restart_and_installs_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let built = {
        let (_log, mut sm) = open_store(dir.path()).unwrap();
        sm.apply([
            normal(1, 1, add_member("a1", MemberKind::Data)),
            normal(1, 2, promote("a1", 1)),
        ])
        .await
        .unwrap();
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 2)));
        // Applied after the snapshot: gone after a restart until openraft re-applies it.
        sm.apply([normal(1, 3, add_member("a2", MemberKind::Data))])
            .await
            .unwrap();
        snap
    };
    let (_log, mut sm) = open_store(dir.path()).unwrap();
    let state = sm.applied().clone();
    assert_eq!(state.last_applied, Some(log_id(1, 2)));
    assert_eq!(state.intent.primary.as_deref(), Some("a1"));
    assert!(state.intent.member("a2").is_none());
    assert_eq!(
        sm.get_current_snapshot().await.unwrap().unwrap().meta,
        built.meta
    );

    // Install on a fresh member, then restart it: the installed state is durable.
    let other = tempfile::tempdir().unwrap();
    {
        let (_l, mut sm2) = open_store(other.path()).unwrap();
        let mut buf = sm2.begin_receiving_snapshot().await.unwrap();
        *buf = *built.snapshot;
        sm2.install_snapshot(&built.meta, buf).await.unwrap();
        assert_eq!(sm2.applied().intent, state.intent);
    }
    let (_l, sm2) = open_store(other.path()).unwrap();
    assert_eq!(sm2.applied().intent, state.intent);
    assert_eq!(sm2.applied().last_applied, Some(log_id(1, 2)));
}
