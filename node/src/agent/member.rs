//! The member side of the runtime: every data member's agent reconciles its local
//! Postgres toward the Raft intent, once per `timing.observe_interval` (Neon-style: the
//! intent says what should be, the member makes it so; the leader never touches another
//! member's Postgres).
//!
//! Owns the Postgres lifecycle: bootstrap (`init`, start, `Promote{Bootstrap}`), clone of a
//! joining member through its slot, start on boot, restart of a crashed standby, fencing of
//! a crashed primary (so the leader promotes at once), promotion of the member the newest
//! generation names, re-pointing standbys (at the primary, or at their `replicatefrom`
//! upstream while it streams: `meridian_core::cascade`), slots (on the primary, and on a
//! standby for the members that cascade from it) and `synchronous_standby_names` on the
//! primary, the switchover's stop-writes / resume steps, rejoin of an old primary (fence,
//! `pg_rewind`, re-clone when rewind fails) and `meridianctl reinit`.
//!
//! Invariants: a Postgres this agent did not see running as the primary is only started as
//! a primary after a lease renewal for the current generation was accepted (a restarted
//! agent's intent may be stale); a Postgres that accepts writes while the intent names
//! another primary is fenced before anything else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_proto::admin_client::AdminClient;

use super::join::unix_ms;
use super::Shared;
use crate::decide::SyncSet;
use crate::pg::{PgInstance, StopMode};
use crate::raft::intent::{Command, Intent, MemberKind, Promote, PromotionKind, Response};
use crate::types::Generation;
use meridian_core::cascade::{self, Upstream};

/// A standby whose WAL receiver does not stream for this long is rewound (it may have
/// diverged from the primary's timeline).
const REJOIN_AFTER: Duration = Duration::from_secs(8);
/// Bound on a command this member proposes (bootstrap promotion, reinit done).
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on starting or stopping the local Postgres.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Prefix of the replication slots Meridian owns; slots without it (pg_receivewal, backup
/// tools, an adopted cluster's own) are never dropped.
pub const SLOT_PREFIX: &str = "meridian_";

/// The replication slot a member streams through (slot names allow `[a-z0-9_]` only).
pub fn slot_name(member: &str) -> String {
    let tail: String = member
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{SLOT_PREFIX}{tail}")
}

/// The inactive slots a primary drops: Meridian's own (by prefix) that no member wants.
pub fn slots_to_drop<'a>(
    inactive: impl IntoIterator<Item = &'a str>,
    wanted: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    inactive
        .into_iter()
        .filter(|s| s.starts_with(SLOT_PREFIX) && !wanted.contains(*s))
        .map(str::to_string)
        .collect()
}

/// `synchronous_standby_names` for a sync set: `ANY k ("a", "b")`. With no sync standby,
/// the lease gate's name when `lease_gate` (commits then wait for the gate, which confirms
/// only under this member's lease), else empty (async).
pub fn render_sync_standby_names(set: &SyncSet, lease_gate: bool) -> String {
    if set.names.is_empty() || set.k == 0 {
        return if lease_gate {
            crate::pg::gate::GATE_APPLICATION_NAME.to_string()
        } else {
            String::new()
        };
    }
    let names: Vec<String> = set.names.iter().map(|n| format!("\"{n}\"")).collect();
    format!("ANY {} ({})", set.k, names.join(", "))
}

/// Parses what Postgres shows for `synchronous_standby_names`: `ANY k (...)`,
/// `FIRST k (...)`, `k (...)` or a bare list (k = 1). `*` stays a name.
pub fn parse_sync_standby_names(s: &str) -> SyncSet {
    let s = s.trim();
    if s.is_empty() {
        return SyncSet::default();
    }
    let (k, list) = match s.find('(') {
        Some(open) => {
            let head = s[..open].trim();
            let num = head
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .trim();
            let k = num.parse::<u32>().unwrap_or(1);
            let inner = s[open + 1..].trim_end().trim_end_matches(')');
            (k, inner)
        }
        None => (1, s),
    };
    // The lease gate is no member: a set of the gate alone is no sync set.
    let names: Vec<String> = list
        .split(',')
        .map(|n| n.trim().trim_matches('"').to_string())
        .filter(|n| !n.is_empty() && n != crate::pg::gate::GATE_APPLICATION_NAME)
        .collect();
    if names.is_empty() {
        return SyncSet::default();
    }
    SyncSet::new(names, k)
}

/// `host:port` of `member`'s Postgres in this agent's address book.
pub fn pg_addr(shared: &Shared, member: &str) -> anyhow::Result<(String, u16)> {
    let addr = shared
        .config
        .peers
        .get(member)
        .and_then(|p| p.postgres.clone())
        .with_context(|| format!("no peers.{member}.postgres in this agent's address book"))?;
    super::dial::split_host_port(&addr)
        .with_context(|| format!("peers.{member}.postgres {addr:?} is not host:port"))
}

/// Proposes `cmd` to the leader: committed here when this member leads, else sent as
/// `Admin.Command` to the leader it knows. Bounded.
pub async fn propose(shared: &Shared, cmd: Command) -> anyhow::Result<Response> {
    if shared.believes_leader() {
        let w = tokio::time::timeout(PROPOSE_TIMEOUT, shared.raft.client_write(cmd))
            .await
            .context("the write was not committed in time")?
            .context("raft write")?;
        return Ok(w.data);
    }
    let (_, leader) = shared.leader().context("no leader is known")?;
    let channel = shared.dialer.channel(&leader)?;
    let token = super::join::admin_token(&shared.config);
    let committed = crate::admin_client::submit(
        &mut AdminClient::new(channel),
        &cmd,
        &token,
        PROPOSE_TIMEOUT,
    )
    .await
    .with_context(|| format!("proposing through the leader {leader}"))?;
    Ok(committed.response)
}

/// The reconcile loop of a data member.
pub async fn run(shared: Arc<Shared>, pg: PgInstance) {
    let mut m = Member {
        shared,
        pg,
        seen_primary_up: false,
        upstream: None,
        disconnected: false,
        not_streaming_since: None,
        unresponsive_since: None,
        promoting_since: None,
        slots: None,
        last_error: None,
        system_identifier: None,
        conf_checked: false,
        roles_ensured: false,
        stanza: Default::default(),
        pending_checked_at: None,
        started: Instant::now(),
        resume_wait: None,
    };
    let mut restarts = m.shared.take_restart_rx();
    let mut ticker = m.shared.observe_ticker();
    let mut applied = m.shared.applied.clone();
    let mut errors = super::errlog::ErrorLog::default();
    loop {
        // A committed change (promotion, switchover phase) is acted on at once.
        tokio::select! {
            _ = ticker.tick() => {}
            r = applied.changed() => if r.is_err() { ticker.tick().await; },
            Some(job) = async {
                match restarts.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if Instant::now() > job.start_by || job.reply.is_closed() {
                    tracing::warn!("a restart request expired before the member loop could run it; not restarting");
                    continue;
                }
                let r = m.restart_now().await.map_err(|e| format!("{e:#}"));
                m.shared.wake_reporter.notify_one();
                let _ = job.reply.send(r);
                continue;
            }
        }
        let before = (m.pg.is_running(), m.pg.is_fenced(), m.shared.activity());
        let result = m.tick().await;
        if before != (m.pg.is_running(), m.pg.is_fenced(), m.shared.activity()) {
            // Tell the leader what changed without waiting for the next report.
            m.shared.wake_reporter.notify_one();
        }
        m.last_error = result.err().map(|e| format!("{e:#}"));
        errors.log(
            "reconciling the local Postgres",
            m.last_error.as_deref().map_or(Ok(()), Err),
        );
    }
}

/// Spacing of the new primary's first lease renewals.
const PROMOTE_LEASE_RETRY: Duration = Duration::from_millis(50);

struct Member {
    shared: Arc<Shared>,
    pg: PgInstance,
    /// This agent saw its Postgres run as the primary (a later crash is then fenced).
    seen_primary_up: bool,
    /// The member this standby's `primary_conninfo` was last pointed at by this agent,
    /// and whether through this member's slot there.
    upstream: Option<Upstream>,
    /// This standby disconnected its WAL receiver (it broke the primary's lease).
    disconnected: bool,
    not_streaming_since: Option<Instant>,
    /// Since when the running local Postgres has not answered probes.
    unresponsive_since: Option<Instant>,
    /// The generation this member was named primary in while still in recovery, and
    /// since when: a promotion that does not complete within `promote_timeout` is given
    /// up (fenced), so the leader can try another candidate (#12, defect 2).
    promoting_since: Option<(Generation, Instant)>,
    /// The slots this primary made sure of, for which generation.
    slots: Option<(Generation, std::collections::BTreeSet<String>)>,
    last_error: Option<String>,
    /// The local data dir's system identifier, read once per data dir.
    system_identifier: Option<u64>,
    /// Meridian's settings were written into the existing data dir since this agent
    /// started (adoption, or a refresh of a data dir it manages).
    conf_checked: bool,
    /// Meridian's roles were made sure of on this primary since this agent started.
    roles_ensured: bool,
    /// `[backup]`: the pgBackRest stanza exists (made sure of as the primary).
    stanza: crate::backup::replica::StanzaGuard,
    /// When `pg_settings.pending_restart` was last read (None: read it next round).
    pending_checked_at: Option<Instant>,
    /// When this member loop started (a fresh clone waits a little for its peer probes
    /// to find a `clonefrom` standby).
    started: Instant,
    /// Since when this fenced primary waits for its lease to resume in place, and in which
    /// generation.
    resume_wait: Option<(Generation, Instant)>,
}

/// How long a fresh clone waits for this agent's probes of the `clonefrom` standbys
/// before it copies from the primary instead.
const CLONE_SOURCE_WAIT: Duration = Duration::from_secs(5);

/// How often the member loop re-reads which parameters wait for a restart (and at once
/// after it applied new ones or restarted).
const PENDING_RESTART_EVERY: Duration = Duration::from_secs(5);

/// A restart of the local Postgres asked for through the admin API; the member loop
/// answers on `reply` (Ok: what it did).
pub struct RestartJob {
    pub reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    /// Not started after this: whoever asked has given up waiting (a restart nobody
    /// waits for any more must not happen later by surprise).
    pub start_by: Instant,
}

/// Why a data directory is refused: it holds another cluster.
pub fn foreign_data_dir_message(data_dir: &std::path::Path, local: u64, recorded: u64) -> String {
    format!(
        "data directory {} holds another Postgres cluster: its system identifier is {local}, \
         the cluster's (recorded in the intent) is {recorded}; refusing to use, move or \
         delete it (point postgres.data_dir elsewhere or remove it by hand)",
        data_dir.display()
    )
}

impl Member {
    /// Whether commits of this primary wait on the lease gate when no sync standby does.
    fn lease_gate(&self) -> bool {
        self.shared
            .config
            .postgres
            .as_ref()
            .is_some_and(|p| p.lease_gate)
    }

    fn name(&self) -> &str {
        self.shared.name()
    }

    fn has_data(&self) -> bool {
        self.pg.data_dir().join("PG_VERSION").exists()
    }

    async fn tick(&mut self) -> anyhow::Result<()> {
        // The shared snapshot, not a deep copy: the history alone holds up to 1,000 entries.
        let applied_now = self.shared.applied();
        let intent = &applied_now.intent;
        let me = self.name().to_string();
        if intent.member(&me).is_none() {
            return Ok(());
        }
        // The cluster's parameters with this member's overrides: every later write of
        // meridian.conf (init, clone, rewind, adoption) carries them.
        let overrides = self
            .shared
            .config
            .postgres
            .as_ref()
            .map(|p| p.parameters.clone())
            .unwrap_or_default();
        let wanted = crate::pgparams::effective(&intent.policy.postgresql.parameters, &overrides);
        let changed = self.pg.set_parameters(wanted);
        let conf_was_checked = self.conf_checked;
        self.check_data_dir(intent).await?;
        if changed && conf_was_checked && self.has_data() {
            self.apply_parameters().await?;
        }
        self.check_pending_restart().await;
        if intent.generation == Generation(0) && intent.primary.is_none() {
            return self.bootstrap(intent).await;
        }
        let i_am_primary = intent.primary.as_deref() == Some(me.as_str());
        if intent.reinit.contains(&me) && !i_am_primary {
            return self.reinit(intent).await;
        }
        if !self.has_data() {
            return self.clone_fresh(intent).await;
        }
        if !self.pg.is_running() {
            // Unresponsiveness counts only while a server runs: a crashed primary resumed
            // in place starts (and runs crash recovery) with a fresh clock. Counting from
            // the crash fenced it again at its first slow probe (seen in CI under load).
            self.unresponsive_since = None;
            return self.not_running(intent, i_am_primary).await;
        }
        let status = self.pg.probe().await;
        if !status.up {
            // Starting up, or frozen. A primary whose server stays unresponsive is fenced
            // (a frozen postmaster is killed with its group), so the leader can promote at
            // once instead of waiting on a server that may wake up and take writes.
            let t = &self.shared.config.timing;
            let since = *self.unresponsive_since.get_or_insert_with(Instant::now);
            if i_am_primary && since.elapsed() >= t.fence_after {
                self.unresponsive_since = None;
                self.seen_primary_up = false;
                self.shared
                    .set_activity("fenced: the primary's Postgres stopped answering");
                tracing::error!(
                    "the local primary's Postgres has not answered for {} ms: fencing it",
                    since.elapsed().as_millis()
                );
                return self
                    .pg
                    .fence(t.pg_probe_timeout * 2)
                    .await
                    .context("fencing an unresponsive primary");
            }
            return Ok(());
        }
        self.unresponsive_since = None;
        if i_am_primary {
            if status.in_recovery {
                let generation = intent.generation;
                let since = match self.promoting_since {
                    Some((g, at)) if g == generation => at,
                    _ => {
                        let now = Instant::now();
                        self.promoting_since = Some((generation, now));
                        now
                    }
                };
                // The leader waits `promote_timeout` from the promotion's commit, then
                // for this fence; counted here from when this agent saw the promotion,
                // so the leader never replaces a member still within its bound.
                let bound = self.shared.config.timing.promote_timeout;
                if since.elapsed() >= bound {
                    self.promoting_since = None;
                    self.shared
                        .set_activity("fenced: the promotion did not complete in time");
                    tracing::error!(
                        %generation,
                        "the promotion did not complete within {} ms: fencing the local \
                         Postgres so the leader can choose another candidate",
                        bound.as_millis()
                    );
                    return self
                        .pg
                        .fence(self.shared.config.timing.pg_probe_timeout * 2)
                        .await
                        .context("fencing after a promotion that did not complete");
                }
                self.promote(intent).await
            } else {
                self.seen_primary_up = true;
                self.as_primary(intent, status.synchronous_standby_names.as_deref())
                    .await
            }
        } else if !status.in_recovery {
            // A second writer: fence before anything else (DESIGN invariant 4).
            self.shared
                .set_activity("fenced: not the primary of the newest generation");
            tracing::error!(
                generation = %intent.generation, primary = ?intent.primary,
                "the local Postgres accepts writes but is not the primary: fencing it"
            );
            self.seen_primary_up = false;
            self.pg
                .fence(self.shared.config.timing.pg_probe_timeout * 2)
                .await
                .context("fencing an old primary")
        } else {
            // Streaming an older timeline than the primary writes on means it diverged
            // (it received WAL past the new timeline's fork point): Postgres retries that
            // forever, so it counts as not streaming and is rewound after a while.
            let primary_tli = intent.primary.as_deref().and_then(|p| {
                let max_age = self.shared.config.timing.observe_interval * 4;
                self.shared.peer_probes.fresh(max_age).get(p)?.timeline
            });
            let streamed_tli = status.wal_receiver.as_ref().and_then(|w| w.received_tli);
            let behind_timeline = matches!(
                (streamed_tli, primary_tli),
                (Some(s), Some(p)) if s < p
            );
            let streaming = status.is_streaming() && !behind_timeline;
            self.as_standby(intent, streaming).await
        }
    }

    /// Before anything touches an existing data dir: refuse one of another cluster (its
    /// system identifier differs from the intent's; nothing is moved or deleted), refuse a
    /// Postgres older than 13, and write Meridian's settings into it once per agent start.
    /// A data dir Meridian never managed (no include line) is adopted: its data and
    /// settings stay, Meridian's go into `meridian.conf`, and a running server is restarted
    /// under the agent (pg_ctl on its data dir) so the listen addresses, socket and
    /// `pg_hba.conf` apply and the agent can stop or fence it.
    async fn check_data_dir(&mut self, intent: &Intent) -> anyhow::Result<()> {
        if !self.has_data() {
            self.system_identifier = None;
            self.conf_checked = false;
            return Ok(());
        }
        let local = match self.system_identifier {
            Some(id) => id,
            None => {
                let id = self
                    .pg
                    .system_identifier()
                    .await
                    .context("reading the data directory's system identifier")?;
                self.system_identifier = Some(id);
                id
            }
        };
        if intent.system_identifier.is_none() && !self.shared.config.raft.bootstrap {
            // A joining member keeps its hands off an existing data dir until the primary
            // recorded which cluster it is.
            self.shared
                .set_activity("waiting for the primary to record the cluster's system identifier");
            return Ok(());
        }
        if let Some(recorded) = intent.system_identifier {
            if recorded != local {
                self.shared
                    .set_activity("refused: the data directory holds another cluster");
                anyhow::bail!(foreign_data_dir_message(
                    self.pg.data_dir(),
                    local,
                    recorded
                ));
            }
        }
        if self.conf_checked {
            return Ok(());
        }
        match self.pg.data_major_version() {
            Some(v) if v >= 13 => {}
            Some(v) => anyhow::bail!(
                "data directory {} holds a PostgreSQL {v} cluster; Meridian needs 13 or newer",
                self.pg.data_dir().display()
            ),
            None => anyhow::bail!(
                "data directory {} has no readable PG_VERSION",
                self.pg.data_dir().display()
            ),
        }
        let adopting = !self.pg.has_meridian_include();
        if adopting {
            tracing::info!(
                data_dir = %self.pg.data_dir().display(),
                system_identifier = local,
                "adopting an existing Postgres data directory: keeping its data and settings"
            );
            self.shared
                .set_activity("adopting an existing data directory");
        }
        self.pg
            .write_conf()
            .context("writing Meridian's settings")?;
        // An adopted standby streams from wherever its DBA pointed it, as whoever they
        // chose (it may lack Meridian's roles until it streams): point it at the intent's
        // primary as the replication role, while it is stopped.
        let repoint = match intent.primary.as_deref() {
            Some(p) if adopting && p != self.name() && self.pg.has_standby_signal() => {
                Some(p.to_string())
            }
            _ => None,
        };
        if self.pg.is_running() {
            let socket = self
                .pg
                .access()
                .socket_dir
                .as_ref()
                .map(|d| d.join(format!(".s.PGSQL.{}", self.pg.port())));
            if adopting || socket.is_some_and(|s| !s.exists()) {
                // Running with settings that are not Meridian's (listen addresses, socket):
                // restart it under the agent's control.
                tracing::info!("restarting the running Postgres under Meridian's settings");
                self.pg
                    .stop(StopMode::Fast, START_TIMEOUT)
                    .await
                    .context("stopping the adopted Postgres")?;
                if let Some(p) = &repoint {
                    self.repoint_stopped(p).await?;
                }
                self.pg
                    .start(START_TIMEOUT)
                    .await
                    .context("starting the adopted Postgres")?;
            } else {
                self.pg.reload().await.context("reloading pg_hba.conf")?;
            }
        } else if let Some(p) = &repoint {
            self.repoint_stopped(p).await?;
        }
        if adopting {
            self.shared.set_activity("");
        }
        self.conf_checked = true;
        Ok(())
    }

    /// Rewrites meridian.conf with the new parameters and reloads a running server; what
    /// needs a restart shows up as pending (read at once).
    async fn apply_parameters(&mut self) -> anyhow::Result<()> {
        self.pg
            .write_conf()
            .context("writing the new Postgres parameters")?;
        if self.pg.is_running() {
            self.pg
                .reload()
                .await
                .context("reloading the new Postgres parameters")?;
        }
        let list: Vec<String> = self
            .pg
            .parameters()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        tracing::info!(parameters = %list.join(", "), "applied the Postgres parameters");
        // The server applies a reload asynchronously: read pending_restart after it had
        // a moment (next round, and again a few seconds later).
        self.pending_checked_at = None;
        Ok(())
    }

    /// Reads `pg_settings.pending_restart` every few seconds (and at once after a change
    /// or restart) into what the observations report. Down: nothing pending.
    async fn check_pending_restart(&mut self) {
        if !self.pg.is_running() {
            self.shared
                .pending_restart
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            self.pending_checked_at = None;
            return;
        }
        if self
            .pending_checked_at
            .is_some_and(|at| at.elapsed() < PENDING_RESTART_EVERY)
        {
            return;
        }
        if let Ok(names) = self.pg.pending_restart().await {
            let mut cur = self
                .shared
                .pending_restart
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *cur != names {
                if !names.is_empty() {
                    tracing::info!(parameters = %names.join(", "), "parameters wait for a restart");
                }
                *cur = names;
                self.shared.wake_reporter.notify_one();
            }
            self.pending_checked_at = Some(Instant::now());
        }
    }

    /// The admin API's restart: fast stop and start of the running local Postgres in the
    /// role it has, between two reconcile rounds (nothing else touches it meanwhile), then
    /// a bounded wait until it answers. A primary keeps its lease throughout.
    async fn restart_now(&mut self) -> anyhow::Result<String> {
        let started = Instant::now();
        if !self.has_data() || !self.pg.is_running() {
            anyhow::bail!("the local Postgres is not running: nothing to restart");
        }
        if self.pg.is_fenced() {
            anyhow::bail!("the local Postgres is fenced: it is not restarted on request");
        }
        let intent = self.shared.applied().intent.clone();
        let me = self.name().to_string();
        let primary = intent.primary.as_deref() == Some(me.as_str());
        if primary && intent.pending_switchover.is_some() {
            anyhow::bail!("a switchover is in progress: restart after it");
        }
        self.shared.set_activity("restarting on request");
        let role = if primary {
            super::callbacks::PgRole::Primary
        } else {
            super::callbacks::PgRole::Replica
        };
        let r = async {
            self.pg
                .stop(StopMode::Fast, START_TIMEOUT)
                .await
                .context("stopping for the restart")?;
            // Too quick for the observations to see: the callbacks hear it from here.
            super::callbacks::note(&self.shared, None);
            self.pg
                .start(START_TIMEOUT)
                .await
                .context("starting after the restart")?;
            super::callbacks::note(&self.shared, Some(role));
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if self.pg.probe().await.up {
                    break;
                }
                if Instant::now() >= deadline {
                    anyhow::bail!(
                        "restarted, but it did not answer within {} s",
                        START_TIMEOUT.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(())
        }
        .await;
        self.shared.set_activity("");
        r?;
        self.pending_checked_at = None;
        self.check_pending_restart().await;
        let elapsed = started.elapsed().as_millis();
        tracing::info!(
            elapsed_ms = elapsed as u64,
            "restarted the local Postgres on request"
        );
        Ok(format!(
            "restarted {me}'s Postgres as {} in {elapsed} ms",
            if primary { "the primary" } else { "a standby" }
        ))
    }

    /// This member's slot on the primary, when the primary keeps one for it: not when it
    /// cascades from another standby ([`cascade::slots_kept_by`]).
    fn primary_slot(&self) -> Option<String> {
        let intent = &self.shared.applied().intent;
        cascade::cascade_source(intent, self.name())
            .is_none()
            .then(|| slot_name(self.name()))
    }

    /// The WAL receiver is about to be pointed somewhere: no report may say it is off any
    /// more (cleared first, so a report in between under-claims, never over-claims).
    fn receiver_on(&self) {
        *self
            .shared
            .receiver_off
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Points a stopped standby at `primary` through this member's slot.
    async fn repoint_stopped(&mut self, primary: &str) -> anyhow::Result<()> {
        self.receiver_on();
        let (host, port) = pg_addr(&self.shared, primary)?;
        let slot = self.primary_slot();
        self.pg
            .configure_standby(&host, port, slot.as_deref())
            .await
            .with_context(|| format!("pointing the adopted standby at {primary}"))?;
        tracing::info!(%primary, "the adopted standby follows the primary");
        self.upstream = Some(Upstream {
            member: primary.to_string(),
            slot: slot.is_some(),
        });
        Ok(())
    }

    /// Records the local system identifier in the intent when none is (this member is
    /// the primary).
    async fn record_system_identifier(&mut self, intent: &Intent) -> anyhow::Result<()> {
        if intent.system_identifier.is_some() {
            return Ok(());
        }
        let id = match self.system_identifier {
            Some(id) => id,
            None => {
                let id = self.pg.system_identifier().await?;
                self.system_identifier = Some(id);
                id
            }
        };
        let cmd = Command::RecordSystemIdentifier {
            member: self.name().to_string(),
            system_identifier: id,
        };
        match propose(&self.shared, cmd).await? {
            Response::Applied => {
                tracing::info!(
                    system_identifier = id,
                    "recorded the cluster's system identifier"
                );
                Ok(())
            }
            other => anyhow::bail!("recording the system identifier: {other:?}"),
        }
    }

    async fn bootstrap(&mut self, intent: &Intent) -> anyhow::Result<()> {
        let shared = self.shared.clone();
        if !shared.config.raft.bootstrap || shared.id != 1 {
            return Ok(());
        }
        if !self.has_data() {
            shared.set_activity("initializing a new cluster");
            self.pg.init().await.context("initdb")?;
        }
        if !self.pg.is_running() {
            self.pg.start(START_TIMEOUT).await.context("starting")?;
        }
        if !shared.believes_leader() {
            return Ok(());
        }
        self.pg
            .ensure_roles()
            .await
            .context("creating Meridian's roles")?;
        self.roles_ensured = true;
        self.record_system_identifier(intent).await?;
        let cmd = Command::Promote(Promote {
            member: self.name().to_string(),
            generation: intent.generation.next(),
            kind: PromotionKind::Bootstrap,
            force: false,
            reason: "bootstrap: first primary of the cluster".into(),
            at_unix_ms: unix_ms(),
            old_primary_lsn: None,
            new_primary_lsn: None,
            possible_loss_bytes: None,
            old_lease_released: false,
            lease_break_round: None,
        });
        match propose(&shared, cmd).await? {
            Response::Applied => {
                tracing::info!("bootstrap: this member is the primary of generation 1");
                shared.set_activity("");
                Ok(())
            }
            other => anyhow::bail!("bootstrap promotion: {other:?}"),
        }
    }

    /// A data member without data: clone from the primary through its own slot (none
    /// when it cascades: then its slot lives on its source).
    async fn clone_fresh(&mut self, intent: &Intent) -> anyhow::Result<()> {
        let Some(primary) = intent.primary.clone() else {
            return Ok(());
        };
        if primary == self.name() {
            anyhow::bail!("this member is the primary but has no data directory");
        }
        let tagged = intent
            .members
            .values()
            .any(|m| m.tags.clonefrom && m.name != self.name() && m.name != primary);
        if tagged
            && self.clone_source(&primary).is_none()
            && self.started.elapsed() < CLONE_SOURCE_WAIT
        {
            self.shared
                .set_activity("waiting for a clonefrom standby to answer its probe");
            return Ok(());
        }
        self.clone_from(&primary).await
    }

    /// A standby tagged `clonefrom` to copy from instead of the primary: streaming (as
    /// this agent's own probe saw it, fresh), this member's region first, then by name.
    fn clone_source(&self, primary: &str) -> Option<String> {
        let intent = self.shared.applied().intent.clone();
        let me = self.name();
        let my_region = intent.member(me).map(|m| m.region.clone());
        let fresh = self
            .shared
            .peer_probes
            .fresh(self.shared.config.timing.observe_interval * 4);
        let mut c: Vec<(bool, String)> = intent
            .members
            .values()
            .filter(|m| m.tags.clonefrom && m.kind == MemberKind::Data)
            .filter(|m| m.name != me && m.name != primary)
            .filter(|m| {
                fresh
                    .get(&m.name)
                    .is_some_and(|p| p.streaming && !p.writable)
            })
            .filter(|m| pg_addr(&self.shared, &m.name).is_ok())
            .map(|m| (Some(&m.region) != my_region.as_ref(), m.name.clone()))
            .collect();
        c.sort();
        c.into_iter().next().map(|(_, n)| n)
    }

    async fn clone_from(&mut self, primary: &str) -> anyhow::Result<()> {
        self.receiver_on();
        self.primary_ready(primary).await?;
        let (host, port) = pg_addr(&self.shared, primary)?;
        let source = self.clone_source(primary);
        let (src_host, src_port) = match &source {
            Some(s) => pg_addr(&self.shared, s)?,
            None => (host.clone(), port),
        };
        let from = source.clone().unwrap_or_else(|| primary.to_string());
        self.shared.set_activity(&format!("cloning from {from}"));
        let slot = slot_name(self.name());
        self.system_identifier = None;
        if self
            .restore_from_repository(primary, &host, port, &slot)
            .await
        {
            return self.start_clone(primary, true).await;
        }
        // A member that cascades has no slot on the primary (its own is on its source).
        let slot = self.primary_slot();
        if let Err(e) = self
            .pg
            .clone_via(&src_host, src_port, &host, port, slot.as_deref())
            .await
        {
            // Only what this attempt wrote is there (there was no data before).
            let _ = std::fs::remove_dir_all(self.pg.data_dir());
            return Err(e).context(format!("cloning from {from}"));
        }
        self.start_clone(primary, slot.is_some()).await
    }

    /// `[backup] create_replica_methods` starting with `pgbackrest`: restore the newest
    /// backup as a standby of `primary`. False (nothing left behind) when not configured
    /// or when it fails, so `pg_basebackup` follows.
    async fn restore_from_repository(
        &mut self,
        primary: &str,
        host: &str,
        port: u16,
        slot: &str,
    ) -> bool {
        let config = &self.shared.config;
        let first = config
            .backup
            .as_ref()
            .and_then(|b| b.create_replica_methods.first().copied());
        if first != Some(crate::backup::ReplicaMethod::Pgbackrest) {
            return false;
        }
        let Some(Ok(br)) = crate::backup::Pgbackrest::from_config(config) else {
            return false;
        };
        self.shared.set_activity(&format!(
            "restoring from the repository (then following {primary})"
        ));
        match crate::backup::replica::restore_standby(&br, &self.pg, host, port, slot).await {
            Ok(()) => {
                tracing::info!(%primary, "replica restored from the pgBackRest repository");
                true
            }
            Err(e) => {
                tracing::warn!(
                    "restoring from the repository failed ({}); cloning with pg_basebackup",
                    crate::agent::errlog::one_line(&e.to_string())
                );
                let _ = std::fs::remove_dir_all(self.pg.data_dir());
                false
            }
        }
    }

    async fn start_clone(&mut self, primary: &str, slot: bool) -> anyhow::Result<()> {
        self.conf_checked = true;
        self.pg
            .start(START_TIMEOUT)
            .await
            .context("starting the clone")?;
        self.upstream = Some(Upstream {
            member: primary.to_string(),
            slot,
        });
        self.not_streaming_since = None;
        self.shared.set_activity("");
        tracing::info!(%primary, "cloned and streaming");
        Ok(())
    }

    async fn not_running(&mut self, intent: &Intent, i_am_primary: bool) -> anyhow::Result<()> {
        let fenced = self.pg.is_fenced();
        if i_am_primary {
            if fenced {
                if switchover_phase_from(intent, self.name())
                    .is_some_and(|p| matches!(p, crate::decide::SwitchoverPhase::Aborting(_)))
                {
                    return self
                        .resume_as_primary("switchover aborted: resuming writes", None)
                        .await;
                }
                // Resumed in place (no other member could take over): with this
                // generation's lease, take writes again, at most once per generation.
                // Without the lease in time the resume is given up, so the fence becomes
                // final for the leader (it reports the resume pending until then).
                let t = &self.shared.config.timing;
                let generation = intent.generation;
                if intent.resumed == Some(generation) && !self.shared.resume.is_spent(generation) {
                    if self.shared.lease.valid(generation, t.fence_after) {
                        tracing::info!(%generation, "resumed in place as the primary");
                        self.resume_wait = None;
                        return self
                            .resume_as_primary("resumed in place", Some(generation))
                            .await;
                    }
                    let since = match self.resume_wait {
                        Some((g, since)) if g == generation => since,
                        _ => {
                            let now = Instant::now();
                            self.resume_wait = Some((generation, now));
                            now
                        }
                    };
                    // Two lease lengths: a majority that grants nothing for that long
                    // will not grant in time to matter.
                    if since.elapsed() >= t.lease_ttl * 2 {
                        tracing::warn!(
                            %generation,
                            waited_ms = since.elapsed().as_millis() as u64,
                            "giving up the resume in place: no lease in time; the fence is final \
                             and the leader may promote another member or resume this one anew"
                        );
                        self.shared.resume.spend(generation)?;
                        self.resume_wait = None;
                    }
                }
                // Stays down: the leader promotes another member.
                return Ok(());
            }
            if self.seen_primary_up {
                // The primary's Postgres crashed under this agent: fence so the leader
                // promotes at once, no lease wait.
                self.seen_primary_up = false;
                self.shared
                    .set_activity("fenced: the primary's Postgres crashed");
                tracing::error!("the local primary's Postgres is down: fencing it");
                return self
                    .pg
                    .fence(self.shared.config.timing.pg_probe_timeout * 2)
                    .await
                    .context("fencing the crashed primary");
            }
            if self.pg.has_standby_signal() {
                // Named primary while down as a standby: start, then promote.
                return self.pg.start(START_TIMEOUT).await.context("starting");
            }
            // Boot: start as the primary only with the current generation's lease.
            let t = &self.shared.config.timing;
            if !self.shared.lease.valid(intent.generation, t.fence_after) {
                self.shared
                    .set_activity("waiting for the lease before starting as primary");
                return Ok(());
            }
            self.shared.set_activity("starting as primary");
            self.pg.start(START_TIMEOUT).await.context("starting")?;
            self.shared.set_activity("");
            return Ok(());
        }
        let Some(primary) = intent.primary.clone() else {
            return Ok(());
        };
        if self.pg.has_standby_signal() && !fenced {
            // A crashed or stopped standby: restart it where it was.
            self.shared.set_activity("starting as standby");
            self.pg.start(START_TIMEOUT).await.context("starting")?;
            self.shared.set_activity("");
            return Ok(());
        }
        // An old primary (or a fenced member): rejoin the current primary.
        self.rejoin(&primary).await
    }

    /// `pg_rewind` onto `primary`, then start as its standby; re-clone if rewind fails.
    async fn rejoin(&mut self, primary: &str) -> anyhow::Result<()> {
        self.receiver_on();
        self.primary_ready(primary).await?;
        let (host, port) = pg_addr(&self.shared, primary)?;
        let slot = self.primary_slot();
        self.push_unarchived_wal().await;
        self.shared
            .set_activity(&format!("rewinding from {primary}"));
        match self.pg.rewind(&host, port, slot.as_deref()).await {
            Ok(()) => {
                self.pg
                    .start(START_TIMEOUT)
                    .await
                    .context("starting after rewind")?;
                self.pg.clear_fence()?;
                *self
                    .shared
                    .final_lsn
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                self.upstream = Some(Upstream {
                    member: primary.to_string(),
                    slot: slot.is_some(),
                });
                self.not_streaming_since = None;
                self.shared.set_activity("");
                tracing::info!(%primary, "rewound and rejoined as a standby");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(%primary, "pg_rewind failed ({e}); re-cloning instead");
                let kept = self.move_data_aside("rewind-failed")?;
                tracing::warn!("the old data directory is kept at {}", kept.display());
                self.clone_from(primary).await
            }
        }
    }

    /// `[backup]`: before a rewind throws this old primary's WAL away, what it had not
    /// archived yet goes to the repository; what cannot is reported lost, in the log and
    /// in the cluster history.
    async fn push_unarchived_wal(&mut self) {
        let Some(Ok(br)) = crate::backup::Pgbackrest::from_config(&self.shared.config) else {
            return;
        };
        self.shared
            .set_activity("archiving WAL the old primary had not archived");
        let out = crate::backup::replica::push_unarchived(&br, &self.pg).await;
        if !out.pushed.is_empty() {
            tracing::info!(segments = ?out.pushed, "archived WAL left unarchived before the failover");
        }
        if out.lost.is_empty() {
            return;
        }
        let names: Vec<&str> = out.lost.iter().map(|(n, _)| n.as_str()).collect();
        tracing::error!(segments = ?names, why = %out.lost[0].1, "WAL of the old primary could not be archived: lost from the archive");
        let intent = self.shared.applied().intent.clone();
        let cmd = Command::AppendHistory(crate::raft::intent::HistoryEntry {
            at_unix_ms: unix_ms(),
            kind: crate::raft::intent::HistoryKind::Note,
            reason: format!(
                "archive gap: {} could not archive {} (first {}): {}",
                self.name(),
                names.join(", "),
                names[0],
                crate::agent::errlog::one_line(&out.lost[0].1)
            ),
            old_primary: Some(self.name().to_string()),
            new_primary: intent.primary.clone(),
            generation: intent.generation,
            old_primary_lsn: None,
            new_primary_lsn: None,
            possible_loss_bytes: None,
            write_pause_ms: None,
        });
        if let Err(e) = propose(&self.shared, cmd).await {
            tracing::warn!("recording the archive gap in the history: {e:#}");
        }
    }

    /// Fails unless `primary`'s Postgres answers and is out of recovery: cloning or
    /// rewinding from anything else would fail and (for a rewind) fall back to a re-clone
    /// for nothing.
    async fn primary_ready(&self, primary: &str) -> anyhow::Result<()> {
        let (host, port) = pg_addr(&self.shared, primary)?;
        let timeout = self.shared.config.timing.pg_probe_timeout;
        let monitor = self.pg.roles().monitor.clone();
        let (client, conn) = self
            .pg
            .connect_remote("primary ready: connect", &host, port, &monitor, timeout)
            .await
            .with_context(|| format!("connecting to {primary}'s Postgres"))?;
        let row =
            tokio::time::timeout(timeout, client.query_one("SELECT pg_is_in_recovery()", &[]))
                .await
                .with_context(|| format!("{primary}'s Postgres did not answer in time"))??;
        drop(client);
        conn.abort();
        anyhow::ensure!(
            !row.get::<_, bool>(0),
            "{primary}'s Postgres is still in recovery (promoting?)"
        );
        Ok(())
    }

    fn move_data_aside(&mut self, why: &str) -> anyhow::Result<std::path::PathBuf> {
        // Only reached after check_data_dir accepted this data dir as the cluster's own.
        self.system_identifier = None;
        self.conf_checked = false;
        let dir = self.pg.data_dir().to_path_buf();
        let mut aside = dir.clone().into_os_string();
        aside.push(format!(".{why}-{}", unix_ms()));
        let aside = std::path::PathBuf::from(aside);
        std::fs::rename(&dir, &aside).with_context(|| format!("moving {} aside", dir.display()))?;
        Ok(aside)
    }

    /// The member the newest generation names: replay what it received, promote, check
    /// it is writable. Needs an accepted lease renewal for this generation first.
    async fn promote(&mut self, intent: &Intent) -> anyhow::Result<()> {
        let shared = self.shared.clone();
        if self.pg.is_fenced() {
            // Fenced for a switchover that is being undone, or after a crash: not promotable.
            return Ok(());
        }
        let generation = intent.generation;
        shared.set_activity(&format!("promoting (generation {generation})"));
        let t = &shared.config.timing;
        // Members that have not applied the promotion yet refuse the first renewal, and
        // a forced promotion waits out the old grants: retry briefly, bounded by one lease.
        let lease_by = Instant::now() + t.lease_ttl;
        loop {
            match super::lease::renew_once(&shared, generation, t.fence_after).await {
                Ok(()) => break,
                Err(e) if Instant::now() >= lease_by => {
                    anyhow::bail!("lease before promotion: {e}")
                }
                Err(_) => tokio::time::sleep(PROMOTE_LEASE_RETRY).await,
            }
        }
        let started = Instant::now();
        // Slots first (a standby can create physical slots), so the standbys re-pointing
        // here stream through them as soon as this server takes writes: under a sync
        // policy the first commits wait for them.
        if let Err(e) = self.ensure_slots(intent).await {
            tracing::debug!("creating slots before promotion: {e:#}");
            self.slots = None;
        }
        // The old primary's setting may name this member: start with this generation's
        // target instead (the intent carries the old set minus this member, so commits
        // keep waiting on the same standbys; empty means async until the leader grows it).
        let applied = intent
            .sync_target
            .as_ref()
            .filter(|t| t.generation == generation);
        let target = render_sync_standby_names(
            &applied.map(|t| t.set.clone()).unwrap_or_default(),
            self.lease_gate(),
        );
        self.pg
            .set_synchronous_standby_names(&target)
            .await
            .context("setting synchronous_standby_names before promotion")?;
        self.note_applied_sync_target(applied);
        self.pg
            .promote(shared.config.timing.promote_timeout)
            .await
            .context("promoting")?;
        self.seen_primary_up = true;
        self.upstream = None;
        shared.set_activity("");
        // Slots at once if they could not be made before, so the standbys find theirs.
        if let Err(e) = self.ensure_slots(intent).await {
            tracing::warn!("creating slots after promotion: {e:#}");
        }
        tracing::info!(
            %generation,
            promote_ms = started.elapsed().as_millis() as u64,
            "promoted: this member is the primary"
        );
        Ok(())
    }

    /// `shown`: `synchronous_standby_names` as this round's probe read it (the probe
    /// carries it, so no second query per round; read on its own when absent).
    async fn as_primary(&mut self, intent: &Intent, shown: Option<&str>) -> anyhow::Result<()> {
        use crate::decide::SwitchoverPhase;
        let generation = intent.generation;
        if switchover_phase_from(intent, self.name()) == Some(SwitchoverPhase::StoppingWrites) {
            return self.stop_writes().await;
        }
        if !self.roles_ensured {
            self.pg
                .ensure_roles()
                .await
                .context("creating Meridian's roles")?;
            self.roles_ensured = true;
        }
        self.record_system_identifier(intent).await?;
        self.ensure_slots(intent).await?;
        let target = intent
            .sync_target
            .as_ref()
            .filter(|t| t.generation == generation);
        let shown = match shown {
            Some(v) => v.to_string(),
            None => self.pg.setting("synchronous_standby_names").await?,
        };
        let want = match target {
            Some(t) => Some(render_sync_standby_names(&t.set, self.lease_gate())),
            // No target for this generation yet: the leader has not decided, so a set
            // already in place stays; an async primary is still gated (or ungated when
            // the gate was turned off).
            None if parse_sync_standby_names(&shown) == SyncSet::default() => Some(
                render_sync_standby_names(&SyncSet::default(), self.lease_gate()),
            ),
            None => None,
        };
        if let Some(want) = want.filter(|w| shown.trim() != w) {
            tracing::info!(from = %shown, to = %want, "setting synchronous_standby_names");
            self.pg.set_synchronous_standby_names(&want).await?;
        }
        self.note_applied_sync_target(target);
        self.stanza.ensure(&self.shared.config).await;
        Ok(())
    }

    /// Remembers the target Postgres was just set to (or already had). Written only after
    /// it was applied, and targets are applied in log order: a report pairing its probe
    /// with this target cannot name one newer than what Postgres waits on.
    fn note_applied_sync_target(&self, target: Option<&crate::raft::intent::SyncTarget>) {
        *self
            .shared
            .applied_sync_target
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = target.map(|t| (t.seq, t.set.clone()));
    }

    /// A slot for every other data member, so each can clone and stream from here; the
    /// inactive slots of members no longer in the intent are dropped (they would hold WAL
    /// until `max_slot_wal_keep_size`). Slots Meridian does not own (no `meridian_`
    /// prefix) are left alone. Done again whenever the generation or the data members change.
    ///
    /// Members that cascade from another standby have their slot there instead
    /// ([`cascade::slots_kept_by`]); on a standby this keeps the slots of the members that
    /// cascade from it (and drops Meridian's other inactive ones: an old primary's would
    /// hold its WAL for nothing).
    async fn ensure_slots(&mut self, intent: &Intent) -> anyhow::Result<()> {
        let wanted: std::collections::BTreeSet<String> =
            cascade::slots_kept_by(intent, self.name())
                .iter()
                .map(|m| slot_name(m))
                .collect();
        let key = (intent.generation, wanted);
        if self.slots.as_ref() == Some(&key) {
            return Ok(());
        }
        for slot in &key.1 {
            self.pg
                .create_slot(slot)
                .await
                .with_context(|| format!("creating slot {slot}"))?;
        }
        let client = self.pg.connect().await?;
        let rows = tokio::time::timeout(
            Duration::from_secs(2),
            client.query(
                "SELECT slot_name::text, active FROM pg_replication_slots \
                 WHERE slot_type = 'physical'",
                &[],
            ),
        )
        .await
        .context("listing slots timed out")??;
        let listed: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let inactive = listed.iter().filter(|(_, a)| !a).map(|(n, _)| n.as_str());
        for slot in slots_to_drop(inactive, &key.1) {
            tracing::info!(%slot, "dropping a slot no member streams through from here");
            self.pg.drop_slot(&slot).await?;
        }
        // An unwanted slot still in use (a member about to cascade from elsewhere) is
        // dropped once it is not: check again next round instead of remembering the key.
        let in_use = listed.iter().filter(|(_, a)| *a).map(|(n, _)| n.as_str());
        if slots_to_drop(in_use, &key.1).is_empty() {
            self.slots = Some(key);
        }
        Ok(())
    }

    /// Switchover: stop writes for real (fast shutdown sends all WAL to the standbys),
    /// then serve read-only as a standby until the promotion lands.
    async fn stop_writes(&mut self) -> anyhow::Result<()> {
        self.shared.set_activity("switchover: stopping writes");
        let started = Instant::now();
        let lsn = self
            .pg
            .stop_writes(START_TIMEOUT)
            .await
            .context("stopping writes for the switchover")?;
        *self
            .shared
            .final_lsn
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(lsn);
        self.seen_primary_up = false;
        tracing::info!(
            final_lsn = %lsn,
            stop_ms = started.elapsed().as_millis() as u64,
            "switchover: writes stopped"
        );
        self.shared.set_activity("switchover: writes stopped");
        Ok(())
    }

    /// Takes writes again: after a switchover given up once writes stopped (`spend`
    /// None), or resumed in place (`spend` its generation). The fence mark goes, then the
    /// resume is spent (durably), then the server starts: a report in between reads
    /// "pending" or "not fenced", never a final fence of a primary about to take writes
    /// (the reporter reads the spent generation before the mark).
    async fn resume_as_primary(
        &mut self,
        why: &str,
        spend: Option<Generation>,
    ) -> anyhow::Result<()> {
        self.shared.set_activity(why);
        let signal = self.pg.data_dir().join("standby.signal");
        let _ = std::fs::remove_file(signal);
        self.pg.clear_fence()?;
        if let Some(generation) = spend {
            self.shared.resume.spend(generation)?;
        }
        *self
            .shared
            .final_lsn
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.pg
            .start(START_TIMEOUT)
            .await
            .context("restarting as primary")?;
        self.shared.set_activity("");
        Ok(())
    }

    async fn as_standby(&mut self, intent: &Intent, streaming: bool) -> anyhow::Result<()> {
        let Some(primary) = intent.primary.clone() else {
            return Ok(());
        };
        // Cut off from every Raft leader, a standby keeps streaming: promotions count only
        // final positions, so its confirmations cannot cost a commit, and disconnecting
        // stalled the primary's commits for a whole partial partition (#12, the sim's
        // `a_sync_standby_cut_off_from_the_leader_keeps_the_primary_writable`).
        // This voter broke the primary's lease of this generation: no WAL from it until a
        // promotion (a new generation) or a release of the break, so a thawed primary's
        // waiting commits are not confirmed here after a promotion was decided (sim F7).
        // The break handler disconnects at once; this keeps it so.
        if let Some((generation, round)) = self.shared.grants.standing_break(intent) {
            if generation == intent.generation {
                if !self.disconnected {
                    tracing::warn!(
                        %primary,
                        %generation,
                        "this member broke the primary's lease: WAL receiver off until a \
                         promotion or a release of the break"
                    );
                    self.shared
                        .set_activity("lease broken here: WAL receiver disconnected");
                    let running = self.pg.is_running();
                    self.pg.disconnect_upstream().await?;
                    self.disconnected = true;
                    self.upstream = None;
                    if running {
                        let mut off = self
                            .shared
                            .receiver_off
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        if off.is_none_or(|o| o < (generation, round)) {
                            *off = Some((generation, round));
                        }
                    }
                }
                return Ok(());
            }
        }
        // Cascading: the tagged source while this agent's own probe sees it stream, else
        // the primary (and back when the source streams again).
        let max_age = self.shared.config.timing.observe_interval * 4;
        let probes = self.shared.peer_probes.fresh(max_age);
        let Some(want) = cascade::upstream(intent, self.name(), |m| {
            probes.get(m).is_some_and(|p| p.streaming && !p.writable)
        }) else {
            return Ok(());
        };
        if self.upstream.as_ref() != Some(&want) || self.disconnected {
            let to = want.member.clone();
            let (host, port) = pg_addr(&self.shared, &to)?;
            let slot = want.slot.then(|| slot_name(self.name()));
            self.receiver_on();
            self.pg
                .configure_standby(&host, port, slot.as_deref())
                .await
                .with_context(|| format!("pointing at {to}"))?;
            if to == primary {
                tracing::info!(%primary, slot = want.slot, "standby follows the primary");
            } else {
                tracing::info!(upstream = %to, %primary, "standby cascades from its replicatefrom member");
            }
            self.upstream = Some(want);
            self.disconnected = false;
            self.not_streaming_since = None;
            self.shared.set_activity("");
            return Ok(());
        }
        if streaming {
            self.not_streaming_since = None;
            if self.pg.is_fenced() {
                // A former primary that now streams from the new one (switchover).
                self.pg.clear_fence()?;
                self.shared.set_activity("");
            }
            // The slots of the members that cascade from here (done again only when the
            // generation or the set changes).
            if let Err(e) = self.ensure_slots(intent).await {
                tracing::debug!("slots for cascading standbys: {e:#}");
                self.slots = None;
            }
            return Ok(());
        }
        let since = *self.not_streaming_since.get_or_insert_with(Instant::now);
        if since.elapsed() < REJOIN_AFTER {
            return Ok(());
        }
        // Not streaming for long: most likely a diverged timeline (if the primary is up).
        if let Err(e) = self.primary_ready(&primary).await {
            return Err(e.context("standby not streaming"));
        }
        tracing::warn!(%primary, "the standby has not streamed for {} s: rewinding", REJOIN_AFTER.as_secs());
        self.not_streaming_since = None;
        self.pg
            .stop(StopMode::Fast, START_TIMEOUT)
            .await
            .context("stopping for a rewind")?;
        self.rejoin(&primary).await
    }

    async fn reinit(&mut self, intent: &Intent) -> anyhow::Result<()> {
        let Some(primary) = intent.primary.clone() else {
            return Ok(());
        };
        self.primary_ready(&primary).await?;
        self.shared.set_activity("reinit: re-cloning");
        if self.pg.is_running() {
            self.pg
                .stop(StopMode::Fast, START_TIMEOUT)
                .await
                .context("stopping before reinit")?;
        }
        if self.pg.data_dir().exists() {
            let old = self.move_data_aside("reinit")?;
            self.clone_from(&primary).await?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            self.clone_from(&primary).await?;
        }
        let cmd = Command::ReinitDone {
            name: self.name().to_string(),
        };
        match propose(&self.shared, cmd).await? {
            Response::Applied => {
                tracing::info!(%primary, "reinit done");
                // Committed is not yet applied here: the next round must not read the old
                // intent and re-clone again (bounded; a later round sees it anyway).
                let me = self.name().to_string();
                let mut applied = self.shared.applied.clone();
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    applied.wait_for(|a| !a.intent.reinit.contains(&me)),
                )
                .await;
                Ok(())
            }
            other => anyhow::bail!("recording reinit done: {other:?}"),
        }
    }
}

/// The pending switchover's phase, when this member is its source.
fn switchover_phase_from(intent: &Intent, me: &str) -> Option<crate::decide::SwitchoverPhase> {
    intent
        .pending_switchover
        .as_ref()
        .filter(|sw| sw.from == me)
        .map(|sw| sw.phase.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_standby_names_round_trip() {
        let set = SyncSet::new(["a2", "b-1"], 1);
        let s = render_sync_standby_names(&set, true);
        assert_eq!(s, "ANY 1 (\"a2\", \"b-1\")");
        assert_eq!(parse_sync_standby_names(&s), set);
        assert_eq!(parse_sync_standby_names(""), SyncSet::default());
        assert_eq!(render_sync_standby_names(&SyncSet::default(), false), "");
        assert_eq!(
            render_sync_standby_names(&SyncSet::default(), true),
            crate::pg::gate::GATE_APPLICATION_NAME
        );
        // The gate is never read back as a member of the sync set.
        assert_eq!(
            parse_sync_standby_names(crate::pg::gate::GATE_APPLICATION_NAME),
            SyncSet::default()
        );
        assert_eq!(
            parse_sync_standby_names("FIRST 2 (x, y, z)"),
            SyncSet::new(["x", "y", "z"], 2)
        );
        assert_eq!(
            parse_sync_standby_names("x, y"),
            SyncSet::new(["x", "y"], 1)
        );
        assert_eq!(
            parse_sync_standby_names("2 (x, y)"),
            SyncSet::new(["x", "y"], 2)
        );
    }

    #[test]
    fn slot_names_are_valid_postgres_identifiers() {
        assert_eq!(slot_name("A-2_x"), "meridian_a_2_x");
    }

    #[test]
    fn only_meridians_unwanted_slots_are_dropped() {
        let wanted: std::collections::BTreeSet<String> = [slot_name("b1")].into();
        let inactive = [
            "meridian_b1",
            "meridian_gone",
            "barman",
            "pg_receivewal_slot",
            "b1",
        ];
        assert_eq!(
            slots_to_drop(inactive, &wanted),
            vec!["meridian_gone".to_string()]
        );
    }

    #[test]
    fn foreign_data_dir_message_names_both_identifiers() {
        let m = foreign_data_dir_message(std::path::Path::new("/d"), 11, 22);
        assert!(
            m.contains("/d") && m.contains("11") && m.contains("22"),
            "{m}"
        );
    }
}
