//! Shared fixtures for Meridian's end-to-end tests: real Postgres clusters (and later
//! real agents) on 127.0.0.1, cleaned up by PID even when a test panics.

pub mod agents;
pub mod pg_fixture;
pub mod wait;

pub use pg_fixture::{free_ports, PgCluster, PgClusterBuilder};
pub use wait::{wait_for, wait_until};
