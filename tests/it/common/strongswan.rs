//! A real strongSwan 5.9 server (`charon` + `swanctl`) and clients (a second `charon` each),
//! every one in its own network namespace with its own runtime directory (bind-mounted over
//! /run: charon's pid file path is fixed), both ends on the userspace `kernel-libipsec` (this
//! kernel has no ESP). IKEv2 with a machine certificate (RSA: the packaged plugins have no EC)
//! in round 1 and an EAP-MD5 user in round 2. Everything is stopped and removed on drop.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::openvpn::{
    ClientNs, find_tool, next_id, read_lossy, run_bounded, stop_process, work_dir,
};

/// The Debian packages the strongSwan rig needs.
pub const PACKAGES: &str = "strongswan-charon strongswan-swanctl libcharon-extra-plugins";

const CHARON: &str = "/usr/lib/ipsec/charon";
const PLUGINS: &str = "random nonce pem pkcs1 pkcs8 x509 revocation constraints pubkey gmp hmac kdf aes sha1 sha2 curve25519 kernel-libipsec kernel-netlink socket-default vici updown attr eap-identity eap-md5 md5";
/// The address the server answers pings on (its own /32 on `lo`, inside its namespace).
pub const TARGET: &str = "10.99.0.1";
const POOL: &str = "10.99.1.0/24";
const CNF: &str = "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n[ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n[server]\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n[client]\nbasicConstraints = CA:FALSE\nextendedKeyUsage = clientAuth\n";

/// An RSA test PKI made with the openssl CLI.
pub struct RsaPki {
    dir: tempfile::TempDir,
}

/// A client certificate.
#[derive(Clone)]
pub struct SwanCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SHA-256 fingerprint, colon hex.
    pub sha256: String,
    /// The subject as strongSwan prints it.
    pub dn: String,
}

impl RsaPki {
    /// CA and server certificate (`CN=vpn-server`).
    pub fn create() -> RsaPki {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cnf"), CNF).unwrap();
        let p = RsaPki { dir };
        p.make("/CN=pforte test CA", "ca", "ca", false);
        p.make("/CN=vpn-server", "server", "server", true);
        p
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn make(&self, subj: &str, ext: &str, name: &str, signed: bool) {
        let mut c = Command::new(find_tool("openssl").unwrap());
        c.arg("req")
            .arg("-config")
            .arg(self.path("cnf"))
            .args([
                "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", subj,
            ])
            .args(["-extensions", ext, "-keyout"])
            .arg(self.path(&format!("{name}.key")))
            .arg("-out")
            .arg(self.path(&format!("{name}.crt")));
        if signed {
            c.arg("-CA")
                .arg(self.path("ca.crt"))
                .arg("-CAkey")
                .arg(self.path("ca.key"));
        }
        run_bounded(c, None, Duration::from_secs(30)).unwrap();
    }

    /// A client certificate `/O=Stadt/CN=<device>`.
    pub fn client(&self, device: &str) -> SwanCert {
        self.make(&format!("/O=Stadt/CN={device}"), "client", device, true);
        let cert = self.path(&format!("{device}.crt"));
        let mut c = Command::new(find_tool("openssl").unwrap());
        c.args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&cert);
        let out = run_bounded(c, None, Duration::from_secs(5)).unwrap();
        let sha256 = out
            .lines()
            .find_map(|l| l.strip_prefix("sha256 Fingerprint="))
            .unwrap()
            .trim()
            .to_ascii_lowercase();
        SwanCert {
            key: self.path(&format!("{device}.key")),
            cert,
            sha256,
            dn: format!("O=Stadt, CN={device}"),
        }
    }
}

/// One charon in a namespace with its own files.
struct Charon {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Charon {
    fn start(ns: &str, dir: tempfile::TempDir) -> Result<Charon, String> {
        let mut charon = Charon { child: None, dir };
        charon.spawn(ns)?;
        Ok(charon)
    }

    /// Stops charon (its VICI socket goes away).
    fn stop(&mut self) {
        let pid = self.dir.path().join("run/charon.pid");
        stop_process(&mut self.child, &pid, Duration::from_secs(5));
        let _ = fs::remove_file(self.vici());
    }

    fn spawn(&mut self, ns: &str) -> Result<(), String> {
        let d = self.dir.path();
        fs::create_dir_all(d.join("run")).map_err(|e| e.to_string())?;
        fs::write(
            d.join("strongswan.conf"),
            format!(
                "charon {{\n load_modular = no\n load = {PLUGINS}\n install_virtual_ip = yes\n plugins {{\n  vici {{\n   socket = unix://{vici}\n  }}\n }}\n filelog {{\n  f {{\n   path = {log}\n   default = 1\n  }}\n }}\n}}\n",
                vici = d.join("charon.vici").display(),
                log = d.join("charon.log").display(),
            ),
        )
        .map_err(|e| e.to_string())?;
        let out = File::create(d.join("stdout.log")).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(find_tool("ip").ok_or("no ip")?)
            .args(["netns", "exec", ns])
            .arg(find_tool("unshare").ok_or("no unshare")?)
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mount --bind '{}' /run && exec {CHARON}",
                d.join("run").display()
            ))
            .env("STRONGSWAN_CONF", d.join("strongswan.conf"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start charon: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.vici().exists() {
            if Instant::now() > deadline {
                return Err(format!("charon did not come up:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn vici(&self) -> PathBuf {
        self.dir.path().join("charon.vici")
    }

    fn log(&self) -> String {
        read_lossy(&self.dir.path().join("charon.log"))
    }

    fn swanctl(&self, args: &[&str]) -> Result<String, String> {
        let mut c = Command::new(find_tool("swanctl").ok_or("no swanctl")?);
        c.args(args)
            .arg("--uri")
            .arg(format!("unix://{}", self.vici().display()))
            .env("SWANCTL_DIR", self.dir.path().join("swanctl"));
        run_bounded(c, None, Duration::from_secs(20))
    }

    /// Writes swanctl.conf and the credentials, and loads them.
    fn load(&self, conf: &str, files: &[(&str, &Path)]) -> Result<(), String> {
        let s = self.dir.path().join("swanctl");
        for sub in ["x509", "x509ca", "private"] {
            fs::create_dir_all(s.join(sub)).map_err(|e| e.to_string())?;
        }
        for (to, from) in files {
            fs::copy(from, s.join(to)).map_err(|e| format!("copy {}: {e}", from.display()))?;
        }
        fs::write(s.join("swanctl.conf"), conf).map_err(|e| e.to_string())?;
        self.swanctl(&["--load-all", "--noprompt"]).map(drop)
    }
}

impl Drop for Charon {
    fn drop(&mut self) {
        let pid = self.dir.path().join("run/charon.pid");
        stop_process(&mut self.child, &pid, Duration::from_secs(5));
    }
}

/// The server: a namespace, charon with the `rw` connection (round 1 certificate, round 2
/// EAP-MD5), a pool, and a /32 to ping.
pub struct SwanServer {
    charon: Charon,
    pub ns: ClientNs,
    links: std::sync::atomic::AtomicU32,
}

/// EAP users and their secrets (the secret is `<user>-pw`).
pub const EAP_USERS: [&str; 7] = ["alice", "bob", "carol", "dora", "frank", "gina", "ivan"];

impl SwanServer {
    pub fn start(pki: &RsaPki) -> Result<SwanServer, String> {
        let ns = ClientNs::create()?;
        ns.exec(
            "ip",
            &["addr", "add", &format!("{TARGET}/32"), "dev", "lo"],
            Duration::from_secs(5),
        )?;
        let charon = Charon::start(ns.name(), work_dir("sws", next_id())?)?;
        let mut secrets = String::new();
        for u in EAP_USERS {
            secrets.push_str(&format!(
                " eap-{u} {{\n  id = {u}\n  secret = \"{u}-pw\"\n }}\n"
            ));
        }
        let conf = format!(
            "connections {{\n rw {{\n  version = 2\n  pools = p1\n  local {{\n   auth = pubkey\n   certs = server.crt\n   id = \"CN=vpn-server\"\n  }}\n  remote-1 {{\n   auth = pubkey\n   cacerts = ca.crt\n  }}\n  remote-2 {{\n   auth = eap-md5\n   eap_id = %any\n  }}\n  children {{\n   net {{\n    local_ts = {TARGET}/32\n    esp_proposals = aes128-sha256\n   }}\n  }}\n }}\n}}\npools {{\n p1 {{\n  addrs = {POOL}\n }}\n}}\nsecrets {{\n{secrets}}}\n"
        );
        charon.load(
            &conf,
            &[
                ("x509/server.crt", &pki.path("server.crt")),
                ("x509ca/ca.crt", &pki.path("ca.crt")),
                ("private/server.key", &pki.path("server.key")),
            ],
        )?;
        Ok(SwanServer {
            charon,
            ns,
            links: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// charon's VICI socket.
    pub fn vici(&self) -> PathBuf {
        self.charon.vici()
    }

    /// Stops the server's charon: its VICI socket is gone.
    pub fn stop_charon(&mut self) {
        self.charon.stop();
    }

    /// Starts the server's charon again with the same config.
    pub fn start_charon(&mut self) -> Result<(), String> {
        self.charon.spawn(self.ns.name())?;
        self.charon.swanctl(&["--load-all", "--noprompt"]).map(drop)
    }

    pub fn log(&self) -> String {
        self.charon.log()
    }

    /// `swanctl --list-sas --raw`.
    pub fn list_sas(&self) -> String {
        self.charon
            .swanctl(&["--list-sas", "--raw"])
            .unwrap_or_default()
    }

    /// How many IKE_SAs the server has.
    pub fn sa_count(&self) -> usize {
        self.list_sas().matches("list-sa event").count()
    }

    /// The unique id of the server's IKE_SA with the client at `ip`.
    pub fn ike_id_of(&self, ip: &str) -> Option<String> {
        let needle = format!("remote-host={ip} ");
        self.list_sas()
            .lines()
            .find(|l| l.contains(&needle))?
            .split_whitespace()
            .find_map(|w| w.trim_start_matches('{').strip_prefix("uniqueid="))
            .map(str::to_string)
    }

    /// Rekeys an IKE_SA by its unique id.
    pub fn rekey(&self, ike_id: &str) -> Result<String, String> {
        self.charon.swanctl(&["--rekey", "--ike-id", ike_id])
    }

    /// Terminates an IKE_SA by its unique id.
    pub fn terminate(&self, ike_id: &str) -> Result<String, String> {
        self.charon.swanctl(&["--terminate", "--ike-id", ike_id])
    }
}

/// A client: a namespace joined to the server's by a veth pair, and its own charon.
pub struct SwanClient {
    charon: Charon,
    pub ns: ClientNs,
    pub server_ip: String,
    /// The client's address on the link to the server (the server's `remote-host`).
    pub ip: String,
}

impl SwanClient {
    /// Sets up the client for `cert` and EAP user `user`; `round2_id` is the identity the
    /// client claims in the EAP round (free to choose: the trap).
    pub fn new(
        server: &SwanServer,
        pki: &RsaPki,
        cert: &SwanCert,
        user: &str,
        round2_id: Option<&str>,
    ) -> Result<SwanClient, String> {
        let ns = ClientNs::create()?;
        let k = server
            .links
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (srv_ip, cli_ip) = (
            format!("192.168.{}.1", 100 + k),
            format!("192.168.{}.2", 100 + k),
        );
        let sv = format!("sv{k}");
        let mut c = Command::new(find_tool("ip").ok_or("no ip")?);
        c.args([
            "link",
            "add",
            &sv,
            "netns",
            server.ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            "up0",
            "netns",
            ns.name(),
        ]);
        run_bounded(c, None, Duration::from_secs(5))?;
        let five = Duration::from_secs(5);
        server.ns.exec(
            "ip",
            &["addr", "add", &format!("{srv_ip}/30"), "dev", &sv],
            five,
        )?;
        server.ns.exec("ip", &["link", "set", &sv, "up"], five)?;
        ns.exec(
            "ip",
            &["addr", "add", &format!("{cli_ip}/30"), "dev", "up0"],
            five,
        )?;
        ns.exec("ip", &["link", "set", "up0", "up"], five)?;
        let charon = Charon::start(ns.name(), work_dir("swc", next_id())?)?;
        let id2 = round2_id
            .map(|i| format!("   id = \"{i}\"\n"))
            .unwrap_or_default();
        let conf = format!(
            "connections {{\n home {{\n  version = 2\n  remote_addrs = {srv_ip}\n  vips = 0.0.0.0\n  local-1 {{\n   auth = pubkey\n   certs = client.crt\n   id = \"{dn}\"\n  }}\n  local-2 {{\n   auth = eap-md5\n   eap_id = {user}\n{id2}  }}\n  remote {{\n   auth = pubkey\n   id = \"CN=vpn-server\"\n  }}\n  children {{\n   home {{\n    remote_ts = {TARGET}/32\n    esp_proposals = aes128-sha256\n   }}\n  }}\n }}\n}}\nsecrets {{\n eap {{\n  id = {user}\n  secret = \"{user}-pw\"\n }}\n}}\n",
            dn = cert.dn
        );
        charon.load(
            &conf,
            &[
                ("x509/client.crt", &cert.cert),
                ("x509ca/ca.crt", &pki.path("ca.crt")),
                ("private/client.key", &cert.key),
            ],
        )?;
        Ok(SwanClient {
            charon,
            ns,
            server_ip: srv_ip,
            ip: cli_ip,
        })
    }

    /// `swanctl --initiate`: the IKE_SA and its CHILD_SA; the time it took.
    pub fn initiate(&self) -> Result<Duration, String> {
        let t0 = Instant::now();
        self.charon
            .swanctl(&["--initiate", "--child", "home", "--timeout", "15"])?;
        Ok(t0.elapsed())
    }

    /// Ends the client's IKE_SA (`swanctl --terminate --ike home`).
    pub fn terminate(&self) -> Result<(), String> {
        self.charon
            .swanctl(&["--terminate", "--ike", "home", "--timeout", "10"])
            .map(drop)
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the client's charon: a client that stops
    /// answering.
    pub fn freeze(&self, frozen: bool) {
        let pid = fs::read_to_string(self.charon.dir.path().join("run/charon.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .expect("client charon's pid file");
        let sig = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }

    /// Whether the client has an IKE_SA.
    pub fn has_sa(&self) -> bool {
        self.charon
            .swanctl(&["--list-sas", "--raw"])
            .is_ok_and(|t| t.contains("state=ESTABLISHED"))
    }

    pub fn log(&self) -> String {
        self.charon.log()
    }

    /// Pings the server's target through the tunnel.
    pub fn ping(&self, size: &str, count: &str) -> Result<String, String> {
        self.ns.exec(
            "ping",
            &["-c", count, "-i", "0.05", "-s", size, "-W", "2", TARGET],
            Duration::from_secs(20),
        )
    }
}
