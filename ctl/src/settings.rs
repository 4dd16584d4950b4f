//! Where meridianctl connects and with what credentials: endpoints, admin token and TLS,
//! resolved from the command line, the environment and the config file, in that order of
//! precedence. Pure except for reading the files it is pointed at.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The config file (`--config`, default `~/.config/meridian/ctl.toml`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Same syntax as `--endpoint`.
    pub endpoints: Vec<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
    /// Bound on one request, in milliseconds.
    pub timeout_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// One member's admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    /// The member name its certificate carries (TLS server name), from `NAME=host:port`.
    pub server_name: Option<String>,
}

impl Endpoint {
    /// Parses `host:port`, `NAME=host:port` or either with an `http://` / `https://`
    /// prefix (the scheme follows the TLS settings, whatever is written).
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        let text = text.trim();
        let (name, rest) = match text.split_once('=') {
            Some((n, r)) => (Some(n.trim()), r.trim()),
            None => (None, text),
        };
        let rest = rest
            .strip_prefix("http://")
            .or_else(|| rest.strip_prefix("https://"))
            .unwrap_or(rest)
            .trim_end_matches('/');
        let bad =
            |why: &str| format!("endpoint {text:?}: {why} (expected host:port or NAME=host:port)");
        if let Some(n) = name {
            if n.is_empty() {
                return Err(bad("empty member name before '='"));
            }
        }
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
        Ok(Endpoint {
            address: rest.to_string(),
            server_name: name.map(str::to_string),
        })
    }

    /// What error messages call it.
    pub fn label(&self) -> String {
        match &self.server_name {
            Some(n) => format!("{n} ({})", self.address),
            None => self.address.clone(),
        }
    }
}

/// Everything a connection needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub endpoints: Vec<Endpoint>,
    pub token: String,
    pub tls: Option<TlsFiles>,
    pub timeout_ms: u64,
}

/// The connection options given on the command line or in the environment.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub endpoints: Vec<String>,
    /// `MERIDIAN_ENDPOINTS`, comma separated.
    pub env_endpoints: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub timeout_ms: Option<u64>,
}

pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// A larger bound would leave a script hanging on a dead cluster for minutes.
pub const MAX_TIMEOUT_MS: u64 = 120_000;

/// `~/.config/meridian/ctl.toml`, when `HOME` is set.
pub fn default_config_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".config/meridian/ctl.toml"))
}

/// Reads the config file. A missing default file is no error; a missing explicit one is.
pub fn load_file(path: Option<&Path>) -> anyhow::Result<FileConfig> {
    let (path, explicit) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => match default_config_path() {
            Some(p) => (p, false),
            None => return Ok(FileConfig::default()),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok(FileConfig::default())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {}",
            path.display(),
            e.message().trim().replace('\n', " ")
        )
    })
}

/// Command line beats environment beats config file. A token file is read here.
pub fn resolve(o: &Overrides, file: &FileConfig) -> anyhow::Result<Settings> {
    let raw: Vec<String> = if !o.endpoints.is_empty() {
        o.endpoints.iter().flat_map(|e| split_list(e)).collect()
    } else if let Some(env) = o.env_endpoints.as_deref().filter(|e| !e.trim().is_empty()) {
        split_list(env)
    } else {
        file.endpoints.clone()
    };
    anyhow::ensure!(
        !raw.is_empty(),
        "no endpoint: pass --endpoint HOST:PORT, set MERIDIAN_ENDPOINTS or list endpoints in the config file"
    );
    let endpoints = raw
        .iter()
        .map(|e| Endpoint::parse(e).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let token = if let Some(t) = &o.token {
        t.clone()
    } else if let Some(p) = &o.token_file {
        read_token(p)?
    } else if let Some(t) = &file.token {
        t.clone()
    } else if let Some(p) = &file.token_file {
        read_token(p)?
    } else {
        String::new()
    };

    let tls = match (&o.tls_ca, &file.tls) {
        (Some(ca), _) => Some(TlsFiles {
            ca_file: ca.clone(),
            cert_file: o.tls_cert.clone(),
            key_file: o.tls_key.clone(),
        }),
        (None, Some(t)) => Some(TlsFiles {
            ca_file: t.ca_file.clone(),
            cert_file: o.tls_cert.clone().or_else(|| t.cert_file.clone()),
            key_file: o.tls_key.clone().or_else(|| t.key_file.clone()),
        }),
        (None, None) => {
            anyhow::ensure!(
                o.tls_cert.is_none() && o.tls_key.is_none(),
                "--tls-cert and --tls-key need --tls-ca"
            );
            None
        }
    };
    if let Some(t) = &tls {
        anyhow::ensure!(
            t.cert_file.is_some() == t.key_file.is_some(),
            "a TLS client certificate needs both a certificate and a key file"
        );
    }
    let timeout_ms = o
        .timeout_ms
        .or(file.timeout_ms)
        .unwrap_or(DEFAULT_TIMEOUT_MS);
    anyhow::ensure!(
        (1..=MAX_TIMEOUT_MS).contains(&timeout_ms),
        "timeout of {timeout_ms} ms is outside 1..={MAX_TIMEOUT_MS} ms"
    );
    Ok(Settings {
        endpoints,
        token,
        tls,
        timeout_ms,
    })
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    Ok(t.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_or_without_name_and_scheme() {
        assert_eq!(
            Endpoint::parse("127.0.0.1:7001").unwrap(),
            Endpoint {
                address: "127.0.0.1:7001".into(),
                server_name: None
            }
        );
        let e = Endpoint::parse("a1=https://127.0.0.1:7001/").unwrap();
        assert_eq!(e.address, "127.0.0.1:7001");
        assert_eq!(e.server_name.as_deref(), Some("a1"));
        assert_eq!(e.label(), "a1 (127.0.0.1:7001)");
        for bad in ["127.0.0.1", ":7001", "h:0", "h:port", "=h:1", "h:70000"] {
            let err = Endpoint::parse(bad).unwrap_err();
            assert!(err.contains("expected host:port"), "{bad}: {err}");
        }
    }

    #[test]
    fn command_line_beats_environment_beats_file() {
        let file = FileConfig {
            endpoints: vec!["f:1".into()],
            token: Some("file-token".into()),
            ..FileConfig::default()
        };
        let mut o = Overrides {
            endpoints: vec!["a:1,b:2".into(), "c:3".into()],
            env_endpoints: Some("e:1".into()),
            ..Overrides::default()
        };
        let s = resolve(&o, &file).unwrap();
        let addrs: Vec<&str> = s.endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(addrs, ["a:1", "b:2", "c:3"]);
        assert_eq!(s.token, "file-token");
        assert_eq!(s.timeout_ms, DEFAULT_TIMEOUT_MS);

        o.endpoints.clear();
        o.token = Some("flag-token".into());
        let s = resolve(&o, &file).unwrap();
        assert_eq!(s.endpoints[0].address, "e:1");
        assert_eq!(s.token, "flag-token");

        o.env_endpoints = Some(" ".into());
        assert_eq!(resolve(&o, &file).unwrap().endpoints[0].address, "f:1");

        let err = resolve(&o, &FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("no endpoint"), "{err}");
    }

    #[test]
    fn tls_and_timeout_are_checked() {
        let o = Overrides {
            endpoints: vec!["a:1".into()],
            tls_cert: Some("c.pem".into()),
            ..Overrides::default()
        };
        assert!(resolve(&o, &FileConfig::default()).is_err());
        let o = Overrides {
            endpoints: vec!["a:1".into()],
            tls_ca: Some("ca.pem".into()),
            tls_cert: Some("c.pem".into()),
            ..Overrides::default()
        };
        let err = resolve(&o, &FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("both"), "{err}");
        let o = Overrides {
            endpoints: vec!["a:1".into()],
            timeout_ms: Some(0),
            ..Overrides::default()
        };
        assert!(resolve(&o, &FileConfig::default()).is_err());
    }

    #[test]
    fn the_config_file_is_strict_and_an_explicit_one_must_exist() {
        let dir = std::env::temp_dir().join(format!("meridianctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ctl.toml");
        std::fs::write(
            &p,
            "endpoints = [\"a1=127.0.0.1:7001\"]\ntoken = \"t\"\n[tls]\nca_file = \"/ca.pem\"\n",
        )
        .unwrap();
        let f = load_file(Some(&p)).unwrap();
        assert_eq!(f.endpoints, ["a1=127.0.0.1:7001"]);
        assert_eq!(f.tls.unwrap().ca_file, PathBuf::from("/ca.pem"));
        std::fs::write(&p, "endpoint = [\"x:1\"]\n").unwrap();
        let err = load_file(Some(&p)).unwrap_err().to_string();
        assert!(err.contains("endpoint"), "{err}");
        assert!(load_file(Some(&dir.join("missing.toml"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
