//! The pure checker: from the writers' outcome logs, the ids finally read back from the
//! table and the split-brain probe rounds, compute what was acknowledged and lost, what was
//! indeterminate and recovered, what appeared without being written, how long writes were
//! unavailable, commit latency percentiles per region and how long more than one member
//! accepted writes. No I/O, so every number is unit-tested exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a writer learned about one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The commit was acknowledged: it must survive.
    Ok,
    /// Definitely not committed (rejected before the commit was sent).
    Failed,
    /// The commit was sent but its fate is unknown (connection lost, sync wait cancelled).
    Indeterminate,
}

/// One write attempt. Instants are offsets from the start of the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRecord {
    pub id: u64,
    /// The writer (client task) that issued it.
    pub writer: String,
    /// The writer's region.
    pub region: String,
    pub outcome: Outcome,
    pub start: Duration,
    pub end: Duration,
    /// The port the accepting Postgres listens on (`inet_server_port()`, the member's real
    /// port, not the proxy's), for acknowledged writes: says which member took it.
    #[serde(default)]
    pub server_port: Option<u16>,
}

/// One split-brain probe round: the members whose Postgres accepted a probe commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRound {
    pub at: Duration,
    pub accepted: BTreeSet<String>,
}

/// Everything the checker looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckInput {
    pub writes: Vec<WriteRecord>,
    /// Ids present in the table at the end.
    pub final_ids: BTreeSet<u64>,
    /// Writers whose availability counts (e.g. not those in a region that was lost); None
    /// means all writers.
    pub surviving_writers: Option<BTreeSet<String>>,
    /// The observation window for write availability (usually writers' start to run end).
    pub observe_from: Duration,
    pub observe_to: Duration,
    pub probes: Vec<ProbeRound>,
    /// When the policy allows async failover, lost acknowledged writes are reported but are
    /// not a violation.
    pub allow_acked_loss: bool,
}

/// What the checker found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CheckReport {
    pub acked: u64,
    pub acked_lost: u64,
    pub lost_ids: Vec<u64>,
    pub indeterminate: u64,
    pub indeterminate_recovered: u64,
    /// Ids in the table that no writer ever attempted.
    pub unexpected: u64,
    pub unexpected_ids: Vec<u64>,
    /// Ids reported `Failed` that are in the table anyway.
    pub failed_present_ids: Vec<u64>,
    /// Longest stretch without an acknowledged write from a surviving writer.
    pub write_unavailable: Option<Duration>,
    pub commit_p50_ms: BTreeMap<String, f64>,
    pub commit_p99_ms: BTreeMap<String, f64>,
    /// Time during which more than one member accepted writes; None without probes.
    pub split_brain: Option<Duration>,
    pub violations: Vec<String>,
}

/// Ids listed in a violation message before it says "and N more".
const IDS_SHOWN: usize = 10;

fn show_ids(ids: &[u64]) -> String {
    let mut s: Vec<String> = ids.iter().take(IDS_SHOWN).map(u64::to_string).collect();
    if ids.len() > IDS_SHOWN {
        s.push(format!("and {} more", ids.len() - IDS_SHOWN));
    }
    s.join(", ")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of `sorted` (ascending, non-empty): the smallest value with at
/// least `p`% of the values at or below it.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub fn check(input: &CheckInput) -> CheckReport {
    let mut r = CheckReport::default();

    let mut seen: BTreeMap<u64, Outcome> = BTreeMap::new();
    let mut duplicates = Vec::new();
    for w in &input.writes {
        if seen.insert(w.id, w.outcome).is_some() {
            duplicates.push(w.id);
        }
    }
    if !duplicates.is_empty() {
        r.violations.push(format!(
            "{} write ids were attempted more than once (checker input is ambiguous): {}",
            duplicates.len(),
            show_ids(&duplicates)
        ));
    }

    for w in &input.writes {
        let present = input.final_ids.contains(&w.id);
        match w.outcome {
            Outcome::Ok => {
                r.acked += 1;
                if !present {
                    r.lost_ids.push(w.id);
                }
            }
            Outcome::Indeterminate => {
                r.indeterminate += 1;
                if present {
                    r.indeterminate_recovered += 1;
                }
            }
            Outcome::Failed => {
                if present {
                    r.failed_present_ids.push(w.id);
                }
            }
        }
    }
    r.acked_lost = r.lost_ids.len() as u64;
    r.unexpected_ids = input
        .final_ids
        .iter()
        .copied()
        .filter(|id| !seen.contains_key(id))
        .collect();
    r.unexpected = r.unexpected_ids.len() as u64;

    if !r.lost_ids.is_empty() {
        let msg = format!(
            "{} acknowledged writes lost: {}",
            r.acked_lost,
            show_ids(&r.lost_ids)
        );
        if input.allow_acked_loss {
            tracing::info!("{msg} (allowed by the async failover policy)");
        } else {
            r.violations.push(msg);
        }
    }
    if !r.unexpected_ids.is_empty() {
        r.violations.push(format!(
            "{} rows never written by any writer: {}",
            r.unexpected,
            show_ids(&r.unexpected_ids)
        ));
    }
    if !r.failed_present_ids.is_empty() {
        r.violations.push(format!(
            "{} writes reported failed are present: {}",
            r.failed_present_ids.len(),
            show_ids(&r.failed_present_ids)
        ));
    }

    r.write_unavailable = write_unavailable(input);

    let mut by_region: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for w in input.writes.iter().filter(|w| w.outcome == Outcome::Ok) {
        by_region
            .entry(&w.region)
            .or_default()
            .push(ms(w.end.saturating_sub(w.start)));
    }
    for (region, mut lat) in by_region {
        lat.sort_by(f64::total_cmp);
        if let (Some(p50), Some(p99)) = (percentile(&lat, 50.0), percentile(&lat, 99.0)) {
            r.commit_p50_ms.insert(region.to_string(), p50);
            r.commit_p99_ms.insert(region.to_string(), p99);
        }
    }

    let (split, split_rounds) = split_brain(&input.probes);
    r.split_brain = split;
    if let Some(first) = split_rounds.first() {
        r.violations.push(format!(
            "split brain: {} probe rounds saw more than one member accept a write (first at {} ms: {})",
            split_rounds.len(),
            first.at.as_millis(),
            first.accepted.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    r
}

/// The longest gap between consecutive acknowledged completions of surviving writers, with
/// the window's ends as the first and last points (so an outage that never ends counts up to
/// the end of the window).
fn write_unavailable(input: &CheckInput) -> Option<Duration> {
    if input.observe_to <= input.observe_from {
        return None;
    }
    let mut points: Vec<Duration> = input
        .writes
        .iter()
        .filter(|w| w.outcome == Outcome::Ok)
        .filter(|w| match &input.surviving_writers {
            Some(s) => s.contains(&w.writer),
            None => true,
        })
        .map(|w| w.end)
        .filter(|end| (input.observe_from..=input.observe_to).contains(end))
        .collect();
    points.push(input.observe_from);
    points.push(input.observe_to);
    points.sort();
    points.windows(2).map(|w| w[1] - w[0]).max()
}

/// Total time with more than one accepting member: a split round lasts until the next round
/// (the last round, with no successor, counts the gap from its predecessor). Returns the
/// split rounds too.
fn split_brain(probes: &[ProbeRound]) -> (Option<Duration>, Vec<&ProbeRound>) {
    if probes.is_empty() {
        return (None, Vec::new());
    }
    let mut rounds: Vec<&ProbeRound> = probes.iter().collect();
    rounds.sort_by_key(|p| p.at);
    let mut total = Duration::ZERO;
    let mut split = Vec::new();
    for (i, round) in rounds.iter().enumerate() {
        if round.accepted.len() < 2 {
            continue;
        }
        split.push(*round);
        total += match (rounds.get(i + 1), i.checked_sub(1).map(|j| rounds[j])) {
            (Some(next), _) => next.at - round.at,
            (None, Some(prev)) => round.at - prev.at,
            (None, None) => Duration::ZERO,
        };
    }
    (Some(total), split)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn w(
        id: u64,
        writer: &str,
        region: &str,
        outcome: Outcome,
        start: u64,
        end: u64,
    ) -> WriteRecord {
        WriteRecord {
            id,
            writer: writer.into(),
            region: region.into(),
            outcome,
            start: d(start),
            end: d(end),
            server_port: None,
        }
    }

    fn probe(at: u64, members: &[&str]) -> ProbeRound {
        ProbeRound {
            at: d(at),
            accepted: members.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[3.0, 7.0, 9.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[3.0, 7.0, 9.0], 99.0), Some(9.0));
        assert_eq!(percentile(&[4.0], 0.0), Some(4.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn counts_losses_recoveries_and_unexpected_rows() {
        use Outcome::*;
        let input = CheckInput {
            writes: vec![
                w(1, "a", "us-east", Ok, 0, 2),
                w(2, "a", "us-east", Ok, 2, 6),
                w(3, "a", "us-east", Indeterminate, 6, 100),
                w(4, "b", "us-west", Ok, 0, 40),
                w(5, "b", "us-west", Indeterminate, 40, 90),
                w(6, "b", "us-west", Failed, 90, 95),
                w(7, "b", "us-west", Failed, 95, 99),
                w(8, "b", "us-west", Ok, 99, 169),
            ],
            // 2 acked but lost, 3 indeterminate and recovered, 5 indeterminate and gone,
            // 7 failed yet present, 42 never written.
            final_ids: [1, 3, 4, 7, 8, 42].into_iter().collect(),
            observe_from: d(0),
            observe_to: d(200),
            ..CheckInput::default()
        };
        let r = check(&input);
        assert_eq!(r.acked, 4);
        assert_eq!(r.acked_lost, 1);
        assert_eq!(r.lost_ids, vec![2]);
        assert_eq!(r.indeterminate, 2);
        assert_eq!(r.indeterminate_recovered, 1);
        assert_eq!(r.unexpected, 1);
        assert_eq!(r.unexpected_ids, vec![42]);
        assert_eq!(r.failed_present_ids, vec![7]);
        assert_eq!(
            r.violations,
            vec![
                "1 acknowledged writes lost: 2".to_string(),
                "1 rows never written by any writer: 42".to_string(),
                "1 writes reported failed are present: 7".to_string(),
            ]
        );
        // Ok ends: 2, 6, 40, 169; window 0..200 → gaps 2, 4, 34, 129, 31.
        assert_eq!(r.write_unavailable, Some(d(129)));
        // us-east latencies [2, 4]; us-west [40, 70].
        assert_eq!(r.commit_p50_ms["us-east"], 2.0);
        assert_eq!(r.commit_p99_ms["us-east"], 4.0);
        assert_eq!(r.commit_p50_ms["us-west"], 40.0);
        assert_eq!(r.commit_p99_ms["us-west"], 70.0);
        assert_eq!(r.split_brain, None);

        let allowed = check(&CheckInput {
            allow_acked_loss: true,
            ..input
        });
        assert_eq!(allowed.acked_lost, 1);
        assert_eq!(allowed.violations.len(), 2);
    }

    #[test]
    fn write_unavailability_ignores_lost_writers_and_counts_the_open_end() {
        use Outcome::*;
        let writes = vec![
            w(1, "east", "us-east", Ok, 0, 100),
            w(2, "west", "us-west", Ok, 100, 150),
            w(3, "east", "us-east", Failed, 100, 2_000),
            w(4, "west", "us-west", Ok, 150, 1_150),
            w(5, "west", "us-west", Ok, 1_150, 1_200),
            w(6, "east", "us-east", Ok, 2_000, 2_500),
        ];
        let all = check(&CheckInput {
            writes: writes.clone(),
            final_ids: [1, 2, 4, 5, 6].into_iter().collect(),
            observe_from: d(0),
            observe_to: d(3_000),
            ..CheckInput::default()
        });
        // Ends 100, 150, 1150, 1200, 2500 in 0..3000 → longest 1200..2500.
        assert_eq!(all.write_unavailable, Some(d(1_300)));
        assert!(all.violations.is_empty(), "{:?}", all.violations);

        let west_only = check(&CheckInput {
            writes: writes.clone(),
            final_ids: [1, 2, 4, 5, 6].into_iter().collect(),
            surviving_writers: Some(["west".to_string()].into_iter().collect()),
            observe_from: d(0),
            observe_to: d(3_000),
            ..CheckInput::default()
        });
        // Ends 150, 1150, 1200 → the open end 1200..3000 is the longest.
        assert_eq!(west_only.write_unavailable, Some(d(1_800)));

        let empty_window = check(&CheckInput {
            writes,
            observe_from: d(5),
            observe_to: d(5),
            ..CheckInput::default()
        });
        assert_eq!(empty_window.write_unavailable, None);
    }

    #[test]
    fn split_brain_time_sums_rounds_with_two_acceptors() {
        let probes = vec![
            probe(0, &["m1"]),
            probe(200, &["m1", "m3"]),
            probe(450, &["m1", "m3"]),
            probe(700, &["m3"]),
            probe(900, &[]),
            probe(1_000, &["m1", "m2"]),
        ];
        let r = check(&CheckInput {
            probes,
            ..CheckInput::default()
        });
        // 200..450 + 450..700 + the last round counts its predecessor's gap (100).
        assert_eq!(r.split_brain, Some(d(600)));
        assert_eq!(
            r.violations,
            vec!["split brain: 3 probe rounds saw more than one member accept a write (first at 200 ms: m1, m3)"]
        );

        let clean = check(&CheckInput {
            probes: vec![probe(0, &["m1"]), probe(100, &["m2"])],
            ..CheckInput::default()
        });
        assert_eq!(clean.split_brain, Some(Duration::ZERO));
        assert!(clean.violations.is_empty());
    }

    #[test]
    fn duplicate_ids_are_flagged() {
        let r = check(&CheckInput {
            writes: vec![
                w(9, "a", "r", Outcome::Ok, 0, 1),
                w(9, "b", "r", Outcome::Ok, 0, 1),
            ],
            final_ids: [9].into_iter().collect(),
            ..CheckInput::default()
        });
        assert_eq!(r.violations.len(), 1);
        assert!(r.violations[0].contains("more than once"));
    }
}
