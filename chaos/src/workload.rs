//! The client workload of a chaos run: one writer per region inserting unique ids through
//! its region's proxies with a multi-host connection string and
//! `target_session_attrs=read-write`, and the split-brain probe that tries a small commit
//! on every Postgres directly, every 100 ms.
//!
//! Owns the classification of a write's fate. A write is `Ok` only when the commit
//! returned success and no warning arrived on its connection meanwhile (a cancelled
//! synchronous-replication wait returns success with a WARNING: committed locally, maybe
//! not replicated). Anything that may have reached the server without an answer
//! (timeout, connection lost, server shutdown) is `Indeterminate`; only a refusal the
//! server gave before committing (read-only, not connected at all) is `Failed`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::check::{Outcome, ProbeRound, WriteRecord};

/// DDL of the tables the workload writes; run once on the primary before the writers start.
pub const SETUP_SQL: &str = "CREATE TABLE IF NOT EXISTS chaos_writes (
        id bigint PRIMARY KEY, writer text NOT NULL, at timestamptz NOT NULL DEFAULT now());
     CREATE TABLE IF NOT EXISTS chaos_probe (member text NOT NULL, at timestamptz NOT NULL DEFAULT now());";

/// One writer: a region's client.
#[derive(Clone, Debug)]
pub struct WriterSpec {
    pub name: String,
    pub region: String,
    /// libpq key=value string, usually multi-host with `target_session_attrs=read-write`.
    pub conninfo: String,
    /// Ids are `id_base + n`; give each writer a disjoint range.
    pub id_base: u64,
    pub interval: Duration,
    /// Bound on one insert, commit included; past it the write is indeterminate.
    pub write_timeout: Duration,
    /// Bound on finding a writable host.
    pub connect_timeout: Duration,
}

/// A connection whose server warnings are counted, so a commit that came back with a
/// "sync wait cancelled" warning is not taken for an acknowledged one.
struct Conn {
    client: Client,
    warned: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(conninfo: &str, timeout: Duration) -> anyhow::Result<Conn> {
    let (client, mut connection) =
        tokio::time::timeout(timeout, tokio_postgres::connect(conninfo, NoTls))
            .await
            .with_context(|| format!("connect within {timeout:?}"))?
            .context("connect")?;
    let warned = Arc::new(AtomicBool::new(false));
    let flag = warned.clone();
    let task = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(msg) = messages.next().await {
            match msg {
                Ok(AsyncMessage::Notice(n)) if n.severity() == "WARNING" => {
                    flag.store(true, Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    Ok(Conn {
        client,
        warned,
        task,
    })
}

/// Is this error a refusal that proves the statement did not commit?
fn refused_before_commit(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else {
        return false;
    };
    // Errors raised while planning or executing the INSERT, before any commit: the
    // server answered and the transaction was rolled back.
    *code == SqlState::READ_ONLY_SQL_TRANSACTION
        || *code == SqlState::UNIQUE_VIOLATION
        || *code == SqlState::UNDEFINED_TABLE
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || code.code().starts_with("42")
}

/// Runs one writer until `stop` turns true; returns every attempt's record.
/// Instants are offsets from `t0`.
pub async fn run_writer(
    spec: WriterSpec,
    t0: Instant,
    mut stop: watch::Receiver<bool>,
) -> Vec<WriteRecord> {
    let mut records = Vec::new();
    let mut conn: Option<Conn> = None;
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        let id = spec.id_base + n;
        n += 1;
        let start = t0.elapsed();
        if conn.is_none() {
            match connect(&spec.conninfo, spec.connect_timeout).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    // Nothing was sent: the id was never written.
                    records.push(WriteRecord {
                        id,
                        writer: spec.name.clone(),
                        region: spec.region.clone(),
                        outcome: Outcome::Failed,
                        start,
                        end: t0.elapsed(),
                        server_port: None,
                    });
                    continue;
                }
            }
        }
        let c = conn.as_ref().expect("connected above");
        c.warned.store(false, Ordering::SeqCst);
        // RETURNING the server's own port says which member took the write.
        let res = tokio::time::timeout(
            spec.write_timeout,
            c.client.query_one(
                "INSERT INTO chaos_writes (id, writer) VALUES ($1, $2) RETURNING inet_server_port()",
                &[&(id as i64), &spec.name],
            ),
        )
        .await;
        let mut server_port = None;
        let outcome = match res {
            Ok(Ok(row)) if !c.warned.load(Ordering::SeqCst) => {
                server_port = row
                    .try_get::<_, Option<i32>>(0)
                    .ok()
                    .flatten()
                    .and_then(|p| u16::try_from(p).ok());
                Outcome::Ok
            }
            Ok(Ok(_)) => {
                conn = None;
                Outcome::Indeterminate
            }
            Ok(Err(e)) if refused_before_commit(&e) => {
                // A read-only host (fenced or demoted): find the writable one again.
                conn = None;
                Outcome::Failed
            }
            Ok(Err(_)) | Err(_) => {
                conn = None;
                Outcome::Indeterminate
            }
        };
        records.push(WriteRecord {
            id,
            writer: spec.name.clone(),
            region: spec.region.clone(),
            outcome,
            start,
            end: t0.elapsed(),
            server_port,
        });
    }
    records
}

/// A member the split-brain probe reaches directly (not through the proxies).
#[derive(Clone, Debug)]
pub struct ProbeTarget {
    pub member: String,
    pub conninfo: String,
}

/// Every `interval`, tries a small commit on every target at once, each bounded by
/// `timeout`; returns one round per tick with the members that accepted.
pub async fn run_split_brain_probe(
    targets: Vec<ProbeTarget>,
    interval: Duration,
    timeout: Duration,
    t0: Instant,
    mut stop: watch::Receiver<bool>,
) -> Vec<ProbeRound> {
    let mut conns: Vec<Option<Conn>> = targets.iter().map(|_| None).collect();
    let mut rounds = Vec::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        let at = t0.elapsed();
        let attempts = targets
            .iter()
            .zip(conns.iter_mut())
            .map(|(t, slot)| async move {
                let accepted = tokio::time::timeout(timeout, probe_once(t, slot)).await;
                match accepted {
                    Ok(true) => true,
                    _ => {
                        *slot = None;
                        false
                    }
                }
            });
        let results = futures::future::join_all(attempts).await;
        let accepted = targets
            .iter()
            .zip(results)
            .filter(|(_, ok)| *ok)
            .map(|(t, _)| t.member.clone())
            .collect();
        rounds.push(ProbeRound { at, accepted });
    }
    rounds
}

async fn probe_once(t: &ProbeTarget, slot: &mut Option<Conn>) -> bool {
    if slot.is_none() {
        match connect(&t.conninfo, Duration::from_secs(1)).await {
            Ok(c) => *slot = Some(c),
            Err(_) => return false,
        }
    }
    let c = slot.as_ref().expect("connected above");
    c.warned.store(false, Ordering::SeqCst);
    let ok = c
        .client
        .execute("INSERT INTO chaos_probe (member) VALUES ($1)", &[&t.member])
        .await
        .is_ok();
    ok && !c.warned.load(Ordering::SeqCst)
}

/// Reads every id in the table from the given (final) primary.
pub async fn read_final_ids(
    conninfo: &str,
    timeout: Duration,
) -> anyhow::Result<std::collections::BTreeSet<u64>> {
    let c = connect(conninfo, timeout)
        .await
        .context("connect to read the final table")?;
    let rows = tokio::time::timeout(timeout, c.client.query("SELECT id FROM chaos_writes", &[]))
        .await
        .context("read the final table in time")?
        .context("read the final table")?;
    Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
}

/// Creates the workload's tables on the primary.
pub async fn setup(conninfo: &str, timeout: Duration) -> anyhow::Result<()> {
    let c = connect(conninfo, timeout)
        .await
        .context("connect to set up the workload tables")?;
    tokio::time::timeout(timeout, c.client.batch_execute(SETUP_SQL))
        .await
        .context("create the workload tables in time")?
        .context("create the workload tables")?;
    Ok(())
}
