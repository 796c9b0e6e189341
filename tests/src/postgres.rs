//! A private Postgres cluster for tests that stop and restart the database server.
//!
//! `initdb` and `pg_ctl` from the machine's Postgres installation run the cluster in a
//! temporary directory on a free port, with `fsync=off`. Postgres refuses to run as root,
//! so under root they run as the `postgres` OS user (`runuser -u postgres --`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

/// A running private cluster; stopped (immediately) when dropped.
#[derive(Debug)]
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `initdb` and `pg_ctl`, or the
/// directory in `PATCHPORT_TEST_PG_BIN`.
fn find_bin() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("PATCHPORT_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl PrivatePostgres {
    /// Creates and starts a cluster. `Ok(Err(reason))` when this machine cannot run one
    /// (no Postgres binaries; root without a `postgres` user).
    pub fn start() -> anyhow::Result<Result<Self, String>> {
        let Some(bin) = find_bin() else {
            return Ok(Err(
                "no Postgres binaries in /usr/lib/postgresql/*/bin (set PATCHPORT_TEST_PG_BIN)"
                    .to_owned(),
            ));
        };
        let as_postgres = is_root();
        let dir = tempfile::tempdir()?;
        if as_postgres {
            let ids = |flag: &str| -> Option<u32> {
                let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
                String::from_utf8(out.stdout).ok()?.trim().parse().ok()
            };
            let (Some(uid), Some(gid)) = (ids("-u"), ids("-g")) else {
                return Ok(Err(
                    "running as root and there is no postgres user".to_owned()
                ));
            };
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .context("giving the cluster directory to the postgres user")?;
        }
        let pg = Self {
            dir,
            bin,
            port: free_port()?,
            as_postgres,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().context("utf-8 path")?,
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        )?;
        pg.start_server()?;
        Ok(Ok(pg))
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (after [`stop`](Self::stop)) and waits until it accepts connections.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -c fsync=off -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().context("utf-8 path")?,
                "-l",
                log.to_str().context("utf-8 path")?,
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// Stops the server with `-m fast`: sessions are disconnected, open transactions
    /// roll back.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg_ctl_stop("fast")
    }

    fn pg_ctl_stop(&self, mode: &str) -> anyhow::Result<()> {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().context("utf-8 path")?,
                "-m",
                mode,
                "-w",
                "-t",
                "60",
                "stop",
            ],
        )
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl_stop("immediate");
    }
}
