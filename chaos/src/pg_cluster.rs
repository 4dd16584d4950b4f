//! A real PostgreSQL cluster for tests: a primary (`s0`) and N streaming standbys (`s1`,
//! `s2`, ...), each standby through its own replication slot named like its
//! application_name, all on free 127.0.0.1 ports in one temp dir. As root the processes run
//! as the `postgres` OS user, which then owns the temp dir. Dropping the cluster (also on
//! panic) SIGKILLs every postmaster's process group by PID, then removes the dir.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use meridian_node::pg::{pid_alive, PgBinaries, PgInstance, RunAs, DEFAULT_OS_USER};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio_postgres::Client;

/// Bound on starting one instance.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a standby showing up as streaming.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(30);

pub use crate::ports::free_ports;

/// Options for [`PgCluster`].
#[derive(Clone, Debug, Default)]
pub struct PgClusterBuilder {
    standbys: usize,
    password: Option<String>,
    synchronous_standby_names: Option<String>,
}

impl PgClusterBuilder {
    pub fn standbys(mut self, n: usize) -> Self {
        self.standbys = n;
        self
    }

    /// Superuser password: host and replication connections then use scram-sha-256.
    pub fn password(mut self, p: impl Into<String>) -> Self {
        self.password = Some(p.into());
        self
    }

    /// Set on the primary once every standby streams.
    pub fn synchronous_standby_names(mut self, v: impl Into<String>) -> Self {
        self.synchronous_standby_names = Some(v.into());
        self
    }

    pub async fn start(self) -> anyhow::Result<PgCluster> {
        PgCluster::start_with(self).await
    }
}

/// A running primary + standbys, torn down on drop.
pub struct PgCluster {
    nodes: Vec<PgInstance>,
    // Declared after `nodes` only for clarity: Drop kills processes before this is removed.
    dir: Option<TempDir>,
}

impl PgCluster {
    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder::default()
    }

    /// A primary and `n_standbys` streaming standbys, no password, async replication.
    pub async fn start(n_standbys: usize) -> anyhow::Result<PgCluster> {
        PgCluster::builder().standbys(n_standbys).start().await
    }

    async fn start_with(b: PgClusterBuilder) -> anyhow::Result<PgCluster> {
        let bin = PgBinaries::detect()
            .await
            .context("find PostgreSQL binaries")?;
        let run_as = RunAs::resolve(DEFAULT_OS_USER).context("choose the OS user")?;
        let dir = tempfile::Builder::new()
            .prefix("meridian-pg-")
            .tempdir()
            .context("create the cluster temp dir")?;
        run_as
            .chown_recursive(dir.path())
            .context("give the temp dir to the OS user")?;
        let ports = free_ports(b.standbys + 1)?;
        let nodes: Vec<PgInstance> = ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let name = format!("s{i}");
                let mut inst = PgInstance::new(
                    bin.clone(),
                    dir.path().join(&name),
                    *port,
                    name,
                    run_as.clone(),
                )
                // Small and fast: many clusters share a 2-core machine; a crash here is a
                // process crash, never an OS one, so skipping fsync loses nothing.
                .with_setting("shared_buffers", "'16MB'")
                .with_setting("max_connections", "40")
                .with_setting("fsync", "off");
                if let Some(p) = &b.password {
                    inst = inst.with_password(p.clone());
                }
                inst
            })
            .collect();
        // From here on, Drop cleans up whatever got started.
        let cluster = PgCluster {
            nodes,
            dir: Some(dir),
        };
        cluster.bring_up(&b).await?;
        Ok(cluster)
    }

    async fn bring_up(&self, b: &PgClusterBuilder) -> anyhow::Result<()> {
        let primary = &self.nodes[0];
        primary.init().await.context("init the primary")?;
        primary
            .start(START_TIMEOUT)
            .await
            .context("start the primary")?;
        for standby in &self.nodes[1..] {
            let slot = standby.application_name();
            primary
                .create_slot(slot)
                .await
                .with_context(|| format!("create slot {slot}"))?;
            standby
                .clone_from(primary.host(), primary.port(), Some(slot))
                .await
                .with_context(|| format!("clone {slot}"))?;
            standby
                .start(START_TIMEOUT)
                .await
                .with_context(|| format!("start {slot}"))?;
        }
        for standby in &self.nodes[1..] {
            self.wait_streaming(standby.application_name(), STREAMING_TIMEOUT)
                .await?;
        }
        if let Some(v) = &b.synchronous_standby_names {
            primary
                .set_synchronous_standby_names(v)
                .await
                .context("set synchronous_standby_names")?;
        }
        Ok(())
    }

    /// Waits until the primary (node 0) lists `application_name` as streaming.
    pub async fn wait_streaming(
        &self,
        application_name: &str,
        within: Duration,
    ) -> anyhow::Result<()> {
        self.wait_streaming_to(0, application_name, within).await
    }

    /// Waits until node `upstream` lists `application_name` as streaming.
    pub async fn wait_streaming_to(
        &self,
        upstream: usize,
        application_name: &str,
        within: Duration,
    ) -> anyhow::Result<()> {
        let up = &self.nodes[upstream];
        crate::wait::wait_until(
            &format!(
                "{application_name} to stream from {}",
                up.application_name()
            ),
            within,
            || async {
                up.probe()
                    .await
                    .standby(application_name)
                    .is_some_and(|s| s.state == "streaming")
            },
        )
        .await
    }

    /// Every instance: 0 is the initial primary, i ≥ 1 the standby `s<i>`.
    pub fn instances(&self) -> &[PgInstance] {
        &self.nodes
    }

    pub fn instance(&self, i: usize) -> &PgInstance {
        &self.nodes[i]
    }

    pub fn primary(&self) -> &PgInstance {
        &self.nodes[0]
    }

    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port()
    }

    pub fn conninfo(&self, i: usize) -> String {
        self.nodes[i].conninfo()
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir lives until drop").path()
    }

    /// A superuser session to node `i`.
    pub async fn client(&self, i: usize) -> anyhow::Result<Client> {
        self.nodes[i]
            .connect()
            .await
            .with_context(|| format!("connect to {}", self.nodes[i].application_name()))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let pids: Vec<i32> = self
            .nodes
            .iter()
            .filter_map(|n| n.postmaster_pid())
            .filter(|p| pid_alive(*p))
            .collect();
        for pid in &pids {
            // The postmaster leads its own process group: this takes the backends too.
            let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        // Bounded: let the kernel finish the kills before the files go.
        for _ in 0..200 {
            if !pids.iter().any(|p| pid_alive(*p)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// A plain PostgreSQL server as a DBA would have it before Meridian: made with `initdb`
/// by hand (no Meridian settings, initdb's own `pg_hba.conf`), its port, listen address and
/// socket in its own `postgresql.conf`, started with `pg_ctl`. The data dir is the
/// caller's; dropping this SIGKILLs whatever postmaster runs in it (by the PID in
/// `postmaster.pid`) but leaves the files.
pub struct PlainPostgres {
    bin: PgBinaries,
    run_as: RunAs,
    data_dir: std::path::PathBuf,
    socket_dir: std::path::PathBuf,
    port: u16,
}

impl PlainPostgres {
    /// `initdb` into `data_dir` (missing or empty) with superuser `postgres`, trust for
    /// local and loopback sessions; the server will listen on the loopback address and
    /// `port`, its socket in `socket_dir`.
    pub async fn init(
        data_dir: &Path,
        socket_dir: &Path,
        port: u16,
    ) -> anyhow::Result<PlainPostgres> {
        let bin = PgBinaries::detect()
            .await
            .context("find PostgreSQL binaries")?;
        let run_as = RunAs::resolve(DEFAULT_OS_USER).context("choose the OS user")?;
        for d in [data_dir, socket_dir] {
            run_as
                .create_private_dir(d)
                .with_context(|| format!("create {}", d.display()))?;
        }
        let p = PlainPostgres {
            bin,
            run_as,
            data_dir: data_dir.to_path_buf(),
            socket_dir: socket_dir.to_path_buf(),
            port,
        };
        let data = p.data_dir.display().to_string();
        p.run(
            "initdb",
            &["-D", &data, "-U", "postgres", "--auth=trust", "--locale=C"],
        )
        .await?;
        let conf = p.data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).context("read postgresql.conf")?;
        text.push_str(&format!(
            "\n# the DBA's own settings\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nshared_buffers = '16MB'\nfsync = off\n",
            p.socket_dir.display()
        ));
        p.run_as
            .write_file(&conf, text.as_bytes(), 0o600)
            .context("write postgresql.conf")?;
        Ok(p)
    }

    async fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = tokio::process::Command::new(self.bin.tool(tool));
        cmd.args(args).current_dir("/").kill_on_drop(true);
        self.run_as.apply(&mut cmd);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .with_context(|| format!("{tool} timed out"))?
            .with_context(|| format!("run {tool}"))?;
        anyhow::ensure!(
            out.status.success(),
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// A streaming standby of this (running) server made by hand: `pg_basebackup -R -X
    /// stream` over its socket into `data_dir`, then its own port and socket dir in its
    /// `postgresql.conf`. Not started.
    pub async fn clone_standby(
        &self,
        data_dir: &Path,
        socket_dir: &Path,
        port: u16,
    ) -> anyhow::Result<PlainPostgres> {
        for d in [data_dir, socket_dir] {
            self.run_as
                .create_private_dir(d)
                .with_context(|| format!("create {}", d.display()))?;
        }
        let data = data_dir.display().to_string();
        let host = self.socket_dir.display().to_string();
        let src_port = self.port.to_string();
        self.run(
            "pg_basebackup",
            &[
                "-D", &data, "-h", &host, "-p", &src_port, "-U", "postgres", "-R", "-X", "stream",
                "-c", "fast",
            ],
        )
        .await?;
        let conf = data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).context("read postgresql.conf")?;
        text.push_str(&format!(
            "\n# the standby's own\nport = {port}\nunix_socket_directories = '{}'\n",
            socket_dir.display()
        ));
        self.run_as
            .write_file(&conf, text.as_bytes(), 0o600)
            .context("write postgresql.conf")?;
        Ok(PlainPostgres {
            bin: self.bin.clone(),
            run_as: self.run_as.clone(),
            data_dir: data_dir.to_path_buf(),
            socket_dir: socket_dir.to_path_buf(),
            port,
        })
    }

    /// `pg_ctl start -w` with the server log next to the data dir.
    pub async fn start(&self) -> anyhow::Result<()> {
        let data = self.data_dir.display().to_string();
        let log = format!("{data}.plain.log");
        std::fs::File::create(&log).context("create the server log")?;
        self.run_as
            .chown(Path::new(&log))
            .context("chown the log")?;
        self.run(
            "pg_ctl",
            &["start", "-D", &data, "-l", &log, "-w", "-t", "30", "-s"],
        )
        .await
    }

    /// `pg_ctl stop -m fast -w`.
    pub async fn stop(&self) -> anyhow::Result<()> {
        let data = self.data_dir.display().to_string();
        self.run(
            "pg_ctl",
            &["stop", "-D", &data, "-m", "fast", "-w", "-t", "30", "-s"],
        )
        .await
    }

    /// A superuser session over the server's own unix socket.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        let (client, conn) =
            tokio::time::timeout(Duration::from_secs(5), c.connect(tokio_postgres::NoTls))
                .await
                .context("connect: timed out")?
                .context("connect")?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// The postmaster's pid, if one runs in the data dir.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for PlainPostgres {
    fn drop(&mut self) {
        if let Some(pid) = self.postmaster_pid().filter(|p| pid_alive(*p)) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            for _ in 0..200 {
                if !pid_alive(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
