//! The member loop's pgBackRest steps: a standby created from the repository (then it
//! catches up from the archive and streaming, so seeding a remote region does not stream
//! the whole database from the primary), and an old primary's WAL that never reached the
//! archive pushed before `pg_rewind` throws it away.

use std::path::PathBuf;

use crate::pg::{PgError, PgInstance, FENCE_MARKER};

use super::pgbackrest::Pgbackrest;

/// Restores the newest backup into the instance's (missing or empty) data dir as a
/// standby of `host:port` through `slot`. The caller starts it.
pub async fn restore_standby(
    br: &Pgbackrest,
    pg: &PgInstance,
    host: &str,
    port: u16,
    slot: &str,
) -> Result<(), PgError> {
    const STEP: &str = "restore replica from the repository";
    let dir = pg.data_dir().to_path_buf();
    if dir.exists()
        && std::fs::read_dir(&dir)
            .map_err(|e| PgError::io(STEP, dir.clone(), e))?
            .next()
            .is_some()
    {
        return Err(PgError::state(
            STEP,
            format!("data dir {} is not empty", dir.display()),
        ));
    }
    pg.run_as()
        .create_private_dir(&dir)
        .map_err(|e| PgError::io(STEP, dir.clone(), e))?;
    pg.write_files()?;
    br.restore(&dir, &["--type=standby".to_string()]).await?;
    // A copy of a fenced primary's data dir is not fenced.
    let _ = std::fs::remove_file(dir.join(FENCE_MARKER));
    pg.write_conf()?;
    pg.configure_standby(host, port, Some(slot)).await
}

/// What happened to the WAL an old primary had not archived yet.
#[derive(Debug, Default)]
pub struct PushOutcome {
    pub pushed: Vec<String>,
    /// Segment and why it could not be archived: lost from the archive.
    pub lost: Vec<(String, String)>,
}

/// Pushes every WAL file of the stopped data dir whose archiving is still pending
/// (`pg_wal/archive_status/*.ready`) to the repository, oldest first.
pub async fn push_unarchived(br: &Pgbackrest, pg: &PgInstance) -> PushOutcome {
    let wal = pg.data_dir().join("pg_wal");
    let mut ready: Vec<String> = match std::fs::read_dir(wal.join("archive_status")) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".ready"))
                    .map(str::to_string)
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    ready.sort();
    let mut out = PushOutcome::default();
    for name in ready {
        let path: PathBuf = wal.join(&name);
        match br.archive_push(&path).await {
            Ok(()) => {
                // As the archiver would: the file is archived, Postgres may recycle it.
                let status = wal.join("archive_status");
                let _ = std::fs::rename(
                    status.join(format!("{name}.ready")),
                    status.join(format!("{name}.done")),
                );
                out.pushed.push(name)
            }
            Err(e) => out.lost.push((name, e.to_string())),
        }
    }
    out
}

/// Spacing of `stanza-create` attempts that failed (repository unreachable, ...).
const STANZA_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Makes sure, once per agent run, that the stanza exists while this member is the
/// primary (archive-push fails until it does). A failure is logged and retried later; it
/// never holds up the primary's other duties.
#[derive(Debug, Default)]
pub struct StanzaGuard {
    done: bool,
    last_try: Option<std::time::Instant>,
}

impl StanzaGuard {
    pub async fn ensure(&mut self, config: &crate::config::Config) {
        if self.done || self.last_try.is_some_and(|t| t.elapsed() < STANZA_RETRY) {
            return;
        }
        let Some(br) = Pgbackrest::from_config(config) else {
            self.done = true;
            return;
        };
        self.last_try = Some(std::time::Instant::now());
        let res = match br {
            Ok(br) => br.stanza_create().await,
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => {
                tracing::info!("pgBackRest stanza ready");
                self.done = true;
            }
            Err(e) => tracing::warn!(
                "pgBackRest stanza-create failed (WAL archiving fails until it succeeds; retried in {} s): {e}",
                STANZA_RETRY.as_secs()
            ),
        }
    }
}
