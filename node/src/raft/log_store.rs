//! The durable Raft log on redb: entries, vote, committed log id and last purged log id.
//!
//! Every write is one redb transaction committed with `Durability::Immediate` before the
//! call returns (and, for appends, before openraft's flush callback fires): a vote or an
//! entry that was acknowledged and then forgotten breaks Raft's safety. Writes are
//! serialized: openraft calls this store through `&mut self` from one task, and redb admits
//! one write transaction at a time anyway.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use anyhow::Context;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{any_error, blocking, LogId, StorageError, TypeConfig, Vote};

type Entry = openraft::Entry<TypeConfig>;

/// Log index → JSON of the entry.
const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_logs");
/// Small JSON values under fixed keys.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

pub(super) fn create_tables(db: &Database) -> anyhow::Result<()> {
    let txn = db.begin_write()?;
    txn.open_table(LOGS)?;
    txn.open_table(META)?;
    txn.commit()?;
    Ok(())
}

/// The Raft log of one member. Cheap to clone: clones share the database, and serve as the
/// log reader openraft's replication tasks use.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub(super) fn new(db: Arc<Database>) -> Self {
        LogStore { db }
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> anyhow::Result<Option<T>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        match table.get(key)? {
            None => Ok(None),
            Some(v) => Ok(Some(
                serde_json::from_slice(v.value()).with_context(|| format!("decoding {key}"))?,
            )),
        }
    }

    async fn write_meta<T: Serialize>(&self, key: &'static str, value: &T) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(value)?;
        let db = self.db.clone();
        blocking(move || {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            txn.open_table(META)?.insert(key, bytes.as_slice())?;
            txn.commit().with_context(|| format!("committing {key}"))?;
            Ok(())
        })
        .await
    }

    fn read_entries<RB: RangeBounds<u64>>(&self, range: RB) -> anyhow::Result<Vec<Entry>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOGS)?;
        let mut out = Vec::new();
        for row in table.range::<u64>(range)? {
            let (k, v) = row?;
            let entry: Entry = serde_json::from_slice(v.value())
                .with_context(|| format!("decoding log entry {}", k.value()))?;
            out.push(entry);
        }
        Ok(out)
    }

    fn log_state(&self) -> anyhow::Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId> = self.read_meta(KEY_LAST_PURGED)?;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOGS)?;
        let last = match table.last()? {
            None => None,
            Some((_, v)) => {
                let entry: Entry =
                    serde_json::from_slice(v.value()).context("decoding last log entry")?;
                Some(entry.log_id)
            }
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_entries(range)
            .map_err(|e| StorageIOError::read_logs(any_error(e)).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.log_state()
            .map_err(|e| StorageIOError::read_logs(any_error(e)).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(KEY_VOTE, vote)
            .await
            .map_err(|e| StorageIOError::write_vote(any_error(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(KEY_VOTE)
            .map_err(|e| StorageIOError::read_vote(any_error(e)).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.write_meta(KEY_COMMITTED, &committed)
            .await
            .map_err(|e| StorageIOError::write(any_error(e)).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        // Stored as JSON of Option<LogId>: a missing key and a stored `null` both mean none.
        self.read_meta::<Option<LogId>>(KEY_COMMITTED)
            .map(Option::flatten)
            .map_err(|e| StorageIOError::read(any_error(e)).into())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let rows = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, serde_json::to_vec(&e)?)))
            .collect::<Result<Vec<(u64, Vec<u8>)>, serde_json::Error>>()
            .map_err(|e| StorageIOError::write_logs(openraft::AnyError::new(&e)))?;
        let db = self.db.clone();
        let res = blocking(move || {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let mut table = txn.open_table(LOGS)?;
                for (index, bytes) in &rows {
                    table.insert(*index, bytes.as_slice())?;
                }
            }
            txn.commit().context("committing log entries")?;
            Ok(())
        })
        .await;
        match res {
            Ok(()) => {
                // Only now is the append durable, so only now may openraft count it.
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let msg = format!("{e:#}");
                callback.log_io_completed(Err(std::io::Error::other(msg.clone())));
                Err(StorageIOError::write_logs(openraft::AnyError::error(msg)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            txn.open_table(LOGS)?
                .retain_in::<u64, _>(log_id.index.., |_, _| false)?;
            txn.commit().context("committing log truncation")?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(any_error(e)).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let prev: Option<LogId> = self
            .read_meta(KEY_LAST_PURGED)
            .map_err(|e| StorageIOError::read_logs(any_error(e)))?;
        if prev.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        let marker = serde_json::to_vec(&log_id)
            .map_err(|e| StorageIOError::write_logs(openraft::AnyError::new(&e)))?;
        let db = self.db.clone();
        blocking(move || {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            // The marker and the deletion commit together, so a crash never leaves a log whose
            // first entry is missing without a purge marker to explain it.
            txn.open_table(META)?
                .insert(KEY_LAST_PURGED, marker.as_slice())?;
            txn.open_table(LOGS)?
                .retain_in::<u64, _>(..=log_id.index, |_, _| false)?;
            txn.commit().context("committing log purge")?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(any_error(e)).into())
    }
}
