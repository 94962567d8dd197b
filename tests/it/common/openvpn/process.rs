//! Running programs bounded in time, signalling and stopping processes, the harness's work
//! directories and the files its processes write.

use super::*;

/// Writes an executable (0755) script. Scripts run by OpenVPN get no `PATH`: use absolute paths
/// (`/usr/bin/env`, `/bin/cat`) inside. To rule out `ETXTBSY` ("Text file busy") when another
/// thread forks while the file is being written, reference it as `"/bin/sh /path/script"` (quoted)
/// in the OpenVPN config rather than executing the file directly.
pub fn write_script(path: &Path, body: &str) -> Result<PathBuf, String> {
    fs::write(path, body).map_err(|e| format!("write {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    Ok(path.to_path_buf())
}

pub fn next_id() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub(super) fn base_dir() -> Result<PathBuf, String> {
    let dir = PathBuf::from(BASE_DIR);
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    Ok(dir)
}

pub fn work_dir(kind: &str, n: u32) -> Result<tempfile::TempDir, String> {
    tempfile::Builder::new()
        .prefix(&format!("{kind}-{}-{n}-", std::process::id()))
        .tempdir_in(base_dir()?)
        .map_err(|e| format!("create work dir: {e}"))
}

pub(super) fn cmd_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion (bounded by `timeout`: killed after it) with optional stdin;
/// `Ok(stdout)` on exit status 0, else `Err` with the command line, status and output.
pub fn run_bounded(
    mut cmd: Command,
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String, String> {
    let line = cmd_line(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("`{line}`: cannot start: {e}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(input.as_bytes());
    }
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    // A waiter thread blocks in wait(), so the exit is seen the moment it happens (the
    // benches time commands with this; polling would round every time up to the poll step).
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = thread::spawn(move || {
        let st = child.wait();
        let _ = tx.send(());
        st
    });
    let status = match rx.recv_timeout(timeout) {
        Ok(()) => match waiter.join() {
            Ok(Ok(st)) => st,
            _ => return Err(format!("`{line}`: wait failed")),
        },
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waiter.join();
            // The readers may block on grandchildren holding the pipes: leave them.
            return Err(format!("`{line}`: timed out after {timeout:?}"));
        }
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if status.success() {
        Ok(out)
    } else {
        Err(format!(
            "`{line}`: {status}; stdout: {}; stderr: {}",
            out.trim(),
            err.trim()
        ))
    }
}

pub(super) fn run(cmd: Command) -> Result<String, String> {
    run_bounded(cmd, None, Duration::from_secs(20))
}

pub(super) fn ip(args: &[&str]) -> Result<String, String> {
    let mut c = Command::new(tool("ip"));
    c.args(args);
    run(c)
}

pub(super) fn ip_batch(netns: Option<&str>, batch: &str) -> Result<String, String> {
    let mut c = Command::new(tool("ip"));
    if let Some(ns) = netns {
        c.args(["-n", ns]);
    }
    c.args(["-batch", "-"]);
    run_bounded(c, Some(batch), Duration::from_secs(20))
}

/// Whether `pid` names a live (non-zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ')'.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

pub fn signal(pids: &[u32], sig: &str) {
    if pids.is_empty() {
        return;
    }
    // The shell's builtin `kill` (no procps needed, no unsafe FFI).
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let mut c = Command::new("/bin/sh");
    c.args([
        "-c",
        &format!("kill -s {sig} {} 2>/dev/null; true", list.join(" ")),
    ]);
    let _ = run_bounded(c, None, Duration::from_secs(5));
}

pub(super) fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// SIGTERM the process (pid file, else the child), wait up to `grace`, then SIGKILL; reaps the
/// child. Returns how long it took.
pub fn stop_process(child: &mut Option<Child>, pid_file: &Path, grace: Duration) -> Duration {
    let t0 = Instant::now();
    let Some(mut ch) = child.take() else {
        return t0.elapsed();
    };
    let mut pids = vec![ch.id()];
    if let Some(p) = read_pid(pid_file).filter(|p| *p != ch.id()) {
        pids.push(p);
    }
    let done = |ch: &mut Child, pids: &[u32]| {
        matches!(ch.try_wait(), Ok(Some(_)) | Err(_)) && pids[1..].iter().all(|p| !pid_alive(*p))
    };
    if !done(&mut ch, &pids) {
        signal(&pids, "TERM");
        let deadline = Instant::now() + grace;
        while !done(&mut ch, &pids) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        if !done(&mut ch, &pids) {
            signal(&pids, "KILL");
            let _ = ch.kill();
        }
    }
    let _ = ch.wait();
    t0.elapsed()
}

pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Polls `path` until `needle` occurs at least `count` times (bounded by `timeout`). `abort` is
/// checked on each round with the current text and may end the wait with an error.
pub fn wait_in_file(
    path: &Path,
    needle: &str,
    count: usize,
    timeout: Duration,
    started: Instant,
    mut abort: impl FnMut(&str) -> Option<String>,
) -> Result<Duration, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = read_lossy(path);
        if text.matches(needle).count() >= count.max(1) {
            return Ok(started.elapsed());
        }
        if let Some(why) = abort(&text) {
            return Err(format!(
                "{why} (waiting for {needle:?} in {}); log:\n{text}",
                path.display()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "timeout after {timeout:?} waiting for {needle:?} in {}; log:\n{text}",
                path.display()
            ));
        }
        thread::sleep(POLL);
    }
}
