//! meridian-node as a library: the agent's building blocks, shared with the end-to-end
//! tests and the chaos harness.

pub mod admin_client;
pub mod agent;
pub mod auth;
pub mod backup;
pub mod config;
#[doc(hidden)]
pub mod fixtures;
pub mod http;
pub mod metrics;
mod observation_wire;
pub mod pg;
pub mod policy_text;
pub mod precheck;
pub mod raft;

// The pure cores live in `meridian-core` (no tokio/tonic/proto dependency); re-exported
// under their old paths so the runtime, ctl, chaos and the tests compile unchanged.
pub use meridian_core::{backup_schedule, pgparams, policy, types};

/// The leader's decision core (`meridian_core::decide`) plus the wire conversion of an
/// agent's report, which needs the proto types the core does not depend on.
pub mod decide {
    pub use crate::observation_wire::observation_from_proto;
    pub use meridian_core::decide::*;
}
