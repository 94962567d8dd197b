//! The test harness of this crate (`harness = false`, libtest-mimic): every test is registered
//! as a [`Trial`] named `module::function`, so filters, `--exact`, `--list`, `--ignored` and
//! `--test-threads` work as with the standard harness.
//!
//! A test that needs a part of the system (a program, root, the OpenVPN rig) declares it with
//! `needs:` when it is registered. When that part is missing the trial is *ignored*, with the
//! reason in its line (`test [skipped: no promtool] ops::… ... ignored`) and in the summary's
//! `N ignored`; one line before the run names what is missing and how to install it. With
//! `PFORTE_E2E=1` (CI) the trial runs instead and fails at once, naming what is missing.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use libtest_mimic::{Arguments, Failed, Trial};

use super::e2e_required;

/// A part of the system a test needs.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// A program on `PATH` and the Debian package that provides it.
    Tool(&'static str, &'static str),
    /// Running as root (the text says what for).
    Root(&'static str),
    /// What the OpenVPN end-to-end rig needs ([`super::openvpn::problems`]).
    OpenVpn,
}

/// Something missing: a short label for the test line, a package to install (if any).
struct Missing {
    short: String,
    package: Option<String>,
}

impl Need {
    fn missing(self) -> Vec<Missing> {
        match self {
            Need::Tool(program, package) if !on_path(program) => vec![Missing {
                short: format!("no {program}"),
                package: Some(package.to_owned()),
            }],
            Need::Tool(..) => Vec::new(),
            Need::Root(_) if nix::unistd::geteuid().is_root() => Vec::new(),
            Need::Root(what) => vec![Missing {
                short: format!("not root ({what})"),
                package: None,
            }],
            Need::OpenVpn => super::openvpn::problems()
                .into_iter()
                .map(|problem| Missing {
                    short: problem.replace('`', ""),
                    package: Some(super::openvpn::PACKAGES.to_owned()),
                })
                .collect(),
        }
    }
}

/// Whether `program` is an executable file in a `PATH` directory (or, for PostgreSQL's server
/// programs, in Debian's `/usr/lib/postgresql/<version>/bin`).
fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(super::postgres::bin_dirs())
        .map(|dir| dir.join(program))
        .any(|p: PathBuf| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What a test function may return: nothing (a panic fails it) or a `Result` whose `Err` fails
/// it, shown as `Error: {err:?}` as the standard harness does.
pub trait TestResult {
    fn into_result(self) -> Result<(), Failed>;
}

impl TestResult for () {
    fn into_result(self) -> Result<(), Failed> {
        Ok(())
    }
}

impl<E: Debug> TestResult for Result<(), E> {
    fn into_result(self) -> Result<(), Failed> {
        self.map_err(|e| format!("Error: {e:?}").into())
    }
}

/// Runs an async test body as `#[tokio::test]` does: a current-thread runtime with I/O and time.
pub fn block_on<F: Future>(body: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(body)
}

/// Runs an async test body as `#[tokio::test(flavor = "multi_thread", worker_threads = n)]`.
pub fn block_on_threads<F: Future>(workers: usize, body: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(body)
}

/// One registered test before it becomes a [`Trial`]: its name, what it needs, its body.
pub struct Case {
    pub name: String,
    pub needs: &'static [Need],
    pub run: Box<dyn FnOnce() -> Result<(), Failed> + Send>,
}

impl Case {
    /// `module_path` is the test function's module (`it::daemon`); the crate name is dropped, so
    /// the test is named `daemon::function` as with the standard harness.
    pub fn new<R: TestResult>(
        module_path: &str,
        function: &str,
        needs: &'static [Need],
        body: impl FnOnce() -> R + Send + 'static,
    ) -> Case {
        let module = module_path
            .split_once("::")
            .map(|(_, rest)| rest)
            .unwrap_or("");
        let name = if module.is_empty() {
            function.to_owned()
        } else {
            format!("{module}::{function}")
        };
        Case {
            name,
            needs,
            run: Box::new(move || body().into_result()),
        }
    }
}

/// Registers a test function of the calling module.
///
/// - `trial!(name)`: a plain `fn name()` (or one returning `Result<(), E: Debug>`);
/// - `trial!(async name)`: an `async fn`, run as `#[tokio::test]` runs it;
/// - `trial!(async(2) name)`: an `async fn` on a multi-thread runtime with 2 workers;
/// - any of these with `, needs: [Need::Tool("prometheus", "prometheus"), …]` after it.
macro_rules! trial {
    (async($workers:literal) $f:ident $(, needs: [$($need:expr),* $(,)?])?) => {
        $crate::common::harness::Case::new(
            module_path!(),
            stringify!($f),
            &[$($($need),*)?],
            || $crate::common::harness::block_on_threads($workers, $f()),
        )
    };
    (async $f:ident $(, needs: [$($need:expr),* $(,)?])?) => {
        $crate::common::harness::Case::new(
            module_path!(),
            stringify!($f),
            &[$($($need),*)?],
            || $crate::common::harness::block_on($f()),
        )
    };
    ($f:ident $(, needs: [$($need:expr),* $(,)?])?) => {
        $crate::common::harness::Case::new(
            module_path!(),
            stringify!($f),
            &[$($($need),*)?],
            $f,
        )
    };
}
pub(crate) use trial;

/// Turns the registered cases into trials (ignored, or failing under `PFORTE_E2E=1`, where a
/// need is missing), prints the one line on what is not run, and runs them.
pub fn main(cases: Vec<Case>) -> std::process::ExitCode {
    let args = Arguments::from_args();
    let required = e2e_required();
    let mut skipped = Vec::new();
    let mut reasons = BTreeSet::new();
    let mut packages = BTreeSet::new();
    let trials: Vec<Trial> = cases
        .into_iter()
        .map(|case| {
            let missing: Vec<Missing> = case.needs.iter().flat_map(|n| n.missing()).collect();
            if missing.is_empty() {
                return Trial::test(case.name, case.run);
            }
            let short: Vec<&str> = missing
                .iter()
                .map(|m| m.short.as_str())
                .filter(|s| !s.is_empty())
                .collect();
            let short = short.join(", ");
            let install: BTreeSet<&str> = missing
                .iter()
                .filter_map(|m| m.package.as_deref())
                .collect();
            let install = install.into_iter().collect::<Vec<_>>().join(" ");
            if required {
                let msg = format!(
                    "PFORTE_E2E=1 but this end-to-end test cannot run here: {short}{}",
                    if install.is_empty() {
                        String::new()
                    } else {
                        format!("; install with `apt-get install -y {install}`")
                    }
                );
                return Trial::test(case.name, move || Err(msg.into()));
            }
            let trial = Trial::test(case.name.clone(), case.run)
                .with_ignored_flag(true)
                .with_kind(format!("skipped: {short}"));
            if !args.is_filtered_out(&trial) {
                skipped.push(case.name);
                reasons.insert(short);
                packages.extend(
                    install
                        .split(' ')
                        .filter(|p| !p.is_empty())
                        .map(str::to_owned),
                );
            }
            trial
        })
        .collect();
    let quiet = args.list || matches!(args.format, Some(libtest_mimic::FormatSetting::Json));
    if !skipped.is_empty() && !quiet {
        let install = if packages.is_empty() {
            String::new()
        } else {
            let packages: Vec<String> = packages.into_iter().collect();
            format!("; install with `apt-get install -y {}`", packages.join(" "))
        };
        println!(
            "not running {} end-to-end test(s), this machine lacks: {}{install} (PFORTE_E2E=1 makes them fail instead): {}",
            skipped.len(),
            reasons.into_iter().collect::<Vec<_>>().join("; "),
            skipped.join(", "),
        );
    }
    libtest_mimic::run(&args, trials).exit_code()
}
