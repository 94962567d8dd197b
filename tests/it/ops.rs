//! The operations pack, checked with the real tools: Prometheus rules and their unit tests
//! (promtool), the example Prometheus and Alertmanager configs (promtool, amtool), the Grafana
//! dashboards, and the systemd unit and snippets (systemd-analyze, systemd-sysusers,
//! systemd-tmpfiles).
//!
//! A missing tool skips its test with a note on stderr, unless `PFORTE_E2E=1`: then the test
//! fails and names the Debian package to install.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::harness::{Case, Need, trial};

/// Every `pforte_*` series name the real daemon exports (read from a running daemon's /metrics,
/// so dashboards and rules are checked against what pforte really serves, not a copied list).
fn exported_metrics() -> &'static Vec<String> {
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| {
        let mut f = crate::common::Fixture::new(
            crate::common::Setup {
                extra: "[[links]]\nname = \"lo\"\ninterface = \"lo\"\nspeed_bits_per_second = 1000\n\n[[openvpn]]\ninstance = \"x\"\nzone = \"office\"\nmanagement = \"/nonexistent/mgmt.sock\"\n".into(),
                ..Default::default()
            },
            &[crate::common::Dev::good("D-1", "alice")],
        );
        // The RADIUS front's series exist once it has a client and an upstream.
        let secret = f.path("radius.secret");
        std::fs::write(&secret, "s").unwrap();
        let udp = || crate::radius_front::free_udp_port();
        f.setup.extra.push_str(&format!(
            "\n[radius]\nauth_listen = \"127.0.0.1:{}\"\nacct_listen = \"127.0.0.1:{}\"\n[[radius.clients]]\nname = \"nas\"\naddress = \"192.0.2.1\"\nsecret_file = \"{s}\"\nzone = \"office\"\n[[radius.upstreams]]\nname = \"up\"\naddress = \"192.0.2.2:1812\"\nsecret_file = \"{s}\"\n",
            udp(),
            udp(),
            s = secret.display()
        ));
        f.write_config();
        let d = f.start();
        crate::common::wait_for("link metrics", std::time::Duration::from_secs(10), || {
            d.metrics().contains("pforte_link_up")
        });
        let mut names: Vec<String> = d
            .metrics()
            .lines()
            .filter(|l| l.starts_with("pforte_"))
            .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
            .collect();
        // Exported only with a PostgreSQL store (checked in cluster::).
        names.extend(
            crate::common::postgres::CLUSTER_METRICS
                .iter()
                .map(|m| m.to_string()),
        );
        names.sort();
        names.dedup();
        names
    })
}

/// The alerts the operations pack promises (docs/MONITORING.md).
const ALERTS: &[&str] = &[
    "PforteDown",
    "PforteSeatSaturation",
    "PforteLinkSaturation",
    "PforteCapacityRefusals",
    "PforteRegistryStale",
    "PforteRegistryReloadFailing",
    "PforteSlowDecisions",
    "PforteSeatsForecastSaturation",
    "PforteLinkForecastSaturation",
    "PforteRadiusUpstreamTimeouts",
    "PforteRadiusUpstreamDown",
    "PforteRadiusAccountingSilent",
];

const RULES: &str = "pforte.rules.yml";
const RULE_TESTS: &[&str] = &["pforte.rules.test.yml", "pforte.rules.longterm.test.yml"];
const DASHBOARDS: &[&str] = &["pforte-live.json", "pforte-capacity.json"];

/// A test failure. Its `Debug` output is the message itself, so that the tools' output keeps
/// its line breaks when the test harness prints it.
struct Failure(String);

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        Failure(format!("I/O error: {err}"))
    }
}

type Outcome = Result<(), Failure>;

fn fail<T>(message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure(message.into()))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> Result<String, Failure> {
    fs::read_to_string(path)
        .map_err(|err| Failure(format!("cannot read {}: {err}", path.display())))
}

/// Finds `program` on PATH. If it is missing the test is skipped (`Ok(None)`), or fails under
/// `PFORTE_E2E=1`, naming the Debian package that provides it.
fn tool(program: &str, package: &str) -> Result<Option<PathBuf>, Failure> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    });
    if found.is_some() {
        return Ok(found);
    }
    let message = format!("{program} is not installed: apt-get install -y {package}");
    if std::env::var("PFORTE_E2E").is_ok_and(|value| value == "1") {
        return fail(format!("PFORTE_E2E=1 and {message}"));
    }
    eprintln!("skipping: {message}");
    Ok(None)
}

/// What a tool printed.
struct Printed {
    stdout: String,
    stderr: String,
}

impl Printed {
    fn both(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// Runs `program args` in `dir`. A failure to start or a non-zero exit is an error that shows
/// the command, its stdout and its stderr.
fn run<S: AsRef<OsStr>>(program: &Path, args: &[S], dir: &Path) -> Result<Printed, Failure> {
    let mut shown = program.display().to_string();
    for arg in args {
        shown.push(' ');
        shown.push_str(&arg.as_ref().to_string_lossy());
    }
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|err| Failure(format!("cannot run `{shown}`: {err}")))?;
    let printed = Printed {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    if !output.status.success() {
        return fail(format!(
            "`{shown}` in {} failed ({}):\n{}",
            dir.display(),
            output.status,
            printed.both()
        ));
    }
    Ok(printed)
}

// ------------------------------------------------------------------------- Prometheus rules

fn prometheus_rules_pass_promtool_check_and_unit_tests() -> Outcome {
    let Some(promtool) = tool("promtool", "prometheus")? else {
        return Ok(());
    };
    let dir = repo().join("dashboards/rules");
    run(&promtool, &["check", "rules", RULES], &dir)?;
    let mut args = vec!["test", "rules"];
    args.extend_from_slice(RULE_TESTS);
    run(&promtool, args.as_slice(), &dir)?;
    Ok(())
}

fn every_alert_has_a_firing_and_a_quiet_unit_test() -> Outcome {
    let dir = repo().join("dashboards/rules");
    let rules = read(&dir.join(RULES))?;
    let alerts: BTreeSet<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    let mut problems = Vec::new();
    for expected in ALERTS {
        if !alerts.contains(expected) {
            problems.push(format!("{RULES} has no alert {expected}"));
        }
    }
    // alertname -> (has a case where it fires, has a case where it stays quiet)
    let mut cases: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for file in RULE_TESTS {
        let text = read(&dir.join(file))?;
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect();
        for (n, line) in lines.iter().enumerate() {
            let Some(name) = line.strip_prefix("alertname:") else {
                continue;
            };
            let entry = cases.entry(name.trim().to_owned()).or_default();
            match lines.get(n + 1) {
                Some(&"exp_alerts: []") => entry.1 = true,
                Some(next) if next.starts_with("exp_alerts:") => entry.0 = true,
                _ => {}
            }
        }
    }
    for alert in &alerts {
        match cases.get(*alert) {
            Some((true, true)) => {}
            Some((fires, quiet)) => problems.push(format!(
                "alert {alert}: a case where it fires: {fires}, a case where it does not: {quiet}"
            )),
            None => problems.push(format!("alert {alert} has no unit test")),
        }
    }
    for name in metric_names(&rules) {
        if !exported_metrics().iter().any(|m| m == name) {
            problems.push(format!("{RULES} uses {name}, which pforte does not export"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        fail(problems.join("\n"))
    }
}

/// The `pforte_*` metric names in `text`.
fn metric_names(text: &str) -> Vec<&str> {
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("pforte_") {
        let start = from + found;
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |len| start + len);
        // Skip prefixes inside longer names and the bare prefix (as in "pforte_*").
        if !text[..start].ends_with(is_name_char) && !text[start..end].ends_with('_') {
            names.push(&text[start..end]);
        }
        from = end;
    }
    names
}

// ---------------------------------------------------------------- Prometheus, Alertmanager

fn prometheus_example_config_is_valid() -> Outcome {
    let Some(promtool) = tool("promtool", "prometheus")? else {
        return Ok(());
    };
    let dir = repo().join("dashboards");
    let printed = run(
        &promtool,
        &["check", "config", "prometheus.example.yml"],
        &dir,
    )?;
    // promtool checks the rule files a config names; make sure it named ours.
    if !printed.both().contains(RULES) {
        return fail(format!(
            "prometheus.example.yml does not load {RULES}:\n{}",
            printed.both()
        ));
    }
    let config = read(&dir.join("prometheus.example.yml"))?;
    for needed in ["job_name: pforte", "127.0.0.1:9477"] {
        if !config.contains(needed) {
            return fail(format!("prometheus.example.yml lacks `{needed}`"));
        }
    }
    Ok(())
}

fn alertmanager_example_config_is_valid_and_routes_pages_to_the_pager() -> Outcome {
    let Some(amtool) = tool("amtool", "prometheus-alertmanager")? else {
        return Ok(());
    };
    let dir = repo().join("dashboards");
    run(&amtool, &["check-config", "alertmanager.example.yml"], &dir)?;
    for (severity, receiver) in [
        ("page", "pager"),
        ("warning", "operations"),
        ("ticket", "operations"),
    ] {
        let label = format!("severity={severity}");
        let expected = format!("--verify.receivers={receiver}");
        run(
            &amtool,
            &[
                "config",
                "routes",
                "test",
                "--config.file=alertmanager.example.yml",
                expected.as_str(),
                "alertname=PforteDown",
                label.as_str(),
            ],
            &dir,
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------- Grafana dashboards

fn dashboards_are_valid_and_use_the_datasource_variable() -> Outcome {
    let dir = repo().join("dashboards");
    let mut problems = Vec::new();
    for name in DASHBOARDS {
        let path = dir.join(name);
        let dashboard: Value = serde_json::from_str(&read(&path)?)
            .map_err(|err| Failure(format!("{}: invalid JSON: {err}", path.display())))?;
        check_dashboard(name, &dashboard, &mut problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        fail(problems.join("\n"))
    }
}

/// A datasource reference to the `datasource` variable: `{"uid": "${datasource}"}` (or the
/// older plain string form).
fn uses_datasource_variable(datasource: Option<&Value>) -> bool {
    let uid = match datasource {
        Some(Value::String(uid)) => uid.as_str(),
        Some(object) => object
            .get("uid")
            .and_then(Value::as_str)
            .unwrap_or_default(),
        None => "",
    };
    uid == "${datasource}" || uid == "$datasource"
}

fn check_dashboard(name: &str, dashboard: &Value, problems: &mut Vec<String>) {
    for key in ["uid", "title"] {
        if dashboard
            .get(key)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            problems.push(format!("{name}: no {key}"));
        }
    }
    if dashboard
        .get("schemaVersion")
        .and_then(Value::as_u64)
        .is_none()
    {
        problems.push(format!("{name}: no schemaVersion"));
    }

    let variables: Vec<&Value> = dashboard
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .map(|list| list.iter().collect())
        .unwrap_or_default();
    let variable = |wanted: &str| {
        variables
            .iter()
            .find(|v| v.get("name").and_then(Value::as_str) == Some(wanted))
            .copied()
    };
    match variable("datasource") {
        Some(v)
            if v.get("type").and_then(Value::as_str) == Some("datasource")
                && v.get("query").and_then(Value::as_str) == Some("prometheus") => {}
        _ => problems.push(format!(
            "{name}: no variable `datasource` of type datasource with query prometheus"
        )),
    }
    for wanted in ["instance", "zone", "org_unit"] {
        let Some(v) = variable(wanted) else {
            problems.push(format!("{name}: no variable `{wanted}`"));
            continue;
        };
        let query = v.get("query").and_then(Value::as_str).unwrap_or_default();
        let flag = |key: &str| v.get(key).and_then(Value::as_bool) == Some(true);
        if v.get("type").and_then(Value::as_str) != Some("query")
            || !query.starts_with("label_values(")
            || !flag("includeAll")
            || !flag("multi")
            || !uses_datasource_variable(v.get("datasource"))
        {
            problems.push(format!(
                "{name}: variable `{wanted}` must be a label_values query on ${{datasource}} \
                 with All and multi-value"
            ));
        }
    }

    let mut panels = Vec::new();
    collect_panels(dashboard.get("panels"), &mut panels);
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in panels {
        let title = panel
            .get("title")
            .and_then(Value::as_str)
            .unwrap_or("(untitled)");
        match panel.get("id").and_then(Value::as_u64) {
            Some(id) if ids.insert(id) => {}
            _ => problems.push(format!(
                "{name}: panel {title:?} has a missing or repeated id"
            )),
        }
        let Some(targets) = panel.get("targets").and_then(Value::as_array) else {
            continue;
        };
        if !uses_datasource_variable(panel.get("datasource")) {
            problems.push(format!(
                "{name}: panel {title:?} does not use ${{datasource}}"
            ));
        }
        for target in targets {
            queries += 1;
            if !uses_datasource_variable(target.get("datasource")) {
                problems.push(format!(
                    "{name}: a target of {title:?} does not use ${{datasource}}"
                ));
            }
            let expr = target
                .get("expr")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if expr.trim().is_empty() {
                problems.push(format!("{name}: a target of {title:?} has no expr"));
            }
            for metric in metric_names(expr) {
                if !exported_metrics().iter().any(|m| m == metric) {
                    problems.push(format!("{name}: {title:?} uses unknown metric {metric}"));
                }
            }
        }
    }
    if queries == 0 {
        problems.push(format!("{name}: no queries"));
    }
}

/// All panels, including those nested in (collapsed) rows.
fn collect_panels<'a>(panels: Option<&'a Value>, out: &mut Vec<&'a Value>) {
    for panel in panels.and_then(Value::as_array).into_iter().flatten() {
        out.push(panel);
        collect_panels(panel.get("panels"), out);
    }
}

// -------------------------------------------------------------------------------- systemd

fn systemd_unit_verifies_and_is_hardened() -> Outcome {
    let Some(analyze) = tool("systemd-analyze", "systemd")? else {
        return Ok(());
    };
    let unit = repo().join("systemd/pforte.service");
    let text = read(&unit)?;
    // `verify` insists that ExecStart's binary exists, and /usr/bin/pforte is not installed
    // here: verify a copy that runs /bin/true with the same arguments instead.
    let exec_start = "ExecStart=/usr/bin/pforte serve ";
    if !text.contains(exec_start) {
        return fail(format!("{} has no `{exec_start}…` line", unit.display()));
    }
    let scratch = tempfile::tempdir()?;
    let copy = scratch.path().join("pforte.service");
    fs::write(
        &copy,
        text.replace(exec_start, "ExecStart=/bin/true serve "),
    )?;
    let verified = run(
        &analyze,
        &[OsStr::new("verify"), copy.as_os_str()],
        scratch.path(),
    )?;
    // verify exits 0 on warnings such as unknown keys; any line about our unit is a problem.
    if verified.both().contains("pforte.service") {
        return fail(format!(
            "systemd-analyze verify complains:\n{}",
            verified.both()
        ));
    }

    let security = run(
        &analyze,
        &[
            OsStr::new("security"),
            OsStr::new("--offline=yes"),
            unit.as_os_str(),
        ],
        scratch.path(),
    )?;
    let Some(exposure) = exposure_level(&security.stdout) else {
        return fail(format!(
            "no overall exposure level in:\n{}",
            security.both()
        ));
    };
    eprintln!("systemd-analyze security: overall exposure level {exposure}");
    if exposure > 2.0 {
        return fail(format!(
            "exposure level {exposure} is above 2.0:\n{}",
            security.both()
        ));
    }
    Ok(())
}

/// The number in `→ Overall exposure level for pforte.service: 1.1 OK 🙂`.
fn exposure_level(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|line| line.contains("Overall exposure level"))?;
    let (_, rest) = line.rsplit_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn systemd_sysusers_and_tmpfiles_snippets_apply() -> Outcome {
    let Some(sysusers) = tool("systemd-sysusers", "systemd")? else {
        return Ok(());
    };
    let Some(tmpfiles) = tool("systemd-tmpfiles", "systemd")? else {
        return Ok(());
    };
    let root = tempfile::tempdir()?;
    // tmpfiles hands the directories to the new user, which only root may do.
    if fs::metadata(root.path())?.uid() != 0 {
        eprintln!("skipping: applying the sysusers and tmpfiles snippets needs root");
        return Ok(());
    }
    fs::create_dir(root.path().join("etc"))?;
    let root_arg = format!("--root={}", root.path().display());
    let systemd = repo().join("systemd");
    let snippet = systemd.join("pforte.sysusers");
    run(
        &sysusers,
        &[OsStr::new(&root_arg), snippet.as_os_str()],
        &systemd,
    )?;
    let passwd = read(&root.path().join("etc/passwd"))?;
    let Some(entry) = passwd.lines().find(|line| line.starts_with("pforte:")) else {
        return fail(format!("no pforte user after systemd-sysusers:\n{passwd}"));
    };
    let uid: u32 = entry
        .split(':')
        .nth(2)
        .and_then(|uid| uid.parse().ok())
        .unwrap_or(0);
    if uid == 0 || !entry.ends_with("/usr/sbin/nologin") {
        return fail(format!("unexpected pforte user: {entry}"));
    }

    let snippet = systemd.join("pforte.tmpfiles");
    let created = run(
        &tmpfiles,
        &[
            OsStr::new("--create"),
            OsStr::new(&root_arg),
            snippet.as_os_str(),
        ],
        &systemd,
    )?;
    for dir in ["var/lib/pforte", "var/log/pforte"] {
        let meta = fs::metadata(root.path().join(dir))
            .map_err(|err| Failure(format!("{dir} not created ({err}):\n{}", created.both())))?;
        let mode = meta.permissions().mode() & 0o7777;
        if !meta.is_dir() || mode != 0o750 || meta.uid() != uid {
            return fail(format!(
                "{dir}: mode {mode:o}, owner {} (want a directory, 750, owner {uid})",
                meta.uid()
            ));
        }
    }
    Ok(())
}

/// The tests of this module, for the harness (`tests/it/main.rs`).
pub fn tests() -> Vec<Case> {
    vec![
        trial!(prometheus_rules_pass_promtool_check_and_unit_tests, needs: [Need::Tool("promtool", "prometheus")]),
        trial!(every_alert_has_a_firing_and_a_quiet_unit_test),
        trial!(prometheus_example_config_is_valid, needs: [Need::Tool("promtool", "prometheus")]),
        trial!(alertmanager_example_config_is_valid_and_routes_pages_to_the_pager, needs: [Need::Tool("amtool", "prometheus-alertmanager")]),
        trial!(dashboards_are_valid_and_use_the_datasource_variable),
        trial!(systemd_unit_verifies_and_is_hardened, needs: [Need::Tool("systemd-analyze", "systemd")]),
        trial!(systemd_sysusers_and_tmpfiles_snippets_apply, needs: [Need::Tool("systemd-sysusers", "systemd"), Need::Tool("systemd-tmpfiles", "systemd"), Need::Root("to apply the snippets")]),
    ]
}
