//! Backup metrics on `GET /metrics`: WAL segments waiting to be archived (the `.ready`
//! files in `pg_wal/archive_status`, read every [`READY_EVERY`] without a Postgres
//! session), and on the primary, every [`INFO_EVERY`], the age of the last good backup
//! (pgBackRest's info) and `pg_stat_archiver`'s failure count — one session a minute, so
//! an idle agent stays idle.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::pgbackrest::Pgbackrest;
use crate::agent::Shared;

const READY_EVERY: Duration = Duration::from_secs(10);
const INFO_EVERY: Duration = Duration::from_secs(60);

/// The backup gauges (part of [`crate::metrics::Metrics`]).
#[derive(Default)]
pub struct BackupMetrics {
    /// Seconds since the newest backup without error finished; -1 when there is none or
    /// it is unknown (not the primary, no `[backup]`).
    pub last_backup_age_seconds: Gauge<f64, AtomicU64>,
    /// WAL segments waiting for `archive_command` (archive lag).
    pub archive_ready_segments: Gauge,
    /// `pg_stat_archiver.failed_count` on the primary (since its statistics reset).
    pub archive_failed_count: Gauge,
}

impl BackupMetrics {
    pub fn register(&self, registry: &mut Registry) {
        self.last_backup_age_seconds.set(-1.0);
        registry.register(
            "backup_last_good_age_seconds",
            "Seconds since the newest good pgBackRest backup finished (-1 = none or unknown)",
            self.last_backup_age_seconds.clone(),
        );
        registry.register(
            "archive_ready_segments",
            "WAL segments waiting to be archived",
            self.archive_ready_segments.clone(),
        );
        registry.register(
            "archive_failed_count",
            "Failed archive_command runs on the primary (pg_stat_archiver)",
            self.archive_failed_count.clone(),
        );
    }
}

/// Number of `.ready` files in the data dir's `pg_wal/archive_status`.
fn ready_count(data_dir: &std::path::Path) -> i64 {
    std::fs::read_dir(data_dir.join("pg_wal").join("archive_status"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".ready"))
                .count() as i64
        })
        .unwrap_or(0)
}

/// Runs for the agent's lifetime on a data member with `[backup]` (returns at once
/// otherwise).
pub async fn run(shared: Arc<Shared>) {
    let Some(Ok(br)) = Pgbackrest::from_config(&shared.config) else {
        return;
    };
    let Some(pg_cfg) = shared.config.postgres.clone() else {
        return;
    };
    let m = &shared.metrics.backup;
    let mut last_info: Option<Instant> = None;
    let mut ticker = tokio::time::interval(READY_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        m.archive_ready_segments.set(ready_count(&pg_cfg.data_dir));
        let primary = shared.applied().intent.primary.as_deref() == Some(shared.name());
        if !primary {
            m.last_backup_age_seconds.set(-1.0);
            continue;
        }
        if last_info.is_some_and(|t| t.elapsed() < INFO_EVERY) {
            continue;
        }
        last_info = Some(Instant::now());
        match br.info().await {
            Ok(info) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or_default();
                let newest = info
                    .backup
                    .iter()
                    .filter(|b| !b.error)
                    .map(|b| b.timestamp.stop)
                    .max();
                m.last_backup_age_seconds
                    .set(newest.map_or(-1.0, |t| (now - t).max(0) as f64));
            }
            Err(e) => tracing::debug!("backup metrics: {e}"),
        }
        if let Ok(pg) = crate::agent::observe::local_instance_or_why(&shared.config).await {
            if let Ok(c) = pg.connect().await {
                let q = c.query_one("SELECT failed_count FROM pg_stat_archiver", &[]);
                if let Ok(Ok(row)) = tokio::time::timeout(Duration::from_secs(5), q).await {
                    m.archive_failed_count.set(row.get::<_, i64>(0));
                }
            }
        }
    }
}
