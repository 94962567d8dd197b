//! Link counters from `/sys/class/net/<interface>/statistics`, exported as byte totals that never
//! go backwards: a counter that drops means the interface was recreated, and its new value is
//! counted as new traffic.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Link;
use crate::metrics::Metrics;

/// How often the counters are read.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// One link's last reading.
#[derive(Debug)]
pub struct LinkReader {
    link: Link,
    root: PathBuf,
    last: Option<(u64, u64)>,
    missing_logged: bool,
}

impl LinkReader {
    /// A reader under `root` (normally `/sys/class/net`).
    pub fn new(link: Link, root: &Path) -> LinkReader {
        LinkReader {
            link,
            root: root.to_path_buf(),
            last: None,
            missing_logged: false,
        }
    }

    fn read(&self) -> std::io::Result<(u64, u64)> {
        let dir = self.root.join(&self.link.interface).join("statistics");
        let num = |f: &str| -> std::io::Result<u64> {
            let t = std::fs::read_to_string(dir.join(f))?;
            t.trim().parse().map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{f}: {e}"))
            })
        };
        Ok((num("rx_bytes")?, num("tx_bytes")?))
    }

    /// Reads once and adds what moved to the counters.
    pub fn poll(&mut self, metrics: &Metrics) {
        let name = self.link.name.as_str();
        metrics
            .link_speed
            .with_label_values(&[name])
            .set((self.link.speed_bits_per_second / 8) as i64);
        match self.read() {
            Ok((rx, tx)) => {
                metrics.link_up.with_label_values(&[name]).set(1);
                self.missing_logged = false;
                let (drx, dtx) = match self.last {
                    // The first reading is the baseline: counters start at this daemon's start.
                    None => (0, 0),
                    Some((lrx, ltx)) => (
                        if rx >= lrx { rx - lrx } else { rx },
                        if tx >= ltx { tx - ltx } else { tx },
                    ),
                };
                metrics
                    .link_receive_bytes
                    .with_label_values(&[name])
                    .inc_by(drx);
                metrics
                    .link_transmit_bytes
                    .with_label_values(&[name])
                    .inc_by(dtx);
                self.last = Some((rx, tx));
            }
            Err(e) => {
                metrics.link_up.with_label_values(&[name]).set(0);
                // Touch the counters so the series exist at 0.
                metrics.link_receive_bytes.with_label_values(&[name]);
                metrics.link_transmit_bytes.with_label_values(&[name]);
                // The interface may come back as a new device: start from a fresh baseline.
                self.last = None;
                if !self.missing_logged {
                    tracing::warn!(link = name, interface = %self.link.interface, error = %e, "link counters unavailable");
                    self.missing_logged = true;
                }
            }
        }
    }
}

/// Polls every link until shutdown.
pub async fn run(links: Vec<Link>, metrics: Metrics, mut shutdown: watch::Receiver<bool>) {
    let root = Path::new("/sys/class/net");
    let mut readers: Vec<LinkReader> = links
        .into_iter()
        .map(|l| LinkReader::new(l, root))
        .collect();
    if readers.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                for r in &mut readers {
                    r.poll(&metrics);
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rx: u64, tx: u64) {
        let d = root.join("eth9").join("statistics");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("rx_bytes"), format!("{rx}\n")).unwrap();
        std::fs::write(d.join("tx_bytes"), format!("{tx}\n")).unwrap();
    }

    #[test]
    fn counters_never_go_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new().unwrap();
        let link = Link {
            name: "uplink".into(),
            interface: "eth9".into(),
            speed_bits_per_second: 8_000,
        };
        let mut r = LinkReader::new(link, dir.path());
        let rx = || m.link_receive_bytes.with_label_values(&["uplink"]).get();
        r.poll(&m);
        assert_eq!(m.link_up.with_label_values(&["uplink"]).get(), 0);
        write(dir.path(), 1000, 10);
        r.poll(&m);
        assert_eq!(rx(), 0, "first reading is the baseline");
        write(dir.path(), 1500, 20);
        r.poll(&m);
        assert_eq!(rx(), 500);
        write(dir.path(), 100, 5); // interface recreated
        r.poll(&m);
        assert_eq!(rx(), 600);
        assert_eq!(m.link_speed.with_label_values(&["uplink"]).get(), 1000);
        assert_eq!(m.link_up.with_label_values(&["uplink"]).get(), 1);
    }
}
