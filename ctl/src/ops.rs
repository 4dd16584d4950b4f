//! The commands: each reads the cluster's status, checks what it can locally (the same
//! validation the cluster runs, so a refusal costs nothing and explains itself), asks for
//! confirmation where the change is disruptive, writes, and for switchover / failover
//! follows the result within a bound.

use std::io::{BufRead, IsTerminal, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use meridian_node::decide::SwitchoverPhase;
use meridian_node::policy::Policy;
use meridian_node::precheck;
use meridian_node::raft::intent::{
    HistoryKind, PendingSwitchover, Promote, PromotionKind, MAX_REASON_LEN,
};
use meridian_node::raft::Command as IntentCommand;
use meridian_node::types::Lsn;
use serde_json::json;

use crate::client::{Client, Snapshot};
use crate::view::{self, history_rows};
use crate::{Command, ConnArgs, Failure, WatchArgs};

/// Writes to stdout. A closed pipe (`meridianctl list --watch 1 | head -1`) ends the
/// program quietly with exit 0: the reader has what it wanted. Other write errors are
/// ignored as `println!` would not (it panics).
pub(crate) fn write_stdout(args: std::fmt::Arguments<'_>, newline: bool) {
    let mut o = std::io::stdout().lock();
    let r = o
        .write_fmt(args)
        .and_then(|()| if newline { o.write_all(b"\n") } else { Ok(()) })
        .and_then(|()| o.flush());
    exit_on_broken_pipe(r);
}

/// Exit 0 at once when stdout's reader went away.
fn exit_on_broken_pipe(r: std::io::Result<()>) {
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

macro_rules! outln {
    () => { write_stdout(format_args!(""), true) };
    ($($t:tt)*) => { write_stdout(format_args!($($t)*), true) };
}

macro_rules! out {
    ($($t:tt)*) => { write_stdout(format_args!($($t)*), false) };
}

/// How often switchover / failover progress is polled.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// Finer during a switchover: the write pause it reports is measured by these polls.
const SWITCHOVER_POLL: Duration = Duration::from_millis(50);
/// `--watch` without `--count` still stops eventually (a week at one refresh a second).
const MAX_WATCH_REFRESHES: u64 = 7 * 24 * 3600;

pub(crate) fn failed(msg: impl Into<String>) -> Failure {
    Failure::Failed(anyhow::anyhow!(msg.into()))
}

pub(crate) fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v).context("encoding JSON output")?;
    outln!("{text}");
    Ok(())
}

/// Asks on the terminal; `--force` skips it, and without a terminal `--force` is required.
pub(crate) fn confirm(question: &str, force: bool, what: &str) -> Result<(), Failure> {
    if force {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Usage(format!(
            "stdin is not a terminal: pass --force to {what} without confirmation"
        )));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the confirmation")?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(failed("aborted: not confirmed")),
    }
}

/// Refuses locally what the cluster would refuse, with the same reason.
pub(crate) fn validate_locally(snap: &Snapshot, cmd: &IntentCommand) -> Result<(), Failure> {
    snap.intent
        .validate(cmd)
        .map_err(|r| failed(format!("refused: {r}")))
}

/// A command that would ask for confirmation cannot run unattended without `--force`:
/// said before anything is read or written.
fn require_force_without_terminal(force: bool, what: &str) -> Result<(), Failure> {
    if force || std::io::stdin().is_terminal() {
        return Ok(());
    }
    Err(Failure::Usage(format!(
        "stdin is not a terminal: pass --force to {what} without confirmation"
    )))
}

pub async fn run(client: &Client, command: Command, json: bool) -> Result<(), Failure> {
    match &command {
        Command::Switchover {
            force,
            cancel: false,
            ..
        } => require_force_without_terminal(*force, "switch over")?,
        Command::Failover { force, .. } => require_force_without_terminal(*force, "fail over")?,
        Command::Remove { force, .. } => require_force_without_terminal(*force, "remove a member")?,
        Command::Reinit { force, .. } => require_force_without_terminal(*force, "reinit a member")?,
        Command::Restart { force, .. } => {
            require_force_without_terminal(*force, "restart members")?
        }
        Command::Reload { force, .. } => require_force_without_terminal(*force, "reload members")?,
        _ => {}
    }
    match command {
        Command::List { watch } => watch_loop(client, watch, json, false).await,
        Command::Topology { watch } => watch_loop(client, watch, json, true).await,
        Command::Switchover {
            cancel: true, wait, ..
        } => cancel_switchover(client, wait, json).await,
        Command::Switchover {
            candidate,
            force,
            wait,
            scheduled,
            ..
        } => {
            if let Some(at) = scheduled {
                let op = meridian_node::raft::intent::ScheduledOp::Switchover { candidate };
                return crate::day2::schedule(client, &at, op, force, json).await;
            }
            switchover(client, candidate.as_deref(), force, wait, json).await
        }
        Command::Reload { members, force } => {
            crate::day2::reload(client, &members, force, json).await
        }
        Command::Restart {
            members,
            pending,
            role,
            scheduled,
            in_place,
            force,
            wait,
        } => {
            if let Some(at) = scheduled {
                let op = meridian_node::raft::intent::ScheduledOp::Restart {
                    members,
                    pending,
                    role,
                    in_place,
                };
                return crate::day2::schedule(client, &at, op, force, json).await;
            }
            let plan = crate::day2::RestartArgs {
                members,
                pending,
                role,
                in_place,
                force,
                wait_s: wait,
            };
            crate::day2::restart(client, plan, json).await
        }
        Command::Flush { what } => crate::day2::flush(client, &what, json).await,
        Command::Dsn {
            member,
            role,
            dbname,
            user,
        } => crate::day2::dsn(client, member, role, &dbname, user.as_deref(), json).await,
        Command::Query {
            sql,
            member,
            role,
            format,
            timeout,
            max_rows,
        } => crate::day2::query(client, &sql, member, role, &format, timeout, max_rows).await,
        Command::Failover {
            candidate,
            allow_data_loss,
            force,
            wait,
        } => failover(client, &candidate, allow_data_loss, force, wait, json).await,
        Command::Pause => maintenance(client, true, json).await,
        Command::Resume => maintenance(client, false, json).await,
        Command::History { all } => {
            let snap = client.status().await?;
            let rows = history_rows(&snap.intent, &snap.intent_raw, all);
            if json {
                print_json(&rows)
            } else {
                out!("{}", view::render_history(&rows));
                Ok(())
            }
        }
        Command::ShowConfig => {
            let snap = client.status().await?;
            show_policy(&snap.intent.policy, snap.intent.policy_version, json)
        }
        Command::EditConfig {
            set,
            unset,
            dry_run,
            expected_version,
        } => edit_config(client, &set, &unset, dry_run, expected_version, json).await,
        Command::Remove { name, force } => remove(client, &name, force, json).await,
        Command::Reinit { name, force, wait } => reinit(client, &name, force, wait, json).await,
        Command::Version => unreachable!("handled before connecting"),
        // ctl/src/backup.rs
        Command::Backup(_) | Command::Restore(_) | Command::RestorePoint { .. } => {
            unreachable!("handled in main")
        }
    }
}

async fn render_once(client: &Client, json: bool, tree: bool) -> Result<(), Failure> {
    let snap = client.status().await?;
    let v = view::cluster_view(&snap.status, &snap.intent);
    if json {
        print_json(&v)
    } else {
        out!(
            "{}",
            if tree {
                view::render_topology(&v)
            } else {
                view::render_list(&v)
            }
        );
        Ok(())
    }
}

async fn watch_loop(client: &Client, w: WatchArgs, json: bool, tree: bool) -> Result<(), Failure> {
    let Some(every) = w.watch else {
        return render_once(client, json, tree).await;
    };
    let clear = !json && std::io::stdout().is_terminal();
    let refreshes = w.count.unwrap_or(MAX_WATCH_REFRESHES);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    for i in 0..refreshes {
        if clear {
            out!("\x1b[2J\x1b[H");
        }
        if !json {
            outln!(
                "{}  (every {every} s, Ctrl-C to stop)",
                view::time_of(now_unix_ms())
            );
        }
        // While watching, a failed refresh is shown and the watch goes on: the cluster
        // may be in the middle of the failover the operator is watching.
        if let Err(e) = render_once(client, json, tree).await {
            let msg = match e {
                Failure::Failed(e) => format!("{e:#}"),
                Failure::Usage(m) => m,
            };
            eprintln!("error: {}", crate::client::one_line(&msg));
        }
        exit_on_broken_pipe(std::io::stdout().flush());
        if i + 1 == refreshes {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(every)) => {}
            _ = &mut ctrl_c => break,
        }
    }
    Ok(())
}

async fn maintenance(client: &Client, on: bool, json: bool) -> Result<(), Failure> {
    let snap = client.status().await?;
    let word = if on { "paused" } else { "resumed" };
    let log_index = if snap.intent.maintenance == on {
        None
    } else {
        Some(
            client
                .command(&IntentCommand::SetMaintenance { on }, true)
                .await?,
        )
    };
    if json {
        return print_json(
            &json!({"ok": true, "paused": on, "changed": log_index.is_some(), "log_index": log_index}),
        );
    }
    match (log_index, on) {
        (None, true) => outln!("Cluster {} is already paused (maintenance mode).", snap.status.cluster),
        (None, false) => outln!("Cluster {} is not paused.", snap.status.cluster),
        (Some(_), true) => outln!(
            "Cluster {} {word}: maintenance mode is on, no automatic failover until `meridianctl resume`.",
            snap.status.cluster
        ),
        (Some(_), false) => outln!(
            "Cluster {} {word}: maintenance mode is off, automatic failover is back on.",
            snap.status.cluster
        ),
    }
    Ok(())
}

fn show_policy(p: &Policy, version: u64, json: bool) -> Result<(), Failure> {
    if json {
        return print_json(p);
    }
    let text = toml::to_string(p).context("encoding the policy as TOML")?;
    // A TOML comment, so the output still parses as the policy.
    outln!("# policy version {version}");
    out!("{text}");
    Ok(())
}

/// `KEY=VALUE` → (key, value); the key must be non-empty.
pub fn parse_set(s: &str) -> Result<(&str, &str), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim(), v.trim())),
        _ => Err(format!(
            "malformed --set {s:?}: expected KEY=VALUE, e.g. sync_quorum=2 or regions.east.mode=sync"
        )),
    }
}

/// Applies every edit to a copy of `policy`; the first bad one is the error.
#[cfg(test)]
pub fn apply_sets(policy: &Policy, sets: &[String]) -> Result<Policy, String> {
    apply_edits(policy, sets, &[])
}

/// Applies the sets, then the unsets, to a copy of `policy`; the first bad one is the
/// error.
pub fn apply_edits(policy: &Policy, sets: &[String], unsets: &[String]) -> Result<Policy, String> {
    let mut next = policy.clone();
    for s in sets {
        let (k, v) = parse_set(s)?;
        next.set(k, v).map_err(|e| e.to_string())?;
    }
    for k in unsets {
        next.unset(k.trim()).map_err(|e| e.to_string())?;
    }
    Ok(next)
}

/// `key: old -> new` lines for every leaf that differs.
pub fn policy_diff(old: &Policy, new: &Policy) -> Vec<String> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    flatten("", &serde_json::to_value(old).unwrap_or_default(), &mut a);
    flatten("", &serde_json::to_value(new).unwrap_or_default(), &mut b);
    let a: std::collections::BTreeMap<String, String> = a.into_iter().collect();
    let b: std::collections::BTreeMap<String, String> = b.into_iter().collect();
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: {} -> {}",
                a.get(k).map_or("(unset)", String::as_str),
                b.get(k).map_or("(unset)", String::as_str)
            )
        })
        .collect()
}

/// Reads the policy and its version, applies the edits and sends them with that version
/// as `expected_version`: if another edit landed in between, the cluster refuses this one
/// (naming both versions) rather than silently undoing the other.
async fn edit_config(
    client: &Client,
    sets: &[String],
    unsets: &[String],
    dry_run: bool,
    expected_version: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    // Parse before touching the network: a typo is reported even with the cluster down.
    for s in sets {
        parse_set(s).map_err(failed)?;
    }
    apply_edits(&Policy::default(), sets, unsets)
        .map_err(|e| failed(format!("edit-config: {e}")))?;
    // Postgres parameters: checked against a running member's pg_settings.
    let param_sets: Vec<(String, String)> = sets
        .iter()
        .filter_map(|s| parse_set(s).ok())
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("postgresql.parameters.")?;
            Some((name.to_ascii_lowercase(), v.to_string()))
        })
        .collect();
    let mut restart_needed = Vec::new();
    if !param_sets.is_empty() {
        let names: Vec<String> = param_sets.iter().map(|(n, _)| n.clone()).collect();
        let (catalog, answered_by) = client
            .pg_catalog(&names, "")
            .await
            .map_err(|e| failed(format!("edit-config: reading pg_settings: {e:#}")))?;
        for (name, value) in &param_sets {
            let entry = catalog.iter().find(|e| e.name == *name);
            meridian_node::pgparams::validate(name, value, entry).map_err(|e| {
                failed(format!(
                    "edit-config: postgresql.parameters.{name}: {e} (checked against {answered_by}'s pg_settings)"
                ))
            })?;
            if entry.is_some_and(|e| e.needs_restart()) {
                restart_needed.push(name.clone());
            }
        }
    }
    let snap = client.status().await?;
    let old = &snap.intent.policy;
    let new = apply_edits(old, sets, unsets).map_err(|e| failed(format!("edit-config: {e}")))?;
    let diff = policy_diff(old, &new);
    let mut words: Vec<String> = sets.iter().map(|s| format!("--set {s}")).collect();
    words.extend(unsets.iter().map(|u| format!("--unset {u}")));
    let mut reason = format!("meridianctl edit-config {}", words.join(" "));
    if reason.len() > MAX_REASON_LEN {
        let mut cut = MAX_REASON_LEN;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let read_version = expected_version.unwrap_or(snap.intent.policy_version);
    let cmd = IntentCommand::SetPolicy {
        policy: new.clone(),
        reason,
        at_unix_ms: now_unix_ms(),
        expected_version: Some(read_version),
    };
    validate_locally(&snap, &cmd)?;
    // A retry after `Unavailable` (no leader took it) is safe: had the first attempt been
    // committed after all, the repeat is refused as stale rather than applied twice.
    let log_index = if diff.is_empty() || dry_run {
        None
    } else {
        Some(client.command(&cmd, true).await?)
    };
    let version = read_version + u64::from(log_index.is_some());
    if json {
        return print_json(&json!({
            "ok": true, "changed": log_index.is_some(), "dry_run": dry_run,
            "changes": diff, "policy": new, "log_index": log_index,
            "policy_version": version, "restart_needed": restart_needed,
        }));
    }
    if diff.is_empty() {
        outln!("Policy unchanged: it already has these values.");
        return Ok(());
    }
    for d in &diff {
        outln!("  {d}");
    }
    if dry_run {
        outln!("Dry run: nothing committed.");
    } else {
        outln!("Policy updated to version {version}.");
    }
    if !restart_needed.is_empty() {
        outln!(
            "Takes effect after a restart: {} (see `meridianctl list`; `meridianctl restart --pending` restarts the members that wait).",
            restart_needed.join(", ")
        );
    }
    Ok(())
}

async fn remove(client: &Client, name: &str, force: bool, json: bool) -> Result<(), Failure> {
    let snap = client.status().await?;
    let in_status = snap.status.members.iter().any(|m| m.name == name);
    if snap.intent.member(name).is_none() && !in_status {
        return Err(failed(format!("no member named {name:?}")));
    }
    if snap.intent.member(name).is_some() {
        validate_locally(
            &snap,
            &IntentCommand::RemoveMember {
                name: name.to_string(),
                at_unix_ms: now_unix_ms(),
            },
        )?;
    }
    confirm(
        &format!("Remove member {name} from cluster {}?", snap.status.cluster),
        force,
        "remove a member",
    )?;
    client.remove_member(name).await?;
    if json {
        return print_json(&json!({"ok": true, "removed": name}));
    }
    outln!(
        "Member {name} removed from cluster {}.",
        snap.status.cluster
    );
    Ok(())
}

async fn reinit(
    client: &Client,
    name: &str,
    force: bool,
    wait_s: u64,
    json: bool,
) -> Result<(), Failure> {
    let snap = client.status().await?;
    let m = snap
        .intent
        .member(name)
        .ok_or_else(|| failed(format!("no member named {name:?}")))?;
    if !view::is_data(&snap.intent, name) {
        return Err(failed(format!(
            "{name} is a {:?} member and has no Postgres to re-clone",
            m.kind
        )));
    }
    let Some(primary) = snap.intent.primary.clone() else {
        return Err(failed(format!(
            "no primary is recorded: there is nothing to re-clone {name} from"
        )));
    };
    if primary == name {
        return Err(failed(format!(
            "{name} is the primary; switch over first, then reinit it"
        )));
    }
    let cmd = IntentCommand::Reinit {
        name: name.to_string(),
    };
    validate_locally(&snap, &cmd)?;
    confirm(
        &format!(
            "Re-clone {name}'s Postgres from the primary {primary} (its data dir is replaced)?"
        ),
        force,
        "reinit a member",
    )?;
    let started = Instant::now();
    // Repeating a reinit request is harmless (the set of pending re-clones absorbs it).
    let log_index = client.command(&cmd, true).await.map_err(|e| {
        let msg = format!("{e:#}");
        if msg.contains("unknown variant") {
            failed(format!(
                "this cluster does not support reinit: its members do not know the command ({msg})"
            ))
        } else {
            Failure::Failed(e)
        }
    })?;
    if wait_s == 0 {
        if json {
            return print_json(
                &json!({"ok": true, "reinit": name, "done": false, "log_index": log_index}),
            );
        }
        outln!("Reinit of {name} requested; watch it with `meridianctl list`.");
        return Ok(());
    }
    if !json {
        outln!("Reinit of {name} requested; waiting up to {wait_s} s for it to re-clone from {primary} and stream...");
    }
    let deadline = started + Duration::from_secs(wait_s);
    let mut last: String;
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        match client.status().await {
            Ok(s) if s.status.from_leader => {
                let v = view::cluster_view(&s.status, &s.intent);
                let row = v.members.iter().find(|r| r.name == name);
                let now_primary = s.intent.primary.clone().unwrap_or_default();
                if s.intent.member(name).is_none() {
                    return Err(failed(format!(
                        "{name} was removed from the cluster during its reinit"
                    )));
                }
                if now_primary == name {
                    return Err(failed(format!(
                        "{name} became the primary during its reinit"
                    )));
                }
                match row {
                    Some(r)
                        if !s.intent.reinit.contains(name)
                            && r.state == "streaming"
                            && r.upstream.as_deref() == Some(now_primary.as_str()) =>
                    {
                        let elapsed_ms = started.elapsed().as_millis() as u64;
                        if json {
                            return print_json(&json!({
                                "ok": true, "reinit": name, "done": true, "upstream": now_primary,
                                "elapsed_ms": elapsed_ms, "log_index": log_index,
                            }));
                        }
                        outln!(
                            "Reinit of {name} done: re-cloned and streaming from {now_primary} ({:.1} s).",
                            elapsed_ms as f64 / 1000.0
                        );
                        return Ok(());
                    }
                    Some(r) => {
                        last = format!(
                            "state {}{}{}",
                            r.state,
                            r.activity
                                .as_ref()
                                .map_or(String::new(), |a| format!(", {a}")),
                            if s.intent.reinit.contains(name) {
                                ", re-clone pending"
                            } else {
                                ""
                            }
                        );
                    }
                    None => last = format!("the leader reports nothing about {name}"),
                }
            }
            Ok(_) => last = "no leader answered".into(),
            Err(e) => last = format!("status error: {e:#}"),
        }
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "the reinit of {name} did not finish within {wait_s} s ({last}); \
                 it goes on in the background, follow it with `meridianctl list`"
            )));
        }
    }
}

pub async fn version(conn: &ConnArgs, json: bool) -> Result<(), Failure> {
    let ctl = env!("CARGO_PKG_VERSION");
    // Without any endpoint configured, the ctl's own version is still an answer.
    let has_endpoints = !conn.endpoint.is_empty()
        || std::env::var("MERIDIAN_ENDPOINTS").is_ok_and(|e| !e.trim().is_empty())
        || conn.config.is_some()
        || crate::settings::default_config_path().is_some_and(|p| p.is_file());
    if !has_endpoints {
        if json {
            return print_json(&json!({"meridianctl": ctl, "members": {}}));
        }
        outln!("meridianctl {ctl}");
        return Ok(());
    }
    let client = crate::connect(conn)?;
    let snap = client.status().await?;
    let mut members = serde_json::Map::new();
    let mut lines = Vec::new();
    for m in &snap.status.members {
        let v = m
            .observation
            .as_ref()
            .map(|o| o.version.clone())
            .filter(|v| !v.is_empty());
        members.insert(m.name.clone(), json!(v));
        lines.push(format!(
            "{}: {}",
            m.name,
            v.unwrap_or_else(|| "unknown (no report reached the leader)".into())
        ));
    }
    if json {
        return print_json(&json!({"meridianctl": ctl, "members": members}));
    }
    outln!("meridianctl {ctl}");
    for l in lines {
        outln!("{l}");
    }
    Ok(())
}

/// A switchover to `to` with nothing printed (a step of `restart`); Ok once `to` takes
/// writes.
pub(crate) async fn switchover_quiet(
    client: &Client,
    to: &str,
    wait_s: u64,
) -> Result<(), Failure> {
    switchover_with(client, Some(to), true, wait_s, false, true).await
}

async fn switchover(
    client: &Client,
    candidate: Option<&str>,
    force: bool,
    wait_s: u64,
    json: bool,
) -> Result<(), Failure> {
    switchover_with(client, candidate, force, wait_s, json, false).await
}

async fn switchover_with(
    client: &Client,
    candidate: Option<&str>,
    force: bool,
    wait_s: u64,
    json: bool,
    quiet: bool,
) -> Result<(), Failure> {
    let snap = client.status().await?;
    let to = precheck::switchover_candidate(&snap.status, &snap.intent, candidate)
        .map_err(|e| failed(format!("switchover refused: {e}")))?;
    let from = snap.intent.primary.clone().unwrap_or_default();
    let generation = snap.intent.generation;
    let cmd = IntentCommand::BeginSwitchover(PendingSwitchover {
        from: from.clone(),
        to: to.clone(),
        started_at_unix_ms: now_unix_ms(),
        phase: SwitchoverPhase::Requested,
    });
    validate_locally(&snap, &cmd)?;
    let region = |n: &str| {
        snap.intent
            .member(n)
            .map(|m| m.region.clone())
            .unwrap_or_default()
    };
    let lag = view::cluster_view(&snap.status, &snap.intent)
        .members
        .into_iter()
        .find(|m| m.name == to)
        .and_then(|m| m.lag_bytes);
    if !json && !quiet {
        outln!(
            "Switchover plan: primary {from} ({}) -> {to} ({}), generation {generation} -> {}.",
            region(&from),
            region(&to),
            generation.next()
        );
        outln!(
            "  {to} is {} behind. Writes on {from} stop until {to} has received its last WAL; \
             {from} then rejoins as a standby of {to}.",
            lag.map_or("an unknown number of bytes".into(), |l| format!(
                "{l} bytes"
            ))
        );
    }
    confirm(
        &format!("Switch over from {from} to {to}?"),
        force,
        "switch over",
    )?;
    let started = Instant::now();
    client.command(&cmd, false).await?;
    if !json && !quiet {
        outln!("Switchover requested; waiting up to {wait_s} s for {to} to take over...");
    }
    let deadline = started + Duration::from_secs(wait_s);
    let mut last_phase = String::from("requested");
    let mut last_error = None;
    // When this command first saw the old primary told to stop writes (the phase after
    // `requested`), and when it first saw the new primary's Postgres out of recovery:
    // the write pause as the admin API shows it.
    let mut stop_seen: Option<Instant> = None;
    loop {
        tokio::time::sleep(SWITCHOVER_POLL).await;
        match client.status().await {
            Ok(s) if s.status.from_leader => {
                let i = &s.intent;
                if i.generation > generation && i.primary.as_deref() == Some(to.as_str()) {
                    if !new_primary_writable(&s.status, &to) && Instant::now() < deadline {
                        continue;
                    }
                    let writable_seen = Instant::now();
                    let elapsed_ms = started.elapsed().as_millis() as u64;
                    // What was observed here, from the stop (or, if the stop phase went by
                    // between two polls, from the request) to the new primary taking writes.
                    let observed_ms = writable_seen
                        .duration_since(stop_seen.unwrap_or(started))
                        .as_millis() as u64;
                    // The leader records the exact pause just after it sees the new primary
                    // take writes: a short, bounded wait for it.
                    let recorded_ms =
                        recorded_write_pause(client, i.clone(), s.intent_raw.clone(), &to).await;
                    let pause_ms = recorded_ms.unwrap_or(observed_ms);
                    if quiet {
                        return Ok(());
                    }
                    if json {
                        return print_json(&json!({
                            "ok": true, "from": from, "to": to, "generation": i.generation.0,
                            "elapsed_ms": elapsed_ms, "write_pause_ms": pause_ms,
                            "write_pause_measured_by": if recorded_ms.is_some() { "leader" } else { "meridianctl" },
                        }));
                    }
                    let how = if recorded_ms.is_some() {
                        format!("writes paused {pause_ms} ms as the leader measured it")
                    } else {
                        format!("writes paused about {pause_ms} ms as seen through the admin API")
                    };
                    outln!(
                        "Switchover complete: {to} is the primary at generation {} ({:.1} s end to end, {how}).",
                        i.generation,
                        elapsed_ms as f64 / 1000.0,
                    );
                    return Ok(());
                }
                if i.generation > generation {
                    return Err(failed(format!(
                        "the switchover did not happen: {} became the primary at generation {} instead",
                        i.primary.as_deref().unwrap_or("nobody"),
                        i.generation
                    )));
                }
                match &i.pending_switchover {
                    Some(sw) if sw.to == to => {
                        last_phase = serde_json::to_value(&sw.phase)
                            .map(|v| v.as_str().map_or(v.to_string(), str::to_string))
                            .unwrap_or_default();
                        if last_phase != "requested" && stop_seen.is_none() {
                            stop_seen = Some(Instant::now());
                        }
                    }
                    _ => {
                        let why = i
                            .history
                            .iter()
                            .rev()
                            .find(|h| {
                                h.kind == HistoryKind::Switchover && h.generation == generation
                            })
                            .map(|h| h.reason.clone())
                            .unwrap_or_else(|| "it was cancelled".into());
                        return Err(failed(format!("switchover abandoned: {why}")));
                    }
                }
            }
            Ok(_) => last_error = Some("no leader answered".to_string()),
            Err(e) => last_error = Some(format!("{e:#}")),
        }
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "the switchover to {to} did not finish within {wait_s} s (phase {last_phase}{}); \
                 it is still pending, follow it with `meridianctl list`",
                last_error.map_or(String::new(), |e| format!(", last status error: {e}"))
            )));
        }
    }
}

/// `switchover --cancel`: records the cancel; if the old primary had already been told to
/// stop writes, waits (bounded by `wait_s`) until it takes writes again and the switchover
/// is gone.
async fn cancel_switchover(client: &Client, wait_s: u64, json: bool) -> Result<(), Failure> {
    let snap = client.status().await?;
    let Some(sw) = snap.intent.pending_switchover.clone() else {
        return Err(failed("no switchover is pending: nothing to cancel"));
    };
    let generation = snap.intent.generation;
    let cmd = IntentCommand::ClearSwitchover {
        at_unix_ms: now_unix_ms(),
    };
    validate_locally(&snap, &cmd)?;
    let started = Instant::now();
    let log_index = client.command(&cmd, false).await.map_err(|e| {
        failed(format!(
            "{e:#} (the switchover from {} to {} finished or was given up meanwhile: see \
             `meridianctl history`)",
            sw.from, sw.to
        ))
    })?;
    let phase = serde_json::to_value(&sw.phase)
        .ok()
        .and_then(|v| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.as_object()?.keys().next().cloned())
        })
        .unwrap_or_default();
    if sw.phase == SwitchoverPhase::Requested {
        if json {
            return print_json(&json!({
                "ok": true, "from": sw.from, "to": sw.to, "phase": phase,
                "writes_stopped": false, "log_index": log_index,
            }));
        }
        outln!(
            "Switchover from {} to {} cancelled before writes stopped; {} stays the primary.",
            sw.from,
            sw.to,
            sw.from
        );
        return Ok(());
    }
    if !json {
        outln!(
            "Switchover from {} to {} cancelled; writes had been asked to stop on {}: waiting up \
             to {wait_s} s for it to take writes again...",
            sw.from,
            sw.to,
            sw.from
        );
    }
    let deadline = started + Duration::from_secs(wait_s);
    let mut last: String;
    loop {
        tokio::time::sleep(SWITCHOVER_POLL).await;
        match client.status().await {
            Ok(s) if s.status.from_leader => {
                let i = &s.intent;
                if i.generation != generation || i.primary.as_deref() != Some(sw.from.as_str()) {
                    return Err(failed(format!(
                        "the cluster moved on: {} is the primary at generation {}",
                        i.primary.as_deref().unwrap_or("nobody"),
                        i.generation
                    )));
                }
                let writable = new_primary_writable(&s.status, &sw.from);
                if i.pending_switchover.is_none() && writable {
                    let resumed_ms = started.elapsed().as_millis() as u64;
                    if json {
                        return print_json(&json!({
                            "ok": true, "from": sw.from, "to": sw.to, "phase": phase,
                            "writes_stopped": true, "resumed_ms": resumed_ms,
                            "log_index": log_index,
                        }));
                    }
                    outln!(
                        "{} takes writes again at generation {generation} ({resumed_ms} ms after the cancel).",
                        sw.from
                    );
                    return Ok(());
                }
                last = format!(
                    "switchover {}, {} {}",
                    if i.pending_switchover.is_some() {
                        "still aborting"
                    } else {
                        "dropped"
                    },
                    sw.from,
                    if writable {
                        "writable"
                    } else {
                        "not writable yet"
                    }
                );
            }
            Ok(_) => last = "no leader answered".into(),
            Err(e) => last = format!("status error: {e:#}"),
        }
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "the cancel was committed but {} has not taken writes again within {wait_s} s \
                 ({last}); follow it with `meridianctl list`",
                sw.from
            )));
        }
    }
}

/// Bound on waiting for the leader to record a switchover's write pause.
const WRITE_PAUSE_GRACE: Duration = Duration::from_secs(1);

/// The write pause the leader recorded in the history entry of the switchover that made
/// `to` the primary (in `intent`, else in a fresh status), polled for at most
/// [`WRITE_PAUSE_GRACE`]. `None` when it records none (e.g. its leadership changed during
/// the switchover) or an older cluster never does.
async fn recorded_write_pause(
    client: &Client,
    mut intent: meridian_node::raft::Intent,
    mut raw: serde_json::Value,
    to: &str,
) -> Option<u64> {
    let generation = intent.generation;
    let deadline = Instant::now() + WRITE_PAUSE_GRACE;
    loop {
        let pause = history_rows(&intent, &raw, false)
            .iter()
            .rev()
            .find(|h| {
                h.kind == "switchover"
                    && h.new_primary.as_deref() == Some(to)
                    && h.generation == generation.0
            })
            .and_then(|h| h.write_pause_ms);
        if pause.is_some() || Instant::now() >= deadline {
            return pause;
        }
        tokio::time::sleep(SWITCHOVER_POLL).await;
        if let Ok(s) = client.status().await {
            if s.intent.generation != generation {
                return None;
            }
            (intent, raw) = (s.intent, s.intent_raw);
        }
    }
}

async fn failover(
    client: &Client,
    candidate: &str,
    allow_data_loss: bool,
    force: bool,
    wait_s: u64,
    json: bool,
) -> Result<(), Failure> {
    let snap = client.status().await?;
    let check = precheck::check_failover(&snap.status, &snap.intent, candidate)
        .map_err(|e| failed(format!("failover refused: {e}")))?;
    if !check.unsafe_reasons.is_empty() && !allow_data_loss {
        return Err(failed(format!(
            "failover to {candidate} refused as unsafe: {}; pass --allow-data-loss to promote it anyway",
            check.unsafe_reasons.join("; ")
        )));
    }
    let generation = snap.intent.generation.next();
    let mut reason = format!("manual failover to {candidate} by meridianctl");
    if !check.unsafe_reasons.is_empty() {
        reason.push_str(&format!(
            " with --allow-data-loss ({})",
            check.unsafe_reasons.join("; ")
        ));
        reason.truncate(reason.floor_char_boundary_compat(MAX_REASON_LEN));
    }
    let cmd = IntentCommand::Promote(Promote {
        member: candidate.to_string(),
        generation,
        kind: PromotionKind::Manual,
        force: allow_data_loss,
        reason,
        at_unix_ms: now_unix_ms(),
        old_primary_lsn: check.best_known_lsn.map(Lsn),
        new_primary_lsn: check.candidate_lsn.map(Lsn),
        possible_loss_bytes: check.possible_loss_bytes,
        old_lease_released: false,
        lease_break_round: None,
    });
    validate_locally(&snap, &cmd)?;
    if !json {
        outln!(
            "Failover plan: promote {candidate} at generation {generation} (primary now: {}).",
            snap.intent.primary.as_deref().unwrap_or("none")
        );
        for r in &check.unsafe_reasons {
            outln!("  UNSAFE (allowed by --allow-data-loss): {r}");
        }
        if let Some(loss) = check.possible_loss_bytes {
            outln!("  Possible loss: {loss} bytes.");
        }
    }
    confirm(&format!("Promote {candidate}?"), force, "fail over")?;
    let started = Instant::now();
    client.command(&cmd, false).await?;
    if !json {
        outln!("Promotion of {candidate} committed at generation {generation}; waiting up to {wait_s} s for it to accept writes...");
    }
    let deadline = started + Duration::from_secs(wait_s);
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        if let Ok(s) = client.status().await {
            if s.intent.generation > generation || s.intent.primary.as_deref() != Some(candidate) {
                return Err(failed(format!(
                    "the cluster moved on: {} is the primary at generation {}",
                    s.intent.primary.as_deref().unwrap_or("nobody"),
                    s.intent.generation
                )));
            }
            let writable = s.status.members.iter().any(|m| {
                m.name == candidate
                    && m.observation
                        .as_ref()
                        .and_then(|o| o.postgres.as_ref())
                        .is_some_and(|pg| pg.up && !pg.in_recovery && !pg.fenced)
            });
            if writable {
                let elapsed_ms = started.elapsed().as_millis() as u64;
                if json {
                    return print_json(&json!({
                        "ok": true, "primary": candidate, "generation": generation.0,
                        "possible_loss_bytes": check.possible_loss_bytes, "elapsed_ms": elapsed_ms,
                    }));
                }
                outln!(
                    "Failover complete: {candidate} accepts writes at generation {generation} ({:.1} s).",
                    elapsed_ms as f64 / 1000.0
                );
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "the promotion of {candidate} was committed (generation {generation}) but it has not \
                 reported accepting writes within {wait_s} s; follow it with `meridianctl list`"
            )));
        }
    }
}

/// `str::floor_char_boundary` is unstable; this is the same for our purpose.
trait FloorBoundary {
    fn floor_char_boundary_compat(&self, at: usize) -> usize;
}

impl FloorBoundary for String {
    fn floor_char_boundary_compat(&self, at: usize) -> usize {
        if at >= self.len() {
            return self.len();
        }
        let mut i = at;
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// Whether the leader's latest observation of `member` shows its Postgres up and out of
/// recovery.
fn new_primary_writable(status: &meridian_proto::StatusResponse, member: &str) -> bool {
    status
        .members
        .iter()
        .find(|m| m.name == member)
        .and_then(|m| m.observation.as_ref())
        .and_then(|o| o.postgres.as_ref())
        .is_some_and(|p| p.up && !p.in_recovery && !p.fenced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_parsing_is_strict_and_names_the_problem() {
        assert_eq!(parse_set("sync_quorum=2").unwrap(), ("sync_quorum", "2"));
        assert_eq!(
            parse_set(" regions.east.mode = sync ").unwrap(),
            ("regions.east.mode", "sync")
        );
        assert_eq!(parse_set("a=b=c").unwrap(), ("a", "b=c"));
        for bad in ["sync_quorum", "=2", ""] {
            let e = parse_set(bad).unwrap_err();
            assert!(e.starts_with("malformed --set") && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn sets_apply_all_or_nothing_and_diff_lists_changes() {
        let p = Policy::default();
        let next = apply_sets(
            &p,
            &["sync_quorum=2".into(), "regions.east.mode=sync".into()],
        )
        .unwrap();
        assert_eq!(next.sync_quorum, 2);
        let diff = policy_diff(&p, &next);
        assert!(
            diff.contains(&"sync_quorum: 1 -> 2".to_string()),
            "{diff:?}"
        );
        assert!(
            diff.iter()
                .any(|d| d.starts_with("regions.east.mode: (unset) -> \"sync\"")),
            "{diff:?}"
        );
        let e = apply_sets(&p, &["sync_quorum=2".into(), "colour=red".into()]).unwrap_err();
        assert!(e.contains("colour") && e.contains("unknown key"), "{e}");
        let e = apply_sets(&p, &["sync_quorum=0".into()]).unwrap_err();
        assert!(e.contains("at least 1"), "{e}");
        assert!(policy_diff(&p, &p).is_empty());
    }
}
