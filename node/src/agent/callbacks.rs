//! `[callbacks]`: the operator's programs run when the local Postgres starts, stops or
//! changes role (to move a VIP or a DNS name), Patroni-style: `EXE ARGS… ACTION ROLE
//! CLUSTER MEMBER`.
//!
//! Owns the per-member queue and its one worker: events are queued without waiting
//! (`try_send` on a bounded queue, so a promotion never waits on a callback; a full queue
//! drops the event, logged and counted), run one at a time in order, each killed when it
//! outlives `[callbacks] timeout`. Failures (exit status, spawn error, timeout) are logged
//! and counted in `meridian_callback_failures_total`. Also owns the detection of the
//! events from successive observations of the local Postgres ([`Transitions`]), a pure
//! state machine.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::Config;
use crate::metrics::Metrics;

/// Events waiting to run, per member; more are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    OnStart,
    OnStop,
    OnRoleChange,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::OnStart => "on_start",
            Action::OnStop => "on_stop",
            Action::OnRoleChange => "on_role_change",
        }
    }
}

/// `primary` or `replica`, as passed to the callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgRole {
    Primary,
    Replica,
}

impl PgRole {
    pub fn as_str(self) -> &'static str {
        match self {
            PgRole::Primary => "primary",
            PgRole::Replica => "replica",
        }
    }
}

/// What the observations said last: whether Postgres was up, and the last role it ran in
/// (kept across a stop, so a restart in another role is a role change).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transitions {
    up: Option<bool>,
    last_role: Option<PgRole>,
}

impl Transitions {
    /// The event one observation implies: `now` is None when Postgres is down, else its
    /// role. A start in the role it last ran in is `on_start`; in another role
    /// `on_role_change`; a role change while running is `on_role_change`; down after up is
    /// `on_stop` with the role it had.
    pub fn next(&mut self, now: Option<PgRole>) -> Option<(Action, PgRole)> {
        let was_up = self.up;
        let last = self.last_role;
        self.up = Some(now.is_some());
        match now {
            None => {
                if was_up == Some(true) {
                    last.map(|r| (Action::OnStop, r))
                } else {
                    None
                }
            }
            Some(role) => {
                self.last_role = Some(role);
                match (was_up == Some(true), last) {
                    (true, Some(l)) if l == role => None,
                    (_, Some(l)) if l != role => Some((Action::OnRoleChange, role)),
                    (false, _) => Some((Action::OnStart, role)),
                    (true, _) => None,
                }
            }
        }
    }
}

/// Records what the local Postgres is now (None: down, else its role) and fires the
/// callback that change implies, if any (queued, never awaited).
pub fn note(shared: &super::Shared, now: Option<PgRole>) {
    let event = shared
        .transitions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .next(now);
    if let Some((action, role)) = event {
        shared.callbacks.fire(action, role);
    }
}

struct Event {
    action: Action,
    role: PgRole,
}

/// The queue of one member's callbacks; cheap to share.
#[derive(Clone, Default)]
pub struct Callbacks {
    tx: Option<mpsc::Sender<Event>>,
    metrics: Option<Arc<Metrics>>,
    /// Events queued or running (the graceful stop waits for them, bounded).
    pending: Arc<AtomicUsize>,
    /// `[callbacks] timeout`: the bound on each one.
    timeout: Duration,
}

impl Callbacks {
    /// Starts the worker when any callback is configured (needs a tokio runtime).
    pub fn spawn(config: &Config, metrics: Arc<Metrics>) -> Callbacks {
        let c = &config.callbacks;
        if c.on_start.is_none() && c.on_stop.is_none() && c.on_role_change.is_none() {
            return Callbacks::default();
        }
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let pending = Arc::new(AtomicUsize::new(0));
        tokio::spawn(worker(
            rx,
            c.clone(),
            config.cluster.clone(),
            config.member.name.clone(),
            metrics.clone(),
            pending.clone(),
        ));
        Callbacks {
            tx: Some(tx),
            metrics: Some(metrics),
            pending,
            timeout: c.timeout,
        }
    }

    /// Waits until every queued callback has run (or was killed at its timeout), at most
    /// `within`. For the graceful stop: the agent's `on_stop` must run before it exits.
    /// False when some were still pending at the bound.
    pub async fn drain(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.pending.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// A bound for [`Callbacks::drain`]: every queued callback at its own timeout, plus
    /// a margin to spawn them.
    pub fn drain_bound(&self) -> Duration {
        let queued = self.pending.load(Ordering::Acquire).max(1) as u32;
        (self.timeout + Duration::from_millis(500)).saturating_mul(queued)
    }

    /// Queues `action` without waiting; a full queue drops it (logged, counted).
    pub fn fire(&self, action: Action, role: PgRole) {
        let Some(tx) = &self.tx else { return };
        tracing::info!(
            action = action.as_str(),
            role = role.as_str(),
            "queueing callback"
        );
        self.pending.fetch_add(1, Ordering::AcqRel);
        if tx.try_send(Event { action, role }).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(
                action = action.as_str(),
                "callback queue full ({QUEUE_CAPACITY} waiting): event dropped"
            );
            if let Some(m) = &self.metrics {
                m.callback_failed(action.as_str(), "dropped");
            }
        }
    }
}

async fn worker(
    mut rx: mpsc::Receiver<Event>,
    c: crate::config::CallbacksConfig,
    cluster: String,
    member: String,
    metrics: Arc<Metrics>,
    pending: Arc<AtomicUsize>,
) {
    while let Some(ev) = rx.recv().await {
        run_event(&c, &cluster, &member, &metrics, ev).await;
        pending.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn run_event(
    c: &crate::config::CallbacksConfig,
    cluster: &str,
    member: &str,
    metrics: &Metrics,
    ev: Event,
) {
    {
        let argv = match ev.action {
            Action::OnStart => &c.on_start,
            Action::OnStop => &c.on_stop,
            Action::OnRoleChange => &c.on_role_change,
        };
        let Some(argv) = argv else { return };
        let started = Instant::now();
        let result = run_one(argv, ev.action, ev.role, cluster, member, c.timeout).await;
        let action = ev.action.as_str();
        match result {
            Ok(()) => {
                metrics.callback_ran(action);
                tracing::info!(
                    action,
                    role = ev.role.as_str(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "callback done"
                );
            }
            Err((kind, why)) => {
                metrics.callback_failed(action, kind);
                tracing::warn!(action, role = ev.role.as_str(), "callback failed: {why}");
            }
        }
    }
}

/// Runs one callback to its end or its bound (killed then); the error is its kind
/// (`spawn`, `exit`, `timeout`) and a sentence.
async fn run_one(
    argv: &[String],
    action: Action,
    role: PgRole,
    cluster: &str,
    member: &str,
    timeout: Duration,
) -> Result<(), (&'static str, String)> {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .args([action.as_str(), role.as_str(), cluster, member])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        // A callback outliving its bound is killed when its future is dropped.
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| ("spawn", format!("starting {}: {e}", argv[0])))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err((
            "timeout",
            format!(
                "{} did not finish within {} ms and was killed",
                argv[0],
                timeout.as_millis()
            ),
        )),
        Ok(Err(e)) => Err(("exit", format!("waiting for {}: {e}", argv[0]))),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = stderr
                .lines()
                .last()
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect();
            Err((
                "exit",
                format!("{} exited with {}: {tail}", argv[0], out.status),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_give_one_event_per_change() {
        use Action::*;
        use PgRole::*;
        let mut t = Transitions::default();
        assert_eq!(t.next(None), None, "down from the start: nothing");
        assert_eq!(t.next(Some(Replica)), Some((OnStart, Replica)));
        assert_eq!(t.next(Some(Replica)), None);
        assert_eq!(
            t.next(Some(Primary)),
            Some((OnRoleChange, Primary)),
            "promoted"
        );
        assert_eq!(t.next(Some(Primary)), None);
        assert_eq!(t.next(None), Some((OnStop, Primary)));
        assert_eq!(t.next(None), None);
        assert_eq!(
            t.next(Some(Replica)),
            Some((OnRoleChange, Replica)),
            "came back as a standby: a role change, not a plain start"
        );
        assert_eq!(t.next(None), Some((OnStop, Replica)));
        assert_eq!(t.next(Some(Replica)), Some((OnStart, Replica)));
    }
}
