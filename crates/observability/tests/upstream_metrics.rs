//! Our registered metrics, mode by mode, against the checked-in list of upstream
//! v1.35's (`upstream/metrics-v1.35.txt`): same names, types, help texts, labels and
//! buckets, and nothing more or less (apart from our own, `OWN_METRICS`, documented apart).

use std::collections::BTreeMap;
use std::path::PathBuf;

use observability::metrics::{BuildInfo, MetricDescription, MetricsMode, ProxyMetrics};

#[derive(Debug, Clone, PartialEq)]
struct Expected {
    kind: String,
    help: String,
    labels: Vec<String>,
    buckets: Vec<f64>,
    modes: Vec<String>,
}

/// `exp(a,f,n)`, `lin(a,w,n)`, `merge(...)` (a leading 0, as upstream's MergeBuckets),
/// a comma list, or `-`.
fn buckets(spec: &str) -> Vec<f64> {
    let args = |inner: &str| -> (f64, f64, usize) {
        let v: Vec<&str> = inner.split(',').collect();
        assert_eq!(v.len(), 3, "{inner}");
        (
            v[0].parse().expect("start"),
            v[1].parse().expect("step"),
            v[2].parse().expect("count"),
        )
    };
    if spec == "-" {
        return Vec::new();
    }
    if let Some(inner) = spec.strip_prefix("exp(").and_then(|s| s.strip_suffix(')')) {
        let (start, factor, n) = args(inner);
        return (0..n).map(|i| start * factor.powi(i as i32)).collect();
    }
    if let Some(inner) = spec.strip_prefix("lin(").and_then(|s| s.strip_suffix(')')) {
        let (start, width, n) = args(inner);
        return (0..n).map(|i| start + width * i as f64).collect();
    }
    if let Some(inner) = spec
        .strip_prefix("merge(")
        .and_then(|s| s.strip_suffix(')'))
    {
        let mut out = vec![0.0];
        for part in inner.split("),") {
            let part = if part.ends_with(')') {
                part.to_owned()
            } else {
                format!("{part})")
            };
            out.extend(buckets(&part));
        }
        return out;
    }
    spec.split(',')
        .map(|b| b.parse().expect("bucket"))
        .collect()
}

fn upstream() -> BTreeMap<String, Expected> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("upstream/metrics-v1.35.txt");
    let text = std::fs::read_to_string(&path).expect("upstream metric list");
    assert!(
        text.contains("pkg/proxy/metrics/metrics.go") && text.contains("v1.35"),
        "the list names its source and version"
    );
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let cols: Vec<&str> = line.split(" | ").collect();
        assert_eq!(cols.len(), 6, "malformed line: {line}");
        let list = |s: &str| -> Vec<String> {
            if s == "-" {
                Vec::new()
            } else {
                s.split(',').map(str::to_owned).collect()
            }
        };
        let previous = out.insert(
            cols[0].to_owned(),
            Expected {
                kind: cols[1].to_owned(),
                help: cols[2].to_owned(),
                labels: list(cols[3]),
                buckets: buckets(cols[4]),
                modes: list(cols[5]),
            },
        );
        assert!(previous.is_none(), "{} listed twice", cols[0]);
    }
    out
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-9 * x.abs().max(1.0))
}

#[test]
fn every_mode_registers_exactly_upstreams_metrics() {
    let list = upstream();
    assert!(list.len() >= 39, "{} entries", list.len());
    let build = BuildInfo::default();
    for mode in MetricsMode::ALL {
        let metrics = ProxyMetrics::new(&build, mode).expect("metrics");
        let ours: BTreeMap<String, MetricDescription> = metrics
            .describe(&build)
            .expect("describe")
            .into_iter()
            .filter(|d| !observability::metrics::OWN_METRICS.contains(&d.name.as_str()))
            .map(|d| (d.name.clone(), d))
            .collect();
        // Upstream has no userspace mode: ours registers what every mode has.
        let expected: BTreeMap<&String, &Expected> = list
            .iter()
            .filter(|(_, e)| e.modes.iter().any(|m| m == "all" || m == mode.name()))
            .collect();
        let extra: Vec<&String> = ours.keys().filter(|n| !expected.contains_key(n)).collect();
        let missing: Vec<&&String> = expected
            .keys()
            .filter(|n| !ours.contains_key(**n))
            .collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "{}: registered but not upstream's: {extra:?}; upstream's but missing: {missing:?}",
            mode.name()
        );
        for (name, want) in expected {
            let got = &ours[name];
            assert_eq!(got.kind, want.kind, "{}: type of {name}", mode.name());
            assert_eq!(got.help, want.help, "{}: help of {name}", mode.name());
            let mut got_labels = got.labels.clone();
            let mut want_labels = want.labels.clone();
            // A scrape shows labels sorted: declaration order is not observable.
            got_labels.sort();
            want_labels.sort();
            assert_eq!(got_labels, want_labels, "{}: labels of {name}", mode.name());
            assert!(
                close(&got.buckets, &want.buckets),
                "{}: buckets of {name}: {:?} vs {:?}",
                mode.name(),
                got.buckets,
                want.buckets
            );
        }
    }
}

#[test]
fn bucket_specs_parse() {
    assert_eq!(buckets("exp(0.001,2,3)"), vec![0.001, 0.002, 0.004]);
    assert_eq!(
        buckets("merge(lin(0.25,0.25,2),lin(1,1,2))"),
        vec![0.0, 0.25, 0.5, 1.0, 2.0]
    );
    assert_eq!(buckets("0.5,1"), vec![0.5, 1.0]);
}
