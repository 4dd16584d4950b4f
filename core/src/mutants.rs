//! Test-only mutation switch (cargo feature `mutants`): re-introduces one known bad rule
//! at a time so the simulation can prove that its checker catches it. Without the feature
//! this module does not exist and every [`mutant!`](crate::mutant) check is `false`, so
//! release code carries none of it.
//!
//! The active mutation is per thread: the simulation runs each seed on one thread, and
//! tests running in parallel do not see each other's mutation.

use std::cell::Cell;

/// One known bad rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// The leader promotes a candidate without waiting for enough of the recorded sync set
    /// to answer (n − k + 1 of ANY k of n): it may pick a member missing acknowledged commits.
    PromoteWithoutSyncQuorum,
    /// The primary fences after the voters' grants may have run out instead of before.
    FenceAfterLease,
    /// Voters grant renewals without checking the generation (neither a broken one nor a
    /// generation other than the intent's).
    GrantWithoutGenerationCheck,
    /// The lease gate confirms WAL without checking the lease (as if there were no gate):
    /// an async primary frozen past its lease acknowledges commits on thaw.
    GateIgnoresLease,
}

impl Mutation {
    pub const ALL: [Mutation; 4] = [
        Mutation::PromoteWithoutSyncQuorum,
        Mutation::FenceAfterLease,
        Mutation::GrantWithoutGenerationCheck,
        Mutation::GateIgnoresLease,
    ];
}

thread_local! {
    static ACTIVE: Cell<Option<Mutation>> = const { Cell::new(None) };
}

/// Sets (or clears) the mutation active on this thread.
pub fn set(m: Option<Mutation>) {
    ACTIVE.with(|a| a.set(m));
}

/// Whether `m` is active on this thread.
pub fn active(m: Mutation) -> bool {
    ACTIVE.with(|a| a.get() == Some(m))
}
