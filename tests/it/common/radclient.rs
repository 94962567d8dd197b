//! FreeRADIUS's `radclient` as the tests' NAS: FreeRADIUS's own encoder and dictionaries
//! (`/usr/share/freeradius`), one try of 2 s.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One radclient run, killed when dropped.
pub struct Radclient {
    child: Child,
    /// Its raddb folder, removed after it.
    _raddb: tempfile::TempDir,
}

impl Radclient {
    /// Starts `radclient -x -r 1 -t 2 127.0.0.1:PORT <command> <secret>` with `attrs` on stdin.
    pub fn start(port: u16, command: &str, secret: &str, attrs: &str) -> Radclient {
        let dict = tempfile::tempdir().unwrap();
        // radclient reads `<raddb>/dictionary` too; an empty one keeps the test independent of
        // freeradius-config (the vendor dictionaries come from `-D`, freeradius-common).
        std::fs::write(dict.path().join("dictionary"), "").unwrap();
        let mut child = Command::new("radclient")
            .args([
                "-x",
                "-r",
                "1",
                "-t",
                "2",
                "-D",
                "/usr/share/freeradius",
                "-d",
            ])
            .arg(dict.path())
            .arg(format!("127.0.0.1:{port}"))
            .args([command, secret])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(attrs.as_bytes()).unwrap();
        drop(stdin);
        Radclient {
            child,
            _raddb: dict,
        }
    }

    /// Waits (at most 10 s) for radclient to exit: its exit code and stdout + stderr.
    pub fn finish(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut code = None;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                code = status.code();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if code.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let mut out = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(mut s) = self.child.stderr.take() {
            let _ = s.read_to_string(&mut out);
        }
        (code, out)
    }
}

impl Drop for Radclient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
