//! meridian-node as a library: the agent's building blocks, shared with the end-to-end
//! tests and the chaos harness.

pub mod agent;
pub mod auth;
pub mod config;
pub mod decide;
pub mod http;
pub mod metrics;
pub mod pg;
pub mod policy;
pub mod raft;
pub mod types;
