//! A real ocserv 1.1 (certificate login) and real `openconnect` clients in their own network
//! namespaces. The server runs on the host side, started by this process and waited on (this
//! machine's PID 1 reaps no orphans); each client runs in a [`ClientNs`]. Everything is stopped
//! on drop.

use std::fs::{self, File};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::openvpn::{
    Claim, ClientNs, Ipv4Prefix, Pki, TUNNEL_RANGE, claim_subnet, find_tool, next_id, read_lossy,
    run_bounded, stop_process, wait_in_file, work_dir,
};

/// The Debian packages the ocserv rig needs.
pub const PACKAGES: &str = "ocserv openconnect openssl iproute2 iputils-ping";

/// A certificate for an ocserv client: subject `/O=Stadt/UID=<user>/CN=<device>`, so that
/// `cert-user-oid = UID` gives the user and `cert-group-oid = CN` the device id.
pub struct OcCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub sha256: String,
}

/// Issues an [`OcCert`] for `device` and `user`.
pub fn cert(pki: &Pki, device: &str, user: &str) -> OcCert {
    let (cert, key, sha256) = pki
        .client_subject(device, &format!("/O=Stadt/UID={user}/CN={device}"))
        .unwrap();
    OcCert { cert, key, sha256 }
}

/// What the server runs as its connect/disconnect script.
pub enum Script {
    /// `pforte hook ocserv` through its `pforte-hook-ocserv` link, settings from the
    /// environment (socket, zone, instance).
    Pforte {
        socket: PathBuf,
        zone: String,
        instance: String,
    },
    /// `#!/bin/sh` / `exit 0`.
    ShExit0,
    /// None at all.
    None,
}

/// Where an ocserv with `auth = radius` and `acct = radius` sends its requests (radcli): a
/// RADIUS server on 127.0.0.1 (pforte's front), its ports and the shared secret.
pub struct RadiusNas {
    pub auth_port: u16,
    pub acct_port: u16,
    pub secret: String,
    /// `stats-report-time`: the seconds between accounting Interim-Updates.
    pub interim_s: u32,
    /// `groupconfig=`: whether ocserv applies what the Access-Accept carries (`Session-Timeout`,
    /// `Framed-IP-Address`, `Framed-Route`, …) to the session.
    pub groupconfig: bool,
}

/// A running ocserv.
pub struct OcservServer {
    child: Option<Child>,
    work: tempfile::TempDir,
    /// TCP and UDP port.
    pub port: u16,
    /// The tunnel net (`ipv4-network`); the server is `.1` in it.
    pub net: Ipv4Prefix,
    /// The occtl socket.
    pub occtl_socket: PathBuf,
    /// `pin-sha256:…` of the server key, for openconnect's `--servercert`.
    pub pin: String,
    _claim: Claim,
}

impl OcservServer {
    /// Starts ocserv with certificate login and `script` as connect- and disconnect-script;
    /// waits until its occtl socket answers.
    pub fn start(pki: &Pki, script: Script) -> Result<OcservServer, String> {
        Self::start_with(pki, script, None)
    }

    /// Starts ocserv with user name and password login over RADIUS and RADIUS accounting
    /// (`auth = "radius[…,groupconfig=…]"`, `acct = "radius[…]"`) against `nas`; radcli's
    /// config and servers file are written into the server's folder. No scripts.
    pub fn start_radius(pki: &Pki, nas: &RadiusNas) -> Result<OcservServer, String> {
        Self::start_with(pki, Script::None, Some(nas))
    }

    fn start_with(
        pki: &Pki,
        script: Script,
        radius: Option<&RadiusNas>,
    ) -> Result<OcservServer, String> {
        let work = work_dir("ocs", next_id())?;
        let d = work.path().to_path_buf();
        let (net, claim) = claim_subnet("tunnel", TUNNEL_RANGE, 24)?;
        let port = super::free_port();
        let occtl_socket = d.join("occtl.sock");
        let mut env: Vec<(String, String)> = Vec::new();
        let script_path = match &script {
            Script::Pforte {
                socket,
                zone,
                instance,
            } => {
                let link = d.join("pforte-hook-ocserv");
                symlink(super::bin(), &link).map_err(|e| format!("link: {e}"))?;
                env.push(("PFORTE_SOCKET".into(), socket.display().to_string()));
                env.push(("PFORTE_ZONE".into(), zone.clone()));
                env.push(("PFORTE_INSTANCE".into(), instance.clone()));
                Some(link)
            }
            Script::ShExit0 => {
                let p = d.join("exit0.sh");
                fs::write(&p, "#!/bin/sh\nexit 0\n").map_err(|e| e.to_string())?;
                fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .map_err(|e| e.to_string())?;
                Some(p)
            }
            Script::None => None,
        };
        let scripts = script_path
            .map(|p| {
                format!(
                    "connect-script = {0}\ndisconnect-script = {0}\n",
                    p.display()
                )
            })
            .unwrap_or_default();
        let auth = match radius {
            None => "auth = \"certificate\"\n\
                     cert-user-oid = 0.9.2342.19200300.100.1.1\n\
                     cert-group-oid = 2.5.4.3\n"
                .to_string(),
            Some(nas) => {
                let servers = d.join("radius-servers");
                fs::write(&servers, format!("127.0.0.1 {}\n", nas.secret))
                    .map_err(|e| e.to_string())?;
                fs::set_permissions(
                    &servers,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .map_err(|e| e.to_string())?;
                let rc = d.join("radiusclient.conf");
                fs::write(
                    &rc,
                    format!(
                        "nas-identifier ocserv-e2e\n\
                         authserver 127.0.0.1:{auth}\n\
                         acctserver 127.0.0.1:{acct}\n\
                         servers {servers}\n\
                         dictionary /etc/radcli/dictionary\n\
                         default_realm\n\
                         radius_timeout 3\n\
                         radius_retries 1\n\
                         bindaddr *\n",
                        auth = nas.auth_port,
                        acct = nas.acct_port,
                        servers = servers.display(),
                    ),
                )
                .map_err(|e| e.to_string())?;
                format!(
                    "auth = \"radius[config={rc},groupconfig={gc}]\"\n\
                     acct = \"radius[config={rc}]\"\n\
                     stats-report-time = {interim}\n",
                    rc = rc.display(),
                    interim = nas.interim_s,
                    gc = nas.groupconfig,
                )
            }
        };
        let conf = format!(
            "{auth}\
             ca-cert = {ca}\nserver-cert = {sc}\nserver-key = {sk}\n\
             tcp-port = {port}\nudp-port = {port}\n\
             socket-file = {d}/ocserv.sock\nocctl-socket-file = {occ}\nuse-occtl = true\n\
             pid-file = {d}/ocserv.pid\n\
             run-as-user = nobody\nrun-as-group = nogroup\nisolate-workers = true\n\
             max-clients = 100\nmax-same-clients = 0\n\
             ipv4-network = {net}\nroute = 10.1.0.0/255.255.0.0\n\
             device = vpns\nkeepalive = 30\ndpd = 30\nmobile-dpd = 30\n\
             {scripts}",
            ca = pki.ca_cert.display(),
            sc = pki.server_cert.display(),
            sk = pki.server_key.display(),
            d = d.display(),
            occ = occtl_socket.display(),
            net = net,
        );
        let conf_path = d.join("ocserv.conf");
        fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        let pin = pin_sha256(&pki.server_cert)?;
        let log = File::create(d.join("ocserv.log")).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(find_tool("ocserv").ok_or("no ocserv")?)
            .args(["-f", "-d", "2", "-c"])
            .arg(&conf_path)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start ocserv: {e}"))?;
        let server = OcservServer {
            child: Some(child),
            work,
            port,
            net,
            occtl_socket,
            pin,
            _claim: claim,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if server.users().is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!("ocserv did not come up:\n{}", server.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's tunnel address (the clients ping it through the tunnel).
    /// Pings the server's tunnel address from a client namespace (`count` pings of `size`
    /// bytes, 50 ms apart, bounded to 20 s): the way to show traffic goes through the tunnel.
    pub fn ping_from(&self, ns: &ClientNs, size: &str, count: &str) -> Result<String, String> {
        let target = self.tunnel_ip().to_string();
        let args = ["-c", count, "-i", "0.05", "-s", size, "-W", "2", &target];
        ns.exec("ping", &args, Duration::from_secs(20))
    }

    pub fn tunnel_ip(&self) -> std::net::Ipv4Addr {
        self.net.host(1)
    }

    /// The server's log.
    pub fn log(&self) -> String {
        read_lossy(&self.work.path().join("ocserv.log"))
    }

    /// `occtl --json show users`.
    pub fn users(&self) -> Result<String, String> {
        let mut c = Command::new(find_tool("occtl").ok_or("no occtl")?);
        c.arg("-s")
            .arg(&self.occtl_socket)
            .args(["--json", "show", "users"]);
        run_bounded(c, None, Duration::from_secs(5))
    }

    /// How many users ocserv lists.
    pub fn user_count(&self) -> usize {
        self.users()
            .ok()
            .and_then(|t| serde_json::from_str::<Vec<serde_json::Value>>(&t).ok())
            .map_or(0, |v| v.len())
    }
}

impl Drop for OcservServer {
    fn drop(&mut self) {
        let pid_file = self.work.path().join("ocserv.pid");
        stop_process(&mut self.child, &pid_file, Duration::from_secs(5));
    }
}

/// `pin-sha256:<base64 of the SHA-256 of the certificate's public key (SPKI)>`.
fn pin_sha256(cert: &Path) -> Result<String, String> {
    let mut c = Command::new(find_tool("sh").ok_or("no sh")?);
    c.arg("-c").arg(format!(
        "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
        cert.display()
    ));
    let out = run_bounded(c, None, Duration::from_secs(5))?;
    Ok(format!("pin-sha256:{}", out.trim()))
}

/// How an [`OcClient`] logs in.
enum Login<'a> {
    Cert(&'a OcCert),
    Password { user: &'a str, password: &'a str },
}

/// A real `openconnect` client in a namespace; stopped on drop.
pub struct OcClient {
    child: Option<Child>,
    dir: tempfile::TempDir,
    started: Instant,
}

impl OcClient {
    /// Starts openconnect in `ns` against `server`; returns at once.
    pub fn start(ns: &ClientNs, cert: &OcCert, server: &OcservServer) -> Result<OcClient, String> {
        Self::start_with(ns, Login::Cert(cert), server)
    }

    /// Starts openconnect in `ns` with a user name and a password (`--user`,
    /// `--passwd-on-stdin`); returns at once.
    pub fn start_password(
        ns: &ClientNs,
        user: &str,
        password: &str,
        server: &OcservServer,
    ) -> Result<OcClient, String> {
        Self::start_with(ns, Login::Password { user, password }, server)
    }

    fn start_with(
        ns: &ClientNs,
        login: Login<'_>,
        server: &OcservServer,
    ) -> Result<OcClient, String> {
        let dir = work_dir("occ", next_id())?;
        let d = dir.path();
        // A minimal vpnc-script: the tun up with its address and a route to the server's
        // tunnel net (the stock script rewrites the shared /etc/resolv.conf).
        let script = d.join("vpnc.sh");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\ncase \"$reason\" in connect)\n  ip link set dev \"$TUNDEV\" up mtu 1300\n  ip addr add \"$INTERNAL_IP4_ADDRESS/32\" dev \"$TUNDEV\"\n  ip route add {} dev \"$TUNDEV\"\n  echo TUNNEL-UP >> {}\n;; esac\nexit 0\n",
                server.net,
                d.join("events").display()
            ),
        )
        .map_err(|e| e.to_string())?;
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let log = File::create(d.join("openconnect.log")).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut c = ns.command(
            find_tool("openconnect")
                .ok_or("no openconnect")?
                .to_str()
                .unwrap_or("openconnect"),
        );
        c.args(["--non-inter", "-i", "tun0"]);
        let password = match login {
            Login::Cert(cert) => {
                c.arg("--certificate")
                    .arg(&cert.cert)
                    .arg("--sslkey")
                    .arg(&cert.key)
                    .stdin(Stdio::null());
                None
            }
            Login::Password { user, password } => {
                c.args(["--user", user, "--passwd-on-stdin"])
                    .stdin(Stdio::piped());
                Some(password)
            }
        };
        c.arg("--servercert")
            .arg(&server.pin)
            .arg("--script")
            .arg(&script)
            .arg(format!("https://{}:{}/", ns.host_ip(), server.port))
            .stdout(log)
            .stderr(err);
        let mut child = c.spawn().map_err(|e| format!("start openconnect: {e}"))?;
        if let Some(password) = password {
            use std::io::Write;
            // Written and closed at once: a pipe this small never blocks.
            let mut stdin = child.stdin.take().ok_or("no stdin")?;
            let _ = writeln!(stdin, "{password}");
        }
        Ok(OcClient {
            child: Some(child),
            dir,
            started,
        })
    }

    /// The client's output.
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("openconnect.log"))
    }

    /// Waits until the tunnel is up (the script ran); the time since start.
    pub fn wait_up(&mut self, timeout: Duration) -> Result<Duration, String> {
        let child = &mut self.child;
        let log = self.dir.path().join("openconnect.log");
        wait_in_file(
            &self.dir.path().join("events"),
            "TUNNEL-UP",
            1,
            timeout,
            self.started,
            |_| match child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(st))) => {
                    Some(format!("openconnect exited ({st}):\n{}", read_lossy(&log)))
                }
                _ => None,
            },
        )
    }

    /// Waits for the process to end; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>, String> {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        loop {
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                self.child = None;
                return Ok(st.code());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "openconnect still running after {timeout:?}:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for OcClient {
    fn drop(&mut self) {
        let pid_file = self.dir.path().join("none.pid");
        stop_process(&mut self.child, &pid_file, Duration::from_secs(3));
    }
}
