//! This member's `pgbackrest server` (TLS with client certificates): what a backup taken on
//! a standby reaches the primary through (pgBackRest's `backup-standby` runs
//! `pg_backup_start`/`pg_backup_stop` on the primary and copies the files from the
//! standby). Owns the server's own config file and the supervised process: started when
//! `[backup] server_port` is set, restarted (bounded backoff) when it exits, and when the
//! set of clients it may serve changes — the cluster's data members (and any
//! `server_clients`, e.g. a repository host that pulls backups), authorized by the CN of
//! their client certificates. The process dies with the agent (`PR_SET_PDEATHSIG`), so
//! a killed agent leaves no server holding the port for the next one.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::ServerTls;
use super::pgbackrest::Pgbackrest;
use crate::agent::Shared;
use crate::raft::intent::{Intent, MemberKind};

/// How often the supervisor looks at the process and the member set.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Longest wait before starting a server that keeps exiting again.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A server that ran this long before it exited was healthy: the backoff starts over.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Bound on waiting for a server we stopped to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The names the server authorizes: every data member of the cluster, sorted.
pub fn clients(intent: &Intent) -> Vec<String> {
    intent
        .members
        .values()
        .filter(|m| m.kind == MemberKind::Data)
        .map(|m| m.name.clone())
        .collect()
}

/// The server's config file: where it logs and locks, its TLS settings, and one
/// `tls-server-auth` line per client CN, each for this cluster's stanza only.
pub fn render_conf(br: &Pgbackrest, tls: &ServerTls, clients: &[String]) -> String {
    let mut s = String::from(
        "# Written by Meridian for this member's pgbackrest server; rewritten when the members change.\n[global]\n",
    );
    let mut kv = |k: &str, v: String| s.push_str(&format!("{k}={v}\n"));
    kv("log-path", br.dir().join("log").display().to_string());
    kv("lock-path", br.dir().join("lock").display().to_string());
    kv("log-level-console", "warn".into());
    kv("log-level-file", "info".into());
    kv("tls-server-address", tls.address.clone());
    kv("tls-server-port", tls.port.to_string());
    kv("tls-server-cert-file", tls.cert_file.display().to_string());
    kv("tls-server-key-file", tls.key_file.display().to_string());
    kv("tls-server-ca-file", tls.ca_file.display().to_string());
    for c in clients {
        kv("tls-server-auth", format!("{c}={}", br.stanza()));
    }
    s
}

fn conf_path(br: &Pgbackrest) -> PathBuf {
    br.dir().join("pgbackrest-server.conf")
}

/// Runs until the agent stops (the task is aborted; the process goes with it).
pub async fn run(shared: Arc<Shared>) {
    let br = match Pgbackrest::from_config(&shared.config) {
        Some(Ok(br)) => br,
        _ => return,
    };
    let Some(tls) = br.cfg.server.clone() else {
        return;
    };
    let mut child: Option<(tokio::process::Child, Instant)> = None;
    let mut running_conf = String::new();
    let mut backoff = Duration::from_secs(1);
    let mut not_before = Instant::now();
    loop {
        let mut names = clients(&shared.applied().intent);
        if !names.is_empty() {
            names.extend(tls.extra_clients.iter().cloned());
            names.sort();
            names.dedup();
        }
        let conf = render_conf(&br, &tls, &names);
        if let Some((c, started)) = child.as_mut() {
            match c.try_wait() {
                Ok(None) if conf == running_conf => {}
                Ok(None) => {
                    tracing::info!("pgbackrest server: the data members changed, restarting it");
                    stop(c).await;
                    child = None;
                }
                Ok(Some(status)) => {
                    let ran = started.elapsed();
                    backoff = if ran >= HEALTHY_AFTER {
                        Duration::from_secs(1)
                    } else {
                        (backoff * 2).min(MAX_BACKOFF)
                    };
                    tracing::warn!(
                        "pgbackrest server on port {} exited ({status}) after {} s; starting it again in {} s (its log: {})",
                        tls.port,
                        ran.as_secs(),
                        backoff.as_secs(),
                        br.dir().join("log").display()
                    );
                    not_before = Instant::now() + backoff;
                    child = None;
                }
                Err(e) => {
                    tracing::warn!("pgbackrest server: cannot read its state: {e}");
                    stop(c).await;
                    child = None;
                }
            }
        }
        // Before this member knows the cluster's data members (it just joined) there is
        // no one to serve, and pgBackRest refuses a server without tls-server-auth.
        let has_clients = conf.contains("tls-server-auth=");
        if !has_clients {
            if let Some((c, _)) = child.as_mut() {
                stop(c).await;
                child = None;
            }
        }
        if child.is_none() && has_clients && Instant::now() >= not_before {
            match start(&br, &conf) {
                Ok(c) => {
                    tracing::info!(
                        "pgbackrest server listening on {}:{} for {} data members",
                        tls.address,
                        tls.port,
                        conf.matches("tls-server-auth=").count()
                    );
                    running_conf = conf;
                    child = Some((c, Instant::now()));
                }
                Err(e) => {
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    not_before = Instant::now() + backoff;
                    tracing::warn!(
                        "pgbackrest server: {e:#}; trying again in {} s",
                        backoff.as_secs()
                    );
                }
            }
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

fn start(br: &Pgbackrest, conf: &str) -> anyhow::Result<tokio::process::Child> {
    use anyhow::Context;
    br.write_conf().context("writing pgbackrest.conf")?;
    let path = conf_path(br);
    br.run_as()
        .write_file(&path, conf.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))?;
    let mut cmd = tokio::process::Command::new(br.bin());
    cmd.arg(format!("--config={}", path.display()))
        .arg("server")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    br.run_as().apply(&mut cmd);
    if let Some(pf) = br.passfile() {
        cmd.env("PGPASSFILE", pf);
    }
    // SAFETY: the closure runs in the forked child before exec and makes one
    // async-signal-safe system call. It runs after the uid change, which would clear the
    // parent-death signal had it been set before.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {} server", br.bin().display()))
}

async fn stop(c: &mut tokio::process::Child) {
    if let Some(pid) = c.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(STOP_TIMEOUT, c.wait()).await.is_err() {
        let _ = c.start_kill();
        let _ = tokio::time::timeout(STOP_TIMEOUT, c.wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_data_member_is_a_client_for_the_stanza_only() {
        let tls = ServerTls {
            address: "*".into(),
            port: 8432,
            cert_file: "/c/s.pem".into(),
            key_file: "/c/s.key".into(),
            ca_file: "/c/ca.pem".into(),
            client_cert_file: "/c/c.pem".into(),
            client_key_file: "/c/c.key".into(),
            extra_clients: vec![],
        };
        let br = Pgbackrest::for_tests("prod", "/state/pgbackrest".into());
        let conf = render_conf(&br, &tls, &["a1".into(), "b1".into()]);
        assert!(conf.contains("tls-server-port=8432\n"), "{conf}");
        assert!(conf.contains("tls-server-ca-file=/c/ca.pem\n"), "{conf}");
        assert!(
            conf.contains("tls-server-auth=a1=prod\ntls-server-auth=b1=prod\n"),
            "{conf}"
        );
        assert!(conf.contains("log-path=/state/pgbackrest/log\n"), "{conf}");
        assert!(
            !conf.contains("=*\ntls-server-auth"),
            "no wildcard stanza: {conf}"
        );
    }
}
