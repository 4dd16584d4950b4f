//! Scheduled backups end to end (issue 13): real agents, real Postgres, real pgBackRest.
//! Two data members whose `[backup]` schedules a full backup every minute; the Raft leader
//! runs each minute's slot once on the primary and records it in the history. Checked:
//! a backup appears in `backup list`, `history --all` has a `backup` entry saying it
//! finished with that backup's label, and no slot was run twice.
//! Needs `cargo build -p meridian-node -p meridianctl` and pgbackrest on PATH.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meridian_tests::agents::{AgentCluster, ClusterSetup, ConfigExtra, MemberSpec};
use meridian_tests::ctl::run_ctl_env;
use meridian_tests::wait_for;

const FORM: Duration = Duration::from_secs(120);
const TOKEN: &str = "schedule-test-token";

fn chown_to_postgres(p: &Path) {
    if nix::unistd::Uid::effective().is_root() {
        let u = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("the postgres OS user");
        nix::unistd::chown(p, Some(u.uid), Some(u.gid)).unwrap();
    }
}

async fn ctl_json(c: &AgentCluster, args: &[&str]) -> Option<serde_json::Value> {
    let eps: Vec<String> = c
        .running()
        .iter()
        .map(|n| format!("{n}={}", c.member(n).grpc))
        .collect();
    let eps = eps.join(",");
    let mut all = vec!["--endpoint", &eps, "--token", TOKEN, "--json"];
    all.extend_from_slice(args);
    let r = run_ctl_env(&all, &[], Duration::from_secs(60)).await.ok()?;
    (r.code == Some(0)).then(|| r.json())
}

/// The history's `backup` entries (kind, reason).
fn backup_entries(history: &serde_json::Value) -> Vec<String> {
    history
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["kind"] == "backup")
        .filter_map(|h| h["reason"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_runs_each_scheduled_slot_once_and_records_it() {
    if std::process::Command::new("pgbackrest")
        .arg("version")
        .output()
        .is_err()
    {
        panic!("pgbackrest is not installed (scripts/ensure-deps.sh installs it)");
    }
    let repo_root = tempfile::Builder::new()
        .prefix("meridian-sched-repo-")
        .tempdir()
        .unwrap();
    let repo = repo_root.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(repo_root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    chown_to_postgres(&repo);
    let section = format!(
        "[backup]\nrepo_path = \"{}\"\nretention_full = 5\ncommand_timeout = \"60s\"\n\
         backup_timeout = \"3m\"\nschedule = [{{ type = \"full\", cron = \"* * * * *\" }}]\n",
        repo.display()
    );
    let hook: meridian_tests::agents::ConfigHook = Arc::new(move |_ctx| {
        Ok(ConfigExtra {
            sections: section.clone(),
            ..ConfigExtra::default()
        })
    });
    let mut c = AgentCluster::build_with(
        vec![
            MemberSpec::data("a1", "a").bootstrap(),
            MemberSpec::data("a2", "a").join("a1"),
        ],
        ClusterSetup {
            token: Some(TOKEN.into()),
            postgres: true,
            config_hook: Some(hook),
            ..ClusterSetup::default()
        },
    )
    .unwrap();
    c.start("a1").unwrap();
    wait_for("a1 primary", FORM, || async {
        let s = c.status().await.ok()?;
        (s.primary == "a1" && s.generation == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    c.start("a2").unwrap();

    // A scheduled full backup finishes (the first slot may race the primary's
    // stanza-create and fail: that is recorded too, and the next minute runs again).
    let label = wait_for(
        "a scheduled backup recorded as finished",
        Duration::from_secs(240),
        || async {
            let h = ctl_json(&c, &["history", "--all"]).await?;
            let done = backup_entries(&h)
                .into_iter()
                .find(|r| r.contains(": finished, label "))?;
            Some(done.rsplit("label ").next()?.to_string())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert!(label.ends_with('F'), "a full backup's label: {label}");

    let list = ctl_json(&c, &["backup", "list"])
        .await
        .expect("backup list");
    let labels: Vec<&str> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["label"].as_str())
        .collect();
    assert!(labels.contains(&label.as_str()), "{label} in {list}");
    assert!(
        list["backups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["kind"] == "full"),
        "{list}"
    );

    // One run per slot: no slot named twice in the history, and the repository holds no
    // more backups than runs that finished.
    let h = ctl_json(&c, &["history", "--all"]).await.expect("history");
    let entries = backup_entries(&h);
    let slots: Vec<String> = entries
        .iter()
        .filter_map(|r| Some(r.split("(slot ").nth(1)?.split(')').next()?.to_string()))
        .collect();
    assert_eq!(slots.len(), entries.len(), "{entries:#?}");
    let distinct: BTreeSet<&String> = slots.iter().collect();
    assert_eq!(
        distinct.len(),
        slots.len(),
        "a slot ran twice: {entries:#?}"
    );
    let finished = entries.iter().filter(|r| r.contains(": finished")).count();
    // A run may have finished in the repository after the history was read.
    let list = ctl_json(&c, &["backup", "list"])
        .await
        .expect("backup list");
    let in_repo = list["backups"].as_array().unwrap().len();
    assert!(
        in_repo <= finished + 1,
        "{in_repo} backups for {finished} finished runs: {entries:#?}\n{list}"
    );
    // Manual backups stay notes; the scheduled ones left no extra note on the member.
    assert!(
        !h.as_array().unwrap().iter().any(|e| e["reason"]
            .as_str()
            .unwrap_or("")
            .contains("backup")
            && e["kind"] == "note"),
        "{h}"
    );
}
