//! What the machine did during a benchmark run, beside the benchmark: this VM's figures move
//! with what its host does, and a run that lost much of its time to other guests says so.

/// The machine's CPU time by kind (`/proc/stat`, first line: user, nice, system, idle, iowait,
/// irq, softirq, steal), in clock ticks.
pub fn cpu_times() -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    Some(
        line.split_whitespace()
            .take(8)
            .map(|v| v.parse().unwrap_or(0))
            .collect(),
    )
}

/// One line on the time since `before` ([`cpu_times`]): the share stolen by the host's other
/// guests, and the share idle.
pub fn report(before: Option<Vec<u64>>) -> Option<String> {
    let (a, b) = (before?, cpu_times()?);
    let d: Vec<u64> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| y.saturating_sub(*x))
        .collect();
    let total: u64 = d.iter().sum::<u64>().max(1);
    let share = |i: usize| 100.0 * d.get(i).copied().unwrap_or(0) as f64 / total as f64;
    Some(format!(
        "machine during the run: steal {:.1} % (CPU time taken by the host's other guests), idle {:.1} %",
        share(7),
        share(3)
    ))
}
