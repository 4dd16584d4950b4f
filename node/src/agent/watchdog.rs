//! The fencing watchdog: a separate `meridian-node --watchdog-of <agent pid>` process that
//! enforces the primary's fence deadline even when the agent itself cannot — frozen
//! (SIGSTOP), killed, or starved. The agent arms it after every accepted lease renewal by
//! writing the deadline (send time + `timing.fence_after`, on the system-wide
//! `CLOCK_MONOTONIC`, the same clock in both processes), the boot it belongs to and the
//! arming agent's pid to `state_dir/watchdog`, and disarms it when it is not the primary.
//! Past an armed deadline the watchdog fences the local Postgres (marker, then kill of the
//! postmaster and every backend), whatever else anyone observes: the design's "fencing is
//! absolute". An agent that dies therefore costs its primary the lease once `fence_after`
//! passes, and the cluster fails over; systemd restarts the agent within a second
//! (`deploy/systemd`), and a restarted agent keeps the armed deadline of its predecessor
//! (it never disarms on start), so a restart inside `fence_after` keeps the primary and a
//! longer one is fenced. A watchdog whose agent is gone exits once the deadline it guards
//! was enforced or a newer agent re-armed the file.
//!
//! The watchdog sleeps until the armed deadline, and is woken early by every change of the
//! file (inotify on `state_dir`): an idle standby's watchdog wakes about once a second, a
//! primary's at each renewal, instead of polling every 50 ms. It still looks at least once
//! per [`IDLE_CHECK`], and polls every [`CHECK_EVERY`] where inotify is unavailable and
//! while a passed deadline is being enforced.
//!
//! An earlier rule skipped the fence while other members' agents still probed this
//! Postgres. The probing member may itself be cut off from the Raft leader together with
//! this host (the majority side then promotes), so that rule made two writers; it is gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::pg::PgInstance;

/// File name of the deadline under `state_dir`.
pub const FILE: &str = "watchdog";
/// How often the watchdog checks without inotify, and while a passed deadline is enforced.
const CHECK_EVERY: Duration = Duration::from_millis(50);
/// The longest the watchdog sleeps with inotify (file changes wake it at once): whether
/// its agent is gone is looked at this often, and a missed change is seen this late at most.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Now on `CLOCK_MONOTONIC`, in milliseconds.
pub fn monotonic_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            u64::try_from(ts.tv_sec()).unwrap_or(0) * 1000
                + u64::try_from(ts.tv_nsec()).unwrap_or(0) / 1_000_000
        }
        Err(_) => 0,
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// This boot's id: a CLOCK_MONOTONIC deadline from another boot means nothing (the clock
/// restarts at boot), so such a deadline counts as passed.
fn boot_id() -> String {
    // Read once: a process never outlives its boot.
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

/// An armed deadline as the file holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Armed {
    /// CLOCK_MONOTONIC, in milliseconds.
    pub deadline_ms: u64,
    /// The agent process that armed it.
    pub agent_pid: i32,
    /// The boot the deadline's clock belongs to (empty where the kernel tells none).
    pub boot_id: String,
}

impl Armed {
    /// Whether the deadline passed at `now_ms` (this boot's CLOCK_MONOTONIC): a deadline of
    /// another boot always has.
    pub fn passed(&self, now_ms: u64, this_boot: &str) -> bool {
        self.boot_id != this_boot || now_ms >= self.deadline_ms
    }
}

/// Every record is this long (padded with spaces), so an in-place rewrite never leaves a
/// tail of an older, longer one.
const RECORD_LEN: usize = 96;

/// FNV-1a of a record's body: a reader that caught a rewrite half done (the agent writes in
/// place, and a buffered read does not wait for a write) sees a mismatch, not a mix of two
/// deadlines, one of which could lie later than either.
fn checksum(body: &str) -> u64 {
    body.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn render(deadline_ms: Option<u64>, agent_pid: i32, boot: &str) -> String {
    let body = match deadline_ms {
        Some(d) => format!("armed {d} {agent_pid} {boot}"),
        None => "disarmed".to_string(),
    };
    let sum = checksum(&body);
    let mut text = format!("{body} #{sum:016x}");
    while text.len() < RECORD_LEN - 1 {
        text.push(' ');
    }
    text.push('\n');
    text
}

/// What a read of the file found.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Record {
    Armed(Armed),
    /// Disarmed, missing, or not a deadline.
    Disarmed,
    /// The checksum does not match: a rewrite was caught half done.
    Torn,
}

fn parse(text: &str) -> Record {
    let text = text.trim_end();
    let body = match text.rsplit_once(" #") {
        Some((body, sum)) => {
            if u64::from_str_radix(sum, 16).ok() != Some(checksum(body)) {
                return Record::Torn;
            }
            body
        }
        // Written by an agent from before the checksum (whole-file rename, never torn).
        None => text,
    };
    let Some(rest) = body.strip_prefix("armed ") else {
        return Record::Disarmed;
    };
    let mut words = rest.split_whitespace();
    let Some(deadline_ms) = words.next().and_then(|w| w.parse().ok()) else {
        return Record::Disarmed;
    };
    // Files written before the pid and boot were recorded: owner unknown, this boot.
    let agent_pid = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    let boot_id = words.next().map_or_else(boot_id, str::to_string);
    Record::Armed(Armed {
        deadline_ms,
        agent_pid,
        boot_id,
    })
}

/// The deadline file as this process keeps it open: rewritten in place at every renewal.
/// A temporary file and a rename per renewal were a tenth of an idle primary's agent CPU
/// (a new inode, a journaled rename and an inotify move each time).
struct Kept {
    path: PathBuf,
    file: std::fs::File,
    ino: u64,
}

/// Arms the watchdog with `deadline_ms` (CLOCK_MONOTONIC) or disarms it (None), in the
/// name of this process: one fixed-length record with a checksum, rewritten in place.
/// Writers of this process (the lease task, the watchdog's spawn) take turns.
pub fn write(state_dir: &Path, deadline_ms: Option<u64>) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    static KEPT: std::sync::Mutex<Option<Kept>> = std::sync::Mutex::new(None);
    let text = render(deadline_ms, std::process::id() as i32, &boot_id());
    debug_assert_eq!(text.len(), RECORD_LEN, "a record longer than its slot");
    let target = path(state_dir);
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    // Reopen when the file is not the one kept (another state directory, or the file was
    // removed or replaced behind this process): a write to an unlinked inode arms nothing.
    let current_ino = std::fs::metadata(&target).ok().map(|m| m.ino());
    let reuse = kept
        .as_ref()
        .is_some_and(|k| k.path == target && Some(k.ino) == current_ino);
    if !reuse {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&target)?;
        let ino = file.metadata()?.ino();
        *kept = Some(Kept {
            path: target,
            file,
            ino,
        });
    }
    let k = kept.as_ref().expect("kept file just set");
    let written = k.file.write_all_at(text.as_bytes(), 0).and_then(|()| {
        // A file left by an older agent may be longer than a record.
        if k.file.metadata()?.len() != RECORD_LEN as u64 {
            k.file.set_len(RECORD_LEN as u64)?;
        }
        Ok(())
    });
    if written.is_err() {
        *kept = None;
    }
    written
}

/// How often a read that caught a rewrite half done is retried before it gives up.
const TORN_RETRIES: u32 = 5;

/// The armed deadline, if armed. `Err(())` when every read caught a rewrite half done.
fn read_checked(state_dir: &Path) -> Result<Option<Armed>, ()> {
    for _ in 0..TORN_RETRIES {
        let Ok(text) = std::fs::read_to_string(path(state_dir)) else {
            return Ok(None);
        };
        match parse(&text) {
            Record::Armed(a) => return Ok(Some(a)),
            Record::Disarmed => return Ok(None),
            Record::Torn => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    Err(())
}

/// The armed deadline, if armed (a file that stays torn reads as not armed).
pub fn read(state_dir: &Path) -> Option<Armed> {
    read_checked(state_dir).ok().flatten()
}

/// Spawns the watchdog process of this agent (same binary, same config). While the
/// applied intent still names this member primary, a deadline armed by a previous agent
/// stays armed (this agent renews it or it is enforced); otherwise it is disarmed.
pub fn spawn(config: &Config, named_primary: bool) -> anyhow::Result<std::process::Child> {
    // A joining member may not have its state directory yet: without it the deadline
    // file could not be written and the member would run with no watchdog at all.
    std::fs::create_dir_all(&config.state_dir).context("creating the state directory")?;
    if !named_primary {
        // A failed disarm must not cost the member its watchdog: the lease task disarms
        // again on its next round (and arms before this member ever takes writes).
        if let Err(e) = write(&config.state_dir, None) {
            tracing::warn!("disarming the watchdog file before spawning it: {e}");
        }
    }
    let exe = std::env::current_exe().context("locating the agent's binary")?;
    std::process::Command::new(exe)
        .arg("--config")
        .arg(&config.source)
        .arg("--watchdog-of")
        .arg(std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("spawning the watchdog")
}

/// Whether the local Postgres answered, within a short bound, that it is in recovery: a
/// standby takes no writes, so there is nothing to fence. Anything else (no answer, a
/// frozen postmaster, an error) counts as possibly writable.
async fn surely_in_recovery(pg: &PgInstance) -> bool {
    let bound = Duration::from_millis(300);
    let Ok(Ok(client)) = tokio::time::timeout(bound, pg.connect()).await else {
        return false;
    };
    matches!(
        tokio::time::timeout(bound, client.query_one("SELECT pg_is_in_recovery()", &[])).await,
        Ok(Ok(row)) if row.get::<_, bool>(0)
    )
}

/// What wakes the watchdog between its checks: changes in `state_dir` (inotify, read by a
/// thread of its own that blocks on the descriptor), or only its timer where inotify
/// cannot be had.
struct Waker {
    changed: Option<Arc<WatchState>>,
}

/// Shared with the inotify thread.
#[derive(Default)]
struct WatchState {
    /// A change came (a permit is kept until the next sleep takes it).
    notify: tokio::sync::Notify,
    /// The watch ended (directory moved or removed, read error): poll from now on.
    broken: std::sync::atomic::AtomicBool,
}

impl Waker {
    fn new(state_dir: &Path) -> Waker {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let watch = || -> anyhow::Result<Inotify> {
            let fd = Inotify::init(InitFlags::IN_CLOEXEC).context("inotify_init")?;
            fd.add_watch(
                state_dir,
                AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_DELETE
                    | AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF,
            )
            .with_context(|| format!("watching {}", state_dir.display()))?;
            Ok(fd)
        };
        let started = watch().and_then(|fd| {
            let state = Arc::new(WatchState::default());
            let theirs = state.clone();
            std::thread::Builder::new()
                .name("watchdog-inotify".into())
                .spawn(move || read_changes(fd, &theirs))
                .context("starting the inotify thread")?;
            Ok(state)
        });
        match started {
            Ok(state) => Waker {
                changed: Some(state),
            },
            Err(e) => {
                tracing::warn!(
                    "watchdog: no inotify ({e:#}); checking every {} ms",
                    CHECK_EVERY.as_millis()
                );
                Waker { changed: None }
            }
        }
    }

    fn watching(&self) -> bool {
        self.changed
            .as_ref()
            .is_some_and(|c| !c.broken.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The longest sleep before the next check, given what the file held.
    fn wait_for(&self, armed: Option<&Armed>, passed: bool, now_ms: u64) -> Duration {
        if !self.watching() || passed {
            return CHECK_EVERY;
        }
        match armed {
            // Wake at the deadline (rounded up, so the check finds it passed).
            Some(a) => {
                Duration::from_millis(a.deadline_ms.saturating_sub(now_ms) + 1).min(IDLE_CHECK)
            }
            None => IDLE_CHECK,
        }
    }

    /// Sleeps for `wait` or until `state_dir` changes, whichever comes first.
    async fn sleep(&self, wait: Duration) {
        match self.changed.as_ref().filter(|_| self.watching()) {
            Some(c) => {
                let _ = tokio::time::timeout(wait, c.notify.notified()).await;
            }
            None => tokio::time::sleep(wait).await,
        }
    }
}

/// The inotify thread: wakes the watchdog at every change in the watched directory, until
/// the watch ends.
fn read_changes(fd: nix::sys::inotify::Inotify, state: &WatchState) {
    use nix::sys::inotify::AddWatchFlags;
    let why = loop {
        match fd.read_events() {
            Ok(events) => {
                state.notify.notify_one();
                let gone = events.iter().any(|e| {
                    e.mask.intersects(
                        AddWatchFlags::IN_DELETE_SELF
                            | AddWatchFlags::IN_MOVE_SELF
                            | AddWatchFlags::IN_IGNORED,
                    )
                });
                if gone {
                    break "the state directory was moved or removed".to_string();
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => break format!("reading inotify events: {e}"),
        }
    };
    tracing::warn!(
        "watchdog: {why}; checking every {} ms from now on",
        CHECK_EVERY.as_millis()
    );
    state
        .broken
        .store(true, std::sync::atomic::Ordering::Relaxed);
    state.notify.notify_one();
}

/// The watchdog's loop (in its own process).
pub async fn run(config: Config, agent_pid: i32) -> anyhow::Result<()> {
    let pg: PgInstance = super::observe::local_instance(&config)
        .await
        .context("this member manages no Postgres")?;
    let fence_timeout = config.timing.pg_probe_timeout * 2;
    let this_boot = boot_id();
    tracing::info!(agent_pid, "watchdog running");
    let mut reported_gone = false;
    let waker = Waker::new(&config.state_dir);
    let mut wait = CHECK_EVERY;
    let mut last_read: Option<Armed> = None;
    loop {
        waker.sleep(wait).await;
        // A file that stays torn keeps what was read last: the deadline it guards holds.
        if let Ok(now) = read_checked(&config.state_dir) {
            last_read = now;
        }
        let armed = last_read.clone();
        let agent_alive = crate::pg::pid_alive(agent_pid);
        let now_ms = monotonic_ms();
        let passed = armed.as_ref().is_some_and(|a| a.passed(now_ms, &this_boot));
        wait = waker.wait_for(armed.as_ref(), passed, now_ms);
        match armed {
            Some(_) if passed => {
                if !agent_alive && !reported_gone {
                    reported_gone = true;
                    tracing::warn!(
                        agent_pid,
                        "watchdog: the agent is gone and the lease deadline passed"
                    );
                }
                if pg.is_running() && !pg.is_fenced() && !surely_in_recovery(&pg).await {
                    tracing::error!(
                        "watchdog: the primary's lease deadline passed without a renewal; fencing the local Postgres"
                    );
                    if let Err(e) = pg.fence(fence_timeout).await {
                        tracing::error!("watchdog: fencing: {e}");
                    }
                }
                if !agent_alive {
                    tracing::info!(
                        agent_pid,
                        "watchdog: agent gone, deadline enforced; exiting"
                    );
                    return Ok(());
                }
            }
            // A newer agent armed it: its own watchdog guards it now.
            Some(a) if !agent_alive && a.agent_pid != agent_pid && a.agent_pid != 0 => {
                tracing::info!(
                    agent_pid,
                    newer = a.agent_pid,
                    "watchdog: a newer agent armed the deadline; exiting"
                );
                return Ok(());
            }
            Some(_) => {}
            None if !agent_alive => {
                tracing::info!(agent_pid, "watchdog: agent gone, nothing armed; exiting");
                return Ok(());
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn armed_file_round_trips_with_owner_and_boot() {
        let text = render(Some(1234), 77, "boot-a");
        assert_eq!(text.len(), RECORD_LEN);
        assert_eq!(
            parse(&text),
            Record::Armed(Armed {
                deadline_ms: 1234,
                agent_pid: 77,
                boot_id: "boot-a".into()
            })
        );
        assert_eq!(parse(&render(None, 77, "boot-a")), Record::Disarmed);
        assert_eq!(render(None, 77, "boot-a").len(), RECORD_LEN);
        assert_eq!(parse("garbage"), Record::Disarmed);
        // Written by an agent from before the checksum.
        assert_eq!(
            parse("armed 99 5 boot-b\n"),
            Record::Armed(Armed {
                deadline_ms: 99,
                agent_pid: 5,
                boot_id: "boot-b".into()
            })
        );
    }

    /// A read that caught a rewrite half done sees a checksum mismatch, never a deadline
    /// made of two (which could lie later than both).
    #[test]
    fn a_half_done_rewrite_reads_as_torn() {
        let old = render(Some(1_234_567_999), 77, "boot-a");
        let new = render(Some(1_234_568_299), 77, "boot-a");
        for cut in 1..RECORD_LEN {
            let mixed = format!("{}{}", &new[..cut], &old[cut..]);
            if mixed == old || mixed == new {
                continue;
            }
            assert_eq!(parse(&mixed), Record::Torn, "cut at {cut}: {mixed:?}");
        }
    }

    /// CI: the lease task and the spawn wrote through one temporary name; a rename then
    /// failed with ENOENT and the agent ran without a watchdog. Now one kept file is
    /// rewritten in place; writers take turns and a reader never sees a torn record.
    #[test]
    fn concurrent_writers_never_lose_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let d = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    for n in 0..200u64 {
                        write(&d, (i % 2 == 0).then_some(n)).unwrap();
                    }
                })
            })
            .collect();
        let reader = {
            let d = dir.path().to_path_buf();
            std::thread::spawn(move || {
                for _ in 0..500 {
                    assert!(read_checked(&d).is_ok(), "a read stayed torn");
                }
            })
        };
        for t in threads {
            t.join().unwrap();
        }
        reader.join().unwrap();
        assert_eq!(
            std::fs::metadata(path(dir.path())).unwrap().len(),
            RECORD_LEN as u64
        );
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 1, "only the deadline file");
    }

    /// A file replaced behind the agent (an operator, an older agent's rename) is reopened,
    /// not written through a stale descriptor; a longer file of an older format is cut to
    /// one record.
    #[test]
    fn a_replaced_file_is_reopened_and_cut_to_one_record() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), Some(10)).unwrap();
        let tmp = dir.path().join("other");
        std::fs::write(
            &tmp,
            format!("armed 5 1 {}{}\n", boot_id(), " ".repeat(300)),
        )
        .unwrap();
        std::fs::rename(&tmp, path(dir.path())).unwrap();
        write(dir.path(), Some(20)).unwrap();
        assert_eq!(read(dir.path()).map(|a| a.deadline_ms), Some(20));
        assert_eq!(
            std::fs::metadata(path(dir.path())).unwrap().len(),
            RECORD_LEN as u64
        );
        write(dir.path(), None).unwrap();
        assert_eq!(read(dir.path()), None);
    }

    #[test]
    fn the_watchdog_sleeps_until_the_deadline_and_polls_without_inotify() {
        let armed = Armed {
            deadline_ms: 10_300,
            agent_pid: 1,
            boot_id: "b".into(),
        };
        let dir = tempfile::tempdir().unwrap();
        let w = Waker::new(dir.path());
        assert!(w.watching(), "inotify is available here");
        assert_eq!(
            w.wait_for(Some(&armed), false, 10_000),
            Duration::from_millis(301)
        );
        assert_eq!(w.wait_for(Some(&armed), false, 5_000), IDLE_CHECK);
        assert_eq!(w.wait_for(None, false, 10_000), IDLE_CHECK);
        assert_eq!(w.wait_for(Some(&armed), true, 10_400), CHECK_EVERY);
        let polling = Waker { changed: None };
        assert_eq!(polling.wait_for(None, false, 0), CHECK_EVERY);
    }

    #[test]
    fn a_write_of_the_file_wakes_the_watchdog_before_its_timer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let w = Waker::new(dir.path());
            let state = dir.path().to_path_buf();
            let writer = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                write(&state, Some(123)).unwrap();
            });
            let started = std::time::Instant::now();
            w.sleep(Duration::from_secs(5)).await;
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "woken by the write, not the timer"
            );
            writer.await.unwrap();
            assert_eq!(read(dir.path()).map(|a| a.deadline_ms), Some(123));
        });
    }

    #[test]
    fn a_deadline_of_another_boot_has_passed() {
        let a = Armed {
            deadline_ms: 10_000,
            agent_pid: 1,
            boot_id: "old".into(),
        };
        assert!(!a.passed(5_000, "old"));
        assert!(a.passed(10_000, "old"));
        assert!(
            a.passed(5_000, "new"),
            "the monotonic clock restarted at boot"
        );
    }
}
