//! `meridian-node --config FILE --check` on configs a user gets wrong when moving to real
//! hosts: an address that is not on this host, a bad `pg_hba.conf` line, a role without
//! its password. Each exits 2 with one line naming the key. Needs `cargo build -p
//! meridian-node` first.

use std::process::Command;

use meridian_tests::agents::node_binary;

const BASE: &str = r#"
cluster = "c"
state_dir = "STATE"

[member]
name = "a1"
region = "a"
kind = "data"

[postgres]
data_dir = "STATE/pgdata"
port = 15999
LISTEN
HBA
[postgres.replication]
password_file = "pw"
[postgres.rewind]
password_file = "pw"
[postgres.monitor]
password_file = "pw"

[api]
listen = "127.0.0.1:17999"
http_listen = "127.0.0.1:18999"

[raft]
bootstrap = true
"#;

/// Runs `--check` on BASE with the placeholders replaced; returns (exit code, stderr).
fn check(listen: &str, hba: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "secret\n").unwrap();
    let text = BASE
        .replace("STATE", &dir.path().join("state").display().to_string())
        .replace("LISTEN", listen)
        .replace("HBA", hba);
    let path = dir.path().join("a1.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(node_binary().unwrap())
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_valid_config_with_several_listen_addresses_passes() {
    let (code, stdout, stderr) = check(
        "listen_addr = [\"127.0.0.1\", \"::1\"]",
        "hba = [\"host all app 10.0.0.0/8 scram-sha-256\"]",
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("is valid"), "{stdout}");
}

#[test]
fn an_address_not_on_this_host_is_a_config_error() {
    // 192.0.2.0/24 (TEST-NET-1) is never an address of this machine.
    let (code, _, stderr) = check("listen_addr = [\"127.0.0.1\", \"192.0.2.7\"]", "");
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("postgres.listen_addr[1]: 192.0.2.7 is not an address of this host"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn a_bad_hba_line_is_named() {
    let (code, _, stderr) = check("", "hba = [\"host all app 10.0.0.0/8 scram\"]");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("postgres.hba[0]"), "{stderr}");
    assert!(stderr.contains("method \"scram\""), "{stderr}");
}
