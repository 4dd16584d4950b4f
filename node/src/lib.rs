//! meridian-node as a library: the agent's building blocks, shared with the end-to-end
//! tests and the chaos harness.

pub mod agent;
pub mod auth;
pub mod backup;
pub mod config;
pub mod decide;
#[doc(hidden)]
pub mod fixtures;
pub mod http;
pub mod metrics;
pub mod pg;
pub mod pgparams;
pub mod policy;
pub mod precheck;
pub mod raft;
pub mod types;
