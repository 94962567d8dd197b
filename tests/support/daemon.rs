//! Starting the real `pforte` binary on a config and waiting until it is ready: the one copy of
//! that code, included with `#[path]` by the integration tests (`tests/it/common/mod.rs`) and by
//! both benches. Self-contained (std + `nix`).
//!
//! [`Running::start`] spawns `pforte serve --config …`, polls `GET /readyz` on the HTTP port
//! until it answers 200 (bounded in time), and panics, with the daemon's log, when the process
//! exits first or is not ready in time. The process is killed on drop.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the daemon's output goes.
#[derive(Clone, Debug)]
pub enum Output {
    /// stdout and stderr appended to this file ([`Running::log`] reads it back).
    Log(PathBuf),
    /// stdout dropped, stderr on this process's stderr (a bench's terminal).
    Stderr,
}

/// How to start the daemon.
#[derive(Clone, Debug)]
pub struct Launch<'a> {
    pub bin: PathBuf,
    pub config: &'a Path,
    /// The config's `server.listen` port on 127.0.0.1, polled for `/readyz`.
    pub port: u16,
    /// `PFORTE_LOG`.
    pub log_level: &'a str,
    /// More environment (e.g. `PFORTE_SERVER__HEADER_TIMEOUT_MS`).
    pub env: &'a [(String, String)],
    pub output: Output,
    /// How long to wait for `/readyz` to answer 200.
    pub ready_within: Duration,
    /// The pause between two polls.
    pub poll: Duration,
}

/// The running daemon; killed on drop.
#[derive(Debug)]
pub struct Running {
    pub child: Child,
    pub port: u16,
    /// How long it took from spawning to the first 200 from `/readyz`.
    pub ready_after: Duration,
    output: Output,
}

impl Running {
    /// Spawns the daemon and waits until it is ready (see the module documentation).
    pub fn start(launch: Launch<'_>) -> Running {
        let started = Instant::now();
        let mut command = Command::new(&launch.bin);
        command
            .args(["serve", "--config"])
            .arg(launch.config)
            .env("PFORTE_LOG", launch.log_level)
            .envs(launch.env.iter().map(|(k, v)| (k, v)));
        match &launch.output {
            Output::Log(path) => {
                let out = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
                let err = out.try_clone().unwrap_or_else(|e| panic!("dup log: {e}"));
                command.stdout(out).stderr(err);
            }
            Output::Stderr => {
                command.stdout(Stdio::null()).stderr(Stdio::inherit());
            }
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", launch.bin.display()));
        let mut running = Running {
            child,
            port: launch.port,
            ready_after: Duration::ZERO,
            output: launch.output,
        };
        let deadline = started + launch.ready_within;
        loop {
            if let Ok(Some(status)) = running.child.try_wait() {
                panic!("pforte exited early with {status}; log:\n{}", running.log());
            }
            if http_get(running.port, "/readyz").is_some_and(|(s, _)| s == 200) {
                running.ready_after = started.elapsed();
                return running;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pforte not ready within {:?}; log:\n{}",
                    launch.ready_within,
                    running.log()
                );
            }
            std::thread::sleep(launch.poll);
        }
    }

    /// What the daemon wrote so far (with [`Output::Log`]; else a pointer to stderr).
    pub fn log(&self) -> String {
        match &self.output {
            Output::Log(path) => std::fs::read_to_string(path).unwrap_or_default(),
            Output::Stderr => "(on stderr above)".to_owned(),
        }
    }

    /// SIGTERM, then waits for the exit (a graceful stop).
    pub fn terminate(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Some((status, body))
}
