//! The graceful stop of an agent (SIGTERM, `systemctl stop`): what happens to the local
//! Postgres before the runtime goes away.
//!
//! A stopped agent must never leave a writable Postgres that nobody routes to and nobody
//! can fence. So, when this member is the primary: hand over first (a switchover to the
//! best healthy standby, chosen by [`crate::precheck::switchover_candidate`] from the
//! leader's status, bounded by `shutdown.switchover_timeout`), then stop Postgres; when no
//! hand-over is possible (no candidate, refused, timed out, or `on_primary_stop = "fence"`),
//! fence Postgres (stopped, with the fence marker) and let the leader hear it, so that a
//! failover follows at once where a member is known to hold every acknowledged commit. A
//! standby's Postgres is stopped (fast), so it no longer acknowledges sync commits with no
//! agent beside it. The member's reconcile loop is stopped before Postgres is, so it cannot
//! start it again. Last, the `on_stop` callback runs (bounded by its timeout) before the
//! agent exits.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::Shared;
use crate::config::OnPrimaryStop;
use crate::pg::{PgInstance, StopMode};

/// Bound on stopping (or fencing) the local Postgres.
const PG_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs before the runtime shuts down. `member_task` is the reconcile loop of `pg`.
pub async fn before_shutdown(
    shared: &Arc<Shared>,
    member_task: Option<JoinHandle<()>>,
    pg: Option<PgInstance>,
) {
    let Some(pg) = pg else {
        return;
    };
    let me = shared.name().to_string();
    let primary_here =
        || shared.applied().intent.primary.as_deref() == Some(me.as_str()) && pg.is_running();
    if primary_here() && shared.config.shutdown.on_primary_stop == OnPrimaryStop::Switchover {
        match hand_over(shared).await {
            Ok(to) => tracing::info!("stopping: handed the primary over to {to}"),
            Err(e) => tracing::warn!(
                "stopping: could not hand the primary over ({e:#}); fencing Postgres so that a failover can follow"
            ),
        }
    }
    if let Some(t) = member_task {
        t.abort();
        let _ = t.await;
    }
    if shared.applied().intent.primary.as_deref() == Some(me.as_str()) {
        if let Err(e) = pg.fence(PG_STOP_TIMEOUT).await {
            tracing::error!("stopping: fencing the local Postgres failed: {e}");
        }
        // The leader replaces a primary whose own agent reports it fenced at once; give
        // the reporter a few rounds to say so before the agent goes.
        shared.wake_reporter.notify_one();
        tokio::time::sleep(shared.config.timing.observe_interval * 3).await;
        tracing::info!("stopping: the local Postgres (the primary) is fenced");
    } else if pg.is_running() {
        match pg.stop(StopMode::Fast, PG_STOP_TIMEOUT).await {
            Ok(()) => tracing::info!("stopping: the local Postgres is stopped"),
            Err(e) => tracing::error!("stopping: stopping the local Postgres failed: {e}"),
        }
    }
    // `on_stop` (once: a no-op when the observations already saw it stop), and every
    // callback still queued, before the runtime goes (bounded by their timeouts).
    if !pg.is_running() {
        super::callbacks::note(shared, None);
    }
    let bound = shared.callbacks.drain_bound();
    if !shared.callbacks.drain(bound).await {
        tracing::warn!(
            "stopping: callbacks still queued after {} ms; not waiting longer",
            bound.as_millis()
        );
    }
}

/// How long a stopping primary waits for a newly elected leader to hear from the standbys.
const GATHER_BOUND: Duration = Duration::from_secs(3);

/// A switchover away from this member, to the best healthy standby; returns its name once
/// the applied intent names it the primary.
async fn hand_over(shared: &Arc<Shared>) -> anyhow::Result<String> {
    let within = shared.config.shutdown.switchover_timeout;
    // Bounded within the switchover budget, before giving up on a hand-over and fencing.
    let to = super::switch_over::choose_target(shared, None, GATHER_BOUND.min(within / 2))
        .await
        .map_err(|why| anyhow::anyhow!(why))?;
    tracing::info!("stopping: switching over to {to} first");
    super::switch_over::run(shared, shared.name(), &to, within).await?;
    Ok(to)
}
