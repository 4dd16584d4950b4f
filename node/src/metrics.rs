//! Prometheus metrics of one agent: the registry, the metric handles the runtime updates,
//! and their text rendering for `GET /metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The metrics of one agent. Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    /// 1 for the member's current role (`primary`, `sync_standby`, ...), 0 for the others.
    pub role: Family<Labels, Gauge>,
    pub generation: Gauge,
    /// Seconds left on this primary's lease; 0 when not primary or expired.
    pub lease_remaining_seconds: Gauge<f64, AtomicU64>,
    /// Per standby (on the primary): bytes between the primary's position and the
    /// standby's replay position.
    pub replication_lag_bytes: Family<Labels, Gauge>,
    /// On a standby: bytes from the primary's current position (read no longer ago than
    /// the bound of `peers::primary_position_max_age`) to this standby's replay position;
    /// absent when unknown.
    pub standby_lag_bytes: Family<Labels, Gauge>,
    pub failovers: Counter,
    pub switchovers: Counter,
    pub raft_term: Gauge,
    /// 1 when this member is the Raft leader.
    pub raft_is_leader: Gauge,
    /// Raft id of the leader this member knows, -1 when none.
    pub raft_leader_id: Gauge,
    /// Time the leader spent in one decision round (observations in, actions out).
    pub decision_latency_seconds: Histogram,
    /// The generation whose lease this voter holds broken (0: none standing): a break no
    /// promotion followed is released by the cluster; one that stays is worth a look.
    pub lease_break_standing_generation: Gauge,
    /// 1 while the intent records the sync set as degraded (the primary may acknowledge
    /// commits no standby holds; no automatic failover without `async_failover`).
    pub sync_degraded: Gauge,
    /// `[backup]` gauges (`backup/metrics.rs`).
    pub backup: crate::backup::metrics::BackupMetrics,
    // ---- for an HA dashboard (deploy/grafana/meridian-ha.json)
    /// Always 1, labelled with version, cluster, member and region.
    pub info: Family<Labels, Gauge>,
    /// 1 when the local Postgres answers probes (data members).
    pub postgres_up: Gauge,
    /// Timeline of the local Postgres (0: unknown).
    pub postgres_timeline: Gauge,
    /// 1 while the cluster is in maintenance mode.
    pub paused: Gauge,
    /// 1 while the agent holds its Postgres fenced.
    pub fenced: Gauge,
    /// 1 when a changed parameter waits for a restart (`pg_settings.pending_restart`).
    pub pending_restart: Gauge,
    /// WAL positions of the local Postgres as byte offsets: current (primary), received
    /// and replayed (standby); absent when not applicable.
    pub wal_position_bytes: Family<Labels, Gauge>,
    /// On a standby: seconds since the last transaction it replayed was committed on the
    /// primary, 0 when it has replayed everything it received; absent when unknown.
    pub standby_lag_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Callbacks run to a successful end, by action.
    pub callback_runs: Family<Labels, Counter>,
    /// Callbacks that failed (exit status, spawn error, timeout, dropped), by action and kind.
    pub callback_failures: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meridian");
        let m = Metrics {
            role: Family::default(),
            generation: Gauge::default(),
            lease_remaining_seconds: Gauge::default(),
            replication_lag_bytes: Family::default(),
            standby_lag_bytes: Family::default(),
            failovers: Counter::default(),
            switchovers: Counter::default(),
            raft_term: Gauge::default(),
            raft_is_leader: Gauge::default(),
            raft_leader_id: Gauge::default(),
            decision_latency_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            lease_break_standing_generation: Gauge::default(),
            sync_degraded: Gauge::default(),
            backup: Default::default(),
            info: Family::default(),
            postgres_up: Gauge::default(),
            postgres_timeline: Gauge::default(),
            paused: Gauge::default(),
            fenced: Gauge::default(),
            pending_restart: Gauge::default(),
            wal_position_bytes: Family::default(),
            standby_lag_seconds: Family::default(),
            callback_runs: Family::default(),
            callback_failures: Family::default(),
            registry: Registry::default(),
        };
        m.backup.register(&mut registry);
        registry.register(
            "info",
            "Always 1: this agent's version, cluster, member and region",
            m.info.clone(),
        );
        registry.register(
            "postgres_up",
            "1 when the local Postgres answers probes",
            m.postgres_up.clone(),
        );
        registry.register(
            "postgres_timeline",
            "Timeline of the local Postgres (0 = unknown)",
            m.postgres_timeline.clone(),
        );
        registry.register(
            "paused",
            "1 while the cluster is in maintenance mode (no automatic failover)",
            m.paused.clone(),
        );
        registry.register(
            "fenced",
            "1 while the agent holds its Postgres fenced",
            m.fenced.clone(),
        );
        registry.register(
            "pending_restart",
            "1 when a changed Postgres parameter waits for a restart (pg_settings.pending_restart)",
            m.pending_restart.clone(),
        );
        registry.register(
            "wal_position_bytes",
            "WAL position of the local Postgres as a byte offset (kind = current | received | replayed)",
            m.wal_position_bytes.clone(),
        );
        registry.register(
            "standby_lag_seconds",
            "This standby's replay delay in seconds (0 when it replayed all it received; absent when unknown)",
            m.standby_lag_seconds.clone(),
        );
        registry.register(
            "callback_runs",
            "Callbacks that ran to a successful end, by action",
            m.callback_runs.clone(),
        );
        registry.register(
            "callback_failures",
            "Callbacks that failed, by action and kind (exit, spawn, timeout, dropped)",
            m.callback_failures.clone(),
        );
        registry.register(
            "role",
            "Current role of this member (1 = current)",
            m.role.clone(),
        );
        registry.register(
            "lease_break_standing_generation",
            "Generation of the primary's lease this voter holds broken (0 = none)",
            m.lease_break_standing_generation.clone(),
        );
        registry.register(
            "sync_degraded",
            "1 while the primary may acknowledge commits no sync standby holds (no automatic failover without async_failover)",
            m.sync_degraded.clone(),
        );
        registry.register(
            "generation",
            "Fencing generation this member has seen",
            m.generation.clone(),
        );
        registry.register(
            "lease_remaining_seconds",
            "Seconds left on this primary's lease",
            m.lease_remaining_seconds.clone(),
        );
        registry.register(
            "replication_lag_bytes",
            "Replication lag of each standby, in bytes, as seen by the primary",
            m.replication_lag_bytes.clone(),
        );
        registry.register(
            "standby_lag_bytes",
            "This standby's lag behind the primary's current position, in bytes (absent when unknown)",
            m.standby_lag_bytes.clone(),
        );
        registry.register(
            "failovers",
            "Failovers this member has seen committed",
            m.failovers.clone(),
        );
        registry.register(
            "switchovers",
            "Switchovers this member has seen committed",
            m.switchovers.clone(),
        );
        registry.register("raft_term", "Current Raft term", m.raft_term.clone());
        registry.register(
            "raft_is_leader",
            "1 when this member is the Raft leader",
            m.raft_is_leader.clone(),
        );
        registry.register(
            "raft_leader_id",
            "Raft id of the known leader, -1 if none",
            m.raft_leader_id.clone(),
        );
        registry.register(
            "decision_latency_seconds",
            "Duration of one decision round on the leader",
            m.decision_latency_seconds.clone(),
        );
        m.raft_leader_id.set(-1);
        Metrics { registry, ..m }
    }

    /// Marks `role` as the current role, clearing the others.
    pub fn set_role(&self, role: &str) {
        for r in [
            "primary",
            "sync_standby",
            "async_standby",
            "witness",
            "unknown",
        ] {
            self.role
                .get_or_create(&vec![("role".to_string(), r.to_string())])
                .set(i64::from(r == role));
        }
    }

    /// Sets the info metric's labels (once, at start).
    pub fn set_info(&self, version: &str, cluster: &str, member: &str, region: &str) {
        self.info.clear();
        self.info
            .get_or_create(&vec![
                ("version".to_string(), version.to_string()),
                ("cluster".to_string(), cluster.to_string()),
                ("member".to_string(), member.to_string()),
                ("region".to_string(), region.to_string()),
            ])
            .set(1);
    }

    pub fn callback_ran(&self, action: &str) {
        self.callback_runs
            .get_or_create(&vec![("action".to_string(), action.to_string())])
            .inc();
    }

    pub fn callback_failed(&self, action: &str, kind: &str) {
        self.callback_failures
            .get_or_create(&vec![
                ("action".to_string(), action.to_string()),
                ("kind".to_string(), kind.to_string()),
            ])
            .inc();
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_metrics() {
        let m = Metrics::new();
        m.generation.set(3);
        m.set_role("primary");
        m.failovers.inc();
        m.replication_lag_bytes
            .get_or_create(&vec![("standby".into(), "east-2".into())])
            .set(4096);
        let text = m.render().unwrap();
        assert!(text.contains("meridian_generation 3"), "{text}");
        assert!(text.contains("meridian_role{role=\"primary\"} 1"), "{text}");
        assert!(text.contains("meridian_role{role=\"witness\"} 0"), "{text}");
        assert!(text.contains("meridian_failovers_total 1"), "{text}");
        assert!(
            text.contains("meridian_replication_lag_bytes{standby=\"east-2\"} 4096"),
            "{text}"
        );
        assert!(text.contains("meridian_raft_leader_id -1"), "{text}");
        m.set_info("0.1.0", "c", "a1", "east");
        m.callback_failed("on_start", "timeout");
        m.pending_restart.set(1);
        let text = m.render().unwrap();
        assert!(
            text.contains(
                "meridian_info{version=\"0.1.0\",cluster=\"c\",member=\"a1\",region=\"east\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "meridian_callback_failures_total{action=\"on_start\",kind=\"timeout\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("meridian_pending_restart 1"), "{text}");
    }

    #[test]
    fn the_dashboard_uses_only_metrics_that_exist() {
        let dashboard = include_str!("../../deploy/grafana/meridian-ha.json");
        let _: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard is JSON");
        let m = Metrics::new();
        // Families render only once they have a member.
        m.set_info("v", "c", "m", "r");
        m.callback_ran("on_start");
        m.callback_failed("on_start", "exit");
        for f in [
            &m.wal_position_bytes,
            &m.standby_lag_bytes,
            &m.replication_lag_bytes,
        ] {
            f.get_or_create(&vec![("kind".to_string(), "x".to_string())])
                .set(1);
        }
        m.standby_lag_seconds
            .get_or_create(&vec![("member".to_string(), "x".to_string())])
            .set(1.0);
        m.set_role("primary");
        let text = m.render().unwrap();
        let mut seen = 0;
        for (i, _) in dashboard.match_indices("meridian_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if name.len() <= "meridian_".len() {
                continue;
            }
            let family = name.strip_suffix("_total").unwrap_or(&name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "the dashboard uses {name}, which this agent does not export"
            );
            seen += 1;
        }
        assert!(seen > 10, "{seen}");
    }
}
