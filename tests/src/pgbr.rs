//! Files and processes the pgBackRest end-to-end tests share: TLS certificates as
//! pgBackRest's TLS server and client want them, files owned by the Postgres OS user, a
//! `pgbackrest` command as that user, and a `pgbackrest server` the test runs itself (a
//! repository host), stopped on drop.

use std::path::{Path, PathBuf};

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

pub fn chown_to_postgres(p: &Path) {
    if is_root() {
        let u = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("the postgres OS user");
        nix::unistd::chown(p, Some(u.uid), Some(u.gid)).unwrap();
    }
}

/// Writes a file the Postgres OS user can read (and only it, for keys).
pub fn write_private(path: &Path, contents: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    chown_to_postgres(path);
}

pub fn new_ca(cn: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
}

/// A certificate named `cn` for `purpose`, signed by `ca`: (cert path, key path).
pub fn issue(
    dir: &Path,
    ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    cn: &str,
    file: &str,
    purpose: rcgen::ExtendedKeyUsagePurpose,
) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![cn.to_string()]).unwrap();
    // pgBackRest matches the host it dials against the DNS names and the CN only, not IP
    // addresses: the address goes in as a DNS name too.
    params.subject_alt_names.extend([
        rcgen::SanType::DnsName("127.0.0.1".try_into().unwrap()),
        rcgen::SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
    ]);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![purpose];
    let cert = params.signed_by(&key, ca).unwrap();
    let (c, k) = (
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    );
    write_private(&c, &cert.pem(), 0o644);
    write_private(&k, &key.serialize_pem(), 0o600);
    (c, k)
}

/// `pgbackrest ARGS` as the Postgres OS user (as root) or as ourselves.
pub fn pgbackrest() -> std::process::Command {
    if is_root() {
        let mut p = std::process::Command::new("runuser");
        p.args(["-u", "postgres", "--", "pgbackrest"]);
        p
    } else {
        std::process::Command::new("pgbackrest")
    }
}

/// A `pgbackrest server` the test started: killed (with its process group) on drop.
pub struct TestServer(pub std::process::Child);

impl TestServer {
    /// Starts `pgbackrest --config=CONF server` in its own process group.
    pub fn start(conf: &Path) -> std::io::Result<TestServer> {
        use std::os::unix::process::CommandExt;
        let child = pgbackrest()
            .arg(format!("--config={}", conf.display()))
            .arg("server")
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        Ok(TestServer(child))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A certificate path pair.
pub type CertPair = (PathBuf, PathBuf);
