//! This agent's resume-in-place commitment: the generation whose resume in place it took
//! or gave up, kept durably in `state_dir/resume-spent`.
//!
//! While a resume is pending, the agent's reports say so (`resume_pending`) and the leader
//! treats the fence as not final; once spent, the agent never takes writes again in that
//! generation, so a fence it reports from then on is final and the leader may promote
//! another member or resume it in a new generation (sim finding F3b). The file outlives a
//! restart, so a restarted agent does not resume a generation it already gave up.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use meridian_core::types::Generation;

/// File under `state_dir` with the spent generation.
pub const RESUME_SPENT_FILE: &str = "resume-spent";

pub struct ResumeSpent {
    file: Option<PathBuf>,
    /// The spent generation (0: none).
    generation: AtomicU64,
}

impl ResumeSpent {
    /// Reads the spent generation from `state_dir` (None: in memory only, for tests).
    /// A missing or unreadable file means none spent: the leader then still waits for
    /// this agent, which is the safe side.
    pub fn load(state_dir: Option<&Path>) -> ResumeSpent {
        let file = state_dir.map(|d| d.join(RESUME_SPENT_FILE));
        let generation = file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        ResumeSpent {
            file,
            generation: AtomicU64::new(generation),
        }
    }

    pub fn is_spent(&self, generation: Generation) -> bool {
        self.generation.load(Ordering::SeqCst) == generation.0
    }

    /// Spends `generation`'s resume: on disk first, then in memory (what reports read).
    pub fn spend(&self, generation: Generation) -> anyhow::Result<()> {
        if let Some(path) = &self.file {
            write_durably(path, generation)
                .with_context(|| format!("recording the spent resume in {}", path.display()))?;
        }
        self.generation.store(generation.0, Ordering::SeqCst);
        Ok(())
    }
}

fn write_durably(path: &Path, generation: Generation) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{}", generation.0)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_resume_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let r = ResumeSpent::load(Some(dir.path()));
        assert!(!r.is_spent(Generation(3)));
        r.spend(Generation(3)).unwrap();
        assert!(r.is_spent(Generation(3)));
        assert!(!r.is_spent(Generation(4)));
        let again = ResumeSpent::load(Some(dir.path()));
        assert!(again.is_spent(Generation(3)));
    }
}
