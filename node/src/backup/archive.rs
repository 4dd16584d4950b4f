//! Archive continuity, as a pure function: given what the repository's archive holds
//! (segment and history file names), the timeline history of the current timeline, where
//! the oldest retained backup starts and the last segment that must be there, which
//! segment or history file is missing first. No I/O: `pgbackrest.rs` lists the repository
//! and `ops.rs` reads the positions.
//!
//! Which timeline a segment must come from follows Postgres' recovery: segment `n` is read
//! from the newest timeline of the history whose switch point lies in or before segment
//! `n` (the segment holding a switch point is copied onto the new timeline, so the old
//! timeline's copy, archived as `.partial`, is not needed).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::types::Lsn;

/// A WAL segment: timeline and segment number (in units of the segment size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    pub timeline: u32,
    pub number: u64,
}

impl Segment {
    /// Parses a 24-hex-digit WAL file name (`000000010000000000000003`).
    pub fn parse(name: &str, segment_size: u64) -> Option<Segment> {
        if name.len() != 24 || !name.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let timeline = u32::from_str_radix(&name[0..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        let per_log = segments_per_log(segment_size);
        if seg >= per_log {
            return None;
        }
        Some(Segment {
            timeline,
            number: log * per_log + seg,
        })
    }

    /// The WAL file name Postgres gives this segment.
    pub fn name(&self, segment_size: u64) -> String {
        let per_log = segments_per_log(segment_size);
        format!(
            "{:08X}{:08X}{:08X}",
            self.timeline,
            self.number / per_log,
            self.number % per_log
        )
    }
}

fn segments_per_log(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size.max(1)
}

/// One line of a timeline history file: `parent_tli switch_lsn reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    /// The timeline that ended.
    pub parent: u32,
    /// Where the next timeline begins.
    pub at: Lsn,
}

/// Parses a timeline history file (`00000003.history`); comment and blank lines skipped.
pub fn parse_history(text: &str) -> Result<Vec<Switch>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(tli), Some(lsn)) = (parts.next(), parts.next()) else {
            return Err(format!("line {}: expected \"timeline lsn reason\"", i + 1));
        };
        let parent = tli
            .parse::<u32>()
            .map_err(|_| format!("line {}: {tli:?} is not a timeline", i + 1))?;
        let at = lsn
            .parse::<Lsn>()
            .map_err(|_| format!("line {}: {lsn:?} is not an LSN", i + 1))?;
        out.push(Switch { parent, at });
    }
    Ok(out)
}

/// What the archive holds, as listed from the repository.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveListing {
    pub segments: BTreeSet<Segment>,
    /// Timelines with a `0000000N.history` file.
    pub histories: BTreeSet<u32>,
}

impl ArchiveListing {
    /// From the repository's file names (`000000010000000000000003-<sha1>.gz`,
    /// `00000002.history`, with or without directories); anything else is ignored.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>, segment_size: u64) -> Self {
        let mut l = ArchiveListing::default();
        for full in names {
            let name = full.rsplit('/').next().unwrap_or(full);
            if let Some(tli) = name.strip_suffix(".history") {
                if tli.len() == 8 {
                    if let Ok(t) = u32::from_str_radix(tli, 16) {
                        l.histories.insert(t);
                    }
                }
                continue;
            }
            // `<24 hex>-<sha1>[.gz|.lz4|...]`; `.partial` and `.backup` files are not segments.
            let Some((seg, rest)) = name.split_once('-') else {
                continue;
            };
            if rest.contains("partial") {
                continue;
            }
            if let Some(s) = Segment::parse(seg, segment_size) {
                l.segments.insert(s);
            }
        }
        l
    }
}

/// The archive check's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveReport {
    /// First segment required (the oldest retained backup's start).
    pub from: String,
    /// Last segment required (the current position's last completed segment).
    pub to: String,
    /// Segments checked.
    pub checked: u64,
    /// History files required (timelines after the first).
    pub histories: Vec<u32>,
    /// The first missing segment or history file; None when the archive is whole.
    pub first_missing: Option<String>,
    /// How many segments are missing.
    pub missing_count: u64,
}

impl ArchiveReport {
    pub fn is_whole(&self) -> bool {
        self.first_missing.is_none()
    }
}

/// The timelines of `current`'s history as (timeline, first segment), oldest first.
fn timeline_starts(current: u32, history: &[Switch], segment_size: u64) -> Vec<(u32, u64)> {
    let mut starts = vec![];
    let mut prev_begin = 0u64;
    for sw in history {
        starts.push((sw.parent, prev_begin));
        prev_begin = sw.at.0 / segment_size;
    }
    starts.push((current, prev_begin));
    starts
}

/// Checks that every segment from `from` to `to` (inclusive, `to` on `current`'s timeline
/// or an ancestor) is in `listing` on the timeline recovery would read it from, and that
/// every timeline after the first has its history file.
pub fn check_continuity(
    listing: &ArchiveListing,
    current: u32,
    history: &[Switch],
    from: Segment,
    to: Segment,
    segment_size: u64,
) -> ArchiveReport {
    let starts = timeline_starts(current, history, segment_size);
    let timeline_of = |n: u64| -> u32 {
        starts
            .iter()
            .rev()
            .find(|(_, begin)| *begin <= n)
            .map(|(t, _)| *t)
            .unwrap_or(from.timeline)
    };
    let mut first_missing = None;
    let mut missing_count = 0u64;
    // History files first: without them recovery cannot follow a switch at all (it finds
    // the newest timeline by probing 2, 3, ... and stops at the first missing file).
    let histories: Vec<u32> = starts.iter().map(|(t, _)| *t).filter(|t| *t > 1).collect();
    for t in &histories {
        if !listing.histories.contains(t) {
            missing_count += 1;
            first_missing.get_or_insert_with(|| format!("{t:08X}.history"));
        }
    }
    let mut checked = 0;
    for n in from.number..=to.number {
        checked += 1;
        let seg = Segment {
            timeline: timeline_of(n),
            number: n,
        };
        if !listing.segments.contains(&seg) {
            missing_count += 1;
            if first_missing.is_none() {
                first_missing = Some(seg.name(segment_size));
            }
        }
    }
    ArchiveReport {
        from: from.name(segment_size),
        to: Segment {
            timeline: timeline_of(to.number),
            number: to.number,
        }
        .name(segment_size),
        checked,
        histories,
        first_missing,
        missing_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB16: u64 = 16 * 1024 * 1024;

    fn seg(name: &str) -> Segment {
        Segment::parse(name, MB16).unwrap()
    }

    #[test]
    fn segment_names_round_trip() {
        let s = seg("0000000200000001000000FF");
        assert_eq!(s.timeline, 2);
        assert_eq!(s.number, 256 + 255);
        assert_eq!(s.name(MB16), "0000000200000001000000FF");
        assert_eq!(Segment::parse("000000010000000000000100", MB16), None);
        assert_eq!(Segment::parse("00000001", MB16), None);
        // 64 MB segments: 64 per log file.
        let big = Segment::parse("00000001000000010000003F", 64 * 1024 * 1024).unwrap();
        assert_eq!(big.number, 64 + 63);
    }

    #[test]
    fn history_files_parse() {
        let h = parse_history("1\t0/3000150\tno recovery target specified\n\n2\t0/5A00000\tx\n")
            .unwrap();
        assert_eq!(
            h,
            vec![
                Switch {
                    parent: 1,
                    at: Lsn(0x300_0150)
                },
                Switch {
                    parent: 2,
                    at: Lsn(0x5A0_0000)
                }
            ]
        );
        assert!(parse_history("x y z").is_err());
    }

    fn listing(names: &[&str]) -> ArchiveListing {
        ArchiveListing::from_names(names.iter().copied(), MB16)
    }

    #[test]
    fn a_whole_archive_across_a_timeline_switch_passes() {
        // Switch to timeline 2 inside segment 3: segment 3 comes from timeline 2; the old
        // timeline's copy is only a .partial.
        let l = listing(&[
            "15-1/0000000100000000/000000010000000000000002-aa.gz",
            "15-1/0000000100000000/000000010000000000000003.partial-bb.gz",
            "15-1/00000002.history",
            "15-1/0000000200000000/000000020000000000000003-cc.gz",
            "15-1/0000000200000000/000000020000000000000004-dd.gz",
            "15-1/0000000100000000/000000010000000000000002.00000028.backup",
        ]);
        let h = [Switch {
            parent: 1,
            at: Lsn(0x300_0150),
        }];
        let r = check_continuity(
            &l,
            2,
            &h,
            seg("000000010000000000000002"),
            seg("000000020000000000000004"),
            MB16,
        );
        assert_eq!(r.first_missing, None, "{r:?}");
        assert_eq!(r.checked, 3);
        assert_eq!(r.histories, vec![2]);
        assert_eq!(r.to, "000000020000000000000004");
    }

    #[test]
    fn the_first_gap_is_named() {
        let l = listing(&[
            "000000010000000000000002-aa.gz",
            "00000002.history",
            "000000020000000000000004-dd.gz",
        ]);
        let h = [Switch {
            parent: 1,
            at: Lsn(0x300_0150),
        }];
        let r = check_continuity(
            &l,
            2,
            &h,
            seg("000000010000000000000002"),
            seg("000000020000000000000004"),
            MB16,
        );
        assert_eq!(r.first_missing.as_deref(), Some("000000020000000000000003"));
        assert_eq!(r.missing_count, 1);
    }

    #[test]
    fn a_missing_history_file_is_a_gap() {
        let l = listing(&[
            "000000010000000000000002-aa.gz",
            "000000020000000000000003-cc.gz",
        ]);
        let h = [Switch {
            parent: 1,
            at: Lsn(0x300_0000),
        }];
        let r = check_continuity(
            &l,
            2,
            &h,
            seg("000000010000000000000002"),
            seg("000000020000000000000003"),
            MB16,
        );
        assert_eq!(r.first_missing.as_deref(), Some("00000002.history"));
    }

    #[test]
    fn an_old_timeline_segment_does_not_stand_in_for_the_new_one() {
        // The old primary pushed its own (diverged) segment 4 on timeline 1: recovery
        // reads segment 4 from timeline 2, which is missing.
        let l = listing(&[
            "000000010000000000000003-aa.gz",
            "000000010000000000000004-bb.gz",
            "00000002.history",
        ]);
        let h = [Switch {
            parent: 1,
            at: Lsn(0x400_0000),
        }];
        let r = check_continuity(
            &l,
            2,
            &h,
            seg("000000010000000000000003"),
            seg("000000020000000000000004"),
            MB16,
        );
        assert_eq!(r.first_missing.as_deref(), Some("000000020000000000000004"));
    }
}
