//! The OpenVPN client process in its namespace, and waiting for its tunnel.

use super::*;

/// Options for [`Client::connect`].
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// Extra config lines, verbatim (`setenv IV_GUI_VER …`, `setenv UV_…`, `tls-version-min …`).
    pub extra: Vec<String>,
    /// Username and password: written to a file and used with `auth-user-pass <file>`.
    pub auth_user_pass: Option<(String, String)>,
}

/// A real OpenVPN client running inside a [`ClientNs`] (`ip netns exec NS setsid openvpn …`).
/// Uses `auth-retry none`, so a refusal (AUTH_FAILED) ends the process. Stopped on drop.
#[derive(Debug)]
pub struct Client {
    dir: tempfile::TempDir,
    child: Option<Child>,
    ns: String,
    config: PathBuf,
    log: PathBuf,
    pid_file: PathBuf,
    started: Instant,
    server_tunnel_ip: Ipv4Addr,
    server_log: PathBuf,
    ns_ip: Ipv4Addr,
}

impl Client {
    /// Writes the client config and starts the client in `ns` against `server` (via the
    /// namespace's host-side veth address); returns at once: use [`Client::wait_connected`] or
    /// [`Client::wait_refused`].
    pub fn connect(
        ns: &ClientNs,
        cert: &ClientCert,
        server: &Server,
        opts: ClientOptions,
    ) -> Result<Client, String> {
        let n = next_id();
        let dir = work_dir("cli", n)?;
        let d = dir.path();
        let log = d.join("openvpn.log");
        let pid_file = d.join("openvpn.pid");
        let config = d.join("client.conf");
        let mut conf = vec![
            "client".to_owned(),
            format!("dev {CLIENT_TUN}"),
            "dev-type tun".to_owned(),
            "proto udp".to_owned(),
            format!("remote {} {}", ns.host_ip(), server.port()),
            "nobind".to_owned(),
            "remote-cert-tls server".to_owned(),
            "push-peer-info".to_owned(),
            "explicit-exit-notify 1".to_owned(),
            "disable-dco".to_owned(),
            "connect-retry 1".to_owned(),
            "auth-retry none".to_owned(),
            "verb 4".to_owned(),
            format!("log {}", log.display()),
            format!("ca {}", server.ca_cert().display()),
            format!("cert {}", cert.cert.display()),
            format!("key {}", cert.key.display()),
        ];
        if let Some((user, pass)) = &opts.auth_user_pass {
            let f = d.join("auth.txt");
            fs::write(&f, format!("{user}\n{pass}\n"))
                .map_err(|e| format!("write {}: {e}", f.display()))?;
            conf.push(format!("auth-user-pass {}", f.display()));
            conf.push("auth-nocache".to_owned());
        }
        conf.extend(opts.extra.iter().cloned());
        let mut text = conf.join("\n");
        text.push('\n');
        fs::write(&config, text).map_err(|e| format!("write {}: {e}", config.display()))?;
        let out =
            File::create(d.join("stdout.log")).map_err(|e| format!("create stdout.log: {e}"))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let started = Instant::now();
        let child = Command::new(tool("ip"))
            .args(["netns", "exec", ns.name()])
            .arg(tool("setsid"))
            .arg(tool("openvpn"))
            .arg("--config")
            .arg(&config)
            .arg("--writepid")
            .arg(&pid_file)
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start openvpn client: {e}"))?;
        Ok(Client {
            dir,
            child: Some(child),
            ns: ns.name().to_owned(),
            config,
            log,
            pid_file,
            started,
            server_tunnel_ip: server.tunnel_ip(),
            server_log: server.log_path().to_path_buf(),
            ns_ip: ns.ip(),
        })
    }

    /// Waits for "Initialization Sequence Completed"; returns the time since the client was
    /// started. Fails early on AUTH_FAILED or when the process exits.
    pub fn wait_connected(&mut self, timeout: Duration) -> Result<Duration, String> {
        let mut child = self.child.as_mut();
        wait_in_file(
            &self.log,
            "Initialization Sequence Completed",
            1,
            timeout,
            self.started,
            |text| {
                if text.contains("AUTH_FAILED") {
                    return Some("client refused (AUTH_FAILED)".to_owned());
                }
                exited(&mut child)
            },
        )
    }

    /// Waits for AUTH_FAILED in the log (a refusal by client-connect, auth script or management
    /// `client-deny`); returns the time since start. Fails early if the client connects instead.
    /// A `tls-verify` refusal gives no AUTH_FAILED and the client logs nothing about it until its
    /// `hand-window` (60 s) ends; it then retries for ever: wait for `"VERIFY SCRIPT ERROR"` in
    /// the server's log ([`Server::wait_log`]) instead.
    pub fn wait_refused(&self, timeout: Duration) -> Result<Duration, String> {
        wait_in_file(&self.log, "AUTH_FAILED", 1, timeout, self.started, |text| {
            text.contains("Initialization Sequence Completed")
                .then(|| "client connected, refusal expected".to_owned())
        })
    }

    /// The reason after `AUTH_FAILED,` sent by the server, if any (e.g. management `client-deny`'s
    /// client reason); `Some("")` for a bare AUTH_FAILED.
    pub fn auth_failed_message(&self) -> Option<String> {
        let log = self.log();
        let line = log.lines().find(|l| l.contains("AUTH_FAILED"))?;
        let rest = &line[line.find("AUTH_FAILED")? + "AUTH_FAILED".len()..];
        Some(rest.strip_prefix(',').unwrap_or("").trim().to_owned())
    }

    /// Waits until `needle` occurs at least `count` times in the log; returns the time since start.
    pub fn wait_log(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Duration, String> {
        wait_in_file(&self.log, needle, count, timeout, self.started, |_| None)
    }

    /// Waits for the process to end by itself (e.g. after a refusal or `client-kill … HALT`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.as_mut().map(|c| c.try_wait()) {
                None | Some(Ok(Some(_))) | Some(Err(_)) => return Ok(self.started.elapsed()),
                Some(Ok(None)) if Instant::now() < deadline => thread::sleep(POLL),
                Some(Ok(None)) => {
                    return Err(format!(
                        "client still running after {timeout:?}; log:\n{}",
                        self.log()
                    ));
                }
            }
        }
    }

    /// Whether the client process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The client's tunnel address, read from its tun device in the namespace.
    pub fn tunnel_ip(&self) -> Result<Ipv4Addr, String> {
        let out = ip(&[
            "-n", &self.ns, "-4", "-o", "addr", "show", "dev", CLIENT_TUN,
        ])?;
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("no IPv4 address on {CLIENT_TUN} in {}: {out:?}", self.ns))
    }

    /// The server's tunnel address (`.1`), the natural ping target.
    pub fn server_tunnel_ip(&self) -> Ipv4Addr {
        self.server_tunnel_ip
    }

    /// Pings `dst` from the namespace `count` times (0.2 s apart); `Ok(output)` when all `count`
    /// replies came (ping's exit status 0), bounded by `count / 5 + 5` seconds.
    pub fn ping(&self, dst: Ipv4Addr, count: u32) -> Result<String, String> {
        let deadline = (count / 5 + 5).to_string();
        let mut c = Command::new(tool("ip"));
        c.args(["netns", "exec", &self.ns]).arg(tool("ping")).args([
            "-n",
            "-q",
            "-i",
            "0.2",
            "-W",
            "2",
            "-w",
            &deadline,
            "-c",
            &count.to_string(),
            &dst.to_string(),
        ]);
        run_bounded(c, None, Duration::from_secs(u64::from(count / 5) + 10))
    }

    /// Pushes `bytes` of zeros through the tunnel over TCP, from the namespace to a listener the
    /// harness binds on the server's tunnel address on the host. Returns the bytes received
    /// (equal to `bytes` on success). Bounded by 30 s.
    pub fn transfer(&self, bytes: u64) -> Result<u64, String> {
        let listener = TcpListener::bind((self.server_tunnel_ip, 0))
            .map_err(|e| format!("bind on tunnel ip: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let receiver = thread::spawn(move || -> Result<u64, String> {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        thread::sleep(POLL)
                    }
                    Err(e) => return Err(format!("accept on {addr}: {e}")),
                }
            };
            stream.set_nonblocking(false).map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            let mut total = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n as u64,
                    Err(e) => return Err(format!("read after {total} bytes: {e}")),
                }
                if Instant::now() >= deadline {
                    return Err(format!("transfer timed out after {total} bytes"));
                }
            }
        });
        let SocketAddr::V4(a) = addr else {
            return Err("listener not IPv4".to_owned());
        };
        let script = format!(
            "exec 3>/dev/tcp/{}/{} && head -c {bytes} /dev/zero >&3",
            a.ip(),
            a.port()
        );
        let mut c = Command::new(tool("ip"));
        c.args(["netns", "exec", &self.ns])
            .arg(tool("timeout"))
            .arg("25")
            .arg(tool("bash"))
            .args(["-c", &script]);
        let sent = run_bounded(c, None, Duration::from_secs(30));
        let received = receiver
            .join()
            .map_err(|_| "receiver thread panicked".to_owned())?;
        sent?;
        let received = received?;
        if received == bytes {
            Ok(received)
        } else {
            Err(format!("sent {bytes} bytes, received {received}"))
        }
    }

    /// The client's work directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file written for this client.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The OpenVPN process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        let child = self.child.as_ref()?;
        Some(read_pid(&self.pid_file).unwrap_or(child.id()))
    }

    /// SIGTERM and wait for the process to end by itself (SIGKILL after 5 s); idempotent. A
    /// connected client sends its exit notification (`explicit-exit-notify 1`) at once, then
    /// lingers ~1.1 s before it exits. Returns how long it took. See [`Client::stop_fast`].
    pub fn stop(&mut self) -> Duration {
        stop_process(&mut self.child, &self.pid_file, STOP_GRACE)
    }

    /// SIGTERM, then SIGKILL as soon as the server has logged the client's exit notification
    /// ("CC-EEN exit message received", bounded by 1 s), or after 200 ms for a client that is not
    /// connected. The server sees the same as with [`Client::stop`] (it frees the client instance
    /// and runs client-disconnect ~5 s later), in ~5 ms instead of ~1.1 s. Used by `Drop`.
    pub fn stop_fast(&mut self) -> Duration {
        let t0 = Instant::now();
        if !self.is_running() {
            return stop_process(&mut self.child, &self.pid_file, Duration::ZERO);
        }
        if !self.log().contains("Initialization Sequence Completed") {
            stop_process(&mut self.child, &self.pid_file, Duration::from_millis(200));
            return t0.elapsed();
        }
        let me = format!("/{}:", self.ns_ip);
        let notified = |log: &Path| {
            read_lossy(log)
                .lines()
                .filter(|l| l.contains(&me) && l.contains("CC-EEN exit message received"))
                .count()
        };
        let before = notified(&self.server_log);
        if let Some(pid) = self.pid() {
            signal(&[pid], "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while notified(&self.server_log) <= before && self.is_running() && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(2));
        }
        stop_process(&mut self.child, &self.pid_file, Duration::ZERO);
        t0.elapsed()
    }

    /// SIGKILL only (a crash or a lost network: no exit notification). The server notices at its
    /// ping-restart (`keepalive 2 10` gives the server 20 s) and then runs client-disconnect.
    pub fn kill(&mut self) {
        if let Some(mut ch) = self.child.take() {
            let mut pids = vec![ch.id()];
            pids.extend(read_pid(&self.pid_file).filter(|p| *p != ch.id()));
            signal(&pids, "KILL");
            let _ = ch.kill();
            let _ = ch.wait();
        }
    }
}

pub(super) fn exited(child: &mut Option<&mut Child>) -> Option<String> {
    match child.as_mut().map(|c| c.try_wait()) {
        Some(Ok(Some(st))) => Some(format!("client exited ({st})")),
        _ => None,
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop_fast();
    }
}
