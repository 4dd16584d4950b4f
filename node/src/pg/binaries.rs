//! Finding the PostgreSQL server binaries: `pg_config --bindir`, then the newest
//! `/usr/lib/postgresql/*/bin`, then `PATH`; and checking the tools Meridian runs are there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::PgError;
use super::exec::{run_tool, RunAs};

/// The server tools Meridian needs, all in one bin dir.
pub const REQUIRED_TOOLS: &[&str] = &["initdb", "pg_ctl", "postgres", "pg_basebackup", "pg_rewind"];

/// A checked PostgreSQL bin dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgBinaries {
    dir: PathBuf,
}

impl PgBinaries {
    /// Uses `dir`, after checking it holds every tool in [`REQUIRED_TOOLS`].
    pub fn at(dir: impl Into<PathBuf>) -> Result<PgBinaries, PgError> {
        let dir = dir.into();
        let missing: Vec<&str> = REQUIRED_TOOLS
            .iter()
            .copied()
            .filter(|t| !is_executable(&dir.join(t)))
            .collect();
        if !missing.is_empty() {
            return Err(PgError::MissingBinaries {
                dir,
                missing: missing.join(", "),
            });
        }
        Ok(PgBinaries { dir })
    }

    /// Finds the bin dir: `pg_config --bindir` (bounded to 5 s), then the newest
    /// `/usr/lib/postgresql/<major>/bin`, then the dir of `initdb` on `PATH`.
    pub async fn detect() -> Result<PgBinaries, PgError> {
        let mut tried = Vec::new();
        if let Some(pg_config) = find_on_path("pg_config") {
            match run_tool(
                "detect bin dir: pg_config --bindir",
                &pg_config,
                ["--bindir"],
                &RunAs::CurrentUser,
                &[],
                Duration::from_secs(5),
            )
            .await
            {
                Ok(out) => {
                    let dir = PathBuf::from(out.stdout.trim());
                    match PgBinaries::at(&dir) {
                        Ok(b) => return Ok(b),
                        Err(e) => tried.push(e.to_string()),
                    }
                }
                Err(e) => tried.push(e.to_string()),
            }
        } else {
            tried.push("pg_config not on PATH".into());
        }
        if let Some(dir) = newest_versioned_bin_dir(Path::new("/usr/lib/postgresql")) {
            match PgBinaries::at(&dir) {
                Ok(b) => return Ok(b),
                Err(e) => tried.push(e.to_string()),
            }
        } else {
            tried.push("no /usr/lib/postgresql/*/bin".into());
        }
        if let Some(initdb) = find_on_path("initdb") {
            // Debian puts wrappers/symlinks on PATH: resolve to the real bin dir.
            let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
            if let Some(dir) = real.parent() {
                match PgBinaries::at(dir) {
                    Ok(b) => return Ok(b),
                    Err(e) => tried.push(e.to_string()),
                }
            }
        } else {
            tried.push("initdb not on PATH".into());
        }
        Err(PgError::NoBinDir(tried.join("; ")))
    }

    #[cfg(test)]
    pub(crate) fn for_tests(dir: &str) -> PgBinaries {
        PgBinaries { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of tool `name` in this bin dir.
    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// The `<root>/<major>/bin` with the highest numeric major version.
fn newest_versioned_bin_dir(root: &Path) -> Option<PathBuf> {
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    for entry in std::fs::read_dir(root).ok()? {
        let entry = entry.ok()?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(version) = parse_version(&name) else {
            continue;
        };
        let bin = entry.path().join("bin");
        if !bin.is_dir() {
            continue;
        }
        let better = match &best {
            Some((v, _)) => version > *v,
            None => true,
        };
        if better {
            best = Some((version, bin));
        }
    }
    best.map(|(_, p)| p)
}

fn parse_version(s: &str) -> Option<Vec<u32>> {
    s.split('.').map(|p| p.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(parse_version("15").unwrap() > parse_version("9.6").unwrap());
        assert!(parse_version("abc").is_none());
    }

    #[test]
    fn newest_bin_dir_wins() {
        let root = tempfile::tempdir().unwrap();
        for v in ["9.6", "15", "13", "notaversion"] {
            std::fs::create_dir_all(root.path().join(v).join("bin")).unwrap();
        }
        std::fs::create_dir_all(root.path().join("16")).unwrap(); // no bin: skipped
        assert_eq!(
            newest_versioned_bin_dir(root.path()).unwrap(),
            root.path().join("15").join("bin")
        );
    }

    #[test]
    fn missing_tools_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = PgBinaries::at(dir.path()).unwrap_err();
        let msg = e.to_string();
        for t in REQUIRED_TOOLS {
            assert!(msg.contains(t), "{msg}");
        }
    }
}
