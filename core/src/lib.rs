//! Meridian's pure cores, in a crate of their own so that the compiler enforces their purity:
//! this crate depends on serde and thiserror only (no tokio, tonic, wire types, Postgres
//! client or config-file parser), so nothing here can do I/O or read a clock.
//!
//! - [`types`]: newtypes (Lsn, MemberId, Generation) and the member kind.
//! - [`policy`]: the replication policy (durability, per-region sync/failover modes).
//! - [`intent`]: the persisted model (what the Raft log and snapshots hold), its commands
//!   and their validation; versioned by [`intent::FORMAT_VERSION`].
//! - [`decide`]: the Raft leader's failover decisions.
//! - [`lease`]: the lease arithmetic of voters and of the primary.
//! - [`cascade`]: cascading replication (which member each standby streams from).
//! - [`schedule`]: scheduled switchovers and restarts (stored in the intent, fired by the
//!   leader).
//! - [`plan`]: the local planner (what a member's agent does next with its Postgres).
//! - [`backup_schedule`]: scheduled backups (cron, one run per slot, the leader's rule).
//! - `mutants` (feature `mutants`, tests only): known bad rules the simulation must catch.
//!
//! The deterministic simulation (`meridian-sim`) runs these same functions under seeded
//! fault schedules.

pub mod backup_schedule;
pub mod cascade;
mod command_display;
pub mod decide;
pub mod intent;
pub mod lease;
#[cfg(feature = "mutants")]
pub mod mutants;
pub mod pgparams;
pub mod plan;
pub mod policy;
pub mod schedule;
pub mod types;

/// `mutant!(Name)`: whether test-only mutation `Name` ([`mutants::Mutation`]) is active on
/// this thread; the constant `false` without the `mutants` feature.
#[macro_export]
#[doc(hidden)]
macro_rules! mutant {
    ($m:ident) => {{
        #[cfg(feature = "mutants")]
        {
            $crate::mutants::active($crate::mutants::Mutation::$m)
        }
        #[cfg(not(feature = "mutants"))]
        {
            false
        }
    }};
}
