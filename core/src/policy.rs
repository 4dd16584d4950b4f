//! The replication policy: which regions replicate synchronously, how many sync
//! standbys must acknowledge a commit, and when an automatic failover may lose data.
//!
//! Owns the policy's schema (serde, TOML- and JSON-friendly, unknown keys refused), its
//! defaults, its validation ([`Policy::validate`]) and the `edit-config --set KEY=VALUE`
//! edits ([`Policy::set`]). The policy lives in the Raft state machine; this module
//! does no I/O.
//!
//! Defaults follow DESIGN §3: every region `auto` with a 10 ms commit-latency budget, so
//! "sync inside the primary's region, async across regions" (35–70 ms round trips)
//! follows the primary after a failover; `ANY 1`; `durability = required`; automatic
//! failover to an async standby allowed when it lags by at most 16 MiB.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::pgparams::PostgresqlPolicy;

/// Default commit-latency budget for `auto` regions: fits a same-region round trip,
/// not a cross-region one.
pub const DEFAULT_COMMIT_LATENCY_BUDGET_MS: u64 = 10;
/// Default bound on what an automatic failover to an async standby may lose.
pub const DEFAULT_MAX_LAG_ON_FAILOVER_BYTES: u64 = 16 * 1024 * 1024;
/// A budget above this is a typo (a commit waiting 10 s is an outage, not a policy).
pub const MAX_COMMIT_LATENCY_BUDGET_MS: u64 = 10_000;
/// Postgres accepts at most this many names in `synchronous_standby_names` in practice;
/// a quorum above it can never be met.
pub const MAX_SYNC_QUORUM: u32 = 64;

/// Why a policy (or one edit of it) was refused: the key, and the value when one was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {key}{}: {reason}", value.as_ref().map(|v| format!(" = {v:?}")).unwrap_or_default())]
pub struct PolicyError {
    /// Dotted key, e.g. `regions.us-west.mode`.
    pub key: String,
    pub value: Option<String>,
    pub reason: String,
}

impl PolicyError {
    pub fn new(key: impl Into<String>, value: Option<&str>, reason: impl Into<String>) -> Self {
        PolicyError {
            key: key.into(),
            value: value.map(str::to_string),
            reason: reason.into(),
        }
    }
}

/// How a region's standbys replicate from the current primary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Always in the sync set: zero loss when this region survives, at its round-trip cost.
    Sync,
    /// Never in the sync set.
    Async,
    /// In the sync set only while the measured round trip from the current primary fits
    /// `commit_latency_budget_ms`.
    #[default]
    Auto,
}

/// What a commit does when fewer than `sync_quorum` sync standbys are healthy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Keep the sync set: commits wait (zero loss).
    #[default]
    Required,
    /// Shrink the set to the healthy standbys and record that it did.
    Preferred,
}

/// Whether a region's members may be promoted without an operator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailoverMode {
    #[default]
    Auto,
    Manual,
}

/// Per-region settings; a region without an entry gets the defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegionPolicy {
    pub mode: SyncMode,
    pub failover: FailoverMode,
    /// Higher is preferred among failover candidates (after "same region as the old
    /// primary").
    pub priority: i32,
}

/// The cluster's replication policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// `auto` regions are sync while the primary's round trip to them is at most this.
    pub commit_latency_budget_ms: u64,
    /// k in `synchronous_standby_names = 'ANY k (...)'`.
    pub sync_quorum: u32,
    pub durability: Durability,
    /// May an automatic failover promote a member that may lack commits the recorded sync
    /// set acknowledged (too few of the set answered, or every candidate is behind the
    /// answering quorum)? Off by default: that loss breaks the promise the sync set made
    /// to clients. On, it trades those commits for availability, bounded by
    /// `max_lag_on_failover_bytes` and recorded in the history as possible loss. With no
    /// sync set recorded (every standby async by policy) nothing was promised, and a
    /// failover within `max_lag_on_failover_bytes` needs no permission.
    pub async_failover: bool,
    /// Bound on the lag (against the best known LSN of the old primary) of any
    /// automatically promoted standby.
    pub max_lag_on_failover_bytes: u64,
    /// Per-region overrides, by region name.
    pub regions: BTreeMap<String, RegionPolicy>,
    /// Cluster-wide Postgres parameters (`postgresql.parameters.NAME`); absent in
    /// policies written before they existed.
    #[serde(default, skip_serializing_if = "PostgresqlPolicy::is_empty")]
    pub postgresql: PostgresqlPolicy,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            commit_latency_budget_ms: DEFAULT_COMMIT_LATENCY_BUDGET_MS,
            sync_quorum: 1,
            durability: Durability::Required,
            async_failover: false,
            max_lag_on_failover_bytes: DEFAULT_MAX_LAG_ON_FAILOVER_BYTES,
            regions: BTreeMap::new(),
            postgresql: PostgresqlPolicy::default(),
        }
    }
}

impl Policy {
    /// The settings of `region` (defaults when the policy does not name it).
    pub fn region(&self, region: &str) -> RegionPolicy {
        self.regions.get(region).cloned().unwrap_or_default()
    }

    /// Checks the policy is coherent; the error names the offending key.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.sync_quorum == 0 {
            return Err(PolicyError::new(
                "sync_quorum",
                Some("0"),
                "must be at least 1 (ANY 0 would wait for nobody; use mode = async instead)",
            ));
        }
        if self.sync_quorum > MAX_SYNC_QUORUM {
            return Err(PolicyError::new(
                "sync_quorum",
                Some(&self.sync_quorum.to_string()),
                format!("must be at most {MAX_SYNC_QUORUM}"),
            ));
        }
        if self.commit_latency_budget_ms > MAX_COMMIT_LATENCY_BUDGET_MS {
            return Err(PolicyError::new(
                "commit_latency_budget_ms",
                Some(&self.commit_latency_budget_ms.to_string()),
                format!("must be at most {MAX_COMMIT_LATENCY_BUDGET_MS} ms"),
            ));
        }
        for name in self.regions.keys() {
            check_region_name(name)?;
        }
        if self.postgresql.parameters.len() > crate::pgparams::MAX_PARAMETERS {
            return Err(PolicyError::new(
                "postgresql.parameters",
                None,
                crate::pgparams::ParamError::TooMany.to_string(),
            ));
        }
        for (name, value) in &self.postgresql.parameters {
            crate::pgparams::check_offline(name, value).map_err(|e| {
                PolicyError::new(
                    format!("postgresql.parameters.{name}"),
                    Some(value),
                    e.to_string(),
                )
            })?;
            if *name != name.to_ascii_lowercase() {
                return Err(PolicyError::new(
                    format!("postgresql.parameters.{name}"),
                    Some(value),
                    "parameter names are kept in lowercase",
                ));
            }
        }
        Ok(())
    }

    /// Removes one `postgresql.parameters.NAME` (the only keys that can be unset: the
    /// others always have a value). Unsetting a parameter that is not set is a no-op.
    pub fn unset(&mut self, key: &str) -> Result<(), PolicyError> {
        match key.strip_prefix("postgresql.parameters.") {
            Some(name) if !name.is_empty() => {
                let name = crate::pgparams::check_name(name)
                    .map_err(|e| PolicyError::new(key, None, e.to_string()))?;
                self.postgresql.parameters.remove(&name);
                Ok(())
            }
            _ => Err(PolicyError::new(
                key,
                None,
                "only postgresql.parameters.NAME can be unset; set the other keys to a value",
            )),
        }
    }

    /// Applies one `KEY=VALUE` edit (`sync_quorum=2`, `regions.us-west.mode=sync`, ...)
    /// and validates the result. On error the policy is left unchanged and the error
    /// names the key and the value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), PolicyError> {
        let bad = |reason: String| PolicyError::new(key, Some(value), reason);
        let mut next = self.clone();
        let parts: Vec<&str> = key.split('.').collect();
        match parts.as_slice() {
            ["commit_latency_budget_ms"] => next.commit_latency_budget_ms = parse_u64(value).map_err(bad)?,
            ["sync_quorum"] => {
                next.sync_quorum = value
                    .trim()
                    .parse()
                    .map_err(|_| bad("expected a whole number such as 1 or 2".into()))?
            }
            ["durability"] => next.durability = parse_enum(value, &[("required", Durability::Required), ("preferred", Durability::Preferred)]).map_err(bad)?,
            ["async_failover"] => {
                next.async_failover = match value.trim() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad("expected true or false".into())),
                }
            }
            ["max_lag_on_failover_bytes"] => next.max_lag_on_failover_bytes = parse_bytes(value).map_err(bad)?,
            ["regions", region, field] => {
                check_region_name(region).map_err(|e| bad(e.reason))?;
                let entry = next.regions.entry(region.to_string()).or_default();
                match *field {
                    "mode" => entry.mode = parse_enum(value, &[("sync", SyncMode::Sync), ("async", SyncMode::Async), ("auto", SyncMode::Auto)]).map_err(bad)?,
                    "failover" => entry.failover = parse_enum(value, &[("auto", FailoverMode::Auto), ("manual", FailoverMode::Manual)]).map_err(bad)?,
                    "priority" => {
                        entry.priority = value
                            .trim()
                            .parse()
                            .map_err(|_| bad("expected a whole number (higher is preferred)".into()))?
                    }
                    _ => return Err(bad(format!("unknown region setting {field:?}; known: mode, failover, priority"))),
                }
            }
            ["postgresql", "parameters", name] | ["postgresql", "parameters", name, _] => {
                // A custom (extension) parameter has a dot of its own: rejoin it.
                let name = key.strip_prefix("postgresql.parameters.").unwrap_or(name);
                let name = crate::pgparams::check_name(name).map_err(|e| bad(e.to_string()))?;
                next.postgresql
                    .parameters
                    .insert(name, value.trim().to_string());
            }
            _ => {
                return Err(bad(
                    "unknown key; known: commit_latency_budget_ms, sync_quorum, durability, \
                     async_failover, max_lag_on_failover_bytes, regions.REGION.{mode,failover,priority}, \
                     postgresql.parameters.NAME"
                        .into(),
                ))
            }
        }
        next.validate().map_err(|e| PolicyError {
            key: e.key,
            value: e.value.or_else(|| Some(value.to_string())),
            reason: e.reason,
        })?;
        *self = next;
        Ok(())
    }
}

fn check_region_name(name: &str) -> Result<(), PolicyError> {
    let key = format!("regions.{name}");
    if name.is_empty() {
        return Err(PolicyError::new(key, None, "region name must not be empty"));
    }
    if name.len() > 63 {
        return Err(PolicyError::new(
            key,
            None,
            "region name is longer than 63 characters",
        ));
    }
    // The same rule as member regions in the agent config; also keeps dotted keys parseable.
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        return Err(PolicyError::new(
            key,
            None,
            "region name may only hold lowercase letters, digits, '-' and '_'",
        ));
    }
    Ok(())
}

fn parse_enum<T: Copy>(value: &str, choices: &[(&str, T)]) -> Result<T, String> {
    let v = value.trim();
    choices
        .iter()
        .find(|(name, _)| *name == v)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            format!("expected one of {}", names.join(", "))
        })
}

fn parse_u64(value: &str) -> Result<u64, String> {
    value
        .trim()
        .parse()
        .map_err(|_| "expected a whole number of milliseconds".to_string())
}

/// A byte count, plain or with a binary suffix (`16777216`, `16MiB`, `512KiB`, `1GiB`).
fn parse_bytes(value: &str) -> Result<u64, String> {
    let v = value.trim();
    let (digits, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v, ""),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| "expected a byte count such as 16777216 or 16MiB".to_string())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?}; use B, KiB, MiB or GiB")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| "byte count overflows 64 bits".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_auto_everywhere_with_a_small_budget() {
        let p = Policy::default();
        assert_eq!(p.commit_latency_budget_ms, 10);
        assert_eq!(p.sync_quorum, 1);
        assert_eq!(p.durability, Durability::Required);
        assert!(!p.async_failover);
        assert_eq!(p.max_lag_on_failover_bytes, 16 << 20);
        assert_eq!(p.region("anywhere"), RegionPolicy::default());
        assert_eq!(p.region("anywhere").mode, SyncMode::Auto);
        assert_eq!(p.region("anywhere").failover, FailoverMode::Auto);
        p.validate().unwrap();
    }

    #[test]
    fn set_edits_and_validates() {
        let mut p = Policy::default();
        p.set("regions.us-west.mode", "sync").unwrap();
        p.set("sync_quorum", "2").unwrap();
        p.set("durability", "preferred").unwrap();
        p.set("async_failover", "true").unwrap();
        p.set("max_lag_on_failover_bytes", "1MiB").unwrap();
        p.set("regions.eu.failover", "manual").unwrap();
        p.set("regions.eu.priority", "-3").unwrap();
        p.set("commit_latency_budget_ms", "25").unwrap();
        assert_eq!(p.region("us-west").mode, SyncMode::Sync);
        assert_eq!(p.sync_quorum, 2);
        assert_eq!(p.durability, Durability::Preferred);
        assert!(p.async_failover);
        assert_eq!(p.max_lag_on_failover_bytes, 1 << 20);
        assert_eq!(p.region("eu").failover, FailoverMode::Manual);
        assert_eq!(p.region("eu").priority, -3);
        assert_eq!(p.commit_latency_budget_ms, 25);
    }

    #[test]
    fn postgres_parameters_are_set_unset_and_round_trip() {
        let mut p = Policy::default();
        p.set("postgresql.parameters.Work_Mem", "64MB").unwrap();
        p.set("postgresql.parameters.pg_stat_statements.max", "5000")
            .unwrap();
        assert_eq!(p.postgresql.parameters["work_mem"], "64MB");
        assert_eq!(p.postgresql.parameters["pg_stat_statements.max"], "5000");
        let e = p.set("postgresql.parameters.port", "6000").unwrap_err();
        assert!(e.reason.contains("managed by Meridian"), "{e}");
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), p);
        p.unset("postgresql.parameters.work_mem").unwrap();
        assert!(!p.postgresql.parameters.contains_key("work_mem"));
        assert!(p.unset("sync_quorum").is_err());
        // A policy without parameters serializes as before they existed.
        assert!(!serde_json::to_string(&Policy::default())
            .unwrap()
            .contains("postgresql"));
    }

    #[test]
    fn set_refuses_and_leaves_the_policy_unchanged() {
        let mut p = Policy::default();
        let before = p.clone();
        let e = p.set("sync_quorum", "0").unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.value.as_deref()),
            ("sync_quorum", Some("0"))
        );
        let e = p.set("regions.us-west.mode", "fast").unwrap_err();
        assert_eq!(e.key, "regions.us-west.mode");
        assert!(e.reason.contains("sync, async, auto"), "{e}");
        let e = p.set("regions.us-west.colour", "red").unwrap_err();
        assert!(e.reason.contains("unknown region setting"), "{e}");
        let e = p.set("regions.US.mode", "sync").unwrap_err();
        assert!(e.reason.contains("lowercase"), "{e}");
        let e = p.set("durabilty", "required").unwrap_err();
        assert!(e.reason.contains("unknown key"), "{e}");
        let e = p.set("max_lag_on_failover_bytes", "16MB").unwrap_err();
        assert!(e.reason.contains("unknown unit"), "{e}");
        let e = p.set("commit_latency_budget_ms", "999999").unwrap_err();
        assert_eq!(e.key, "commit_latency_budget_ms");
        assert_eq!(p, before);
        assert_eq!(
            e.to_string(),
            "policy commit_latency_budget_ms = \"999999\": must be at most 10000 ms"
        );
    }
}
