//! `meridianctl restore --as-new-cluster NAME`: turning a point-in-time restore into the
//! data directory of a new one-member Meridian cluster. Pure text transformations: the
//! new agent's config derived from the restoring member's own (same region, roles,
//! secrets, TLS files; new cluster name, data dir, port, state dir, listen addresses; no
//! peers, bootstrap on, no `[backup]` so it never archives into the old cluster's stanza),
//! and the restored `postgresql.auto.conf` without the inspection overrides, so the new
//! agent's `meridian.conf` governs. The agent then adopts the directory like any existing
//! data dir (`agent/member.rs`, `check_data_dir` and `bootstrap`).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What the operator asked for with `--as-new-cluster`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCluster {
    /// The new cluster's name.
    pub cluster: String,
    /// The new agent's gRPC listen address (`host:port`).
    pub listen: String,
    /// The new agent's HTTP listen address (`host:port`).
    pub http_listen: String,
}

/// The first line of the block `restored_overrides` appends to `postgresql.auto.conf`.
pub const INSPECTION_MARKER: &str =
    "# Meridian: a point-in-time restore for inspection, not a member.";

/// `postgresql.auto.conf` without the inspection block (and whatever follows it: nothing
/// else writes there before the new agent starts).
pub fn strip_inspection_overrides(auto_conf: &str) -> String {
    match auto_conf.find(INSPECTION_MARKER) {
        Some(i) => auto_conf[..i].trim_end_matches('\n').to_string() + "\n",
        None => auto_conf.to_string(),
    }
}

fn table<'a>(root: &'a mut toml::Table, key: &str) -> Result<&'a mut toml::Table, String> {
    root.entry(key)
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .ok_or_else(|| format!("[{key}] is not a table"))
}

/// The new member's config, from the restoring member's config text.
pub fn new_cluster_config(
    original: &str,
    nc: &NewCluster,
    data_dir: &Path,
    port: u16,
    state_dir: &Path,
) -> Result<String, String> {
    let mut root: toml::Table = original
        .parse()
        .map_err(|e| format!("reading this member's config: {e}"))?;
    let s = |v: &str| toml::Value::String(v.to_string());
    root.insert("cluster".into(), s(&nc.cluster));
    root.insert("state_dir".into(), s(&state_dir.display().to_string()));
    root.remove("peers");
    root.remove("backup");
    let api = table(&mut root, "api")?;
    api.insert("listen".into(), s(&nc.listen));
    api.insert("http_listen".into(), s(&nc.http_listen));
    let raft = table(&mut root, "raft")?;
    raft.insert("bootstrap".into(), toml::Value::Boolean(true));
    raft.insert("join".into(), toml::Value::Array(Vec::new()));
    let pg = table(&mut root, "postgres")?;
    pg.insert("data_dir".into(), s(&data_dir.display().to_string()));
    pg.insert("port".into(), toml::Value::Integer(i64::from(port)));
    let body = toml::to_string(&root).map_err(|e| format!("writing the new config: {e}"))?;
    Ok(format!(
        "# Written by `meridianctl restore --as-new-cluster {}`: a one-member Meridian cluster\n\
         # adopting the restored data directory {}. No [backup]: add one with a new stanza\n\
         # (or repository) before it archives.\n{body}",
        nc.cluster,
        data_dir.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = r#"
cluster = "prod"
state_dir = "/var/lib/meridian/a1"

[member]
name = "a1"
region = "eu"
kind = "data"

[postgres]
data_dir = "/var/lib/meridian/a1/pgdata"
port = 5432
listen_addr = "10.0.0.1"

[api]
listen = "10.0.0.1:7000"
http_listen = "10.0.0.1:8008"
token_file = "token"

[raft]
bootstrap = false
join = ["a2"]

[peers.a2]
api = "10.0.0.2:7000"

[backup]
repo_path = "/var/lib/pgbackrest"
"#;

    #[test]
    fn the_new_config_is_a_bootstrapping_member_of_a_new_cluster() {
        let nc = NewCluster {
            cluster: "prod-restored".into(),
            listen: "10.0.0.1:7100".into(),
            http_listen: "10.0.0.1:8108".into(),
        };
        let text = new_cluster_config(
            ORIGINAL,
            &nc,
            Path::new("/srv/restored"),
            6543,
            Path::new("/srv/restored.meridian"),
        )
        .unwrap();
        let v: toml::Table = text.parse().unwrap();
        assert_eq!(v["cluster"].as_str(), Some("prod-restored"));
        assert_eq!(v["state_dir"].as_str(), Some("/srv/restored.meridian"));
        assert_eq!(v["member"]["name"].as_str(), Some("a1"));
        assert_eq!(v["member"]["region"].as_str(), Some("eu"));
        assert_eq!(v["postgres"]["data_dir"].as_str(), Some("/srv/restored"));
        assert_eq!(v["postgres"]["port"].as_integer(), Some(6543));
        assert_eq!(v["postgres"]["listen_addr"].as_str(), Some("10.0.0.1"));
        assert_eq!(v["api"]["listen"].as_str(), Some("10.0.0.1:7100"));
        assert_eq!(v["api"]["token_file"].as_str(), Some("token"));
        assert_eq!(v["raft"]["bootstrap"].as_bool(), Some(true));
        assert_eq!(v["raft"]["join"].as_array().map(Vec::len), Some(0));
        assert!(v.get("peers").is_none());
        assert!(v.get("backup").is_none());
    }

    #[test]
    fn inspection_overrides_are_stripped() {
        let auto = format!(
            "# Do not edit this file manually!\nwork_mem = '8MB'\n\n{INSPECTION_MARKER}\nport = 6543\n"
        );
        assert_eq!(
            strip_inspection_overrides(&auto),
            "# Do not edit this file manually!\nwork_mem = '8MB'\n"
        );
        assert_eq!(strip_inspection_overrides("a = 1\n"), "a = 1\n");
    }
}
