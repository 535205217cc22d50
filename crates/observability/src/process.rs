//! The `process_*` metrics as Go's client library (client_golang's process collector,
//! which upstream kube-proxy registers) exports them on Linux: the same names, help
//! texts and types, read from `/proc/self`. The Rust library's own collector differs
//! (no `process_virtual_memory_max_bytes` or network counters, an extra
//! `process_threads`), so this one replaces it.

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, Metric, MetricFamily, MetricType};

/// Go reports an unlimited address space as the largest uint64.
const UNLIMITED: f64 = u64::MAX as f64;

/// Go's procfs counts CPU time in USER_HZ, fixed at 100 on Linux.
const USER_HZ: f64 = 100.0;

struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
}

const FAMILIES: [Family; 9] = [
    Family {
        name: "process_cpu_seconds_total",
        help: "Total user and system CPU time spent in seconds.",
        kind: MetricType::COUNTER,
    },
    Family {
        name: "process_max_fds",
        help: "Maximum number of open file descriptors.",
        kind: MetricType::GAUGE,
    },
    Family {
        name: "process_network_receive_bytes_total",
        help: "Number of bytes received by the process over the network.",
        kind: MetricType::COUNTER,
    },
    Family {
        name: "process_network_transmit_bytes_total",
        help: "Number of bytes sent by the process over the network.",
        kind: MetricType::COUNTER,
    },
    Family {
        name: "process_open_fds",
        help: "Number of open file descriptors.",
        kind: MetricType::GAUGE,
    },
    Family {
        name: "process_resident_memory_bytes",
        help: "Resident memory size in bytes.",
        kind: MetricType::GAUGE,
    },
    Family {
        name: "process_start_time_seconds",
        help: "Start time of the process since unix epoch in seconds.",
        kind: MetricType::GAUGE,
    },
    Family {
        name: "process_virtual_memory_bytes",
        help: "Virtual memory size in bytes.",
        kind: MetricType::GAUGE,
    },
    Family {
        name: "process_virtual_memory_max_bytes",
        help: "Maximum amount of virtual memory available in bytes.",
        kind: MetricType::GAUGE,
    },
];

/// Collects the proxy's own process figures at each scrape.
pub struct ProcessCollector {
    descs: Vec<Desc>,
    boot_time: Option<f64>,
}

impl ProcessCollector {
    pub fn new() -> Result<ProcessCollector, prometheus::Error> {
        let descs = FAMILIES
            .iter()
            .map(|f| Desc::new(f.name.into(), f.help.into(), vec![], Default::default()))
            .collect::<Result<_, _>>()?;
        Ok(ProcessCollector {
            descs,
            boot_time: boot_time(),
        })
    }

    /// Each family's value now; `None` when it cannot be read (Go then leaves it out).
    fn values(&self) -> [Option<f64>; 9] {
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| Stat::parse(&s));
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let (received, sent) = network_bytes().unzip();
        [
            stat.as_ref().map(|s| (s.utime + s.stime) as f64 / USER_HZ),
            limit(&limits, "Max open files"),
            received,
            sent,
            std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as f64),
            resident_bytes(),
            stat.as_ref()
                .zip(self.boot_time)
                .map(|(s, boot)| boot + s.start_ticks as f64 / USER_HZ),
            stat.as_ref().map(|s| s.vsize as f64),
            limit(&limits, "Max address space"),
        ]
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        FAMILIES
            .iter()
            .zip(self.values())
            .filter_map(|(family, value)| Some((family, value?)))
            .map(|(family, value)| {
                let mut metric = Metric::default();
                if family.kind == MetricType::COUNTER {
                    let mut c = Counter::default();
                    c.set_value(value);
                    metric.set_counter(c);
                } else {
                    let mut g = Gauge::default();
                    g.set_value(value);
                    metric.set_gauge(g);
                }
                let mut mf = MetricFamily::default();
                mf.set_name(family.name.into());
                mf.set_help(family.help.into());
                mf.set_field_type(family.kind);
                mf.mut_metric().push(metric);
                mf
            })
            .collect()
    }
}

/// The fields of `/proc/self/stat` we use.
struct Stat {
    utime: u64,
    stime: u64,
    start_ticks: u64,
    vsize: u64,
}

impl Stat {
    fn parse(text: &str) -> Option<Stat> {
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Field numbers from proc(5), minus the two before the ')' and one for 1-based.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            start_ticks: field(22)?,
            vsize: field(23)?,
        })
    }
}

/// A soft limit from `/proc/self/limits`, "unlimited" as Go reports it.
fn limit(limits: &str, name: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with(name))?;
    let soft = line[name.len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(UNLIMITED);
    }
    soft.parse::<u64>().ok().map(|v| v as f64)
}

/// `IpExt: InOctets OutOctets` of the process's network namespace, as Go reads them.
fn network_bytes() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/self/net/netstat").ok()?;
    let mut ip_ext = text.lines().filter(|l| l.starts_with("IpExt:"));
    let names: Vec<&str> = ip_ext.next()?.split_whitespace().collect();
    let values: Vec<&str> = ip_ext.next()?.split_whitespace().collect();
    let get = |name: &str| -> Option<f64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse::<f64>().ok()
    };
    Some((get("InOctets")?, get("OutOctets")?))
}

fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// `VmRSS` (the resident pages Go multiplies by the page size), in bytes.
fn resident_bytes() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()?;
    Some(kb * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_family_on_linux() {
        let c = ProcessCollector::new().expect("collector");
        let families = c.collect();
        let names: Vec<&str> = families.iter().map(|f| f.name()).collect();
        for f in &FAMILIES {
            assert!(names.contains(&f.name), "{} missing: {names:?}", f.name);
        }
        let value = |name: &str| {
            let f = families.iter().find(|f| f.name() == name).expect(name);
            let m = &f.get_metric()[0];
            m.get_gauge().get_value() + m.get_counter().get_value()
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_start_time_seconds") > 1.6e9);
    }

    #[test]
    fn parses_limits_and_stat_with_odd_command_names() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n\
                      Max address space         unlimited            unlimited            bytes     \n";
        assert_eq!(limit(limits, "Max open files"), Some(1024.0));
        assert_eq!(limit(limits, "Max address space"), Some(UNLIMITED));
        assert_eq!(
            crate::textfmt::go_float(UNLIMITED),
            "1.8446744073709552e+19",
            "what Go's scrape shows"
        );
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 500 1000000 250 18446744073709551615";
        let s = Stat::parse(stat).expect("stat");
        assert_eq!(
            (s.utime, s.stime, s.start_ticks, s.vsize),
            (7, 3, 500, 1_000_000)
        );
    }
}
