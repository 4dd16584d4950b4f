//! Small intents shared by unit tests of this crate and of meridianctl (not for product code).

use crate::raft::intent::{Member, MemberKind, MemberTags};
use crate::raft::Intent;
use crate::types::MemberId;

/// a1, a2 in `east`, b1 in `west` (data) and the witness w1 in `eu`; a1 is the primary.
pub fn four_member_intent() -> Intent {
    let mut i = Intent::default();
    for (n, (name, region, kind)) in [
        ("a1", "east", MemberKind::Data),
        ("a2", "east", MemberKind::Data),
        ("b1", "west", MemberKind::Data),
        ("w1", "eu", MemberKind::Witness),
    ]
    .into_iter()
    .enumerate()
    {
        i.members.insert(
            name.into(),
            Member {
                name: name.into(),
                id: MemberId(n as u64 + 1),
                region: region.into(),
                kind,
                tags: MemberTags::default(),
            },
        );
    }
    i.primary = Some("a1".into());
    i
}
