//! The OpenVPN server: its options, config and process on the host.

use super::*;

/// Options for [`Server::start`].
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// UDP port; `None` picks a free one (and retries with another if the bind races).
    pub port: Option<u16>,
    /// Tunnel net for `server <net> <mask>` (server address `.1`); `None` allocates a free `/24`
    /// from [`TUNNEL_RANGE`]. A given net is claimed too; it must not overlap a host route.
    pub tunnel_net: Option<Ipv4Prefix>,
    /// Adds `management <dir>/mgmt.sock unix` (see [`Server::management_socket`]).
    pub management: bool,
    /// Extra config lines, verbatim, after the harness's own (`tls-verify …`, `client-connect …`,
    /// `client-disconnect …`, `setenv …`, `management-client-auth`, `duplicate-cn`, …).
    pub extra: Vec<String>,
    /// Bound on waiting for "Initialization Sequence Completed".
    pub ready_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            port: None,
            tunnel_net: None,
            management: false,
            extra: Vec::new(),
            ready_timeout: Duration::from_secs(10),
        }
    }
}

/// A real OpenVPN server (UDP, `dev-type tun`, `topology subnet`, `disable-dco`) running on the
/// host as a child process. Stopped on drop.
#[derive(Debug)]
pub struct Server {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    tunnel_net: Ipv4Prefix,
    tun_name: String,
    config: PathBuf,
    log: PathBuf,
    pid_file: PathBuf,
    mgmt: Option<PathBuf>,
    ca_cert: PathBuf,
    startup: Duration,
    _claim: Option<Claim>,
}

impl Server {
    /// Writes the config into a fresh work directory under [`BASE_DIR`], starts
    /// `openvpn --config … --writepid …` and waits for "Initialization Sequence Completed".
    /// On failure the error carries the log.
    pub fn start(pki: &Pki, opts: ServerOptions) -> Result<Server, String> {
        let (tunnel_net, claim) = match opts.tunnel_net {
            None => claim_subnet("tun", TUNNEL_RANGE, 24)?,
            Some(net) => {
                if let Some(r) = host_routes()?.iter().find(|r| r.overlaps(&net)) {
                    return Err(format!("tunnel net {net} overlaps host route {r}"));
                }
                let claim = Claim::try_take(&format!("tun-{}-{}", net.addr, net.len))?
                    .ok_or_else(|| format!("tunnel net {net} is in use by another test server"))?;
                (net, claim)
            }
        };
        let attempts = if opts.port.is_some() { 1 } else { 3 };
        let mut last_err = String::new();
        for _ in 0..attempts {
            let port = match opts.port {
                Some(p) => p,
                None => free_udp_port()?,
            };
            match Server::start_once(pki, &opts, port, tunnel_net) {
                Ok(mut s) => {
                    s._claim = Some(claim);
                    return Ok(s);
                }
                Err((e, retry)) => {
                    last_err = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(last_err)
    }

    // Err((message, worth retrying with another port)).
    fn start_once(
        pki: &Pki,
        opts: &ServerOptions,
        port: u16,
        net: Ipv4Prefix,
    ) -> Result<Server, (String, bool)> {
        let fail = |e: String| (e, false);
        let n = next_id();
        let dir = work_dir("srv", n).map_err(fail)?;
        let tun_name = format!("{TUN_PREFIX}{}s{n}", std::process::id());
        debug_assert!(tun_name.len() <= 15);
        let d = dir.path();
        let tmp = d.join("tmp");
        fs::create_dir_all(&tmp).map_err(|e| fail(format!("create {}: {e}", tmp.display())))?;
        let log = d.join("openvpn.log");
        let pid_file = d.join("openvpn.pid");
        let config = d.join("server.conf");
        let mgmt = opts.management.then(|| d.join("mgmt.sock"));
        let mut conf = vec![
            format!("port {port}"),
            "proto udp".to_owned(),
            format!("dev {tun_name}"),
            "dev-type tun".to_owned(),
            "topology subnet".to_owned(),
            format!("server {} {}", net.addr, net.netmask()),
            format!("ca {}", pki.ca_cert.display()),
            format!("cert {}", pki.server_cert.display()),
            format!("key {}", pki.server_key.display()),
            "dh none".to_owned(),
            "disable-dco".to_owned(),
            "keepalive 2 10".to_owned(),
            format!("tmp-dir {}", tmp.display()),
            "verb 4".to_owned(),
            format!("log {}", log.display()),
            "script-security 2".to_owned(),
        ];
        if let Some(m) = &mgmt {
            conf.push(format!("management {} unix", m.display()));
        }
        conf.extend(opts.extra.iter().cloned());
        let mut text = conf.join("\n");
        text.push('\n');
        fs::write(&config, text).map_err(|e| fail(format!("write {}: {e}", config.display())))?;
        let out = File::create(d.join("stdout.log"))
            .map_err(|e| fail(format!("create stdout.log: {e}")))?;
        let err = out.try_clone().map_err(|e| fail(e.to_string()))?;
        let t0 = Instant::now();
        let child = Command::new(tool("openvpn"))
            .current_dir(d)
            .arg("--config")
            .arg(&config)
            .arg("--writepid")
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| fail(format!("start openvpn: {e}")))?;
        let mut server = Server {
            dir,
            child: Some(child),
            port,
            tunnel_net: net,
            tun_name,
            config,
            log,
            pid_file,
            mgmt,
            ca_cert: pki.ca_cert.clone(),
            startup: Duration::ZERO,
            _claim: None,
        };
        let res = {
            let child = server.child.as_mut().expect("just set");
            let stdout = server.dir.path().join("stdout.log");
            wait_in_file(
                &server.log,
                "Initialization Sequence Completed",
                1,
                opts.ready_timeout,
                t0,
                |_| match child.try_wait() {
                    Ok(Some(st)) => Some(format!(
                        "openvpn server exited ({st}); stdout/stderr: {}",
                        read_lossy(&stdout).trim()
                    )),
                    _ => None,
                },
            )
        };
        match res {
            Ok(d) => {
                server.startup = d;
                Ok(server)
            }
            Err(e) => {
                let retry = e.contains("Address already in use");
                server.stop();
                Err((format!("OpenVPN server did not start: {e}"), retry))
            }
        }
    }

    /// The UDP port it listens on (all host addresses).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The tunnel net (`server` directive).
    pub fn tunnel_net(&self) -> Ipv4Prefix {
        self.tunnel_net
    }

    /// The server's own tunnel address (`.1` of the tunnel net), on the host's tun device.
    pub fn tunnel_ip(&self) -> Ipv4Addr {
        self.tunnel_net.host(1)
    }

    /// Name of the server's tun device on the host (`pft{pid}s{n}`), for
    /// `/sys/class/net/<tun>/statistics`.
    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }

    /// The server's work directory (config, log, pid file, `tmp/`, `mgmt.sock`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file written for this server.
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

    /// The management socket when [`ServerOptions::management`] was set.
    pub fn management_socket(&self) -> Option<&Path> {
        self.mgmt.as_deref()
    }

    /// The CA certificate clients must trust.
    pub fn ca_cert(&self) -> &Path {
        &self.ca_cert
    }

    /// The tun device's `(rx_bytes, tx_bytes)` from `/sys/class/net/<tun>/statistics`: whole IP
    /// packets from (rx) and to (tx) all clients together.
    pub fn tun_bytes(&self) -> Result<(u64, u64), String> {
        let read = |what: &str| {
            let path = format!("/sys/class/net/{}/statistics/{what}", self.tun_name);
            fs::read_to_string(&path)
                .map_err(|e| format!("read {path}: {e}"))?
                .trim()
                .parse::<u64>()
                .map_err(|e| format!("parse {path}: {e}"))
        };
        Ok((read("rx_bytes")?, read("tx_bytes")?))
    }

    /// Time from spawning the process to "Initialization Sequence Completed".
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The process id (from the pid file, else the child), while running.
    pub fn pid(&self) -> Option<u32> {
        let child = self.child.as_ref()?;
        Some(read_pid(&self.pid_file).unwrap_or(child.id()))
    }

    /// Whether the server process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits until `needle` occurs at least `count` times in the log; returns the time waited.
    pub fn wait_log(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Duration, String> {
        wait_in_file(&self.log, needle, count, timeout, Instant::now(), |_| None)
    }

    /// SIGTERM via the pid file, SIGKILL after 5 s; idempotent. Returns how long it took.
    pub fn stop(&mut self) -> Duration {
        stop_process(&mut self.child, &self.pid_file, STOP_GRACE)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A UDP port that was free a moment ago (bind to port 0, read it, release it).
pub fn free_udp_port() -> Result<u16, String> {
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind udp: {e}"))?;
    sock.local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}
