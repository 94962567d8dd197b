//! The `[radius]` section: the RADIUS front's listeners, its clients (NASes) and the optional
//! upstream credential servers. Raw file types, runtime types and their validation; shared
//! secrets are read from their files here, at load, so a missing or empty secret file is a
//! config error naming its key.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::Rules;
use super::validate::{Invalid, bad, check_label};

/// The `[radius]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRadius {
    pub(super) auth_listen: Option<String>,
    pub(super) acct_listen: Option<String>,
    pub(super) accounting_start_timeout_s: Option<u64>,
    pub(super) missing_device: Option<String>,
    pub(super) session_timeout_s: Option<u32>,
    pub(super) dae_timeout_ms: Option<u64>,
    #[serde(default)]
    pub(super) clients: Vec<RawRadiusClient>,
    #[serde(default)]
    pub(super) upstreams: Vec<RawRadiusUpstream>,
}

/// One `[[radius.clients]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRadiusClient {
    pub(super) name: String,
    pub(super) address: String,
    pub(super) secret_file: String,
    pub(super) vendor: Option<String>,
    pub(super) zone: String,
    pub(super) dae_port: Option<u16>,
    pub(super) dae_address: Option<String>,
    pub(super) device_attribute: Option<String>,
    pub(super) require_message_authenticator: Option<bool>,
}

/// One `[[radius.upstreams]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRadiusUpstream {
    pub(super) name: Option<String>,
    pub(super) address: String,
    pub(super) secret_file: String,
    pub(super) timeout_ms: Option<u64>,
    pub(super) require_message_authenticator: Option<bool>,
}

/// A shared secret's bytes, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Vec<u8>);

impl SecretValue {
    /// A secret from its bytes (`None` when empty). The config reads secrets from files; this is
    /// for tools and tests that build a client entry themselves.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Option<SecretValue> {
        let bytes = bytes.into();
        (!bytes.is_empty()).then_some(SecretValue(bytes))
    }

    /// The bytes, for the codec.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// A secret value for tests elsewhere in the crate.
#[cfg(test)]
pub fn test_secret_value(bytes: &[u8]) -> SecretValue {
    SecretValue(bytes.to_vec())
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(********)")
    }
}

/// How a NAS's requests name the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// Cisco ASA/FTD AnyConnect: ACIDex `mdm-tlv=device-uid`, `device-mac`.
    Cisco,
    /// Palo Alto GlobalProtect: `PaloAlto-Client-Hostname`.
    PaloAlto,
    /// FortiGate: only the configured `device_attribute`.
    Fortinet,
    /// Anything else: only the configured `device_attribute`.
    Generic,
}

impl Vendor {
    /// The config word.
    pub fn as_str(self) -> &'static str {
        match self {
            Vendor::Cisco => "cisco",
            Vendor::PaloAlto => "paloalto",
            Vendor::Fortinet => "fortinet",
            Vendor::Generic => "generic",
        }
    }
}

/// Where a `device_attribute` is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAttribute {
    /// A standard attribute by type number (`User-Name`, `Calling-Station-Id`, … or `attr:N`).
    Standard(u8),
    /// A vendor attribute (`vsa:VENDOR:TYPE`).
    Vendor(u32, u8),
    /// The value after `name=` in a Cisco-AVPair (`avpair:NAME`).
    AvPair(String),
}

/// What to do when a request carries no device identity at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingDevice {
    /// Refuse with `unregistered_device`.
    Refuse,
    /// Skip the device checks (person, level and zone checks still run).
    SkipDeviceChecks,
}

/// One NAS.
#[derive(Debug, Clone)]
pub struct RadiusClient {
    /// Metric label and the sessions' instance.
    pub name: String,
    /// Its address or prefix.
    pub prefix: IpNet,
    /// The shared secret.
    pub secret: SecretValue,
    /// How its requests name the device.
    pub vendor: Vendor,
    /// The zone its sessions belong to.
    pub zone: String,
    /// Where Disconnect-Requests go (0: none).
    pub dae_port: u16,
    /// The address Disconnect-Requests go to (default: `address` when it is one host).
    pub dae_address: Option<IpAddr>,
    /// The attribute that names the device (fortinet, generic; optional for the others).
    pub device_attribute: Option<DeviceAttribute>,
    /// Access-Requests without Message-Authenticator are dropped (default true). False only for
    /// NASes that cannot send one (radcli, hence ocserv, sends it only with EAP); one that is
    /// sent is always checked.
    pub require_message_authenticator: bool,
}

/// One upstream credential server.
#[derive(Debug, Clone)]
pub struct RadiusUpstream {
    /// Metric label (default: the address).
    pub name: String,
    /// Where Access-Requests go.
    pub address: SocketAddr,
    /// The shared secret with it.
    pub secret: SecretValue,
    /// How long to wait for its answer.
    pub timeout: Duration,
    /// Answers without a valid Message-Authenticator are ignored (default true; false only for
    /// servers that cannot send one, such as FreeRADIUS before 3.2.5 answering PAP).
    pub require_message_authenticator: bool,
}

/// The RADIUS front.
#[derive(Debug, Clone)]
pub struct RadiusConfig {
    /// Access-Requests.
    pub auth_listen: SocketAddr,
    /// Accounting-Requests.
    pub acct_listen: SocketAddr,
    /// An accepted session whose Accounting Start has not come within this is ended.
    pub accounting_start_timeout: Duration,
    /// No device identity in a request: refuse or skip the device checks.
    pub missing_device: MissingDevice,
    /// `Session-Timeout` sent with every Accept (none: not sent).
    pub session_timeout_s: Option<u32>,
    /// How long a Disconnect-Request waits for its ACK/NAK (once retried).
    pub dae_timeout: Duration,
    /// The NASes.
    pub clients: Vec<RadiusClient>,
    /// Upstream credential servers, tried in order.
    pub upstreams: Vec<RadiusUpstream>,
}

/// Reads a secret file: its first line without the line end, refused if missing or empty.
fn read_secret(key: &str, path: &str) -> Result<SecretValue, Invalid> {
    let text = std::fs::read(Path::new(path))
        .map_err(|e| bad(key, format!("cannot read the secret file `{path}`: {e}")))?;
    let line = text.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err(bad(key, format!("the secret file `{path}` is empty")));
    }
    Ok(SecretValue(line.to_vec()))
}

fn parse_device_attribute(key: &str, text: &str) -> Result<DeviceAttribute, Invalid> {
    let named = [
        ("user-name", 1u8),
        ("calling-station-id", 31),
        ("called-station-id", 30),
        ("nas-identifier", 32),
        ("connect-info", 77),
        ("class", 25),
    ];
    let lower = text.to_ascii_lowercase();
    if let Some((_, n)) = named.iter().find(|(name, _)| *name == lower) {
        return Ok(DeviceAttribute::Standard(*n));
    }
    let wrong = || {
        bad(
            key,
            format!(
                "`{text}` is not User-Name, Calling-Station-Id, Called-Station-Id, NAS-Identifier, Connect-Info, attr:N, vsa:VENDOR:TYPE or avpair:NAME"
            ),
        )
    };
    if let Some(n) = lower.strip_prefix("attr:") {
        return n
            .parse()
            .ok()
            .filter(|n| *n != 0)
            .map(DeviceAttribute::Standard)
            .ok_or_else(wrong);
    }
    if let Some(rest) = lower.strip_prefix("vsa:") {
        let (v, t) = rest.split_once(':').ok_or_else(wrong)?;
        return Ok(DeviceAttribute::Vendor(
            v.parse().map_err(|_| wrong())?,
            t.parse().map_err(|_| wrong())?,
        ));
    }
    if let Some(name) = text.strip_prefix("avpair:").filter(|n| !n.is_empty()) {
        return Ok(DeviceAttribute::AvPair(name.to_string()));
    }
    Err(wrong())
}

fn parse_listen(key: &str, text: Option<String>, default: &str) -> Result<SocketAddr, Invalid> {
    let text = text.unwrap_or_else(|| default.to_string());
    text.parse()
        .map_err(|_| bad(key, format!("`{text}` is not an address ip:port")))
}

/// Validates `[radius]`; `None` when the section is absent.
pub(super) fn validate_radius(
    raw: Option<RawRadius>,
    rules: &Rules,
) -> Result<Option<RadiusConfig>, Invalid> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let auth_listen = parse_listen("radius.auth_listen", raw.auth_listen, "0.0.0.0:1812")?;
    let acct_listen = parse_listen("radius.acct_listen", raw.acct_listen, "0.0.0.0:1813")?;
    if auth_listen == acct_listen && auth_listen.port() != 0 {
        return Err(bad(
            "radius.acct_listen",
            "must differ from radius.auth_listen",
        ));
    }
    let missing_device = match raw.missing_device.as_deref().unwrap_or("refuse") {
        "refuse" => MissingDevice::Refuse,
        "skip-device-checks" => MissingDevice::SkipDeviceChecks,
        other => {
            return Err(bad(
                "radius.missing_device",
                format!("`{other}` is not one of refuse, skip-device-checks"),
            ));
        }
    };
    let timeout = raw.accounting_start_timeout_s.unwrap_or(60);
    if timeout == 0 {
        return Err(bad(
            "radius.accounting_start_timeout_s",
            "must be greater than zero",
        ));
    }
    if raw.session_timeout_s == Some(0) {
        return Err(bad(
            "radius.session_timeout_s",
            "must be greater than zero (leave it out to send none)",
        ));
    }
    let mut clients: Vec<RadiusClient> = Vec::new();
    for (i, c) in raw.clients.into_iter().enumerate() {
        let key = format!("radius.clients[{i}]");
        check_label(&format!("{key}.name"), &c.name)?;
        if clients.iter().any(|x| x.name == c.name) {
            return Err(bad(
                format!("{key}.name"),
                format!("client `{}` is defined twice", c.name),
            ));
        }
        let prefix: IpNet = match c.address.parse::<IpNet>() {
            Ok(p) => p.trunc(),
            Err(_) => c.address.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
                bad(
                    format!("{key}.address"),
                    format!("`{}` is not an address or prefix", c.address),
                )
            })?,
        };
        if clients.iter().any(|x| x.prefix == prefix) {
            return Err(bad(
                format!("{key}.address"),
                format!("`{}` is already another client's address", c.address),
            ));
        }
        let vendor = match c.vendor.as_deref().unwrap_or("generic") {
            "cisco" => Vendor::Cisco,
            "paloalto" => Vendor::PaloAlto,
            "fortinet" => Vendor::Fortinet,
            "generic" => Vendor::Generic,
            other => {
                return Err(bad(
                    format!("{key}.vendor"),
                    format!("`{other}` is not one of cisco, paloalto, fortinet, generic"),
                ));
            }
        };
        let secret = read_secret(&format!("{key}.secret_file"), &c.secret_file)?;
        if !rules.zones.contains_key(&c.zone) {
            return Err(bad(
                format!("{key}.zone"),
                format!("zone `{}` is not configured in [[zones]]", c.zone),
            ));
        }
        let device_attribute = c
            .device_attribute
            .as_deref()
            .map(|t| parse_device_attribute(&format!("{key}.device_attribute"), t))
            .transpose()?;
        let dae_address = match c.dae_address.as_deref() {
            Some(t) => Some(t.parse::<IpAddr>().map_err(|_| {
                bad(
                    format!("{key}.dae_address"),
                    format!("`{t}` is not an IP address"),
                )
            })?),
            None if prefix.prefix_len() == prefix.max_prefix_len() => Some(prefix.addr()),
            None => None,
        };
        clients.push(RadiusClient {
            name: c.name,
            prefix,
            secret,
            vendor,
            zone: c.zone,
            dae_port: c.dae_port.unwrap_or(3799),
            dae_address,
            device_attribute,
            require_message_authenticator: c.require_message_authenticator.unwrap_or(true),
        });
    }
    let mut upstreams: Vec<RadiusUpstream> = Vec::new();
    for (i, u) in raw.upstreams.into_iter().enumerate() {
        let key = format!("radius.upstreams[{i}]");
        let address: SocketAddr = u.address.parse().map_err(|_| {
            bad(
                format!("{key}.address"),
                format!("`{}` is not an address ip:port", u.address),
            )
        })?;
        let name = u.name.unwrap_or_else(|| address.to_string());
        check_label(&format!("{key}.name"), &name.replace([':', '[', ']'], "_"))?;
        if upstreams.iter().any(|x| x.name == name) {
            return Err(bad(
                format!("{key}.name"),
                format!("upstream `{name}` is defined twice"),
            ));
        }
        let timeout_ms = u.timeout_ms.unwrap_or(2000);
        if !(1..=60_000).contains(&timeout_ms) {
            return Err(bad(
                format!("{key}.timeout_ms"),
                "must be between 1 and 60000",
            ));
        }
        upstreams.push(RadiusUpstream {
            name,
            address,
            secret: read_secret(&format!("{key}.secret_file"), &u.secret_file)?,
            timeout: Duration::from_millis(timeout_ms),
            require_message_authenticator: u.require_message_authenticator.unwrap_or(true),
        });
    }
    Ok(Some(RadiusConfig {
        auth_listen,
        acct_listen,
        accounting_start_timeout: Duration::from_secs(timeout),
        missing_device,
        session_timeout_s: raw.session_timeout_s,
        dae_timeout: Duration::from_millis(raw.dae_timeout_ms.unwrap_or(1000).clamp(10, 30_000)),
        clients,
        upstreams,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::{ConfigError, load_with_env};
    use std::collections::HashMap;
    use std::path::Path;

    const BASE: &str = r#"
[server]
socket = "run/p.sock"
[registry]
devices = "d.csv"
[[org_units]]
name = "it"
level = 1
[[zones]]
name = "office"
pool = "10.80.0.0/24"
"#;

    fn load(dir: &Path, radius: &str) -> Result<super::super::Config, ConfigError> {
        let p = dir.join("t.toml");
        std::fs::write(&p, format!("{BASE}\n{radius}")).unwrap();
        load_with_env(&p, HashMap::new())
    }

    #[test]
    fn a_radius_section_loads_with_secrets_from_files() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("asa.secret");
        std::fs::write(&s, "s3cret\n").unwrap();
        let c = load(
            d.path(),
            &format!(
                r#"
[radius]
auth_listen = "127.0.0.1:1812"
acct_listen = "127.0.0.1:1813"
[[radius.clients]]
name = "asa-1"
address = "192.0.2.0/28"
secret_file = "{s}"
vendor = "cisco"
zone = "office"
[[radius.upstreams]]
address = "10.0.0.5:1812"
secret_file = "{s}"
"#,
                s = s.display()
            ),
        )
        .unwrap();
        let r = c.radius.unwrap();
        assert_eq!(r.clients[0].secret.expose(), b"s3cret");
        assert_eq!(r.clients[0].dae_port, 3799);
        assert_eq!(r.clients[0].dae_address, None);
        assert_eq!(r.upstreams[0].name, "10.0.0.5:1812");
        assert_eq!(r.accounting_start_timeout.as_secs(), 60);
        assert!(!format!("{r:?}").contains("s3cret"));
    }

    #[test]
    fn radius_errors_name_the_key() {
        let d = tempfile::tempdir().unwrap();
        let empty = d.path().join("empty.secret");
        std::fs::write(&empty, "\n").unwrap();
        let client = |extra: &str, secret: &str| {
            format!(
                "[radius]\n[[radius.clients]]\nname = \"n\"\naddress = \"192.0.2.1\"\nsecret_file = \"{secret}\"\nzone = \"office\"\n{extra}\n"
            )
        };
        let cases = [
            (
                client("", "/nonexistent/x"),
                "radius.clients[0].secret_file",
            ),
            (
                client("", &empty.display().to_string()),
                "radius.clients[0].secret_file",
            ),
            (
                client("vendor = \"juniper\"", "/nonexistent/x"),
                "radius.clients[0].vendor",
            ),
            (
                "[radius]\nmissing_device = \"maybe\"\n".to_string(),
                "radius.missing_device",
            ),
            (
                "[radius]\nauth_listen = \"nowhere\"\n".to_string(),
                "radius.auth_listen",
            ),
        ];
        for (text, key) in cases {
            let e = load(d.path(), &text).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let ok = d.path().join("ok.secret");
        std::fs::write(&ok, "x").unwrap();
        let e = load(
            d.path(),
            &client("zone = \"nowhere\"", &ok.display().to_string())
                .replace("zone = \"office\"\n", ""),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("radius.clients[0].zone"), "{e}");
        let e = load(
            d.path(),
            &client("device_attribute = \"Bogus\"", &ok.display().to_string()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("radius.clients[0].device_attribute"), "{e}");
    }
}
