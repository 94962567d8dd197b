//! A throw-away PKI made with the `openssl` CLI.

use super::*;

pub(super) const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// A throw-away PKI made with the `openssl` CLI: EC P-256 keys, a CA, one server certificate
/// (`extendedKeyUsage=serverAuth`) and any number of client certificates (`clientAuth`).
/// Certificates have random serials (as real CAs do: up to 20 bytes, too big for a `u64`).
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    cnf: PathBuf,
    /// CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// CA private key (PEM).
    pub ca_key: PathBuf,
    /// Server certificate (PEM), CN `pforte-test-server`.
    pub server_cert: PathBuf,
    /// Server private key (PEM).
    pub server_key: PathBuf,
}

/// A client certificate and the values OpenVPN will report for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    /// File base name given to [`Pki::client`].
    pub name: String,
    /// Subject common name (`X509_0_CN`, `common_name`).
    pub cn: String,
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, unencrypted).
    pub key: PathBuf,
    /// SHA-256 fingerprint as OpenVPN's `tls_digest_sha256_0`: lowercase hex with colons.
    pub sha256: String,
    /// Serial in decimal, as OpenVPN's `tls_serial_0`.
    pub serial: String,
    /// Serial as OpenVPN's `tls_serial_hex_0`: lowercase hex bytes with colons.
    pub serial_hex: String,
}

impl Pki {
    /// Creates the CA and the server certificate in `dir` (created if missing). ~30 ms.
    pub fn create(dir: &Path) -> Result<Pki, String> {
        fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let cnf = dir.join("openssl.cnf");
        fs::write(&cnf, OPENSSL_CNF).map_err(|e| format!("write {}: {e}", cnf.display()))?;
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            cnf,
        };
        pki.make_cert(
            "/CN=pforte test CA",
            "v3_ca",
            &pki.ca_key,
            &pki.ca_cert,
            false,
        )?;
        pki.make_cert(
            "/CN=pforte-test-server",
            "server",
            &pki.server_key,
            &pki.server_cert,
            true,
        )?;
        Ok(pki)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a client certificate with common name `cn` into `<dir>/<name>.crt` / `.key`.
    /// `cn` must not contain `/` or `=` (it goes into `openssl -subj`). ~20 ms.
    pub fn client(&self, name: &str, cn: &str) -> Result<ClientCert, String> {
        if cn.contains(['/', '=']) || name.contains('/') {
            return Err(format!("unsupported client name {name:?} / cn {cn:?}"));
        }
        let cert = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        self.make_cert(&format!("/CN={cn}"), "client", &key, &cert, true)?;
        let mut c = Command::new(tool("openssl"));
        c.args([
            "x509",
            "-noout",
            "-serial",
            "-fingerprint",
            "-sha256",
            "-in",
        ])
        .arg(&cert);
        let out = run(c)?;
        let value = |prefix: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(|v| v.trim().to_ascii_lowercase())
                .ok_or_else(|| format!("no {prefix:?} in openssl output: {out}"))
        };
        let serial_plain = value("serial=")?;
        let sha256 = value("sha256 Fingerprint=")?;
        let serial_hex = serial_plain
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(":");
        Ok(ClientCert {
            name: name.to_owned(),
            cn: cn.to_owned(),
            cert,
            key,
            sha256,
            serial: hex_to_decimal(&serial_plain)?,
            serial_hex,
        })
    }

    /// Issues a client certificate with the subject `subj` (openssl's `/K=V/…` form) into
    /// `<dir>/<name>.crt` / `.key`; returns the files and the SHA-256 fingerprint.
    pub fn client_subject(
        &self,
        name: &str,
        subj: &str,
    ) -> Result<(PathBuf, PathBuf, String), String> {
        let cert = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        self.make_cert(subj, "client", &key, &cert, true)?;
        let mut c = Command::new(tool("openssl"));
        c.args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&cert);
        let out = run(c)?;
        let fp = out
            .lines()
            .find_map(|l| l.strip_prefix("sha256 Fingerprint="))
            .map(|v| v.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("no fingerprint in openssl output: {out}"))?;
        Ok((cert, key, fp))
    }

    fn make_cert(
        &self,
        subj: &str,
        ext: &str,
        key: &Path,
        cert: &Path,
        signed: bool,
    ) -> Result<(), String> {
        let mut c = Command::new(tool("openssl"));
        c.args(["req", "-config"]).arg(&self.cnf);
        c.args([
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "3650",
        ]);
        c.args(["-subj", subj, "-extensions", ext, "-keyout"])
            .arg(key)
            .arg("-out")
            .arg(cert);
        if signed {
            c.arg("-CA")
                .arg(&self.ca_cert)
                .arg("-CAkey")
                .arg(&self.ca_key);
        }
        run(c).map(drop)
    }
}

/// Converts a hex string (any length) to decimal.
pub(super) fn hex_to_decimal(hex: &str) -> Result<String, String> {
    // Little-endian base-10^9 limbs.
    let mut limbs: Vec<u64> = vec![0];
    for ch in hex.chars().filter(|c| *c != ':') {
        let d = u64::from(ch.to_digit(16).ok_or_else(|| format!("bad hex {hex:?}"))?);
        let mut carry = d;
        for limb in limbs.iter_mut() {
            let v = *limb * 16 + carry;
            *limb = v % 1_000_000_000;
            carry = v / 1_000_000_000;
        }
        if carry > 0 {
            limbs.push(carry);
        }
    }
    let mut s = limbs.last().copied().unwrap_or(0).to_string();
    for limb in limbs.iter().rev().skip(1) {
        s.push_str(&format!("{limb:09}"));
    }
    Ok(s)
}
