//! Logging of a loop's repeated failure: one line per failure (a multi-line tool output is
//! folded), a failure that repeats (the same text once its digits — pids, times, LSNs —
//! are ignored) is not logged again, and a changing one at most once per
//! [`MIN_SPACING`], with the number of rounds left unlogged meanwhile. The recovery is
//! logged once.

use std::time::{Duration, Instant};

/// At most one warning per this spacing while a loop keeps failing.
pub const MIN_SPACING: Duration = Duration::from_secs(10);

/// The longest line a failure is logged with.
const MAX_CHARS: usize = 600;

/// What a failure looks like in one log line.
pub fn one_line(text: &str) -> String {
    let folded: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    if folded.chars().count() <= MAX_CHARS {
        folded
    } else {
        let mut cut: String = folded.chars().take(MAX_CHARS).collect();
        cut.push('…');
        cut
    }
}

/// Digits ignored: what tells two failures of the same kind apart.
fn kind_of(text: &str) -> String {
    text.chars().filter(|c| !c.is_ascii_digit()).collect()
}

/// What to log for one round's outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Log {
    Nothing,
    /// A failure, folded to one line, with the number of failed rounds not logged before.
    Failure {
        line: String,
        unlogged_rounds: u64,
    },
    Recovered,
}

/// The state of one loop's failure log.
#[derive(Debug, Default)]
pub struct ErrorLog {
    /// The kind of the failure logged last (None: not failing).
    kind: Option<String>,
    logged_at: Option<Instant>,
    unlogged_rounds: u64,
}

impl ErrorLog {
    /// What to log for this round's outcome at `now`.
    pub fn note(&mut self, outcome: Result<(), &str>, now: Instant) -> Log {
        match outcome {
            Ok(()) => {
                let was_failing = self.kind.is_some() || self.unlogged_rounds > 0;
                *self = ErrorLog::default();
                if was_failing {
                    Log::Recovered
                } else {
                    Log::Nothing
                }
            }
            Err(text) => {
                let line = one_line(text);
                let kind = kind_of(&line);
                let spaced = self
                    .logged_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= MIN_SPACING);
                if self.kind.as_deref() == Some(kind.as_str()) || !spaced {
                    // Logged already, or too soon after the last one: a persisting new
                    // failure is logged once the spacing has passed.
                    self.unlogged_rounds += 1;
                    return Log::Nothing;
                }
                let unlogged_rounds = std::mem::take(&mut self.unlogged_rounds);
                self.kind = Some(kind);
                self.logged_at = Some(now);
                Log::Failure {
                    line,
                    unlogged_rounds,
                }
            }
        }
    }

    /// [`ErrorLog::note`] and log it: a failure as a warning `"{what}: {line}"`.
    pub fn log(&mut self, what: &str, outcome: Result<(), &str>) {
        match self.note(outcome, Instant::now()) {
            Log::Nothing => {}
            Log::Failure {
                line,
                unlogged_rounds: 0,
            } => tracing::warn!("{what}: {line}"),
            Log::Failure {
                line,
                unlogged_rounds,
            } => tracing::warn!("{what}: {line} ({unlogged_rounds} failed rounds not logged)"),
            Log::Recovered => tracing::info!("{what} works again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_start_logs_one_line_then_stays_quiet() {
        let mut log = ErrorLog::default();
        let t0 = Instant::now();
        let err = |pid: u32| {
            format!(
                "start: pg_ctl failed (exit status: 1); stderr: waiting for server to start\n\
                 2026-12-01 10:00:0{} LOG:  starting PostgreSQL 15\n\
                 FATAL:  lock file \"postmaster.pid\" already exists (pid {pid})\n stopped waiting",
                pid % 10
            )
        };
        let first = log.note(Err(&err(101)), t0);
        let Log::Failure {
            line,
            unlogged_rounds: 0,
        } = first
        else {
            panic!("{first:?}");
        };
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains(" | FATAL:  lock file"), "{line}");
        // Every 250 ms for 12 s, with a changing pid and time: nothing more...
        let mut logged = 0;
        for i in 1..48u32 {
            let at = t0 + Duration::from_millis(250) * i;
            if log.note(Err(&err(100 + i)), at) != Log::Nothing {
                logged += 1;
            }
        }
        assert_eq!(logged, 0);
        // ...a different failure after the spacing is logged, with the count...
        let other = log.note(Err("start: data dir is fenced"), t0 + MIN_SPACING * 2);
        assert_eq!(
            other,
            Log::Failure {
                line: "start: data dir is fenced".into(),
                unlogged_rounds: 47
            }
        );
        // ...and the recovery once.
        assert_eq!(log.note(Ok(()), t0 + MIN_SPACING * 3), Log::Recovered);
        assert_eq!(log.note(Ok(()), t0 + MIN_SPACING * 4), Log::Nothing);
    }

    #[test]
    fn changing_failures_are_spaced() {
        let mut log = ErrorLog::default();
        let t0 = Instant::now();
        assert!(matches!(log.note(Err("a"), t0), Log::Failure { .. }));
        assert_eq!(
            log.note(Err("b"), t0 + Duration::from_secs(1)),
            Log::Nothing
        );
        assert_eq!(
            log.note(Err("c"), t0 + Duration::from_secs(2)),
            Log::Nothing
        );
        assert_eq!(
            log.note(Err("d"), t0 + MIN_SPACING),
            Log::Failure {
                line: "d".into(),
                unlogged_rounds: 2
            }
        );
        assert_eq!(one_line(&"x".repeat(700)).chars().count(), MAX_CHARS + 1);
    }
}
