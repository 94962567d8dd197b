//! RADIUS benchmark: Access-Requests per second and latency (p50/p99) with a load generator of
//! pforte's own over UDP (many identifiers in flight on one socket), the same generator against
//! (a) FreeRADIUS 3.2 answering from its `files` module with the same device allow-list,
//! (b) pforte authorising alone, (c) pforte proxying to that FreeRADIUS; then Interim-Updates per
//! second into pforte. radclient is not used: it burns a core itself and caps the rate.
//!
//! ```sh
//! cargo bench --bench radius -- --requests 20000 --window 64
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_range_loop
)]

#[path = "common/machine.rs"]
mod machine;

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use pforte::vpn::radius::{Code, Packet, Secret, attr, auth};

#[derive(Parser)]
struct Cli {
    /// Access-Requests per measured run.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Requests in flight at once (distinct identifiers on one socket).
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Users and devices in the registry and in FreeRADIUS's users file.
    #[arg(long, default_value_t = 1_000)]
    users: usize,
    /// Interim-Updates in the accounting run.
    #[arg(long, default_value_t = 50_000)]
    interims: usize,
    /// cargo bench passes --bench; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const NAS_SECRET: &str = "bench-nas-secret";
const UP_SECRET: &str = "bench-upstream-secret";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn uid(i: usize) -> String {
    format!("UID-{i:06}")
}

fn mac(i: usize) -> String {
    format!(
        "02-00-00-{:02x}-{:02x}-{:02x}",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

fn start_freeradius(dir: &Path, port: u16, users: usize) -> Proc {
    let d = dir.display();
    std::fs::write(dir.join("dictionary"), "").unwrap();
    // The same device allow-list as pforte's registry: user i may log in only from device i.
    let mut list = String::new();
    for i in 0..users {
        list.push_str(&format!(
            "user{i} Cleartext-Password := \"pw\", Cisco-AVPair == \"mdm-tlv=device-uid={}\"\n",
            uid(i)
        ));
    }
    list.push_str("DEFAULT Auth-Type := Reject\n");
    std::fs::write(dir.join("users"), list).unwrap();
    std::fs::write(
        dir.join("radiusd.conf"),
        format!(
            r#"prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
logdir = {d}
raddbdir = {d}
radacctdir = {d}
name = freeradius
confdir = {d}
modconfdir = {d}
certdir = {d}
cadir = {d}
run_dir = {d}
db_dir = {d}
libdir = /usr/lib/freeradius
pidfile = {d}/radiusd.pid
max_request_time = 30
cleanup_delay = 5
max_requests = 1048576
hostname_lookups = no
log {{
  destination = files
  file = {d}/radius.log
}}
security {{
  max_attributes = 200
  reject_delay = 0
  status_server = no
}}
client local {{
  ipaddr = 127.0.0.1
  secret = {UP_SECRET}
  require_message_authenticator = yes
}}
modules {{
  pap {{
  }}
  files {{
    filename = {d}/users
  }}
}}
server default {{
  listen {{
    type = auth
    ipaddr = 127.0.0.1
    port = {port}
  }}
  authorize {{
    files
    pap
  }}
  authenticate {{
    Auth-Type PAP {{
      pap
    }}
  }}
}}
"#
        ),
    )
    .unwrap();
    let child = Command::new("freeradius")
        .args(["-f", "-d"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let p = Proc(child);
    std::thread::sleep(Duration::from_millis(500));
    p
}

fn start_pforte(dir: &Path, users: usize, auth: u16, acct: u16, upstream: Option<u16>) -> Proc {
    let d = dir.display();
    let api = free_tcp();
    let mut devices = String::from(
        "device_id,ownership,status,org_unit,clearance,disk_encrypted,patched_on,cert_sha256,cert_serial,hwaddr,users,device_uid\n",
    );
    let mut people = String::from("username,org_unit,level\n");
    let today = chrono::Utc::now().date_naive();
    for i in 0..users {
        devices.push_str(&format!(
            "D-{i},service,active,staff,1,true,{today},,,{},user{i},{}\n",
            mac(i).replace('-', ":"),
            uid(i)
        ));
        people.push_str(&format!("user{i},staff,\n"));
    }
    std::fs::write(dir.join("devices.csv"), devices).unwrap();
    std::fs::write(dir.join("users.csv"), people).unwrap();
    std::fs::write(dir.join("nas.secret"), NAS_SECRET).unwrap();
    std::fs::write(dir.join("up.secret"), UP_SECRET).unwrap();
    let upstream = upstream
        .map(|p| {
            format!(
                "[[radius.upstreams]]\nname = \"fr\"\naddress = \"127.0.0.1:{p}\"\nsecret_file = \"{d}/up.secret\"\ntimeout_ms = 2000\nrequire_message_authenticator = false\n"
            )
        })
        .unwrap_or_default();
    std::fs::write(
        dir.join("pforte.toml"),
        format!(
            r#"[server]
listen = "127.0.0.1:{api}"
[registry]
devices = "{d}/devices.csv"
users = "{d}/users.csv"
watch_interval_s = 0
[store]
path = "{d}/state/pforte.db"
[policy]
max_patch_age_days = 30
remote_max_level = 1
[capacity]
max_sessions = 10000000
max_sessions_per_user = 0
[[org_units]]
name = "staff"
level = 1
[[zones]]
name = "office"
level = 1
pool = "10.64.0.0/10"
routes = ["10.1.0.0/16"]
[radius]
auth_listen = "127.0.0.1:{auth}"
acct_listen = "127.0.0.1:{acct}"
accounting_start_timeout_s = 3600
[[radius.clients]]
name = "bench"
address = "127.0.0.1"
secret_file = "{d}/nas.secret"
vendor = "cisco"
zone = "office"
dae_port = 0
{upstream}"#
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pforte"))
        .args(["serve", "--config"])
        .arg(dir.join("pforte.toml"))
        .env("PFORTE_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", api)) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            if buf.starts_with("HTTP/1.1 200") {
                return p;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("pforte not ready");
}

/// A signed Cisco-shaped Access-Request for user `i`.
fn access_request(id: u8, n: u64, i: usize, secret: &Secret) -> (Vec<u8>, [u8; 16]) {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&n.to_le_bytes());
    a[8..].copy_from_slice(&(!n).to_le_bytes());
    let mut p = Packet::new(Code::AccessRequest, id, a);
    p.add(attr::USER_NAME, format!("user{i}")).unwrap();
    let hidden = auth::hide_password(b"pw", &a, secret).unwrap();
    p.add(attr::USER_PASSWORD, hidden).unwrap();
    p.add_vendor(9, 1, format!("mdm-tlv=device-uid={}", uid(i)).as_bytes())
        .unwrap();
    p.add_vendor(9, 1, format!("mdm-tlv=device-mac={}", mac(i)).as_bytes())
        .unwrap();
    p.add(attr::CALLING_STATION_ID, "203.0.113.7").unwrap();
    (auth::finalize_request(&mut p, secret).unwrap(), a)
}

/// An Interim-Update for a session named by Class (first time) and Acct-Session-Id.
fn interim(id: u8, n: u64, class: &str, secret: &Secret) -> (Vec<u8>, [u8; 16]) {
    let mut p = Packet::new(Code::AccountingRequest, id, [0; 16]);
    p.add_u32(attr::ACCT_STATUS_TYPE, 3);
    p.add(attr::ACCT_SESSION_ID, format!("S-{class}")).unwrap();
    p.add(attr::CLASS, class.as_bytes().to_vec()).unwrap();
    p.add_u32(attr::ACCT_INPUT_OCTETS, (n as u32).wrapping_mul(1000));
    p.add_u32(attr::ACCT_OUTPUT_OCTETS, (n as u32).wrapping_mul(3000));
    let wire = auth::finalize_request(&mut p, secret).unwrap();
    (wire, p.authenticator)
}

struct Run {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    accepted: usize,
    lost: usize,
    classes: Vec<String>,
}

/// Sends `total` requests made by `make(identifier, sequence)` keeping `window` in flight; a
/// request not answered in 2 s is counted lost and replaced.
fn drive(
    port: u16,
    total: usize,
    window: usize,
    secret: &Secret,
    make: &dyn Fn(u8, u64) -> (Vec<u8>, [u8; 16]),
) -> Run {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let window = window.clamp(1, 256);
    let mut slots: Vec<Option<(Instant, [u8; 16])>> = vec![None; 256];
    let mut lat = Vec::with_capacity(total);
    let (mut sent, mut done, mut lost, mut accepted) = (0usize, 0usize, 0usize, 0usize);
    let mut classes = Vec::new();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    for slot in 0..window.min(total) {
        let (w, a) = make(slot as u8, sent as u64);
        sock.send(&w).unwrap();
        slots[slot] = Some((Instant::now(), a));
        sent += 1;
    }
    while done < total {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let Ok(resp) = Packet::decode(&buf[..n]) else {
                    continue;
                };
                let slot = usize::from(resp.identifier);
                let Some((at, a)) = slots[slot] else { continue };
                if auth::verify_response_authenticator(&resp, &a, secret).is_err() {
                    continue;
                }
                lat.push(at.elapsed());
                done += 1;
                if resp.code == Code::AccessAccept {
                    accepted += 1;
                    if classes.len() < 5000
                        && let Ok(Some(c)) = resp.get_str(attr::CLASS)
                    {
                        classes.push(c.to_string());
                    }
                }
                slots[slot] = None;
                if sent < total {
                    let (w, a) = make(slot as u8, sent as u64);
                    sock.send(&w).unwrap();
                    slots[slot] = Some((Instant::now(), a));
                    sent += 1;
                }
            }
            Err(_) => {
                for slot in 0..256 {
                    if let Some((at, _)) = slots[slot]
                        && at.elapsed() > Duration::from_secs(2)
                    {
                        lost += 1;
                        done += 1;
                        slots[slot] = None;
                        if sent < total {
                            let (w, a) = make(slot as u8, sent as u64);
                            sock.send(&w).unwrap();
                            slots[slot] = Some((Instant::now(), a));
                            sent += 1;
                        }
                    }
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(f64::NAN)
    };
    Run {
        rate: (total - lost) as f64 / secs,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        accepted,
        lost,
        classes,
    }
}

fn print(label: &str, r: &Run) {
    println!(
        "{label:<44} {:>9.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  accepted {:>6}  lost {}",
        r.rate, r.p50_ms, r.p99_ms, r.accepted, r.lost
    );
}

fn main() {
    let cli = Cli::parse();
    let before = machine::cpu_times();
    let fr_dir = tempfile::tempdir().unwrap();
    let fr_port = free_udp();
    let _fr = start_freeradius(fr_dir.path(), fr_port, cli.users);
    let up = Secret::new(UP_SECRET).unwrap();
    let nas = Secret::new(NAS_SECRET).unwrap();
    let users = cli.users;
    let access_up = move |id: u8, n: u64| access_request(id, n, n as usize % users, &up);
    let access_nas = {
        let nas = nas.clone();
        move |id: u8, n: u64| access_request(id, n, n as usize % users, &nas)
    };
    println!(
        "{} Access-Requests, {} in flight, {} users/devices, one generator socket",
        cli.requests, cli.window, cli.users
    );
    // Warm-up, then the measured runs.
    let up2 = Secret::new(UP_SECRET).unwrap();
    drive(fr_port, 2000, cli.window, &up2, &access_up);
    let a = drive(fr_port, cli.requests, cli.window, &up2, &access_up);
    print("(a) FreeRADIUS 3.2 files+pap", &a);

    let dir_b = tempfile::tempdir().unwrap();
    let (auth_b, acct_b) = (free_udp(), free_udp());
    let pf_b = start_pforte(dir_b.path(), cli.users, auth_b, acct_b, None);
    drive(auth_b, 2000, cli.window, &nas, &access_nas);
    let b = drive(auth_b, cli.requests, cli.window, &nas, &access_nas);
    print("(b) pforte authorising alone", &b);

    // Interim-Updates into pforte's sessions (the first for each binds it by Class).
    let classes = b.classes.clone();
    let nas_i = nas.clone();
    let make_interim =
        move |id: u8, n: u64| interim(id, n, &classes[n as usize % classes.len()], &nas_i);
    drive(acct_b, b.classes.len(), cli.window, &nas, &make_interim);
    let i = drive(acct_b, cli.interims, cli.window, &nas, &make_interim);
    println!(
        "{:<44} {:>9.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  lost {}",
        "(d) pforte Interim-Updates", i.rate, i.p50_ms, i.p99_ms, i.lost
    );
    drop(pf_b);

    let dir_c = tempfile::tempdir().unwrap();
    let (auth_c, acct_c) = (free_udp(), free_udp());
    let _pf_c = start_pforte(dir_c.path(), cli.users, auth_c, acct_c, Some(fr_port));
    drive(auth_c, 2000, cli.window, &nas, &access_nas);
    let c = drive(auth_c, cli.requests, cli.window, &nas, &access_nas);
    print("(c) pforte proxying to FreeRADIUS", &c);

    println!(
        "ratios: (b)/(a) rate {:.2}, p99 {:.2} vs {:.2} ms; (c)-(a) p50 {:+.2} ms",
        b.rate / a.rate,
        b.p99_ms,
        a.p99_ms,
        c.p50_ms - a.p50_ms
    );
    if let Some(line) = machine::report(before) {
        println!("{line}");
    }
}
