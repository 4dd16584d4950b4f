//! Shared fixtures for Meridian's end-to-end tests: real Postgres clusters (and later
//! real agents) on 127.0.0.1, cleaned up by PID even when a test panics.
//!
//! The Postgres cluster fixture lives in the chaos harness's library (which runs the same
//! clusters for the demo and the scenarios); it is re-exported here.

pub mod agents;
pub mod ctl;
pub mod pgbr;

pub use meridian_chaos::pg_cluster::{free_ports, PgCluster, PgClusterBuilder};
pub use meridian_chaos::wait::{wait_for, wait_until};
