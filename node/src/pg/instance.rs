//! One local PostgreSQL instance and every action on it: initdb, start/stop, promote,
//! re-point as a standby, slots, `synchronous_standby_names`, clone, rewind and fencing.
//!
//! Meridian's settings live in `meridian.conf` (included from `postgresql.conf`) and in
//! `pg_hba.conf`, both rewritten by [`PgInstance::write_conf`]; replication targets go to
//! `postgresql.auto.conf` (ALTER SYSTEM when running, edited in place when stopped), which
//! Postgres reads last, so they win over anything `pg_basebackup -R` or `pg_rewind` copied.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_postgres::{Client, NoTls};

use crate::types::Lsn;

use super::access::{
    render_hba, render_ident, render_passfile, ClientSsl, HbaSpec, PgRole, PgRoles, ServerSsl,
};
use super::binaries::PgBinaries;
use super::conninfo::{conninfo, quote_conf_value, quote_literal};
use super::error::{tail, PgError};
use super::exec::{kill_group, pid_alive, run_tool, RunAs};
use super::tls::PgTls;

/// Marker file in the data dir of a fenced instance: nothing may start it as a primary.
pub const FENCE_MARKER: &str = "meridian.fenced";
/// Meridian's settings file, included from `postgresql.conf`.
const MERIDIAN_CONF: &str = "meridian.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'meridian.conf'";
const LOG_TAIL_CHARS: usize = 1500;

/// Bounds on the steps that take no explicit timeout.
/// Which `postmaster.pid` was read: a new postmaster writes a new file, and Postgres
/// rewrites its status lines in place (new mtime), so a changed file never matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PidFileKey {
    ino: u64,
    mtime_ns: (i64, i64),
    len: u64,
}

/// A `postmaster.pid` read: which file, and the pid its first line held.
type PidFileRead = (PidFileKey, Option<i32>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgTimeouts {
    /// Opening a SQL session.
    pub connect: Duration,
    /// One SQL step (slot, ALTER SYSTEM + reload + verify, promote's write check).
    pub sql: Duration,
    /// A whole [`PgInstance::probe`].
    pub probe: Duration,
    /// Long tools: initdb, pg_basebackup, pg_rewind.
    pub tool: Duration,
}

impl Default for PgTimeouts {
    fn default() -> Self {
        PgTimeouts {
            connect: Duration::from_secs(2),
            sql: Duration::from_secs(5),
            probe: Duration::from_secs(2),
            tool: Duration::from_secs(120),
        }
    }
}

/// How `pg_ctl stop` stops the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, write a shutdown checkpoint: a clean stop.
    Fast,
    /// Kill everything at once; the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    fn as_arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// How a managed Postgres is reached and who may log in: the agent sets it from its config
/// ([`PgInstance::with_access`]); without it an instance listens on the loopback address
/// with `trust` (or scram with a superuser password) for its one superuser (the test
/// fixtures' setup).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgAccess {
    /// `listen_addresses` entries (`*` or IP addresses); never empty.
    pub listen_addresses: Vec<String>,
    /// Unix socket directory; when set, the agent's own sessions use it.
    pub socket_dir: Option<PathBuf>,
    pub roles: PgRoles,
    pub hba: HbaSpec,
    /// TLS of Meridian's sessions to other members' Postgres (libpq and tokio-postgres).
    pub client_ssl: ClientSsl,
    /// Postgres' own TLS.
    pub server_ssl: Option<ServerSsl>,
    /// Directory (in the agent's state dir) for the passfile and the server's TLS files,
    /// owned by the Postgres OS user, mode 0700; None = passwords through the environment.
    pub files_dir: Option<PathBuf>,
    /// `max_slot_wal_keep_size`; None leaves Postgres' default.
    pub max_slot_wal_keep_size: Option<String>,
}

impl PgAccess {
    /// The fixtures' setup: loopback only, one superuser.
    pub fn loopback(superuser: &str, password: Option<String>) -> PgAccess {
        let with_password = password.is_some();
        PgAccess {
            listen_addresses: vec![std::net::Ipv4Addr::LOCALHOST.to_string()],
            socket_dir: None,
            roles: PgRoles::all_superuser(superuser, password),
            hba: HbaSpec::loopback(with_password),
            client_ssl: ClientSsl::default(),
            server_ssl: None,
            files_dir: None,
            max_slot_wal_keep_size: None,
        }
    }

    /// Where the agent connects for its own sessions: the socket directory, else the first
    /// listen address (the loopback address for `*`).
    pub fn local_host(&self) -> String {
        if let Some(d) = &self.socket_dir {
            return d.display().to_string();
        }
        match self.listen_addresses.first().map(String::as_str) {
            Some("*") | Some("0.0.0.0") | None => std::net::Ipv4Addr::LOCALHOST.to_string(),
            Some("::") => std::net::Ipv6Addr::LOCALHOST.to_string(),
            Some(a) => a.to_string(),
        }
    }

    pub fn passfile(&self) -> Option<PathBuf> {
        self.files_dir.as_ref().map(|d| d.join("pgpass"))
    }
}

/// One PostgreSQL instance, managed through its data dir.
#[derive(Clone)]
pub struct PgInstance {
    bin: PgBinaries,
    data_dir: PathBuf,
    log_file: PathBuf,
    /// Where the agent's own sessions connect ([`PgAccess::local_host`]).
    host: String,
    port: u16,
    run_as: RunAs,
    access: PgAccess,
    tls: PgTls,
    application_name: String,
    timeouts: PgTimeouts,
    settings: Vec<(String, String)>,
    /// The kept probe session, shared by clones (`probe.rs`).
    kept: std::sync::Arc<super::probe::KeptSession>,
    /// The last `postmaster.pid` read, by the file's identity (inode, mtime, size): the
    /// agent asks several times a round, and a `stat` is one syscall where a read is five.
    pid_file: std::sync::Arc<std::sync::Mutex<Option<PidFileRead>>>,
    /// The cluster's Postgres parameters with this member's overrides
    /// (`crate::pgparams::effective`), rendered into `meridian.conf`; shared by clones so
    /// that every write of the file (init, clone, rewind, adoption) carries them.
    parameters: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>,
}

impl fmt::Debug for PgInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgInstance")
            .field("data_dir", &self.data_dir)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("run_as", &self.run_as)
            .field("roles", &self.access.roles)
            .field("application_name", &self.application_name)
            .finish_non_exhaustive()
    }
}

impl PgInstance {
    /// An instance with data in `data_dir` on `port`, known to its primary as
    /// `application_name` (the member name), with the fixtures' access
    /// ([`PgAccess::loopback`]: superuser `postgres`, no password) until
    /// [`PgInstance::with_access`]; server log at `<data_dir>.log`.
    pub fn new(
        bin: PgBinaries,
        data_dir: impl Into<PathBuf>,
        port: u16,
        application_name: impl Into<String>,
        run_as: RunAs,
    ) -> PgInstance {
        let data_dir = data_dir.into();
        let mut log = data_dir.clone().into_os_string();
        log.push(".log");
        PgInstance {
            bin,
            data_dir,
            log_file: PathBuf::from(log),
            host: PgAccess::loopback("postgres", None).local_host(),
            port,
            run_as,
            access: PgAccess::loopback("postgres", None),
            tls: PgTls::default(),
            application_name: application_name.into(),
            timeouts: PgTimeouts::default(),
            settings: Vec::new(),
            kept: Default::default(),
            pid_file: Default::default(),
            parameters: Default::default(),
        }
    }

    /// The fixtures' access for superuser `name` (keeps a password set before).
    pub fn with_superuser(mut self, name: impl Into<String>) -> Self {
        let pw = self.access.roles.superuser.password.clone();
        self.access = PgAccess::loopback(&name.into(), pw);
        self.host = self.access.local_host();
        self
    }

    /// The fixtures' access with a superuser password: host connections then need
    /// scram-sha-256.
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        let name = self.access.roles.superuser.name.clone();
        self.access = PgAccess::loopback(&name, Some(password.into()));
        self.host = self.access.local_host();
        self
    }

    /// Listen addresses, roles, `pg_hba.conf`, TLS and the passfile from the agent's
    /// config. Fails when the client TLS setting cannot be built (unreadable root CA).
    pub fn with_access(mut self, access: PgAccess) -> Result<Self, PgError> {
        self.tls = PgTls::from_client_ssl(&access.client_ssl)
            .map_err(|why| PgError::state("TLS to other members' Postgres", why))?;
        self.host = access.local_host();
        self.access = access;
        Ok(self)
    }

    pub fn access(&self) -> &PgAccess {
        &self.access
    }

    /// The client TLS for sessions to other members' Postgres.
    pub fn tls(&self) -> &PgTls {
        &self.tls
    }

    pub fn with_log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = path.into();
        self
    }

    pub fn with_timeouts(mut self, timeouts: PgTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// An extra server setting written to `meridian.conf` (value written verbatim, quote it
    /// yourself where Postgres needs quotes).
    pub fn with_setting(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((key.into(), value.into()));
        self
    }

    /// Replaces the operator's parameters rendered into `meridian.conf`; true when they
    /// changed (the caller then rewrites the file and reloads).
    pub fn set_parameters(&self, next: std::collections::BTreeMap<String, String>) -> bool {
        let mut cur = self.parameters.lock().unwrap_or_else(|e| e.into_inner());
        if *cur == next {
            return false;
        }
        *cur = next;
        true
    }

    /// The operator's parameters currently rendered into `meridian.conf`.
    pub fn parameters(&self) -> std::collections::BTreeMap<String, String> {
        self.parameters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn bin(&self) -> &PgBinaries {
        &self.bin
    }
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn run_as(&self) -> &RunAs {
        &self.run_as
    }
    pub fn superuser(&self) -> &str {
        &self.access.roles.superuser.name
    }
    pub fn roles(&self) -> &PgRoles {
        &self.access.roles
    }
    pub fn application_name(&self) -> &str {
        &self.application_name
    }
    pub fn timeouts(&self) -> PgTimeouts {
        self.timeouts
    }
    pub(crate) fn kept(&self) -> &super::probe::KeptSession {
        &self.kept
    }

    /// libpq conninfo for a superuser session to this instance (without the password).
    pub fn conninfo(&self) -> String {
        let port = self.port.to_string();
        conninfo([
            ("host", self.host.as_str()),
            ("port", port.as_str()),
            ("user", self.superuser()),
            ("dbname", "postgres"),
        ])
    }

    /// Where the lease gate ([`super::gate`]) connects: this instance, as the replication
    /// role, over the agent's own path (the socket directory, else the listen address).
    pub fn gate_target(&self) -> super::gate::GateTarget {
        let role = &self.access.roles.replication;
        super::gate::GateTarget {
            host: self.host.clone(),
            port: self.port,
            user: role.name.clone(),
            password: role.password.clone(),
            connect_timeout: self.timeouts.connect,
        }
    }

    /// tokio-postgres settings for a local superuser session (password included).
    pub fn client_config(&self) -> tokio_postgres::Config {
        self.session_config(&self.host, self.port, &self.access.roles.superuser)
    }

    /// tokio-postgres settings for a session as `role` to `host:port` (another member's
    /// Postgres or this one). Note `Config::host` appends: never add a host to one of these.
    pub fn session_config(&self, host: &str, port: u16, role: &PgRole) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(host)
            .port(port)
            .user(&role.name)
            .dbname("postgres")
            .application_name("meridian")
            .connect_timeout(self.timeouts.connect);
        if let Some(p) = &role.password {
            c.password(p.as_str());
        }
        c
    }

    /// A session as `role` to another member's Postgres at `host:port`, over the
    /// configured client TLS, bounded by `timeout`; the connection task is returned so the
    /// caller can end it.
    pub async fn connect_remote(
        &self,
        step: &'static str,
        host: &str,
        port: u16,
        role: &PgRole,
        timeout: Duration,
    ) -> Result<(Client, tokio::task::JoinHandle<()>), PgError> {
        let mut config = self.session_config(host, port, role);
        config.connect_timeout(timeout);
        tokio::time::timeout(timeout, super::tls::connect(&config, &self.tls))
            .await
            .map_err(|_| PgError::Timeout {
                step,
                timeout_ms: timeout.as_millis() as u64,
            })?
            .map_err(|e| PgError::sql(step, e))
    }

    /// A superuser session, bounded by the connect timeout; its connection task is spawned.
    pub async fn connect(&self) -> Result<Client, PgError> {
        self.connect_within("connect", self.timeouts.connect).await
    }

    pub(crate) async fn connect_within(
        &self,
        step: &'static str,
        timeout: Duration,
    ) -> Result<Client, PgError> {
        self.connect_local_as(step, &self.access.roles.superuser, timeout)
            .await
    }

    /// A local session as the monitor role (probes).
    pub(crate) async fn connect_monitor_within(
        &self,
        step: &'static str,
        timeout: Duration,
    ) -> Result<Client, PgError> {
        self.connect_local_as(step, &self.access.roles.monitor, timeout)
            .await
    }

    async fn connect_local_as(
        &self,
        step: &'static str,
        role: &PgRole,
        timeout: Duration,
    ) -> Result<Client, PgError> {
        let mut config = self.session_config(&self.host, self.port, role);
        config.connect_timeout(timeout);
        let (client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
            .await
            .map_err(|_| PgError::Timeout {
                step,
                timeout_ms: timeout.as_millis() as u64,
            })?
            .map_err(|e| PgError::sql(step, e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
        Ok(client)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.data_dir.join(name)
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.bin.tool(name)
    }

    /// How libpq tools logging in as `role` find its password: the passfile when there is
    /// one, else `PGPASSWORD`.
    fn password_env(&self, role: &PgRole) -> Vec<(String, String)> {
        if let Some(pf) = self.access.passfile() {
            return vec![("PGPASSFILE".into(), pf.display().to_string())];
        }
        match &role.password {
            Some(p) => vec![("PGPASSWORD".into(), p.clone())],
            None => vec![],
        }
    }

    /// libpq conninfo for a session as `role` to `host:port` over the client TLS setting,
    /// without any password (the passfile or the environment provides it).
    fn remote_conninfo(
        &self,
        host: &str,
        port: u16,
        role: &PgRole,
        dbname: Option<&str>,
    ) -> String {
        let port = port.to_string();
        let ssl = self.access.client_ssl.conninfo_pairs();
        let mut pairs: Vec<(&str, &str)> = vec![
            ("host", host),
            ("port", port.as_str()),
            ("user", role.name.as_str()),
        ];
        if let Some(db) = dbname {
            pairs.push(("dbname", db));
        }
        pairs.push(("connect_timeout", "5"));
        for (k, v) in &ssl {
            pairs.push((k, v.as_str()));
        }
        conninfo(pairs)
    }

    /// Writes the passfile and the server's TLS files into `files_dir` (a no-op without
    /// one): the passfile 0600, the key 0600, all owned by the Postgres OS user.
    pub fn write_files(&self) -> Result<(), PgError> {
        const STEP: &str = "write passfile and TLS files";
        let Some(dir) = &self.access.files_dir else {
            return Ok(());
        };
        self.run_as
            .create_private_dir(dir)
            .map_err(|e| PgError::io(STEP, dir.clone(), e))?;
        let pf = dir.join("pgpass");
        self.run_as
            .write_file(&pf, render_passfile(&self.access.roles).as_bytes(), 0o600)
            .map_err(|e| PgError::io(STEP, pf.clone(), e))?;
        if let Some(ssl) = &self.access.server_ssl {
            for (src, name, mode) in [
                (Some(&ssl.cert_file), "server.crt", 0o644),
                (Some(&ssl.key_file), "server.key", 0o600),
                (ssl.ca_file.as_ref(), "ca.crt", 0o644),
            ] {
                let Some(src) = src else { continue };
                let bytes = std::fs::read(src).map_err(|e| PgError::io(STEP, src.clone(), e))?;
                let dst = dir.join(name);
                self.run_as
                    .write_file(&dst, &bytes, mode)
                    .map_err(|e| PgError::io(STEP, dst.clone(), e))?;
            }
        }
        Ok(())
    }

    /// Postgres' `ssl*` settings for `meridian.conf` (the copies in `files_dir`).
    fn ssl_settings(&self) -> Vec<(String, String)> {
        let (Some(ssl), Some(dir)) = (&self.access.server_ssl, &self.access.files_dir) else {
            return vec![];
        };
        let path = |n: &str| quote_conf_value(&dir.join(n).display().to_string());
        let mut v = vec![
            ("ssl".to_string(), "on".to_string()),
            ("ssl_cert_file".into(), path("server.crt")),
            ("ssl_key_file".into(), path("server.key")),
        ];
        if ssl.ca_file.is_some() {
            v.push(("ssl_ca_file".into(), path("ca.crt")));
        }
        v
    }

    /// Fails unless the data dir is missing or empty; then creates it 0700 for the OS user.
    fn prepare_empty_data_dir(&self, step: &'static str) -> Result<(), PgError> {
        let dir = &self.data_dir;
        if dir.exists() {
            let mut entries =
                std::fs::read_dir(dir).map_err(|e| PgError::io(step, dir.clone(), e))?;
            if entries.next().is_some() {
                return Err(PgError::state(
                    step,
                    format!("data dir {} is not empty", dir.display()),
                ));
            }
        }
        self.run_as
            .create_private_dir(dir)
            .map_err(|e| PgError::io(step, dir.clone(), e))
    }

    /// Creates the cluster with initdb (data checksums on) and writes Meridian's config
    /// (`pg_hba.conf` from [`PgAccess::hba`] replaces initdb's).
    pub async fn init(&self) -> Result<(), PgError> {
        const STEP: &str = "initdb";
        self.prepare_empty_data_dir(STEP)?;
        let superuser = &self.access.roles.superuser;
        let mut args: Vec<String> = vec![
            "-D".into(),
            self.data_dir.display().to_string(),
            "-U".into(),
            superuser.name.clone(),
            "--encoding=UTF8".into(),
            "--locale=C".into(),
            "--data-checksums".into(),
            "--auth-local=trust".into(),
        ];
        // The password reaches initdb through a 0600 file, never the command line.
        let pwfile = superuser.password.as_ref().map(|_| {
            let mut p = self.data_dir.clone().into_os_string();
            p.push(".pwfile");
            PathBuf::from(p)
        });
        if let (Some(pw), Some(path)) = (&superuser.password, &pwfile) {
            self.run_as
                .write_file(path, format!("{pw}\n").as_bytes(), 0o600)
                .map_err(|e| PgError::io(STEP, path.clone(), e))?;
            args.push(format!("--pwfile={}", path.display()));
            args.push("--auth-host=scram-sha-256".into());
        } else {
            args.push("--auth-host=trust".into());
        }
        let res = run_tool(
            STEP,
            &self.tool("initdb"),
            &args,
            &self.run_as,
            &[],
            self.timeouts.tool,
        )
        .await;
        if let Some(path) = &pwfile {
            let _ = std::fs::remove_file(path);
        }
        res?;
        self.write_conf()
    }

    /// (Re)writes `meridian.conf`, its include line in `postgresql.conf` (appended once),
    /// `pg_hba.conf`, `pg_ident.conf`, the passfile and the TLS files: the one writer of
    /// Meridian's settings, after init, clone, rewind, re-clone and adoption alike.
    pub fn write_conf(&self) -> Result<(), PgError> {
        const STEP: &str = "write config";
        self.write_files()?;
        let mut extra = vec![
            (
                "hba_file".to_string(),
                quote_conf_value(&self.path("pg_hba.conf").display().to_string()),
            ),
            (
                "ident_file".to_string(),
                quote_conf_value(&self.path("pg_ident.conf").display().to_string()),
            ),
        ];
        if let Some(sz) = &self.access.max_slot_wal_keep_size {
            extra.push(("max_slot_wal_keep_size".into(), quote_conf_value(sz)));
        }
        extra.extend(self.ssl_settings());
        extra.extend(self.settings.iter().cloned());
        let operator: Vec<(String, String)> = self
            .parameters()
            .into_iter()
            // Checked when set; skipped again here so a name Meridian owns never
            // overrides the agent's own line.
            .filter(|(k, _)| crate::pgparams::owned(k).is_none())
            .map(|(k, v)| (k, quote_conf_value(&v)))
            .collect();
        let conf = render_meridian_conf(
            &self.access.listen_addresses.join(","),
            self.access.socket_dir.as_deref(),
            self.port,
            &self.application_name,
            &extra,
            &operator,
        );
        if let Some(dir) = &self.access.socket_dir {
            self.run_as
                .create_private_dir(dir)
                .map_err(|e| PgError::io(STEP, dir.clone(), e))?;
        }
        let p = self.path(MERIDIAN_CONF);
        self.run_as
            .write_file(&p, conf.as_bytes(), 0o600)
            .map_err(|e| PgError::io(STEP, p.clone(), e))?;

        let pg_conf = self.path("postgresql.conf");
        let current =
            std::fs::read_to_string(&pg_conf).map_err(|e| PgError::io(STEP, pg_conf.clone(), e))?;
        if let Some(next) = with_include_line(&current) {
            self.run_as
                .write_file(&pg_conf, next.as_bytes(), 0o600)
                .map_err(|e| PgError::io(STEP, pg_conf.clone(), e))?;
        }

        let hba = render_hba(&self.access.hba, &self.access.roles);
        let p = self.path("pg_hba.conf");
        self.run_as
            .write_file(&p, hba.as_bytes(), 0o600)
            .map_err(|e| PgError::io(STEP, p.clone(), e))?;
        let ident = render_ident(&self.access.hba, &self.access.roles);
        let p = self.path("pg_ident.conf");
        self.run_as
            .write_file(&p, ident.as_bytes(), 0o600)
            .map_err(|e| PgError::io(STEP, p.clone(), e))
    }

    /// True when `postgresql.conf` already includes Meridian's settings (a data dir
    /// Meridian created or adopted before).
    pub fn has_meridian_include(&self) -> bool {
        std::fs::read_to_string(self.path("postgresql.conf"))
            .is_ok_and(|c| with_include_line(&c).is_none())
    }

    /// The postmaster's pid from `postmaster.pid`, if the file is there.
    pub fn postmaster_pid(&self) -> Option<i32> {
        use std::os::unix::fs::MetadataExt;
        let path = self.path("postmaster.pid");
        let meta = std::fs::metadata(&path).ok()?;
        let key = PidFileKey {
            ino: meta.ino(),
            mtime_ns: (meta.mtime(), meta.mtime_nsec()),
            len: meta.len(),
        };
        let mut cache = self.pid_file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, pid)) = cache.as_ref() {
            if *k == key {
                return *pid;
            }
        }
        let pid = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse().ok());
        *cache = Some((key, pid));
        pid
    }

    /// True when `postmaster.pid` names a live process.
    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some_and(pid_alive)
    }

    /// Removes a `postmaster.pid` whose process is gone. A SIGKILLed postmaster whose
    /// parent does not reap it stays a zombie, and Postgres takes a zombie's pid for a
    /// live postmaster and refuses to start ("lock file already exists").
    fn remove_stale_lock(&self, step: &'static str) -> Result<(), PgError> {
        let lock = self.path("postmaster.pid");
        match self.postmaster_pid() {
            Some(pid) if !pid_alive(pid) => {
                tracing::info!(pid, data_dir = %self.data_dir.display(), "removing stale postmaster.pid of a dead postmaster");
                match std::fs::remove_file(&lock) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(PgError::io(step, lock, e)),
                }
            }
            _ => Ok(()),
        }
    }

    /// True when `standby.signal` is present: the next start enters standby mode.
    pub fn has_standby_signal(&self) -> bool {
        self.path("standby.signal").exists()
    }

    fn ensure_log_file(&self, step: &'static str) -> Result<(), PgError> {
        let p = &self.log_file;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| PgError::io(step, p.clone(), e))?;
        self.run_as
            .chown(p)
            .map_err(|e| PgError::io(step, p.clone(), e))
    }

    fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.log_file)
            .map(|s| tail(&s, LOG_TAIL_CHARS))
            .unwrap_or_default()
    }

    fn with_log(&self, e: PgError) -> PgError {
        match e {
            PgError::ToolFailed {
                step,
                tool,
                status,
                stderr_tail,
            } => PgError::ToolFailed {
                step,
                tool,
                status,
                stderr_tail: format!("{stderr_tail}; server log: {}", self.log_tail()),
            },
            PgError::ToolTimeout {
                step,
                tool,
                timeout_ms,
                ..
            } => PgError::ToolTimeout {
                step,
                tool,
                timeout_ms,
                stderr_tail: format!("server log: {}", self.log_tail()),
            },
            other => other,
        }
    }

    /// Starts the server and waits until it accepts connections. Refuses a fenced data dir
    /// unless it will come up as a standby. A no-op when already running.
    pub async fn start(&self, timeout: Duration) -> Result<(), PgError> {
        const STEP: &str = "start";
        if self.is_fenced() && !self.has_standby_signal() {
            return Err(PgError::Fenced {
                step: STEP,
                data_dir: self.data_dir.clone(),
                marker: self.path(FENCE_MARKER),
            });
        }
        if self.is_running() {
            return Ok(());
        }
        self.remove_stale_lock(STEP)?;
        self.ensure_log_file(STEP)?;
        let log = self.log_file.display().to_string();
        self.pg_ctl(STEP, "start", &["-l", &log], timeout).await
    }

    /// Runs `pg_ctl <action> -D <data dir> <extra> -w -t <secs> -s`, bounded a little past
    /// pg_ctl's own wait; a failure carries the server log's tail.
    async fn pg_ctl(
        &self,
        step: &'static str,
        action: &str,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<(), PgError> {
        let secs = timeout.as_secs().max(1).to_string();
        let mut args = vec![
            action.to_string(),
            "-D".into(),
            self.data_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend(["-w".into(), "-t".into(), secs, "-s".into()]);
        run_tool(
            step,
            &self.tool("pg_ctl"),
            &args,
            &self.run_as,
            &[],
            timeout + Duration::from_secs(2),
        )
        .await
        .map_err(|e| self.with_log(e))?;
        Ok(())
    }

    /// Stops the server with `pg_ctl stop -m <mode> -w`. A no-op when not running.
    pub async fn stop(&self, mode: StopMode, timeout: Duration) -> Result<(), PgError> {
        const STEP: &str = "stop";
        if !self.is_running() {
            return Ok(());
        }
        self.pg_ctl(STEP, "stop", &["-m", mode.as_arg()], timeout)
            .await
    }

    /// Promotes a standby (`pg_promote(true, wait)`), then checks it really accepts writes:
    /// out of recovery, and a read-write transaction that takes an xid commits. A primary
    /// only gets the write check. Refuses a fenced data dir.
    pub async fn promote(&self, wait: Duration) -> Result<(), PgError> {
        const STEP: &str = "promote";
        if self.is_fenced() {
            return Err(PgError::Fenced {
                step: STEP,
                data_dir: self.data_dir.clone(),
                marker: self.path(FENCE_MARKER),
            });
        }
        let client = self
            .connect_within("promote: connect", self.timeouts.connect)
            .await?;
        let in_recovery = self
            .bounded_sql("promote: pg_is_in_recovery", self.timeouts.sql, async {
                client.query_one("SELECT pg_is_in_recovery()", &[]).await
            })
            .await?
            .get::<_, bool>(0);
        if in_recovery {
            let secs = wait.as_secs().clamp(1, i32::MAX as u64) as i32;
            let promoted: bool = self
                .bounded_sql(
                    "promote: pg_promote",
                    wait + self.timeouts.sql,
                    client.query_one("SELECT pg_promote(true, $1)", &[&secs]),
                )
                .await?
                .get(0);
            if !promoted {
                return Err(PgError::state(
                    "promote: pg_promote",
                    format!("still in recovery after {} s", secs),
                ));
            }
        }
        self.check_writable(&client).await
    }

    /// Whether the local server is a standby (in recovery), in one bounded session.
    pub async fn is_in_recovery(&self) -> Result<bool, PgError> {
        const STEP: &str = "read pg_is_in_recovery()";
        let client = self.connect().await?;
        let row = self
            .bounded_sql(
                STEP,
                self.timeouts.sql,
                client.query_one("SELECT pg_is_in_recovery()", &[]),
            )
            .await?;
        Ok(row.get::<_, bool>(0))
    }

    /// Fails unless `client`'s server is out of recovery and commits a read-write
    /// transaction. The commit is local-only so a stale `synchronous_standby_names` cannot
    /// hang the check.
    async fn check_writable(&self, client: &Client) -> Result<(), PgError> {
        let row = self
            .bounded_sql(
                "promote: check recovery ended",
                self.timeouts.sql,
                client.query_one("SELECT pg_is_in_recovery()", &[]),
            )
            .await?;
        if row.get::<_, bool>(0) {
            return Err(PgError::state(
                "promote: check recovery ended",
                "server is still in recovery",
            ));
        }
        self.bounded_sql(
            "promote: check a write commits",
            self.timeouts.sql,
            client.batch_execute(
                "BEGIN READ WRITE; SET LOCAL synchronous_commit = local; \
                 SELECT txid_current(); COMMIT",
            ),
        )
        .await
    }

    /// Runs each statement on its own (ALTER SYSTEM refuses to run in the implicit
    /// transaction of a multi-statement query), all within one SQL timeout.
    async fn run_each(
        &self,
        step: &'static str,
        client: &Client,
        statements: &[&str],
    ) -> Result<(), PgError> {
        self.bounded_sql(step, self.timeouts.sql, async {
            for s in statements {
                client.batch_execute(s).await?;
            }
            Ok(())
        })
        .await
    }

    async fn bounded_sql<T>(
        &self,
        step: &'static str,
        timeout: Duration,
        fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, PgError> {
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| PgError::Timeout {
                step,
                timeout_ms: timeout.as_millis() as u64,
            })?
            .map_err(|e| PgError::sql(step, e))
    }

    /// The `primary_conninfo` that makes this instance stream from `host:port` as the
    /// replication role under its own application_name, over the client TLS setting. With a
    /// passfile the password stays in it (`passfile=`); only the fixtures, which have none,
    /// put a password here.
    pub fn primary_conninfo(&self, host: &str, port: u16) -> String {
        let role = &self.access.roles.replication;
        let port = port.to_string();
        let passfile = self.access.passfile().map(|p| p.display().to_string());
        let ssl = self.access.client_ssl.conninfo_pairs();
        let mut pairs: Vec<(&str, &str)> = vec![
            ("host", host),
            ("port", port.as_str()),
            ("user", role.name.as_str()),
            ("application_name", self.application_name.as_str()),
            ("connect_timeout", "2"),
        ];
        for (k, v) in &ssl {
            pairs.push((k, v.as_str()));
        }
        match (&passfile, &role.password) {
            (Some(pf), _) => pairs.push(("passfile", pf.as_str())),
            (None, Some(p)) => pairs.push(("password", p.as_str())),
            (None, None) => {}
        }
        conninfo(pairs)
    }

    /// Makes this instance a standby of `host:port` through `slot`: `standby.signal`,
    /// `primary_conninfo`, `primary_slot_name`. On a running server by ALTER SYSTEM and
    /// reload (the WAL receiver restarts on reload since PG 13); on a stopped one by editing
    /// `postgresql.auto.conf`. A running primary only becomes a standby at its next start.
    pub async fn configure_standby(
        &self,
        primary_host: &str,
        primary_port: u16,
        slot: Option<&str>,
    ) -> Result<(), PgError> {
        const STEP: &str = "configure standby";
        let signal = self.path("standby.signal");
        self.run_as
            .write_file(&signal, b"", 0o600)
            .map_err(|e| PgError::io(STEP, signal.clone(), e))?;
        let info = self.primary_conninfo(primary_host, primary_port);
        if self.is_running() {
            let client = self
                .connect_within("configure standby: connect", self.timeouts.connect)
                .await?;
            let slot_sql = match slot {
                Some(s) => format!("ALTER SYSTEM SET primary_slot_name = {}", quote_literal(s)),
                None => "ALTER SYSTEM RESET primary_slot_name".into(),
            };
            let conninfo_sql = format!(
                "ALTER SYSTEM SET primary_conninfo = {}",
                quote_literal(&info)
            );
            self.run_each(
                "configure standby: ALTER SYSTEM",
                &client,
                &[&conninfo_sql, &slot_sql, "SELECT pg_reload_conf()"],
            )
            .await
        } else {
            self.set_auto_conf(
                STEP,
                &[
                    ("primary_conninfo", Some(&info)),
                    ("primary_slot_name", slot),
                ],
            )
        }
    }

    /// Sets (Some) or removes (None) keys in `postgresql.auto.conf` of a stopped server.
    fn set_auto_conf(
        &self,
        step: &'static str,
        kv: &[(&str, Option<&str>)],
    ) -> Result<(), PgError> {
        let p = self.path("postgresql.auto.conf");
        let current = match std::fs::read_to_string(&p) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(PgError::io(step, p, e)),
        };
        let next = edit_auto_conf(&current, kv);
        self.run_as
            .write_file(&p, next.as_bytes(), 0o600)
            .map_err(|e| PgError::io(step, p.clone(), e))
    }

    /// Creates a physical replication slot that reserves WAL at once; a no-op if it exists.
    pub async fn create_slot(&self, name: &str) -> Result<(), PgError> {
        let client = self
            .connect_within("create slot: connect", self.timeouts.connect)
            .await?;
        self.bounded_sql(
            "create slot",
            self.timeouts.sql,
            client.execute(
                "SELECT pg_create_physical_replication_slot($1, true) \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&name],
            ),
        )
        .await
        .map(|_| ())
    }

    /// Drops a replication slot; a no-op if there is none. Fails while a walsender uses it.
    pub async fn drop_slot(&self, name: &str) -> Result<(), PgError> {
        let client = self
            .connect_within("drop slot: connect", self.timeouts.connect)
            .await?;
        self.bounded_sql(
            "drop slot",
            self.timeouts.sql,
            client.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&name],
            ),
        )
        .await
        .map(|_| ())
    }

    /// ALTER SYSTEM SET synchronous_standby_names, reload, and wait (bounded) until the
    /// server reports the new value.
    pub async fn set_synchronous_standby_names(&self, value: &str) -> Result<(), PgError> {
        const STEP: &str = "set synchronous_standby_names";
        let client = self
            .connect_within(
                "set synchronous_standby_names: connect",
                self.timeouts.connect,
            )
            .await?;
        let sql = format!(
            "ALTER SYSTEM SET synchronous_standby_names = {}",
            quote_literal(value)
        );
        self.run_each(STEP, &client, &[&sql, "SELECT pg_reload_conf()"])
            .await?;
        let deadline = Instant::now() + self.timeouts.sql;
        loop {
            let row = self
                .bounded_sql(
                    "set synchronous_standby_names: SHOW",
                    self.timeouts.sql,
                    client.query_one("SHOW synchronous_standby_names", &[]),
                )
                .await?;
            let shown: String = row.get(0);
            if shown == value {
                // A probe taken before the reload must not answer the next round.
                self.forget_probe().await;
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(PgError::state(
                    "set synchronous_standby_names: verify",
                    format!(
                        "server still shows {shown:?} instead of {value:?} after {} ms",
                        self.timeouts.sql.as_millis()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Clones `primary_host:primary_port` into this (missing or empty) data dir with
    /// `pg_basebackup -X stream -R -c fast`, streaming WAL through `slot` if given (the slot
    /// must exist on the primary), then writes this instance's config and standby settings.
    /// The caller starts it.
    pub async fn clone_from(
        &self,
        primary_host: &str,
        primary_port: u16,
        slot: Option<&str>,
    ) -> Result<(), PgError> {
        self.clone_via(primary_host, primary_port, primary_host, primary_port, slot)
            .await
    }

    /// Like [`PgInstance::clone_from`], but copies from `source` (a standby tagged
    /// `clonefrom`, sparing the primary the copy) and then streams from the primary
    /// through `slot`. The slot lives on the primary, so the copy from a standby streams
    /// its WAL without it (pg_basebackup's temporary slot).
    pub async fn clone_via(
        &self,
        source_host: &str,
        source_port: u16,
        primary_host: &str,
        primary_port: u16,
        slot: Option<&str>,
    ) -> Result<(), PgError> {
        const STEP: &str = "clone: pg_basebackup";
        self.prepare_empty_data_dir(STEP)?;
        self.write_files()?;
        let role = &self.access.roles.replication;
        let from_primary = (source_host, source_port) == (primary_host, primary_port);
        let slot_for_copy = if from_primary { slot } else { None };
        let source = self.remote_conninfo(source_host, source_port, role, None);
        let mut args = vec![
            "-D".to_string(),
            self.data_dir.display().to_string(),
            "-d".into(),
            source,
            "-X".into(),
            "stream".into(),
            "-R".into(),
            "-c".into(),
            "fast".into(),
            "-w".into(),
        ];
        if let Some(s) = slot_for_copy {
            args.push("-S".into());
            args.push(s.into());
        }
        let env = self.password_env(role);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_tool(
            STEP,
            &self.tool("pg_basebackup"),
            &args,
            &self.run_as,
            &env,
            self.timeouts.tool,
        )
        .await?;
        // A clone is never fenced, whatever its source was.
        let _ = std::fs::remove_file(self.path(FENCE_MARKER));
        self.write_conf()?;
        self.configure_standby(primary_host, primary_port, slot)
            .await
    }

    /// Rewinds this stopped instance onto `source_host:source_port`'s timeline with
    /// `pg_rewind`, then configures it as a standby of the source through `slot`.
    ///
    /// pg_rewind needs a cleanly shut down target. Since PG 13 it runs the single-user
    /// crash recovery itself when the target crashed (as after [`PgInstance::fence`]); that
    /// cannot run in standby mode, so `standby.signal` is removed first. A fence marker
    /// survives the rewind.
    pub async fn rewind(
        &self,
        source_host: &str,
        source_port: u16,
        slot: Option<&str>,
    ) -> Result<(), PgError> {
        const STEP: &str = "rewind: pg_rewind";
        if self.is_running() {
            return Err(PgError::state(
                STEP,
                "target server is running; stop it first",
            ));
        }
        self.remove_stale_lock(STEP)?;
        let was_fenced = self.is_fenced();
        for f in ["standby.signal", "recovery.signal"] {
            let p = self.path(f);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(PgError::io(STEP, p, e)),
            }
        }
        // A just-promoted source keeps its old timeline in pg_control until its
        // end-of-recovery checkpoint is done; pg_rewind reads that and would wrongly find
        // "no rewind required". A CHECKPOINT on the source settles it.
        self.checkpoint_source(source_host, source_port).await?;
        self.write_files()?;
        let role = &self.access.roles.rewind;
        let source = self.remote_conninfo(source_host, source_port, role, Some("postgres"));
        let args = rewind_args(&self.data_dir, &source, self.has_restore_command());
        let env = self.password_env(role);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_tool(
            STEP,
            &self.tool("pg_rewind"),
            &args,
            &self.run_as,
            &env,
            self.timeouts.tool,
        )
        .await?;
        // pg_rewind copied the source's config files and may have removed files it lacks.
        if was_fenced {
            self.write_fence_marker("rewind")?;
        }
        self.write_conf()?;
        self.configure_standby(source_host, source_port, slot).await
    }

    /// True when `meridian.conf` carries a non-empty `restore_command` (from `[backup]` or
    /// the operator's parameters): pg_rewind can then fetch WAL it needs from the archive.
    fn has_restore_command(&self) -> bool {
        let set = |(k, v): (&String, &String)| {
            k == "restore_command" && !v.trim().trim_matches('\'').trim().is_empty()
        };
        self.settings.iter().any(|(k, v)| set((k, v)))
            || self
                .parameters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(set)
    }

    /// CHECKPOINT on the rewind source as the rewind role (`pg_checkpoint`, PG 15+). On an
    /// older source that refuses it, pg_rewind runs anyway: its "no rewind required" may
    /// then be wrong and the standby is re-cloned when it does not stream.
    async fn checkpoint_source(&self, host: &str, port: u16) -> Result<(), PgError> {
        const STEP: &str = "rewind: CHECKPOINT on the source";
        let role = self.access.roles.rewind.clone();
        let (client, conn) = self
            .connect_remote(STEP, host, port, &role, self.timeouts.connect)
            .await?;
        let res = self
            .bounded_sql(STEP, self.timeouts.tool, client.batch_execute("CHECKPOINT"))
            .await;
        drop(client);
        let _ = tokio::time::timeout(self.timeouts.connect, conn).await;
        match res {
            Err(ref e)
                if e.sql_state()
                    == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                tracing::warn!("the rewind source refused CHECKPOINT to {} (Postgres before 15?): rewinding without it", role.name);
                Ok(())
            }
            other => other,
        }
    }

    /// True when the fence marker is present.
    pub fn is_fenced(&self) -> bool {
        self.path(FENCE_MARKER).exists()
    }

    fn write_fence_marker(&self, step: &'static str) -> Result<(), PgError> {
        let p = self.path(FENCE_MARKER);
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let text = format!("fenced by meridian at unix time {secs}; do not start as a primary\n");
        self.run_as
            .write_file(&p, text.as_bytes(), 0o600)
            .map_err(|e| PgError::io(step, p.clone(), e))
    }

    /// Removes the fence marker (a no-op if absent).
    pub fn clear_fence(&self) -> Result<(), PgError> {
        let p = self.path(FENCE_MARKER);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PgError::io("clear fence", p, e)),
        }
    }

    /// Stops this instance from accepting writes for real, within `timeout`: writes the
    /// fence marker first (so a crash mid-way still leaves it), then SIGKILL of the
    /// postmaster and each of its backends (which also ends a SIGSTOPped postmaster),
    /// then waits for the postmaster to be gone.
    pub async fn fence(&self, timeout: Duration) -> Result<(), PgError> {
        self.write_fence_marker("fence")?;
        let Some(pid) = self.postmaster_pid().filter(|p| pid_alive(*p)) else {
            return Ok(());
        };
        let started = Instant::now();
        // No `pg_ctl stop -m immediate` first: it signals a postmaster that may be frozen
        // and waits on it, while backends keep acknowledging; a fence is a crash anyway
        // (the next start recovers), so it kills the postmaster and its backends at once.
        kill_group(pid);
        let deadline = started + timeout.max(Duration::from_millis(500));
        while pid_alive(pid) {
            if Instant::now() >= deadline {
                return Err(PgError::Timeout {
                    step: "fence: wait for the postmaster to die",
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Clears `primary_conninfo` on a running standby and reloads: its WAL receiver stops,
    /// so it no longer acknowledges synchronous commits (an isolated standby). A no-op
    /// when the server is not running.
    pub async fn disconnect_upstream(&self) -> Result<(), PgError> {
        if !self.is_running() {
            return Ok(());
        }
        let client = self
            .connect_within("disconnect upstream: connect", self.timeouts.connect)
            .await?;
        self.run_each(
            "disconnect upstream",
            &client,
            &[
                "ALTER SYSTEM SET primary_conninfo = ''",
                "SELECT pg_reload_conf()",
            ],
        )
        .await
    }

    /// Stops writes for a planned switchover: fence marker first, then a fast shutdown
    /// (the walsenders send everything, up to the shutdown checkpoint, to the connected
    /// standbys before the server exits). Returns the shutdown checkpoint's location from
    /// `pg_controldata`: every commit lies before it.
    pub async fn stop_writes(&self, timeout: Duration) -> Result<Lsn, PgError> {
        const STEP: &str = "stop writes";
        self.write_fence_marker(STEP)?;
        self.stop(StopMode::Fast, timeout).await?;
        self.checkpoint_lsn().await
    }

    /// Creates Meridian's roles on this running primary where missing and sets their
    /// passwords (as SCRAM verifiers computed here, so no clear-text password reaches the
    /// server or its log): the replication role `LOGIN REPLICATION`, the rewind role with
    /// EXECUTE on the four functions pg_rewind calls (and `pg_checkpoint` on PG 15+), the
    /// monitor role in `pg_monitor`. None of them is a superuser. A no-op when every role
    /// is the superuser.
    pub async fn ensure_roles(&self) -> Result<(), PgError> {
        const STEP: &str = "create Meridian's roles";
        let managed = self.access.roles.managed();
        if managed.is_empty() {
            return Ok(());
        }
        let client = self
            .connect_within("create roles: connect", self.timeouts.connect)
            .await?;
        let version: i32 = self
            .bounded_sql(STEP, self.timeouts.sql, async {
                client
                    .query_one("SELECT current_setting('server_version_num')::int", &[])
                    .await
            })
            .await?
            .get(0);
        // Role changes are made again at every primary start, so they need not wait for
        // the sync standbys: a new primary whose sync set still names a dead member (commits
        // wait until the leader reshapes it) must not block its own reconcile loop here.
        let mut statements: Vec<String> = vec!["SET synchronous_commit = local".into()];
        for (kind, role) in &managed {
            let ident = quote_ident(&role.name);
            statements.push(format!(
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {}) \
                 THEN CREATE ROLE {ident}; END IF; END $$",
                quote_literal(&role.name)
            ));
            let repl = if *kind == "replication" {
                "REPLICATION"
            } else {
                "NOREPLICATION"
            };
            let password = match &role.password {
                Some(p) => format!(
                    " PASSWORD {}",
                    quote_literal(&postgres_protocol::password::scram_sha_256(p.as_bytes()))
                ),
                None => String::new(),
            };
            statements.push(format!(
                "ALTER ROLE {ident} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE {repl}{password}"
            ));
            match *kind {
                "rewind" => {
                    for f in [
                        "pg_catalog.pg_ls_dir(text, boolean, boolean)",
                        "pg_catalog.pg_stat_file(text, boolean)",
                        "pg_catalog.pg_read_binary_file(text)",
                        "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
                    ] {
                        statements.push(format!("GRANT EXECUTE ON FUNCTION {f} TO {ident}"));
                    }
                    if version >= 150000 {
                        statements.push(format!("GRANT pg_checkpoint TO {ident}"));
                    }
                }
                "monitor" => {
                    statements.push(format!("GRANT pg_monitor TO {ident}"));
                    statements.push(format!(
                        "GRANT EXECUTE ON FUNCTION pg_catalog.pg_control_checkpoint() TO {ident}"
                    ));
                }
                _ => {}
            }
        }
        let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
        self.run_each(STEP, &client, &refs).await
    }

    /// "Database system identifier" of this data dir, from `pg_controldata` (works on a
    /// running or a stopped server).
    pub async fn system_identifier(&self) -> Result<u64, PgError> {
        const STEP: &str = "pg_controldata: system identifier";
        let out = run_tool(
            STEP,
            &self.tool("pg_controldata"),
            &["-D".to_string(), self.data_dir.display().to_string()],
            &self.run_as,
            &[],
            self.timeouts.sql,
        )
        .await?;
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("Database system identifier:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| PgError::state(STEP, "no \"Database system identifier\" in its output"))
    }

    /// The major version in `PG_VERSION`, if the data dir has one.
    pub fn data_major_version(&self) -> Option<u32> {
        std::fs::read_to_string(self.path("PG_VERSION"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Reloads the configuration of the running server (a no-op when stopped).
    pub async fn reload(&self) -> Result<(), PgError> {
        if !self.is_running() {
            return Ok(());
        }
        let client = self
            .connect_within("reload: connect", self.timeouts.connect)
            .await?;
        self.run_each("reload", &client, &["SELECT pg_reload_conf()"])
            .await
    }

    /// Runs one operator's SQL text (`meridianctl query`) as the superuser on a session of
    /// its own, within `timeout` (also set as its `statement_timeout`): the columns and at
    /// most `max_rows` rows of the last statement that returned rows, as text (None =
    /// NULL), and whether rows were cut off.
    pub async fn query_text(
        &self,
        sql: &str,
        max_rows: usize,
        timeout: Duration,
    ) -> Result<(Vec<String>, Vec<Vec<Option<String>>>, bool), PgError> {
        use tokio_postgres::SimpleQueryMessage;
        const STEP: &str = "query";
        let client = self
            .connect_within("query: connect", self.timeouts.connect)
            .await?;
        let ms = timeout.as_millis().max(1);
        let messages = self
            .bounded_sql(STEP, timeout, async {
                client
                    .batch_execute(&format!("SET statement_timeout = {ms}"))
                    .await?;
                client.simple_query(sql).await
            })
            .await?;
        let (mut columns, mut rows, mut truncated) = (Vec::new(), Vec::new(), false);
        for m in messages {
            match m {
                SimpleQueryMessage::RowDescription(cols) => {
                    // A new result set: only the last one is shown.
                    columns = cols.iter().map(|c| c.name().to_string()).collect();
                    rows.clear();
                    truncated = false;
                }
                SimpleQueryMessage::Row(r) => {
                    if rows.len() >= max_rows {
                        truncated = true;
                        continue;
                    }
                    rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
                }
                _ => {}
            }
        }
        Ok((columns, rows, truncated))
    }

    /// "Latest checkpoint location" of a stopped server, from `pg_controldata`.
    pub async fn checkpoint_lsn(&self) -> Result<Lsn, PgError> {
        const STEP: &str = "pg_controldata";
        let out = run_tool(
            STEP,
            &self.tool("pg_controldata"),
            &["-D".to_string(), self.data_dir.display().to_string()],
            &self.run_as,
            &[],
            self.timeouts.sql,
        )
        .await?;
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("Latest checkpoint location:"))
            .and_then(|v| v.trim().parse::<Lsn>().ok())
            .ok_or_else(|| PgError::state(STEP, "no \"Latest checkpoint location\" in its output"))
    }

    /// Stops the server if it runs (fast), puts `standby.signal` in place and starts it: it
    /// then serves reads and refuses writes. Allowed on a fenced data dir.
    pub async fn restart_as_standby(&self, timeout: Duration) -> Result<(), PgError> {
        const STEP: &str = "restart as standby";
        let started = Instant::now();
        self.stop(StopMode::Fast, timeout).await?;
        let signal = self.path("standby.signal");
        self.run_as
            .write_file(&signal, b"", 0o600)
            .map_err(|e| PgError::io(STEP, signal.clone(), e))?;
        let left = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        self.start(left).await
    }
}

/// The contents of `meridian.conf`.
fn render_meridian_conf(
    listen_addresses: &str,
    socket_dir: Option<&Path>,
    port: u16,
    application_name: &str,
    extra: &[(String, String)],
    operator: &[(String, String)],
) -> String {
    let mut s = String::from(
        "# Written by Meridian; rewritten on init, clone, rewind and adoption.\n\
         # ALTER SYSTEM settings (postgresql.auto.conf) override these.\n",
    );
    let socket = match socket_dir {
        Some(d) => quote_conf_value(&d.display().to_string()),
        // No socket: the agent connects over TCP (the fixtures).
        None => "''".into(),
    };
    let lines = [
        ("listen_addresses", quote_conf_value(listen_addresses)),
        ("port", port.to_string()),
        ("unix_socket_directories", socket),
        ("cluster_name", quote_conf_value(application_name)),
        ("wal_level", "replica".into()),
        // Redundant with data checksums, but pg_rewind accepts either.
        ("wal_log_hints", "on".into()),
        ("max_wal_senders", "16".into()),
        ("max_replication_slots", "16".into()),
        ("hot_standby", "on".into()),
        ("wal_keep_size", "'256MB'".into()),
        // Standbys report replay progress often, so lag readings are fresh.
        ("wal_receiver_status_interval", "'1s'".into()),
        // A standby re-pointed at a new primary retries soon (default 5 s), e.g. while
        // its slot is being created there.
        ("wal_retrieve_retry_interval", "'500ms'".into()),
        // A replication connection whose peer went silent (a partition dropping its
        // packets) ends after 5 s on both sides instead of 60 s: the standby reconnects as
        // soon as the path heals instead of waiting out TCP's retransmission backoff on
        // the dead connection, and the primary's sender releases the standby's slot so
        // the new connection can take it. A live idle link never trips either: each side
        // asks the other for a reply after half its timeout.
        ("wal_sender_timeout", "'5s'".into()),
        ("wal_receiver_timeout", "'5s'".into()),
        ("password_encryption", "'scram-sha-256'".into()),
    ];
    for (k, v) in lines {
        s.push_str(&format!("{k} = {v}\n"));
    }
    for (k, v) in extra {
        s.push_str(&format!("{k} = {v}\n"));
    }
    if !operator.is_empty() {
        s.push_str("# Cluster parameters (meridianctl edit-config postgresql.parameters.*) and this member's [postgres.parameters].\n");
        for (k, v) in operator {
            s.push_str(&format!("{k} = {v}\n"));
        }
    }
    s
}

/// A SQL identifier in double quotes.
fn quote_ident(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\"\""))
}

/// `postgresql.conf` with Meridian's include line appended, or None when it is there.
fn with_include_line(current: &str) -> Option<String> {
    if current.lines().any(|l| l.trim() == INCLUDE_LINE) {
        return None;
    }
    let mut next = current.to_string();
    if !next.is_empty() && !next.ends_with('\n') {
        next.push('\n');
    }
    next.push_str("# Meridian's settings (later lines win)\n");
    next.push_str(INCLUDE_LINE);
    next.push('\n');
    Some(next)
}

/// `postgresql.auto.conf` with each key in `kv` removed and, when Some, re-added at the
/// end in ALTER SYSTEM's format.
fn edit_auto_conf(current: &str, kv: &[(&str, Option<&str>)]) -> String {
    let key_of = |line: &str| -> Option<String> {
        let l = line.trim_start();
        if l.starts_with('#') {
            return None;
        }
        let end = l.find(|c: char| c == '=' || c.is_whitespace())?;
        Some(l[..end].to_ascii_lowercase())
    };
    let mut out: String = current
        .lines()
        .filter(|l| match key_of(l) {
            Some(k) => !kv.iter().any(|(key, _)| key.eq_ignore_ascii_case(&k)),
            None => true,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    for (k, v) in kv {
        if let Some(v) = v {
            out.push_str(&format!("{k} = {}\n", quote_conf_value(v)));
        }
    }
    out
}

/// pg_rewind's command line. With a `restore_command` configured, `--restore-target-wal`
/// lets pg_rewind fetch from the archive the target's WAL (back to the last common
/// checkpoint) that the old primary already recycled; without it such a rewind fails and
/// the member is re-cloned over the network.
fn rewind_args(data_dir: &Path, source_conninfo: &str, restore_target_wal: bool) -> Vec<String> {
    let mut args = vec![
        "-D".to_string(),
        data_dir.display().to_string(),
        format!("--source-server={source_conninfo}"),
    ];
    if restore_target_wal {
        args.push("--restore-target-wal".to_string());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_conf_edit_replaces_and_removes_keys() {
        let before = "# Do not edit this file manually!\n\
                      primary_conninfo = 'host=a port=1'\n\
                      synchronous_standby_names = 'ANY 1 (s1)'\n\
                      primary_slot_name = 'old'\n";
        let after = edit_auto_conf(
            before,
            &[
                ("primary_conninfo", Some("host=b port=2 password='x\\'y'")),
                ("primary_slot_name", None),
            ],
        );
        assert_eq!(
            after,
            "# Do not edit this file manually!\n\
             synchronous_standby_names = 'ANY 1 (s1)'\n\
             primary_conninfo = 'host=b port=2 password=''x\\\\''y'''\n"
        );
        assert_eq!(edit_auto_conf("", &[("k", Some("v"))]), "k = 'v'\n");
    }

    #[test]
    fn meridian_conf_is_exact() {
        let c = render_meridian_conf(
            "10.0.0.1,127.0.0.1",
            Some(Path::new("/var/lib/meridian/pg-socket")),
            6543,
            "s1",
            &[("max_slot_wal_keep_size".into(), "'4GB'".into())],
            &[("work_mem".into(), "'64MB'".into())],
        );
        let want = "\
# Written by Meridian; rewritten on init, clone, rewind and adoption.
# ALTER SYSTEM settings (postgresql.auto.conf) override these.
listen_addresses = '10.0.0.1,127.0.0.1'
port = 6543
unix_socket_directories = '/var/lib/meridian/pg-socket'
cluster_name = 's1'
wal_level = replica
wal_log_hints = on
max_wal_senders = 16
max_replication_slots = 16
hot_standby = on
wal_keep_size = '256MB'
wal_receiver_status_interval = '1s'
wal_retrieve_retry_interval = '500ms'
wal_sender_timeout = '5s'
wal_receiver_timeout = '5s'
password_encryption = 'scram-sha-256'
max_slot_wal_keep_size = '4GB'
# Cluster parameters (meridianctl edit-config postgresql.parameters.*) and this member's [postgres.parameters].
work_mem = '64MB'
";
        assert_eq!(c, want);
        assert!(render_meridian_conf("*", None, 1, "x", &[], &[])
            .contains("unix_socket_directories = ''\n"));
    }

    #[test]
    fn include_line_is_appended_once() {
        let once = with_include_line("shared_buffers = 1MB").unwrap();
        assert_eq!(
            once,
            "shared_buffers = 1MB\n# Meridian's settings (later lines win)\ninclude_if_exists = 'meridian.conf'\n"
        );
        assert_eq!(with_include_line(&once), None);
    }

    fn agent_instance() -> PgInstance {
        let bin = PgBinaries::for_tests("/nonexistent");
        let roles = PgRoles {
            superuser: PgRole::new("postgres", Some("su".into())),
            replication: PgRole::new("replicator", Some("hunter2".into())),
            rewind: PgRole::new("rewinder", Some("rw".into())),
            monitor: PgRole::new("meridian_monitor", Some("mon".into())),
        };
        let access = PgAccess {
            listen_addresses: vec!["10.0.0.1".into()],
            socket_dir: Some("/run/m/sock".into()),
            roles,
            hba: HbaSpec::loopback(true),
            client_ssl: ClientSsl {
                mode: super::super::access::SslMode::Require,
                root_cert: None,
            },
            server_ssl: None,
            files_dir: Some("/run/m/files".into()),
            max_slot_wal_keep_size: None,
        };
        PgInstance::new(bin, "/tmp/x", 5432, "s1", RunAs::CurrentUser)
            .with_access(access)
            .unwrap()
    }

    #[test]
    fn primary_conninfo_uses_the_passfile_and_tls_never_a_password() {
        let i = agent_instance();
        let info = i.primary_conninfo("10.0.0.2", 5433);
        assert_eq!(
            info,
            "host=10.0.0.2 port=5433 user=replicator application_name=s1 connect_timeout=2 \
             sslmode=require passfile=/run/m/files/pgpass"
        );
        assert!(!info.contains("hunter2"));
        assert_eq!(
            i.remote_conninfo("10.0.0.2", 5433, &i.roles().rewind.clone(), Some("postgres")),
            "host=10.0.0.2 port=5433 user=rewinder dbname=postgres connect_timeout=5 sslmode=require"
        );
        assert_eq!(i.host(), "/run/m/sock");
        assert_eq!(
            i.password_env(&i.roles().replication.clone()),
            vec![("PGPASSFILE".to_string(), "/run/m/files/pgpass".to_string())]
        );
    }

    #[test]
    fn debug_redacts_the_password() {
        let bin = PgBinaries::at("/usr/lib/postgresql/15/bin").unwrap_or_else(|_| {
            // Only the Debug output matters here.
            PgBinaries::for_tests("/nonexistent")
        });
        let i =
            PgInstance::new(bin, "/tmp/x", 1, "s1", RunAs::CurrentUser).with_password("hunter2");
        assert_eq!(i.host(), "127.0.0.1");
        let d = format!("{i:?}");
        assert!(!d.contains("hunter2") && d.contains("redacted"), "{d}");
        assert!(!i.conninfo().contains("hunter2"));
        assert!(i
            .primary_conninfo("127.0.0.1", 5)
            .contains("application_name=s1"));
    }

    #[test]
    fn rewind_restores_target_wal_only_with_a_restore_command() {
        let bin = PgBinaries::for_tests("/nonexistent");
        let plain = PgInstance::new(bin.clone(), "/d", 5432, "s1", RunAs::CurrentUser);
        assert!(!plain.has_restore_command());
        let args = rewind_args(Path::new("/d"), "host=p", plain.has_restore_command());
        assert_eq!(args, ["-D", "/d", "--source-server=host=p"]);

        let archived = PgInstance::new(bin.clone(), "/d", 5432, "s1", RunAs::CurrentUser)
            .with_setting("restore_command", "'pgbackrest archive-get %f \"%p\"'");
        assert!(archived.has_restore_command());
        let args = rewind_args(Path::new("/d"), "host=p", archived.has_restore_command());
        assert_eq!(
            args,
            ["-D", "/d", "--source-server=host=p", "--restore-target-wal"]
        );

        // An operator's empty restore_command parameter is no restore_command.
        let empty = PgInstance::new(bin.clone(), "/d", 5432, "s1", RunAs::CurrentUser);
        empty.set_parameters([("restore_command".to_string(), "''".to_string())].into());
        assert!(!empty.has_restore_command());
        let by_param = PgInstance::new(bin, "/d", 5432, "s1", RunAs::CurrentUser);
        by_param
            .set_parameters([("restore_command".to_string(), "'cp /a/%f %p'".to_string())].into());
        assert!(by_param.has_restore_command());
    }
}
