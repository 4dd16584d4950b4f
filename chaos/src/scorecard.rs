//! The scorecard of one chaos run (the JSON contract of `meridian-chaos`), its human table,
//! and the bench summary over many runs.
//!
//! Times are integer milliseconds except the commit latency percentiles, which are fractional
//! milliseconds (in-region commits take about a millisecond). `null` means not applicable or
//! not measured (e.g. no failover happened, so no `promote_ms`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::check::{percentile, CheckReport};

/// One run's results. The field set is the contract; see the module doc for units.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scorecard {
    pub scenario: String,
    pub seed: u64,
    pub policy: String,
    /// Where the members ran: `loopback` (one machine's 127.0.0.1, links through the proxy
    /// mesh) or `netns` (one network namespace per member). Absent in older scorecards.
    #[serde(default = "default_hosts")]
    pub hosts: String,
    /// Fault injection to the first acknowledged write on the new (or surviving) primary.
    pub rto_ms: Option<u64>,
    /// Fault injection to the cluster deciding the primary failed.
    pub detection_ms: Option<u64>,
    /// Promotion decision to the new primary accepting writes.
    pub promote_ms: Option<u64>,
    pub write_unavailable_ms: Option<u64>,
    pub acked: u64,
    pub acked_lost: u64,
    pub indeterminate: u64,
    pub indeterminate_recovered: u64,
    pub unexpected: u64,
    pub split_brain_ms: Option<u64>,
    pub failovers: u64,
    pub final_primary: Option<String>,
    pub final_timeline: Option<u64>,
    pub converged: bool,
    pub commit_p50_ms: BTreeMap<String, f64>,
    pub commit_p99_ms: BTreeMap<String, f64>,
    pub violations: Vec<String>,
    /// With a backup repository: `none`, or the first missing WAL segment / history file
    /// of the archive after the scenario (`archive.rs`). Absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_gap: Option<String>,
}

fn default_hosts() -> String {
    "loopback".to_string()
}

/// Milliseconds of a duration, for the scorecard's integer fields.
pub fn to_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Rounds to microseconds, so the JSON does not carry float noise.
fn round_us(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

impl Scorecard {
    pub fn new(scenario: &str, seed: u64, policy: &str) -> Scorecard {
        Scorecard {
            scenario: scenario.to_string(),
            seed,
            policy: policy.to_string(),
            hosts: default_hosts(),
            ..Scorecard::default()
        }
    }

    /// Copies the checker's numbers in and appends its violations.
    pub fn apply_check(&mut self, r: &CheckReport) {
        self.acked = r.acked;
        self.acked_lost = r.acked_lost;
        self.indeterminate = r.indeterminate;
        self.indeterminate_recovered = r.indeterminate_recovered;
        self.unexpected = r.unexpected;
        self.write_unavailable_ms = r.write_unavailable.map(to_ms);
        self.split_brain_ms = r.split_brain.map(to_ms);
        self.commit_p50_ms = r
            .commit_p50_ms
            .iter()
            .map(|(k, v)| (k.clone(), round_us(*v)))
            .collect();
        self.commit_p99_ms = r
            .commit_p99_ms
            .iter()
            .map(|(k, v)| (k.clone(), round_us(*v)))
            .collect();
        self.violations.extend(r.violations.iter().cloned());
    }

    /// A run passes when it converged and broke no invariant.
    pub fn passed(&self) -> bool {
        self.converged && self.violations.is_empty()
    }

    /// A two-column table for people.
    pub fn render_table(&self) -> String {
        fn opt<T: ToString>(v: &Option<T>) -> String {
            v.as_ref().map_or_else(|| "-".to_string(), T::to_string)
        }
        fn ms(v: &Option<u64>) -> String {
            v.map_or_else(|| "-".to_string(), |v| format!("{v} ms"))
        }
        fn regions(m: &BTreeMap<String, f64>) -> String {
            if m.is_empty() {
                return "-".to_string();
            }
            m.iter()
                .map(|(r, v)| format!("{r} {v:.2} ms"))
                .collect::<Vec<_>>()
                .join(", ")
        }
        let mut rows: Vec<(&str, String)> = vec![
            ("scenario", self.scenario.clone()),
            ("seed", self.seed.to_string()),
            ("policy", self.policy.clone()),
            ("hosts", self.hosts.clone()),
            ("rto", ms(&self.rto_ms)),
            ("detection", ms(&self.detection_ms)),
            ("promote", ms(&self.promote_ms)),
            ("write unavailable", ms(&self.write_unavailable_ms)),
            ("acked", self.acked.to_string()),
            ("acked lost", self.acked_lost.to_string()),
            ("indeterminate", self.indeterminate.to_string()),
            (
                "indeterminate recovered",
                self.indeterminate_recovered.to_string(),
            ),
            ("unexpected", self.unexpected.to_string()),
            ("split brain", ms(&self.split_brain_ms)),
            ("failovers", self.failovers.to_string()),
            ("final primary", opt(&self.final_primary)),
            ("final timeline", opt(&self.final_timeline)),
            (
                "converged",
                if self.converged { "yes" } else { "NO" }.to_string(),
            ),
            ("commit p50", regions(&self.commit_p50_ms)),
            ("commit p99", regions(&self.commit_p99_ms)),
            (
                "result",
                if self.passed() { "PASS" } else { "FAIL" }.to_string(),
            ),
        ];
        if let Some(gap) = &self.archive_gap {
            rows.insert(rows.len() - 1, ("archive gap", gap.clone()));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<width$}  {v}");
        }
        for v in &self.violations {
            let _ = writeln!(out, "{:<width$}  {v}", "VIOLATION");
        }
        out
    }
}

/// min / p50 / p99 / max of one field over runs (nearest-rank percentiles).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        Some(Stat {
            min: *v.first()?,
            p50: percentile(&v, 50.0)?,
            p99: percentile(&v, 99.0)?,
            max: *v.last()?,
        })
    }
}

/// Numeric scorecard fields summarized by a bench (nulls are skipped).
pub const SUMMARY_FIELDS: [&str; 11] = [
    "rto_ms",
    "detection_ms",
    "promote_ms",
    "write_unavailable_ms",
    "acked",
    "acked_lost",
    "indeterminate",
    "indeterminate_recovered",
    "unexpected",
    "split_brain_ms",
    "failovers",
];

/// `{"runs": [scorecard...], "summary": {field: {"min","p50","p99","max"}}}`. Per-region
/// commit percentiles appear as `commit_p50_ms.<region>` and `commit_p99_ms.<region>`; a
/// field with no value in any run is left out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub runs: Vec<Scorecard>,
    pub summary: BTreeMap<String, Stat>,
}

impl BenchReport {
    pub fn from_runs(runs: Vec<Scorecard>) -> BenchReport {
        let mut columns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for run in &runs {
            let value = serde_json::to_value(run).unwrap_or_default();
            for field in SUMMARY_FIELDS {
                if let Some(x) = value.get(field).and_then(serde_json::Value::as_f64) {
                    columns.entry(field.to_string()).or_default().push(x);
                }
            }
            for (name, m) in [
                ("commit_p50_ms", &run.commit_p50_ms),
                ("commit_p99_ms", &run.commit_p99_ms),
            ] {
                for (region, x) in m {
                    columns
                        .entry(format!("{name}.{region}"))
                        .or_default()
                        .push(*x);
                }
            }
        }
        let summary = columns
            .into_iter()
            .filter_map(|(k, v)| Stat::of(&v).map(|s| (k, s)))
            .collect();
        BenchReport { runs, summary }
    }

    /// Runs that failed (violations or not converged).
    pub fn failures(&self) -> usize {
        self.runs.iter().filter(|r| !r.passed()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn sample() -> Scorecard {
        let mut s = Scorecard::new("primary-kill", 7, "auto");
        s.rto_ms = Some(2_900);
        s.detection_ms = Some(2_100);
        s.promote_ms = Some(340);
        s.failovers = 1;
        s.final_primary = Some("m2".into());
        s.final_timeline = Some(2);
        s.converged = true;
        s
    }

    #[test]
    fn json_has_exactly_the_contract_fields() {
        let v = serde_json::to_value(sample()).unwrap();
        let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let expected: BTreeSet<&str> = [
            "scenario",
            "seed",
            "policy",
            "hosts",
            "rto_ms",
            "detection_ms",
            "promote_ms",
            "write_unavailable_ms",
            "acked",
            "acked_lost",
            "indeterminate",
            "indeterminate_recovered",
            "unexpected",
            "split_brain_ms",
            "failovers",
            "final_primary",
            "final_timeline",
            "converged",
            "commit_p50_ms",
            "commit_p99_ms",
            "violations",
        ]
        .into_iter()
        .collect();
        assert_eq!(keys, expected);
        assert!(v["write_unavailable_ms"].is_null());
        assert!(v["commit_p50_ms"].is_object());
        assert!(v["violations"].is_array());
        assert_eq!(v["hosts"], "loopback");
        let back: Scorecard = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, sample());
        // Scorecards written before the hosts field read as loopback runs.
        let mut old = v;
        old.as_object_mut().unwrap().remove("hosts");
        let back: Scorecard = serde_json::from_value(old).unwrap();
        assert_eq!(back.hosts, "loopback");
        let mut extra = serde_json::to_value(sample()).unwrap();
        extra["surprise"] = serde_json::json!(1);
        assert!(serde_json::from_value::<Scorecard>(extra).is_err());
    }

    #[test]
    fn apply_check_copies_numbers_and_violations() {
        let mut report = CheckReport {
            acked: 10,
            acked_lost: 1,
            indeterminate: 2,
            indeterminate_recovered: 1,
            unexpected: 0,
            write_unavailable: Some(Duration::from_micros(2_345_900)),
            split_brain: Some(Duration::ZERO),
            violations: vec!["1 acknowledged writes lost: 5".into()],
            ..CheckReport::default()
        };
        report.commit_p50_ms.insert("us-east".into(), 1.234_567);
        report.commit_p99_ms.insert("us-east".into(), 35.5);
        let mut s = sample();
        s.apply_check(&report);
        assert_eq!(s.acked, 10);
        assert_eq!(s.acked_lost, 1);
        assert_eq!(s.indeterminate, 2);
        assert_eq!(s.indeterminate_recovered, 1);
        assert_eq!(s.write_unavailable_ms, Some(2_345));
        assert_eq!(s.split_brain_ms, Some(0));
        assert_eq!(s.commit_p50_ms["us-east"], 1.235);
        assert_eq!(s.commit_p99_ms["us-east"], 35.5);
        assert!(!s.passed());
        let table = s.render_table();
        assert!(
            table.contains("rto                      2900 ms"),
            "{table}"
        );
        assert!(
            table.contains("commit p50               us-east 1.24 ms"),
            "{table}"
        );
        assert!(table.contains("VIOLATION                1 acknowledged writes lost: 5"));
        assert!(table.contains("result                   FAIL"));
        assert!(sample()
            .render_table()
            .contains("write unavailable        -"));
    }

    #[test]
    fn bench_summary_over_numeric_fields() {
        let runs: Vec<Scorecard> = [(1_000, Some(10)), (3_000, None), (2_000, Some(30))]
            .into_iter()
            .enumerate()
            .map(|(i, (rto, wu))| {
                let mut s = sample();
                s.seed = i as u64;
                s.rto_ms = Some(rto);
                s.write_unavailable_ms = wu;
                s.promote_ms = None;
                s.commit_p50_ms.insert("us-east".into(), 1.0 + i as f64);
                s
            })
            .collect();
        let b = BenchReport::from_runs(runs);
        assert_eq!(
            b.summary["rto_ms"],
            Stat {
                min: 1_000.0,
                p50: 2_000.0,
                p99: 3_000.0,
                max: 3_000.0
            }
        );
        assert_eq!(
            b.summary["write_unavailable_ms"],
            Stat {
                min: 10.0,
                p50: 10.0,
                p99: 30.0,
                max: 30.0
            }
        );
        assert_eq!(b.summary["commit_p50_ms.us-east"].max, 3.0);
        assert_eq!(b.summary["failovers"].p50, 1.0);
        assert!(!b.summary.contains_key("promote_ms"));
        assert!(!b.summary.contains_key("seed"));
        assert_eq!(b.failures(), 0);
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["runs"].as_array().unwrap().len(), 3);
        assert_eq!(v["summary"]["rto_ms"]["p99"], 3000.0);
    }
}
