//! The Raft state machine: the applied cluster intent in memory, and its snapshots, which
//! are persisted in the same redb file so a restarted member comes back with its state
//! (openraft then re-applies the committed entries after the snapshot).
//!
//! Readers outside Raft follow the applied state through a `watch` channel
//! ([`StateMachineStore::subscribe`]) instead of locking the state machine.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::intent::{Intent, Response};
use super::{
    any_error, blocking, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

type Entry = openraft::Entry<TypeConfig>;

/// The current snapshot: its meta as JSON and its data (JSON of the intent) as bytes.
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");
const KEY_META: &str = "meta";
const KEY_DATA: &str = "data";

pub(super) fn create_tables(db: &Database) -> anyhow::Result<()> {
    let txn = db.begin_write()?;
    txn.open_table(SNAPSHOT)?;
    txn.commit()?;
    Ok(())
}

/// What the state machine has applied: up to which entry, under which membership, and the
/// resulting intent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub intent: Intent,
}

pub struct StateMachineStore {
    db: Arc<Database>,
    state: AppliedState,
    tx: watch::Sender<Arc<AppliedState>>,
    /// Makes snapshot ids unique even when two snapshots cover the same log id.
    snapshot_seq: Arc<AtomicU64>,
}

fn read_snapshot(db: &Database) -> anyhow::Result<Option<(SnapshotMeta, Vec<u8>)>> {
    let txn = db.begin_read()?;
    let table = txn.open_table(SNAPSHOT)?;
    let (Some(meta), Some(data)) = (table.get(KEY_META)?, table.get(KEY_DATA)?) else {
        return Ok(None);
    };
    let meta: SnapshotMeta =
        serde_json::from_slice(meta.value()).context("decoding snapshot meta")?;
    Ok(Some((meta, data.value().to_vec())))
}

/// Stores `meta` and `data` as the current snapshot. A built snapshot does not replace a newer
/// stored one (an install may have raced the build); an installed one always replaces it.
async fn write_snapshot(
    db: Arc<Database>,
    meta: &SnapshotMeta,
    data: Vec<u8>,
    only_if_newer: bool,
) -> anyhow::Result<()> {
    let meta_bytes = serde_json::to_vec(meta)?;
    let last = meta.last_log_id;
    blocking(move || {
        if only_if_newer {
            if let Some((stored, _)) = read_snapshot(&db)? {
                if stored.last_log_id > last {
                    return Ok(());
                }
            }
        }
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut table = txn.open_table(SNAPSHOT)?;
            table.insert(KEY_META, meta_bytes.as_slice())?;
            table.insert(KEY_DATA, data.as_slice())?;
        }
        txn.commit().context("committing snapshot")?;
        Ok(())
    })
    .await
}

fn state_from_snapshot(meta: &SnapshotMeta, data: &[u8]) -> anyhow::Result<AppliedState> {
    let intent: Intent = serde_json::from_slice(data).context("decoding snapshot intent")?;
    Ok(AppliedState {
        last_applied: meta.last_log_id,
        last_membership: meta.last_membership.clone(),
        intent,
    })
}

impl StateMachineStore {
    pub(super) fn load(db: Arc<Database>) -> anyhow::Result<Self> {
        let state = match read_snapshot(&db)? {
            Some((meta, data)) => state_from_snapshot(&meta, &data)?,
            None => AppliedState::default(),
        };
        let (tx, _) = watch::channel(Arc::new(state.clone()));
        Ok(StateMachineStore {
            db,
            state,
            tx,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Follows the applied state; the value is replaced after every applied batch and every
    /// installed snapshot. Clone the `Arc` out of `borrow()`, don't hold the borrow.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AppliedState>> {
        self.tx.subscribe()
    }

    pub fn applied(&self) -> &AppliedState {
        &self.state
    }

    fn publish(&self) {
        self.tx.send_replace(Arc::new(self.state.clone()));
    }
}

/// Builds a snapshot of the state as it was when the builder was made.
pub struct IntentSnapshotBuilder {
    db: Arc<Database>,
    state: AppliedState,
    seq: Arc<AtomicU64>,
}

impl RaftSnapshotBuilder<TypeConfig> for IntentSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let data = serde_json::to_vec(&self.state.intent)
            .map_err(|e| StorageIOError::write_snapshot(None, openraft::AnyError::new(&e)))?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let snapshot_id = match &self.state.last_applied {
            Some(l) => format!("{}-{}-{now_ms}-{seq}", l.leader_id, l.index),
            None => format!("none-{now_ms}-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self.state.last_applied,
            last_membership: self.state.last_membership.clone(),
            snapshot_id,
        };
        write_snapshot(self.db.clone(), &meta, data.clone(), true)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any_error(e)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = IntentSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.state.last_applied, self.state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut responses = Vec::new();
        for entry in entries {
            self.state.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => Response::Empty,
                EntryPayload::Normal(command) => self.state.intent.apply(&command),
                EntryPayload::Membership(m) => {
                    self.state.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::Empty
                }
            };
            responses.push(response);
        }
        self.publish();
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        IntentSnapshotBuilder {
            db: self.db.clone(),
            state: self.state.clone(),
            seq: self.snapshot_seq.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state = state_from_snapshot(meta, &data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), any_error(e)))?;
        // Durable first: after a crash the member must come back with this state, not an older one.
        write_snapshot(self.db.clone(), meta, data, false)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), any_error(e)))?;
        self.state = state;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let stored = read_snapshot(&self.db)
            .map_err(|e| StorageIOError::read_snapshot(None, any_error(e)))?;
        Ok(stored.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
