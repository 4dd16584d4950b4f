//! Cascading replication (the `replicatefrom` tag, as in Patroni): which member each
//! standby streams from, and which members' replication slots each Postgres keeps.
//!
//! A standby tagged `replicatefrom = "X"` streams from X instead of the primary, so one
//! WAN stream can feed a whole remote region. The choice is made by the standby's own
//! agent from the applied intent and its own probe of X (is X a standby whose WAL
//! receiver streams?): while X is not, the standby streams from the primary, and goes
//! back to X when X streams again. A tag that names the primary, itself, a witness, an
//! unknown member, or that closes a cycle of tags, means "the primary".
//!
//! Slots follow the tags from the intent alone (not from probes), so every member agrees
//! without talking: a member that cascades from X has its slot on X, not on the primary
//! (an unused slot there would hold the primary's WAL for nothing); while it falls back
//! to the primary it streams without a slot, as in Patroni.
//!
//! A cascading standby is never in the sync set: its `application_name` never reaches
//! the primary's `pg_stat_replication`, so a commit could not wait for it.

use std::collections::BTreeSet;

use crate::intent::{Intent, MemberKind};

/// Where a standby should stream from now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// The member whose Postgres `primary_conninfo` points at.
    pub member: String,
    /// Whether that member keeps this standby's slot (stream through it) or not (stream
    /// without a slot).
    pub slot: bool,
}

/// The member `me`'s `replicatefrom` tag makes it cascade from, judged on the intent
/// only: a data member other than `me` and the primary, reached without a cycle of tags.
/// None: `me` streams from the primary.
pub fn cascade_source<'a>(intent: &'a Intent, me: &str) -> Option<&'a str> {
    let first = direct_source(intent, me)?;
    // Follow the chain: back at `me` is a cycle (every member in it streams from the
    // primary instead, so none waits on the others); a chain ending elsewhere is fine.
    let mut at = first;
    for _ in 0..intent.members.len() {
        match direct_source(intent, at) {
            Some(next) if next == me => return None,
            Some(next) => at = next,
            None => return Some(first),
        }
    }
    // Longer than the member list: a cycle further up that `me` is not part of; its
    // members stream from the primary, so `me` can still follow its own source.
    Some(first)
}

/// The tag of `name`, when it names a data member other than `name` and the primary.
fn direct_source<'a>(intent: &'a Intent, name: &str) -> Option<&'a str> {
    let target = intent.members.get(name)?.tags.replicatefrom.as_deref()?;
    let m = intent.members.get(target)?;
    (m.kind == MemberKind::Data && target != name && intent.primary.as_deref() != Some(target))
        .then_some(m.name.as_str())
}

/// Where standby `me` streams from: its cascade source while `source_streaming` says that
/// member is a standby whose WAL receiver streams (this agent's own probe of it), else
/// the primary. None when the intent names no primary (or `me` is it).
pub fn upstream(
    intent: &Intent,
    me: &str,
    source_streaming: impl Fn(&str) -> bool,
) -> Option<Upstream> {
    let primary = intent.primary.as_deref().filter(|p| *p != me)?;
    match cascade_source(intent, me) {
        Some(src) if source_streaming(src) => Some(Upstream {
            member: src.to_string(),
            slot: true,
        }),
        source => Some(Upstream {
            member: primary.to_string(),
            // The primary keeps no slot for a member that cascades elsewhere.
            slot: source.is_none(),
        }),
    }
}

/// The members whose slots `host`'s Postgres keeps: on the primary, every other data
/// member that does not cascade from someone else; on a standby, the members that cascade
/// from it.
pub fn slots_kept_by(intent: &Intent, host: &str) -> BTreeSet<String> {
    let is_primary = intent.primary.as_deref() == Some(host);
    intent
        .members
        .values()
        .filter(|m| m.kind == MemberKind::Data && m.name != host)
        .filter(|m| match cascade_source(intent, &m.name) {
            Some(src) => src == host,
            None => is_primary,
        })
        .map(|m| m.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::{Member, MemberTags};
    use crate::types::MemberId;

    /// a1 primary (east); b1, b2, b3 in west; witness w.
    fn intent(tags: &[(&str, &str)]) -> Intent {
        let mut i = Intent {
            primary: Some("a1".into()),
            ..Intent::default()
        };
        for (n, (name, kind)) in [
            ("a1", MemberKind::Data),
            ("b1", MemberKind::Data),
            ("b2", MemberKind::Data),
            ("b3", MemberKind::Data),
            ("w", MemberKind::Witness),
        ]
        .into_iter()
        .enumerate()
        {
            let replicatefrom = tags
                .iter()
                .find(|(m, _)| *m == name)
                .map(|(_, t)| t.to_string());
            i.members.insert(
                name.into(),
                Member {
                    name: name.into(),
                    id: MemberId(n as u64 + 1),
                    region: if name == "a1" { "east" } else { "west" }.into(),
                    kind,
                    tags: MemberTags {
                        replicatefrom,
                        ..MemberTags::default()
                    },
                },
            );
        }
        i
    }

    fn names(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_tagged_standby_streams_from_its_source_while_that_streams() {
        let i = intent(&[("b2", "b1"), ("b3", "b1")]);
        assert_eq!(cascade_source(&i, "b2"), Some("b1"));
        assert_eq!(
            upstream(&i, "b2", |m| m == "b1"),
            Some(Upstream {
                member: "b1".into(),
                slot: true
            })
        );
        // b1 down, promoting or not streaming: the primary, without a slot there.
        assert_eq!(
            upstream(&i, "b2", |_| false),
            Some(Upstream {
                member: "a1".into(),
                slot: false
            })
        );
        // b1 itself follows the primary through its slot.
        assert_eq!(
            upstream(&i, "b1", |_| true),
            Some(Upstream {
                member: "a1".into(),
                slot: true
            })
        );
        assert_eq!(upstream(&i, "a1", |_| true), None);
    }

    #[test]
    fn a_tag_naming_the_primary_itself_a_witness_or_nobody_means_the_primary() {
        for tag in ["a1", "b2", "w", "nosuch"] {
            let i = intent(&[("b2", tag)]);
            assert_eq!(cascade_source(&i, "b2"), None, "{tag}");
            assert_eq!(
                upstream(&i, "b2", |_| true).unwrap(),
                Upstream {
                    member: "a1".into(),
                    slot: true
                },
                "{tag}"
            );
        }
    }

    #[test]
    fn when_the_source_is_promoted_its_cascading_standbys_follow_it_as_the_primary() {
        let mut i = intent(&[("b2", "b1")]);
        i.primary = Some("b1".into());
        assert_eq!(cascade_source(&i, "b2"), None);
        assert_eq!(
            upstream(&i, "b2", |_| true).unwrap(),
            Upstream {
                member: "b1".into(),
                slot: true
            }
        );
        assert_eq!(slots_kept_by(&i, "b1"), names(&["a1", "b2", "b3"]));
    }

    #[test]
    fn a_cycle_of_tags_streams_from_the_primary_and_a_chain_cascades() {
        let i = intent(&[("b1", "b2"), ("b2", "b1")]);
        assert_eq!(cascade_source(&i, "b1"), None);
        assert_eq!(cascade_source(&i, "b2"), None);
        // b3 follows b1, which is in a cycle it is not part of: still b1.
        let i = intent(&[("b1", "b2"), ("b2", "b1"), ("b3", "b1")]);
        assert_eq!(cascade_source(&i, "b3"), Some("b1"));
        // A chain a1 <- b1 <- b2 <- b3.
        let i = intent(&[("b2", "b1"), ("b3", "b2")]);
        assert_eq!(cascade_source(&i, "b3"), Some("b2"));
        assert_eq!(slots_kept_by(&i, "b2"), names(&["b3"]));
    }

    #[test]
    fn slots_live_where_the_members_stream_from() {
        let i = intent(&[("b2", "b1"), ("b3", "b1")]);
        assert_eq!(slots_kept_by(&i, "a1"), names(&["b1"]));
        assert_eq!(slots_kept_by(&i, "b1"), names(&["b2", "b3"]));
        assert_eq!(slots_kept_by(&i, "b2"), names(&[]));
        // Without tags: every other data member's on the primary, none on a standby.
        let i = intent(&[]);
        assert_eq!(slots_kept_by(&i, "a1"), names(&["b1", "b2", "b3"]));
        assert!(slots_kept_by(&i, "b1").is_empty());
    }
}
