//! Separate test hosts on one machine (root only): one network namespace per member, each
//! with its own address on a per-run Linux bridge in the root namespace, loopback up, and
//! **no default route**, so nothing leaves the machine. The bridge has an address too, so
//! the test process (root namespace) reaches every host. Commands run inside a host with
//! `ip netns exec` (which execs the program: the child's PID is the program's, killable).
//! Partitions are packet filters inside the namespaces (iptables `DROP` on INPUT and
//! OUTPUT per peer address, one-way cuts too); healing flushes them.
//!
//! Owns every namespace, veth pair, bridge and rule it creates: dropping a [`NetnsHosts`]
//! (also on panic) kills what still runs inside its namespaces and removes them all, and
//! [`NetnsHosts::create`] first removes leftovers of earlier runs whose process is dead.
//! Names carry the owner's PID and a per-process run number (`mer-<pid>-<run>-<i>`,
//! bridge `mrb-<pid hex>-<run>`); each run takes its own `10.77.N.0/24`, chosen under a
//! lock file among the subnets no interface of the machine uses. Every command is bounded
//! by [`COMMAND_TIMEOUT`].

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meridian_node::pg::pid_alive;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Bound on every `ip` / `iptables` command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Namespace names start with this.
pub const NETNS_PREFIX: &str = "mer-";
const BRIDGE_PREFIX: &str = "mrb-";
const VETH_PREFIX: &str = "mrv-";
const PEER_PREFIX: &str = "mrp-";
/// The first two octets of every run's subnet.
const SUBNET_BASE: [u8; 2] = [10, 77];
/// Third octets a run may take.
const SUBNET_RANGE: std::ops::Range<u16> = 20..220;
/// Host `i` gets `10.77.N.(HOST_OFFSET + i)`; the bridge has `.1`.
const HOST_OFFSET: u8 = 10;
/// At most this many hosts per run (addresses and interface-name lengths).
pub const MAX_HOSTS: usize = 10;
/// Serializes subnet choice between runs on this machine (other processes too).
const LOCK_FILE: &str = "/run/meridian-netns.lock";

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);
static LOCAL_LOCK: Mutex<()> = Mutex::new(());

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// Namespaces, bridges and packet filters need root.
    #[error("separate hosts need root (network namespaces, a bridge, iptables); this process runs as uid {uid}")]
    NeedsRoot { uid: u32 },
    #[error("separate hosts need `{tool}` (looked in PATH, /usr/sbin, /sbin): install the Debian package {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("no free subnet for the test hosts: every 10.77.N.0/24 with N in 20..220 is in use")]
    NoFreeSubnet,
    #[error("unknown test host {0:?}")]
    UnknownHost(String),
    #[error("{0}")]
    Command(String),
}

impl NetnsError {
    /// The machine cannot build hosts at all (not root, tools missing): a test skips.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            NetnsError::NeedsRoot { .. } | NetnsError::MissingTool { .. }
        )
    }
}

fn find_tool(name: &'static str, package: &'static str) -> Result<PathBuf, NetnsError> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(NetnsError::MissingTool {
            tool: name,
            package,
        })
}

/// Checks that this process can build hosts: root, `ip` and `iptables` present.
pub fn check_available() -> Result<(PathBuf, PathBuf), NetnsError> {
    let uid = nix::unistd::geteuid().as_raw();
    if uid != 0 {
        return Err(NetnsError::NeedsRoot { uid });
    }
    Ok((
        find_tool("ip", "iproute2")?,
        find_tool("iptables", "iptables")?,
    ))
}

/// Runs `program args`, bounded by `timeout`; its stdout on success, an error naming the
/// command and its stderr otherwise.
fn run(program: &Path, args: &[&str], timeout: Duration) -> Result<String, NetnsError> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetnsError::Command(format!("{shown}: cannot start: {e}")))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NetnsError::Command(format!(
                    "{shown}: no answer within {} ms",
                    timeout.as_millis()
                )));
            }
            Err(e) => return Err(NetnsError::Command(format!("{shown}: {e}"))),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NetnsError::Command(format!("{shown}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetnsError::Command(format!(
            "{shown}: {} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        )))
    }
}

/// One test host: a namespace with one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// The member (or other label) this host was made for.
    pub name: String,
    /// The network namespace's name (`ip netns`).
    pub netns: String,
    pub addr: Ipv4Addr,
    veth: String,
}

/// The hosts of one run. See the module doc.
#[derive(Debug)]
pub struct NetnsHosts {
    ip: PathBuf,
    iptables: PathBuf,
    bridge: Option<String>,
    bridge_addr: Ipv4Addr,
    hosts: Vec<Host>,
    /// Namespaces created (removed on drop), a superset of `hosts`' while building.
    netns: Vec<String>,
    /// Root-side veths created.
    veths: Vec<String>,
    /// Directed cuts in place: (from host index, to host index).
    cuts: Mutex<BTreeSet<(usize, usize)>>,
}

/// Parses the owner PID out of a name like `<prefix><pid>-...` (`hex` for bridges and veths).
fn owner_pid(name: &str, prefix: &str, hex: bool) -> Option<i32> {
    let rest = name.strip_prefix(prefix)?;
    let digits = rest.split('-').next()?;
    if hex {
        i32::from_str_radix(digits, 16).ok()
    } else {
        digits.parse().ok()
    }
}

impl NetnsHosts {
    /// Builds one host per name in `names` (in order). Removes stale leftovers first.
    pub fn create(names: &[String]) -> Result<NetnsHosts, NetnsError> {
        let (ip, iptables) = check_available()?;
        if names.is_empty() || names.len() > MAX_HOSTS {
            return Err(NetnsError::Command(format!(
                "between 1 and {MAX_HOSTS} hosts, not {}",
                names.len()
            )));
        }
        remove_stale(&ip);
        let pid = std::process::id();
        let run_no = RUN_COUNTER.fetch_add(1, Ordering::Relaxed) % 100;
        let tag = format!("{pid:x}-{run_no}");
        let mut me = NetnsHosts {
            ip,
            iptables,
            bridge: None,
            bridge_addr: Ipv4Addr::UNSPECIFIED,
            hosts: Vec::new(),
            netns: Vec::new(),
            veths: Vec::new(),
            cuts: Mutex::new(BTreeSet::new()),
        };
        // Subnet choice and the bridge's address under one lock, so two runs (threads of
        // this process, or other processes) never take the same subnet.
        let third = {
            let _local = LOCAL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            let lock_file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(LOCK_FILE)
                .map_err(|e| NetnsError::Command(format!("open {LOCK_FILE}: {e}")))?;
            let _flock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| NetnsError::Command(format!("lock {LOCK_FILE}: {e}")))?;
            let used = me.used_subnets()?;
            let span = SUBNET_RANGE.end - SUBNET_RANGE.start;
            let start = (pid as u16 % span + run_no as u16 * 7) % span;
            let third = (0..span)
                .map(|k| SUBNET_RANGE.start + (start + k) % span)
                .map(|t| t as u8)
                .find(|t| !used.contains(t))
                .ok_or(NetnsError::NoFreeSubnet)?;
            let bridge = format!("{BRIDGE_PREFIX}{tag}");
            me.ip_cmd(&["link", "add", &bridge, "type", "bridge"])?;
            me.bridge = Some(bridge.clone());
            me.bridge_addr = Ipv4Addr::new(SUBNET_BASE[0], SUBNET_BASE[1], third, 1);
            me.ip_cmd(&[
                "addr",
                "add",
                &format!("{}/24", me.bridge_addr),
                "dev",
                &bridge,
            ])?;
            third
        };
        let bridge = me.bridge.clone().expect("set above");
        me.ip_cmd(&["link", "set", &bridge, "up"])?;
        for (i, name) in names.iter().enumerate() {
            let netns = format!("{NETNS_PREFIX}{pid}-{run_no}-{i}");
            let veth = format!("{VETH_PREFIX}{tag}-{i}");
            let peer = format!("{PEER_PREFIX}{tag}-{i}");
            let addr = Ipv4Addr::new(SUBNET_BASE[0], SUBNET_BASE[1], third, HOST_OFFSET + i as u8);
            me.ip_cmd(&["netns", "add", &netns])?;
            me.netns.push(netns.clone());
            me.ip_cmd(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
            me.veths.push(veth.clone());
            me.ip_cmd(&["link", "set", &peer, "netns", &netns])?;
            me.ip_cmd(&["link", "set", &veth, "master", &bridge])?;
            me.ip_cmd(&["link", "set", &veth, "up"])?;
            me.ip_cmd(&["-n", &netns, "link", "set", "lo", "up"])?;
            me.ip_cmd(&["-n", &netns, "link", "set", &peer, "name", "eth0"])?;
            me.ip_cmd(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            me.ip_cmd(&["-n", &netns, "link", "set", "eth0", "up"])?;
            me.hosts.push(Host {
                name: name.clone(),
                netns,
                addr,
                veth,
            });
        }
        Ok(me)
    }

    fn ip_cmd(&self, args: &[&str]) -> Result<String, NetnsError> {
        run(&self.ip, args, COMMAND_TIMEOUT)
    }

    /// Third octets of 10.77.N.0/24 subnets some interface of the root namespace is in.
    fn used_subnets(&self) -> Result<BTreeSet<u8>, NetnsError> {
        let out = self.ip_cmd(&["-o", "-4", "addr", "show"])?;
        Ok(out
            .split_whitespace()
            .filter_map(|w| w.split('/').next()?.parse::<Ipv4Addr>().ok())
            .filter(|a| a.octets()[..2] == SUBNET_BASE)
            .map(|a| a.octets()[2])
            .collect())
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The bridge's address: where the hosts see the test process's connections from.
    pub fn bridge_addr(&self) -> Ipv4Addr {
        self.bridge_addr
    }

    /// The interfaces this run made in the root namespace (bridge and veths), to check
    /// after drop that they are gone.
    pub fn links(&self) -> Vec<String> {
        self.bridge.iter().chain(&self.veths).cloned().collect()
    }

    /// Whether an interface named `name` exists in the root namespace.
    pub fn link_exists(&self, name: &str) -> bool {
        link_exists(&self.ip, name)
    }

    /// The run's subnet, e.g. `10.77.42.0/24`.
    pub fn subnet(&self) -> String {
        let o = self.bridge_addr.octets();
        format!("{}.{}.{}.0/24", o[0], o[1], o[2])
    }

    fn index(&self, name: &str) -> Result<usize, NetnsError> {
        self.hosts
            .iter()
            .position(|h| h.name == name)
            .ok_or_else(|| NetnsError::UnknownHost(name.to_string()))
    }

    pub fn host(&self, name: &str) -> Result<&Host, NetnsError> {
        Ok(&self.hosts[self.index(name)?])
    }

    pub fn addr(&self, name: &str) -> Result<Ipv4Addr, NetnsError> {
        Ok(self.host(name)?.addr)
    }

    /// A command that runs `program` inside `name`'s namespace (`ip netns exec`, which
    /// execs it: the spawned child's PID is the program's).
    pub fn command(
        &self,
        name: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command, NetnsError> {
        let h = self.host(name)?;
        let mut c = Command::new(&self.ip);
        c.args(["netns", "exec", &h.netns]).arg(program);
        Ok(c)
    }

    /// Runs `program args` inside `name`'s namespace, bounded; its stdout.
    pub fn exec(&self, name: &str, program: &str, args: &[&str]) -> Result<String, NetnsError> {
        let h = self.host(name)?;
        let mut all = vec!["netns", "exec", h.netns.as_str(), program];
        all.extend_from_slice(args);
        run(&self.ip, &all, COMMAND_TIMEOUT)
    }

    fn iptables(&self, host: usize, args: &[&str]) -> Result<(), NetnsError> {
        let ipt = self.iptables.to_string_lossy().into_owned();
        let mut all = vec![
            "netns",
            "exec",
            self.hosts[host].netns.as_str(),
            ipt.as_str(),
            "-w",
            "5",
        ];
        all.extend_from_slice(args);
        run(&self.ip, &all, COMMAND_TIMEOUT).map(drop)
    }

    fn cut_index(&self, from: usize, to: usize) -> Result<bool, NetnsError> {
        if from == to {
            return Ok(false);
        }
        let mut cuts = self.cuts.lock().unwrap_or_else(|e| e.into_inner());
        if cuts.contains(&(from, to)) {
            return Ok(false);
        }
        let (src, dst) = (
            self.hosts[from].addr.to_string(),
            self.hosts[to].addr.to_string(),
        );
        // Both ends drop: the sender's OUTPUT and the receiver's INPUT.
        self.iptables(from, &["-A", "OUTPUT", "-d", &dst, "-j", "DROP"])?;
        cuts.insert((from, to));
        self.iptables(to, &["-A", "INPUT", "-s", &src, "-j", "DROP"])?;
        Ok(true)
    }

    /// Drops every packet from `from` to `to` (a one-way link failure). Returns whether
    /// the cut is new.
    pub fn cut_one_way(&self, from: &str, to: &str) -> Result<bool, NetnsError> {
        self.cut_index(self.index(from)?, self.index(to)?)
    }

    /// Cuts the link between `a` and `b` both ways.
    pub fn cut(&self, a: &str, b: &str) -> Result<usize, NetnsError> {
        let (a, b) = (self.index(a)?, self.index(b)?);
        Ok(usize::from(self.cut_index(a, b)?) + usize::from(self.cut_index(b, a)?))
    }

    /// Cuts `name` off from every other host, both ways (the test process in the root
    /// namespace still reaches it). Returns the number of new directed cuts.
    pub fn isolate(&self, name: &str) -> Result<usize, NetnsError> {
        let i = self.index(name)?;
        let mut n = 0;
        for j in 0..self.hosts.len() {
            n += usize::from(self.cut_index(i, j)?) + usize::from(self.cut_index(j, i)?);
        }
        Ok(n)
    }

    /// Cuts every host of `a` off from every host of `b`, both ways.
    pub fn partition(&self, a: &[&str], b: &[&str]) -> Result<usize, NetnsError> {
        let mut n = 0;
        for x in a {
            for y in b {
                n += self.cut(x, y)?;
            }
        }
        Ok(n)
    }

    /// Directed cuts in place, as (from, to) host names.
    pub fn cuts(&self) -> Vec<(String, String)> {
        let cuts = self.cuts.lock().unwrap_or_else(|e| e.into_inner());
        cuts.iter()
            .map(|(a, b)| (self.hosts[*a].name.clone(), self.hosts[*b].name.clone()))
            .collect()
    }

    /// Removes every cut (flushes INPUT and OUTPUT in every host).
    pub fn heal(&self) -> Result<(), NetnsError> {
        let mut cuts = self.cuts.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..self.hosts.len() {
            self.iptables(i, &["-F", "INPUT"])?;
            self.iptables(i, &["-F", "OUTPUT"])?;
        }
        cuts.clear();
        Ok(())
    }

    /// Runs `f` on a thread that has entered `name`'s network namespace (sockets it makes
    /// live there).
    fn in_netns<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, NetnsError> {
        let path = Path::new("/run/netns").join(&self.host(name)?.netns);
        let fd = std::fs::File::open(&path)
            .map_err(|e| NetnsError::Command(format!("open {}: {e}", path.display())))?;
        let shown = name.to_string();
        std::thread::spawn(move || {
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| std::io::Error::other(format!("enter the namespace: {e}")))?;
            f()
        })
        .join()
        .map_err(|_| NetnsError::Command(format!("the thread inside {shown} panicked")))?
        .map_err(|e| NetnsError::Command(format!("inside {shown}: {e}")))
    }

    /// A TCP listener bound inside `name`'s namespace (any thread may accept on it).
    pub fn listen(&self, name: &str, port: u16) -> Result<TcpListener, NetnsError> {
        let addr = SocketAddr::from((self.addr(name)?, port));
        self.in_netns(name, move || TcpListener::bind(addr))
    }

    /// Whether a TCP connection from inside `from`'s namespace to `to` succeeds within
    /// `timeout` (the packet filter's effect, as a peer sees it).
    pub fn can_connect(
        &self,
        from: &str,
        to: SocketAddr,
        timeout: Duration,
    ) -> Result<bool, NetnsError> {
        self.in_netns(from, move || {
            Ok(TcpStream::connect_timeout(&to, timeout).is_ok())
        })
    }

    /// PIDs of the processes inside `name`'s namespace.
    pub fn pids(&self, name: &str) -> Result<Vec<i32>, NetnsError> {
        let h = self.host(name)?;
        netns_pids(&self.ip, &h.netns)
    }
}

fn netns_pids(ip: &Path, netns: &str) -> Result<Vec<i32>, NetnsError> {
    Ok(run(ip, &["netns", "pids", netns], COMMAND_TIMEOUT)?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// SIGKILLs whatever still runs in `netns`, then deletes it (best effort, bounded).
fn remove_netns(ip: &Path, netns: &str) {
    for _ in 0..3 {
        let pids = netns_pids(ip, netns).unwrap_or_default();
        if pids.is_empty() {
            break;
        }
        for p in &pids {
            let _ = kill(Pid::from_raw(*p), Signal::SIGCONT);
            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Err(e) = run(ip, &["netns", "del", netns], COMMAND_TIMEOUT) {
        eprintln!("netns: could not remove namespace {netns}: {e}");
    }
}

fn link_exists(ip: &Path, name: &str) -> bool {
    run(ip, &["link", "show", "dev", name], COMMAND_TIMEOUT).is_ok()
}

/// Removes namespaces, bridges and veths of earlier runs whose owner process is dead.
fn remove_stale(ip: &Path) {
    if let Ok(list) = run(ip, &["netns", "list"], COMMAND_TIMEOUT) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if owner_pid(ns, NETNS_PREFIX, false).is_some_and(|p| !pid_alive(p)) {
                eprintln!("netns: removing stale namespace {ns}");
                remove_netns(ip, ns);
            }
        }
    }
    if let Ok(list) = run(ip, &["-o", "link", "show"], COMMAND_TIMEOUT) {
        for link in list.lines().filter_map(|l| l.split(':').nth(1)) {
            let link = link.trim().split('@').next().unwrap_or("");
            let stale = [BRIDGE_PREFIX, VETH_PREFIX, PEER_PREFIX]
                .iter()
                .any(|p| owner_pid(link, p, true).is_some_and(|p| !pid_alive(p)));
            if stale {
                eprintln!("netns: removing stale link {link}");
                let _ = run(ip, &["link", "del", link], COMMAND_TIMEOUT);
            }
        }
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        // Namespaces first (their veth ends go with them), then what is left in the root.
        for ns in self.netns.drain(..).rev() {
            remove_netns(&self.ip, &ns);
        }
        for veth in self.veths.drain(..) {
            if link_exists(&self.ip, &veth) {
                let _ = run(&self.ip, &["link", "del", &veth], COMMAND_TIMEOUT);
            }
        }
        if let Some(bridge) = self.bridge.take() {
            if let Err(e) = run(&self.ip, &["link", "del", &bridge], COMMAND_TIMEOUT) {
                eprintln!("netns: could not remove bridge {bridge}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pids_parse() {
        assert_eq!(owner_pid("mer-1234-0-3", NETNS_PREFIX, false), Some(1234));
        assert_eq!(owner_pid("mrb-4d2-1", BRIDGE_PREFIX, true), Some(1234));
        assert_eq!(owner_pid("mrv-4d2-1-2", VETH_PREFIX, true), Some(1234));
        assert_eq!(owner_pid("meridian", NETNS_PREFIX, false), None);
        assert_eq!(owner_pid("eth0", BRIDGE_PREFIX, true), None);
        // Interface names fit the kernel's 15 characters at the largest PID and run.
        let longest = format!("{VETH_PREFIX}{:x}-99-{}", 4_194_304, MAX_HOSTS - 1);
        assert!(longest.len() <= 15, "{longest}");
    }

    fn hosts_or_skip(names: &[&str]) -> Option<NetnsHosts> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        match NetnsHosts::create(&names) {
            Ok(h) => Some(h),
            Err(e) if e.is_unavailable() => {
                println!("skipped: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn netns_exists(name: &str) -> bool {
        Path::new("/run/netns").join(name).exists()
    }

    /// Hosts reach each other and the bridge, cuts drop exactly what they name (one-way
    /// too), heal restores, and drop removes every namespace, veth and the bridge.
    #[test]
    fn hosts_partition_heal_and_clean_up() {
        let Some(h) = hosts_or_skip(&["a", "b", "c"]) else {
            return;
        };
        let t = Duration::from_millis(500);
        let la = h.listen("a", 7000).unwrap();
        let lb = h.listen("b", 7000).unwrap();
        let lc = h.listen("c", 7000).unwrap();
        let (a, b, c) = (
            la.local_addr().unwrap(),
            lb.local_addr().unwrap(),
            lc.local_addr().unwrap(),
        );
        assert_ne!(a.ip(), b.ip());
        assert!(h.can_connect("a", b, t).unwrap());
        assert!(h.can_connect("b", c, t).unwrap());
        assert!(
            TcpStream::connect_timeout(&a, t).is_ok(),
            "root ns reaches a"
        );
        // Nothing routes off the machine from inside a host.
        let out = h.exec("a", "ip", &["-4", "route", "show"]).unwrap();
        assert!(!out.contains("default"), "{out}");

        assert!(h.cut_one_way("a", "b").unwrap());
        assert!(
            !h.cut_one_way("a", "b").unwrap(),
            "a repeated cut is not new"
        );
        assert!(!h.can_connect("a", b, t).unwrap());
        // b's SYN reaches a, but a's answer is dropped.
        assert!(!h.can_connect("b", a, t).unwrap());
        assert!(h.can_connect("a", c, t).unwrap());
        h.heal().unwrap();
        assert!(h.can_connect("a", b, t).unwrap());

        assert_eq!(h.isolate("c").unwrap(), 4);
        assert!(!h.can_connect("a", c, t).unwrap());
        assert!(!h.can_connect("c", b, t).unwrap());
        assert!(h.can_connect("a", b, t).unwrap());
        assert!(
            TcpStream::connect_timeout(&c, t).is_ok(),
            "root ns still reaches c"
        );
        assert_eq!(h.cuts().len(), 4);
        h.heal().unwrap();
        assert!(h.can_connect("c", a, t).unwrap());
        assert!(h.cuts().is_empty());

        let namespaces: Vec<String> = h.hosts().iter().map(|x| x.netns.clone()).collect();
        let links = h.links();
        assert_eq!(links.len(), 4);
        drop((la, lb, lc));
        drop(h);
        let ip = find_tool("ip", "iproute2").unwrap();
        for ns in &namespaces {
            assert!(!netns_exists(ns), "{ns} left behind");
        }
        for l in &links {
            assert!(!link_exists(&ip, l), "{l} left behind");
        }
    }

    /// A namespace named for a dead PID is removed by the next run.
    #[test]
    fn stale_leftovers_are_removed() {
        let Ok((ip, _)) = check_available() else {
            println!("skipped: needs root");
            return;
        };
        // PIDs above the kernel's pid_max never run.
        let stale = format!("{NETNS_PREFIX}4194305-0-0");
        run(&ip, &["netns", "add", &stale], COMMAND_TIMEOUT).unwrap();
        let Some(h) = hosts_or_skip(&["x"]) else {
            return;
        };
        assert!(!netns_exists(&stale), "{stale} was not removed");
        drop(h);
    }
}
