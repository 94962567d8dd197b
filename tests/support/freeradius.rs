//! A FreeRADIUS 3.2 of the tests' and the RADIUS benchmark's own: a config in a temp folder (no
//! system-wide FreeRADIUS is used), included with `#[path]` by `tests/it` and `benches/radius.rs`.

#![allow(dead_code)]

use std::path::Path;

/// Writes a minimal FreeRADIUS config into `dir`: one auth listener on 127.0.0.1:`port`, pforte
/// (127.0.0.1) as its client with `secret` and Message-Authenticator required, `files` with
/// `users`, PAP and EAP-MD5; its log in `dir/radius.log` (`-X` writes it to standard output instead).
pub fn write_config(dir: &Path, port: u16, secret: &str, users: &str) {
    let d = dir.display();
    std::fs::write(dir.join("dictionary"), "").unwrap();
    std::fs::write(dir.join("users"), users).unwrap();
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
  allow_core_dumps = no
  max_attributes = 200
  reject_delay = 0
  status_server = no
}}
client pforte {{
  ipaddr = 127.0.0.1
  secret = {secret}
  require_message_authenticator = yes
}}
modules {{
  pap {{
  }}
  files {{
    filename = {d}/users
  }}
  eap {{
    default_eap_type = md5
    timer_expire = 60
    ignore_unknown_eap_types = no
    max_sessions = 4096
    md5 {{
    }}
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
    eap {{
      ok = return
    }}
    pap
  }}
  authenticate {{
    Auth-Type PAP {{
      pap
    }}
    eap
  }}
}}
"#
        ),
    )
    .unwrap();
}
