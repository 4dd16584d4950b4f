//! Runs the lease gate (`pg::gate`) while this member is the primary: one replication
//! session to the local Postgres, reconnected (bounded backoff) when it ends, stopped as
//! soon as the applied intent names another primary.
//!
//! The gate answers "may this WAL be confirmed?" with [`lease_holds`]: the intent names
//! this member primary and a majority granted a renewal sent less than the fence offset
//! ago, read on the monotonic clock when the answer is given. That is the same deadline
//! the lease loop and the watchdog fence at, so no commit is released past it.
//!
//! Whether commits wait on the gate at all is decided where `synchronous_standby_names`
//! is rendered ([`super::member::render_sync_standby_names`]): only with
//! `postgres.lease_gate` on and no sync standby in the target set.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Shared;
use crate::pg::gate::{self, GateProgress};
use crate::pg::PgInstance;

/// How often, at least, the supervisor looks whether a named primary's Postgres runs (a
/// new applied intent wakes it at once).
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// First and longest pause before reconnecting after a session ended.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A session that streamed this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(5);

/// Whether the primary's lease holds now: the rule the gate confirms WAL under
/// (`meridian_core::lease::gate_may_confirm`, on the agent's millisecond clock).
pub fn lease_holds(shared: &Shared) -> bool {
    let intent = &shared.applied().intent;
    let ms = |at: Instant| {
        u64::try_from(at.saturating_duration_since(shared.epoch).as_millis()).unwrap_or(u64::MAX)
    };
    let t = &shared.config.timing;
    let dur_ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    meridian_core::lease::gate_may_confirm(
        intent.primary.as_deref() == Some(shared.name()),
        shared.lease.last_ok(intent.generation).map(ms),
        ms(Instant::now()),
        dur_ms(t.fence_after),
        dur_ms(t.lease_ttl),
    )
}

fn named_primary(shared: &Shared) -> bool {
    shared.applied().intent.primary.as_deref() == Some(shared.name())
}

pub async fn run(shared: Arc<Shared>, pg: PgInstance) {
    if !shared
        .config
        .postgres
        .as_ref()
        .is_some_and(|p| p.lease_gate)
    {
        return;
    }
    let target = pg.gate_target();
    let progress = Mutex::new(GateProgress::default());
    let mut errors = super::errlog::ErrorLog::default();
    let mut backoff = BACKOFF_MIN;
    let mut intent_rx = shared.applied.clone();
    loop {
        if !named_primary(&shared) || pg.is_fenced() || !pg.is_running() {
            // Woken by a new applied intent at once (a promotion); Postgres' own state
            // changes have no signal, so at least once per poll interval.
            let _ = tokio::time::timeout(POLL_INTERVAL, intent_rx.changed()).await;
            continue;
        }
        let started = Instant::now();
        let stop = {
            let shared = shared.clone();
            let mut rx = shared.applied.clone();
            async move {
                while named_primary(&shared) {
                    if rx.changed().await.is_err() {
                        // The agent is shutting down.
                        return;
                    }
                }
            }
        };
        let outcome = gate::run(&target, || lease_holds(&shared), stop, &progress).await;
        match outcome {
            Ok(()) => {
                errors.log("lease gate", Ok(()));
                backoff = BACKOFF_MIN;
                continue;
            }
            Err(e) => {
                // A primary that just promoted ends cascading walsenders, and a restart
                // ends every session: expected, so retried quietly at first.
                errors.log("lease gate", Err(&e.to_string()));
            }
        }
        if started.elapsed() >= HEALTHY_SESSION {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
