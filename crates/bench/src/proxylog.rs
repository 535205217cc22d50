//! What the proxy's log says about its syncs: each "synced rules" line with its timestamp
//! (tracing's default format: RFC 3339 in UTC, first on the line), whether the sync was
//! full, how many changed Services and endpoint sets it carried, and the proxy's own
//! `took_ms`.

use std::time::{Duration, SystemTime};

/// One "synced rules" line.
#[derive(Debug, Clone, PartialEq)]
pub struct Synced {
    /// When the line was written: just after the sync returned.
    pub at: SystemTime,
    pub full: bool,
    /// Changed Services and endpoint sets the sync carried.
    pub services: u64,
    pub endpoints: u64,
    pub took_ms: f64,
    pub bytes: f64,
}

impl Synced {
    /// When the sync started, by the proxy's clock: `at - took_ms`.
    pub fn started(&self) -> SystemTime {
        self.at - Duration::from_secs_f64(self.took_ms.max(0.0) / 1e3)
    }

    /// Whether the sync carried no change: the runner's periodic sync (after the first;
    /// also a retry, or a Node change, which the bench does not make). A periodic sync
    /// that rewrote everything says `full=true`; one that only checked the kernel (as
    /// later versions do) may not.
    pub fn periodic(&self) -> bool {
        self.full || (self.services == 0 && self.endpoints == 0)
    }

    /// Whether an event at `t` met this sync: it came while the sync ran, or less than
    /// `min_gap` (the min sync period) after it started, when the runner may hold the
    /// next sync back.
    pub fn holds(&self, t: SystemTime, min_gap: Duration) -> bool {
        let start = self.started();
        start <= t && t <= self.at.max(start + min_gap)
    }
}

/// Every "synced rules" line of `log` that parses, in order.
pub fn synced(log: &str) -> Vec<Synced> {
    log.lines()
        .filter(|l| l.contains("synced rules"))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Synced> {
    let stamp = line.split_whitespace().next()?;
    let at: jiff::Timestamp = stamp.parse().ok()?;
    let took_ms: f64 = field(line, "took_ms")?.parse().ok()?;
    if !took_ms.is_finite() || took_ms < 0.0 {
        return None;
    }
    Some(Synced {
        at: SystemTime::from(at),
        // A periodic sync that only checked the kernel logs `full=false periodic=true`.
        full: field(line, "full")? == "true" || field(line, "periodic") == Some("true"),
        services: field(line, "services")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        endpoints: field(line, "endpoints")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        took_ms,
        bytes: field(line, "bytes")
            .and_then(|b| b.parse().ok())
            .unwrap_or(0.0),
    })
}

/// When the source delivered its initial state (the runner's line), if it did.
pub fn initial_state(log: &str) -> Option<SystemTime> {
    let line = log
        .lines()
        .find(|l| l.contains("sources delivered their initial state"))?;
    let at: jiff::Timestamp = line.split_whitespace().next()?.parse().ok()?;
    Some(SystemTime::from(at))
}

/// Maps a full load found already holding their elements and left alone, summed over
/// the log's "not reloaded" lines.
pub fn maps_kept(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("not reloaded"))
        .filter_map(|l| field(l, "maps")?.parse::<usize>().ok())
        .sum()
}

/// The value of `key=value` on `line`.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_synced_lines() {
        let log = "2025-12-04T02:55:42.500000Z  INFO proxy_core::runner: sources delivered their initial state\n\
                   2025-12-04T02:55:42.512500Z  INFO proxy_core::runner: synced rules full=true services=3 endpoints=3 bytes=1234 service_ports=3 took_ms=12.5\n\
                   2025-12-04T02:55:52.000000Z  INFO proxy_core::runner: synced rules full=false services=1 endpoints=0 bytes=352 service_ports=3 took_ms=0.7\n";
        let lines = synced(log);
        assert_eq!(lines.len(), 2);
        let delivered: jiff::Timestamp = "2025-12-04T02:55:42.5Z".parse().unwrap();
        assert_eq!(initial_state(log), Some(SystemTime::from(delivered)));
        assert_eq!(initial_state("no such line"), None);
        assert!(synced("2025-12-04T02:55:42Z INFO synced rules full=true took_ms=NaN").is_empty());
        assert!(lines[0].full && !lines[1].full);
        assert!(lines[0].periodic() && !lines[1].periodic());
        assert_eq!((lines[1].services, lines[1].endpoints), (1, 0));
        let check = "2025-12-04T02:56:02Z INFO synced rules full=false services=0 endpoints=0 bytes=0 took_ms=1.0";
        assert!(synced(check)[0].periodic());
        assert_eq!(lines[0].took_ms, 12.5);
        assert_eq!(lines[0].bytes, 1234.0);
        let start = lines[0].started();
        let expected: jiff::Timestamp = "2025-12-04T02:55:42.500Z".parse().unwrap();
        assert_eq!(start, SystemTime::from(expected));
        assert!(lines[0].holds(start + Duration::from_millis(5), Duration::ZERO));
        assert!(!lines[0].holds(start + Duration::from_millis(20), Duration::ZERO));
        assert!(lines[0].holds(start + Duration::from_millis(20), Duration::from_secs(1)));
        assert!(!lines[0].holds(start - Duration::from_millis(1), Duration::from_secs(1)));
    }
}
