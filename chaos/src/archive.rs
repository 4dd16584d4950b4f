//! The scorecard's `archive_gap`: after a scenario, `Admin.BackupOp` Check on the
//! cluster's primary (through any responsive member) proves the pgBackRest archive whole
//! from the oldest retained backup (or the archive's first segment) to the current
//! position, across every timeline switch the scenario caused. Only for runs with a
//! backup repository (`--backup-repo`).

use std::time::Duration;

use meridian_node::backup::ops::CheckResult;
use meridian_node::backup::BackupOp;

use crate::cluster::{Cluster, ADMIN_TOKEN};

/// Bound on the whole check (pgbackrest check, WAL switch, listing).
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);

/// The `[backup]` table of a data member whose repository is `repo`.
pub fn backup_section(repo: &std::path::Path) -> String {
    format!(
        "[backup]\nrepo_path = \"{}\"\narchive_mode = \"on\"\ncommand_timeout = \"60s\"\n\n",
        repo.display()
    )
}

/// `none`, the first missing segment or history file, or why the check could not run
/// (`check failed: ...`).
pub async fn archive_gap(c: &Cluster) -> String {
    match check(c).await {
        Ok(r) => r.report.first_missing.unwrap_or_else(|| "none".to_string()),
        Err(e) => format!("check failed: {}", one_line(&format!("{e:#}"))),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn check(c: &Cluster) -> anyhow::Result<CheckResult> {
    let op = serde_json::to_string(&BackupOp::Check)?;
    let mut last = None;
    for name in c.responsive() {
        let mut client = match c.admin(&name).await {
            Ok(cl) => cl,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let mut req = tonic::Request::new(meridian_proto::BackupOpRequest {
            token: ADMIN_TOKEN.to_string(),
            member: String::new(),
            op_json: op.clone(),
            timeout_ms: CHECK_TIMEOUT.as_millis() as u64,
        });
        req.set_timeout(CHECK_TIMEOUT + Duration::from_secs(2));
        match tokio::time::timeout(
            CHECK_TIMEOUT + Duration::from_secs(5),
            client.backup_op(req),
        )
        .await
        {
            Ok(Ok(r)) => return Ok(serde_json::from_str(&r.into_inner().result_json)?),
            Ok(Err(s)) => last = Some(anyhow::anyhow!("{name}: {}", s.message())),
            Err(_) => last = Some(anyhow::anyhow!("{name}: no answer in time")),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no agent is running")))
}
