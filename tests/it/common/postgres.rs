//! A real PostgreSQL for the tests: `initdb` and `pg_ctl` (Debian's `postgresql`) run as an
//! unprivileged user (`postgres` if the system has it, else `nobody`) in a temp folder, listening
//! on 127.0.0.1 and a free port, its socket in that folder, `fsync` on. Stopped (`-m immediate`)
//! and removed on drop.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The metrics a node exports only with `backend = "postgres"` (the operations checks count
/// them as exported; `cluster::` checks that a node on PostgreSQL exports each).
pub const CLUSTER_METRICS: &[&str] = &[
    "pforte_cluster_seats_used",
    "pforte_cluster_sessions",
    "pforte_cluster_node_lease_ok",
    "pforte_cluster_sessions_expired_total",
    "pforte_cluster_config_mismatch",
    "pforte_cluster_node_info",
];

/// The superuser's password (set by `initdb`; TCP logins need it, pforte reads it from a file).
pub const PASSWORD: &str = "pforte-test-secret";

/// Debian's PostgreSQL program folders, newest first.
pub fn bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs.reverse();
    dirs
}

/// The full path of a PostgreSQL program.
pub fn program(name: &str) -> PathBuf {
    for dir in bin_dirs() {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from(name)
}

/// A running PostgreSQL.
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    uid: u32,
    gid: u32,
}

fn account() -> (u32, u32) {
    for name in ["postgres", "nobody"] {
        if let Ok(Some(u)) = nix::unistd::User::from_name(name) {
            return (u.uid.as_raw(), u.gid.as_raw());
        }
    }
    (65534, 65534)
}

impl Postgres {
    /// initdb and start.
    pub fn start() -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("pforte-pg")
            .tempdir()
            .unwrap();
        let (uid, gid) = account();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(
            dir.path(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .unwrap();
        let pg = Postgres {
            dir,
            port: super::free_port(),
            uid,
            gid,
        };
        std::fs::write(pg.path("pwfile"), PASSWORD).unwrap();
        nix::unistd::chown(
            &pg.path("pwfile"),
            Some(nix::unistd::Uid::from_raw(uid)),
            None,
        )
        .unwrap();
        let data = pg.path("data");
        pg.run_as(
            program("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "pforte",
                "--pwfile",
                pg.path("pwfile").to_str().unwrap(),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
        );
        pg.start_server();
        pg.psql("postgres", "CREATE DATABASE pforte");
        pg
    }

    /// A streaming standby of `primary` (`pg_basebackup -R` over its socket), started and
    /// answering (read-only) on its own port and folder.
    pub fn standby_of(primary: &Postgres) -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("pforte-pg-standby")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(
            dir.path(),
            Some(nix::unistd::Uid::from_raw(primary.uid)),
            Some(nix::unistd::Gid::from_raw(primary.gid)),
        )
        .unwrap();
        let pg = Postgres {
            dir,
            port: super::free_port(),
            uid: primary.uid,
            gid: primary.gid,
        };
        std::fs::write(pg.path("pwfile"), PASSWORD).unwrap();
        let data = pg.path("data");
        pg.run_as(
            program("pg_basebackup"),
            &[
                "-h",
                primary.dir.path().to_str().unwrap(),
                "-p",
                &primary.port.to_string(),
                "-U",
                "pforte",
                "-D",
                data.to_str().unwrap(),
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
            ],
        );
        pg.start_server();
        pg
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&self) {
        self.run_as(
            program("pg_ctl"),
            &[
                "-D",
                self.path("data").to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "promote",
            ],
        );
    }

    /// Stops the server as a crash would (`immediate`: no shutdown checkpoint, nothing flushed).
    pub fn crash(&self) {
        self.run_as(
            program("pg_ctl"),
            &[
                "-D",
                self.path("data").to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// The server's processes: the postmaster (from `postmaster.pid`) and its children.
    /// Empty when the server is not running.
    fn processes(&self) -> Vec<nix::unistd::Pid> {
        let Some(main) = std::fs::read_to_string(self.path("data/postmaster.pid"))
            .ok()
            .and_then(|f| f.lines().next()?.trim().parse::<i32>().ok())
        else {
            return Vec::new();
        };
        let mut pids = vec![nix::unistd::Pid::from_raw(main)];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(main) {
                pids.push(nix::unistd::Pid::from_raw(pid));
            }
        }
        pids
    }

    /// Freezes the whole server (SIGSTOP to the postmaster and every backend): connections
    /// stay open and connection attempts are taken by the kernel, but nothing answers.
    pub fn freeze(&self) {
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// Lets a frozen server go on.
    pub fn thaw(&self) {
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run_as(&self, program: PathBuf, args: &[&str]) -> Output {
        let out = Command::new("setpriv")
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("--")
            .arg(&program)
            .args(args)
            .current_dir(self.dir.path())
            .env("PGTZ", "UTC")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} {args:?}: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts the server (again) and waits until it answers.
    pub fn start_server(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} -c fsync=on -c synchronous_commit=on -c max_connections=200 -c shared_buffers=128MB",
            self.port,
            self.dir.path().display()
        );
        self.run_as(
            program("pg_ctl"),
            &[
                "-D",
                self.path("data").to_str().unwrap(),
                "-l",
                self.path("server.log").to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
    }

    /// Stops the server (`fast`: connections are closed, the data stays).
    pub fn stop_server(&self) {
        self.run_as(
            program("pg_ctl"),
            &[
                "-D",
                self.path("data").to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// A connection URL for a database (pforte logs in over TCP with the password file).
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://pforte@127.0.0.1:{}/{db}", self.port)
    }

    /// A password file for pforte.
    pub fn password_file(&self) -> PathBuf {
        self.path("pwfile")
    }

    /// Runs SQL through `psql` on the Unix socket; returns its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", "pforte"])
            .arg("-h")
            .arg(self.dir.path())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .arg("-c")
            .arg(sql)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A fresh database.
    pub fn create_db(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
    }

    /// Environment for a pforte node on this database.
    pub fn node_env(&self, db: &str, node: &str, lease_s: u64) -> Vec<(String, String)> {
        vec![
            ("PFORTE_STORE__BACKEND".into(), "postgres".into()),
            ("PFORTE_STORE__URL".into(), self.url(db)),
            (
                "PFORTE_STORE__PASSWORD_FILE".into(),
                self.password_file().display().to_string(),
            ),
            ("PFORTE_STORE__NODE".into(), node.into()),
            ("PFORTE_STORE__LEASE_S".into(), lease_s.to_string()),
        ]
    }

    /// Waits until a query's output satisfies `cond`.
    pub fn wait_query(
        &self,
        db: &str,
        sql: &str,
        within: Duration,
        cond: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let out = self.psql(db, sql);
            if cond(&out) || Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.thaw();
        let _ = Command::new("setpriv")
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("--")
            .arg(program("pg_ctl"))
            .arg("-D")
            .arg(self.path("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
