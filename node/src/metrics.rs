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
    /// `[backup]` gauges (`backup/metrics.rs`).
    pub backup: crate::backup::metrics::BackupMetrics,
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
            backup: Default::default(),
            registry: Registry::default(),
        };
        m.backup.register(&mut registry);
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
    }
}
