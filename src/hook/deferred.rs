//! OpenVPN's deferred client-connect (2.5+): the hook writes `2` into the deferred file, starts
//! a detached child that asks the daemon, and returns at once; the child writes the config file
//! and the verdict, a refusal only after OpenVPN has read the `2` (inotify), so that OpenVPN's
//! event loop never waits for the daemon and never misses a refusal.

use super::*;

/// Deferred client-connect (OpenVPN 2.5+): write `2` into the deferred file, start a detached
/// child that asks the daemon and writes the config file and the verdict, and return as soon
/// as the child is watching the deferred file (see [`deferred_child`]).
pub(super) fn deferred_connect(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    let (Some(deferred), Some(_)) = (
        env.get("client_connect_deferred_file"),
        env.get("client_connect_config_file"),
    ) else {
        eprintln!("pforte hook: OpenVPN offers no deferred client-connect here; deciding at once");
        return client_connect(opts, env);
    };
    if let Err(e) = std::fs::write(deferred, "2") {
        eprintln!("pforte hook: cannot write {deferred}: {e}; refusing");
        return REFUSE;
    }
    // Exit 0 with anything but `2` in the file is success to OpenVPN: never leave a `0` there
    // and exit 0. If the child cannot take over, decide at once, with the file emptied.
    let decide_now = |why: String| {
        eprintln!("pforte hook: cannot start the deferred decision: {why}; deciding at once");
        if let Err(e) = std::fs::write(deferred, "") {
            eprintln!("pforte hook: cannot write {deferred}: {e}; refusing");
            return REFUSE;
        }
        client_connect(opts, env)
    };
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return decide_now(format!("cannot find my own binary: {e}")),
    };
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["hook", "openvpn", "--deferred-child", "--socket"])
        .arg(&opts.socket)
        .args([
            "--zone",
            &opts.settings.zone,
            "--instance",
            &opts.settings.instance,
        ])
        .arg("--timeout")
        .arg(format!("{}ms", opts.timeout.as_millis()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .process_group(0);
    if opts.fail_open {
        cmd.arg("--fail-open");
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return decide_now(e.to_string()),
    };
    // The child says `1` on its stdout once it watches the deferred file; only then may
    // OpenVPN read it (which it does right after this process exits).
    let ready = child
        .stdout
        .take()
        .map(|out| read_ready(out, DEFERRED_READY_WAIT))
        .unwrap_or(false);
    if ready {
        ACCEPT
    } else {
        let _ = child.kill();
        let _ = child.wait();
        decide_now("the decision process did not get ready".into())
    }
}

/// How long the hook waits for its deferred child to watch the deferred file.
const DEFERRED_READY_WAIT: Duration = Duration::from_secs(1);

/// Reads the child's readiness byte, bounded by `wait`.
fn read_ready(out: std::process::ChildStdout, wait: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::io::Read as _;
    use std::os::fd::AsFd as _;
    let ms = PollTimeout::try_from(wait).unwrap_or(PollTimeout::NONE);
    let readable = {
        let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, ms), Ok(n) if n > 0)
    };
    let mut byte = [0u8; 1];
    let mut out = out;
    readable && matches!(out.read(&mut byte), Ok(1)) && byte[0] == b'1'
}

/// The detached half of a deferred client-connect.
///
/// OpenVPN 2.6 reads the deferred file once right after the hook exits
/// (`multi_client_connect_call_script` in multi.c) and takes anything but `2` there, a `0` or
/// an empty file included, for success; later reads are the deferred polls, where `0` refuses.
/// A refusal written before that first read would admit the client (seen with fast answers in
/// `benches/openvpn_connect.rs`). So the child watches the file with inotify before the hook
/// exits, and:
/// - an allow is written at once (the config file first, then `1`): success at any read;
/// - a refusal is written only after a read of the file has been seen (nobody else reads
///   it: the hook only wrote it), so OpenVPN's first read has happened; if none is seen
///   within the time bound, the `2` stays and OpenVPN's own deferred timeout refuses the
///   client.
pub(super) fn deferred_child(opts: &HookOptions, env: &HashMap<String, String>) -> i32 {
    let started = Instant::now();
    let (Some(deferred), Some(config)) = (
        env.get("client_connect_deferred_file"),
        env.get("client_connect_config_file"),
    ) else {
        return REFUSE;
    };
    let watch = match watch_reads(Path::new(deferred)) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("pforte hook: cannot watch {deferred}: {e}");
            return REFUSE; // no readiness byte: the hook decides at once
        }
    };
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if out.write_all(b"1").and_then(|()| out.flush()).is_err() {
            return REFUSE;
        }
    }
    let verdict = match ask(opts, env) {
        Verdict::Allow(text) => match write_config(Path::new(config), &text) {
            Ok(()) => "1",
            Err(e) => {
                eprintln!("pforte hook: cannot write {config}: {e}; refusing");
                "0"
            }
        },
        Verdict::Refuse => "0",
    };
    if verdict == "0" {
        let left = opts.timeout.saturating_sub(started.elapsed());
        if !wait_for_read(&watch, left) {
            eprintln!(
                "pforte hook: OpenVPN did not read {deferred} within the time bound; leaving it deferred (OpenVPN's own timeout refuses)"
            );
            return REFUSE;
        }
    }
    // Written over the `2` in place (no truncation first): a poll never sees an empty file.
    match write_config(Path::new(deferred), verdict) {
        Ok(()) => ACCEPT,
        Err(e) => {
            eprintln!("pforte hook: cannot write {deferred}: {e}");
            REFUSE
        }
    }
}

/// An inotify watch for reads of one file.
fn watch_reads(path: &Path) -> nix::Result<nix::sys::inotify::Inotify> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    ino.add_watch(
        path,
        AddWatchFlags::IN_ACCESS | AddWatchFlags::IN_CLOSE_NOWRITE,
    )?;
    Ok(ino)
}

/// Waits until the watched file has been read, at most `wait`. Reads seen before the call
/// count (they are queued in the watch).
fn wait_for_read(ino: &nix::sys::inotify::Inotify, wait: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::inotify::AddWatchFlags;
    use std::os::fd::AsFd as _;
    let deadline = Instant::now() + wait;
    loop {
        match ino.read_events() {
            Ok(events)
                if events.iter().any(|e| {
                    e.mask
                        .intersects(AddWatchFlags::IN_ACCESS | AddWatchFlags::IN_CLOSE_NOWRITE)
                }) =>
            {
                return true;
            }
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
            Err(_) => return false,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::NONE);
        if poll(&mut fds, ms).is_err() {
            return false;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The deferred child may write a refusal only after the deferred file has been read:
    /// a read is seen (also one that came before the wait), a write is not, and without a
    /// read the wait ends at its bound.
    #[test]
    fn deferred_child_sees_reads_of_the_deferred_file_and_only_reads() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("deferred");
        std::fs::write(&file, "2").unwrap();
        let watch = watch_reads(&file).unwrap();
        // Writes (the hook's own, or ours) are not reads.
        std::fs::write(&file, "2").unwrap();
        let t = Instant::now();
        assert!(!wait_for_read(&watch, Duration::from_millis(100)));
        assert!(t.elapsed() >= Duration::from_millis(100));
        // A read from elsewhere, while the child waits.
        let reader = {
            let file = file.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                std::fs::read_to_string(&file).unwrap()
            })
        };
        assert!(wait_for_read(&watch, Duration::from_secs(5)));
        assert_eq!(reader.join().unwrap(), "2");
        // A read that happened before the wait began counts too.
        let watch = watch_reads(&file).unwrap();
        std::fs::read_to_string(&file).unwrap();
        assert!(wait_for_read(&watch, Duration::from_millis(1)));
    }

    #[test]
    fn read_ready_wants_the_byte_within_its_bound() {
        use std::process::{Command, Stdio};
        let spawn = |script: &str| {
            Command::new("/bin/sh")
                .args(["-c", script])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut ok = spawn("printf 1; sleep 5");
        assert!(read_ready(
            ok.stdout.take().unwrap(),
            Duration::from_secs(5)
        ));
        let _ = ok.kill();
        let _ = ok.wait();
        let mut silent = spawn("sleep 5");
        let t = Instant::now();
        assert!(!read_ready(
            silent.stdout.take().unwrap(),
            Duration::from_millis(100)
        ));
        assert!(t.elapsed() < Duration::from_secs(2));
        let _ = silent.kill();
        let _ = silent.wait();
        let mut wrong = spawn("printf 0");
        assert!(!read_ready(
            wrong.stdout.take().unwrap(),
            Duration::from_secs(5)
        ));
        let _ = wrong.wait();
        let mut gone = spawn("exit 0");
        assert!(!read_ready(
            gone.stdout.take().unwrap(),
            Duration::from_secs(5)
        ));
        let _ = gone.wait();
    }
}
