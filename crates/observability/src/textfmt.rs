//! The Prometheus text exposition format 0.0.4, written the way Go's client library
//! writes it (upstream kube-proxy's `/metrics`): families sorted by name, label pairs
//! sorted by name with `le` last, and numbers in Go's shortest `%g` form (`1.779223e+06`,
//! `0.001`, `+Inf`), so a scrape of ours diffs cleanly against an upstream one.

use std::fmt::Write as _;

use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};

/// The `Content-Type` of the format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes gathered families. Families with no samples are skipped, as Go's registry does.
pub fn encode(families: &[MetricFamily]) -> String {
    let mut sorted: Vec<&MetricFamily> = families
        .iter()
        .filter(|f| !f.get_metric().is_empty())
        .collect();
    sorted.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = String::new();
    for family in sorted {
        encode_family(&mut out, family);
    }
    out
}

fn encode_family(out: &mut String, family: &MetricFamily) {
    let name = family.name();
    let kind = match family.get_field_type() {
        MetricType::COUNTER => "counter",
        MetricType::GAUGE => "gauge",
        MetricType::HISTOGRAM => "histogram",
        MetricType::SUMMARY => "summary",
        MetricType::UNTYPED => "untyped",
    };
    let _ = writeln!(out, "# HELP {name} {}", escape_help(family.help()));
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let mut metrics: Vec<(Vec<&LabelPair>, &Metric)> = family
        .get_metric()
        .iter()
        .map(|m| {
            let mut labels: Vec<&LabelPair> = m.get_label().iter().collect();
            labels.sort_by(|a, b| a.name().cmp(b.name()));
            (labels, m)
        })
        .collect();
    metrics.sort_by(|(a, _), (b, _)| {
        let key = |l: &Vec<&LabelPair>| -> Vec<(String, String)> {
            l.iter()
                .map(|p| (p.name().to_owned(), p.value().to_owned()))
                .collect()
        };
        key(a).cmp(&key(b))
    });
    for (labels, metric) in metrics {
        match family.get_field_type() {
            MetricType::COUNTER => sample(
                out,
                name,
                "",
                &labels,
                None,
                metric.get_counter().get_value(),
            ),
            MetricType::GAUGE => {
                sample(out, name, "", &labels, None, metric.get_gauge().get_value())
            }
            // Nothing here registers untyped metrics.
            MetricType::UNTYPED => {}
            MetricType::SUMMARY => {
                let s = metric.get_summary();
                for q in s.get_quantile() {
                    let le = ("quantile", q.quantile());
                    sample(out, name, "", &labels, Some(le), q.value());
                }
                sample(out, name, "_sum", &labels, None, s.sample_sum());
                sample(out, name, "_count", &labels, None, s.sample_count() as f64);
            }
            MetricType::HISTOGRAM => {
                let h = metric.get_histogram();
                let mut inf_written = false;
                for b in h.get_bucket() {
                    inf_written |= b.upper_bound() == f64::INFINITY;
                    let le = ("le", b.upper_bound());
                    sample(
                        out,
                        name,
                        "_bucket",
                        &labels,
                        Some(le),
                        b.cumulative_count() as f64,
                    );
                }
                if !inf_written {
                    let le = ("le", f64::INFINITY);
                    sample(
                        out,
                        name,
                        "_bucket",
                        &labels,
                        Some(le),
                        h.get_sample_count() as f64,
                    );
                }
                sample(out, name, "_sum", &labels, None, h.get_sample_sum());
                sample(
                    out,
                    name,
                    "_count",
                    &labels,
                    None,
                    h.get_sample_count() as f64,
                );
            }
        }
    }
}

fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[&LabelPair],
    extra: Option<(&str, f64)>,
    value: f64,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || extra.is_some() {
        out.push('{');
        let mut first = true;
        for pair in labels {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{}=\"{}\"", pair.name(), escape_label(pair.value()));
        }
        if let Some((extra_name, extra_value)) = extra {
            if !first {
                out.push(',');
            }
            let _ = write!(out, "{extra_name}=\"{}\"", go_float(extra_value));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&go_float(value));
    out.push('\n');
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

/// A float as Go's `strconv.FormatFloat(f, 'g', -1, 64)` writes it: the shortest digits
/// that read back to the same value, in exponent form when the decimal exponent is
/// below -4 or at least 6 (`1e+06`, `1.5e-05`), with a two-digit exponent at least.
pub fn go_float(value: f64) -> String {
    if value.is_nan() {
        return "NaN".into();
    }
    if value.is_infinite() {
        return if value > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if value == 0.0 {
        // Go writes 0 and -0 alike in metrics ("0").
        return "0".into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "1.779223e6", "-2.5e-5".
    let sci = format!("{value:e}");
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return sci;
    };
    let Ok(exp) = exp.parse::<i32>() else {
        return sci;
    };
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    // Plain decimal; Rust's `{}` is also shortest round-trip and never uses exponents.
    format!("{value}")
}

#[cfg(test)]
mod tests {
    use super::go_float;

    #[test]
    fn floats_are_written_as_go_writes_them() {
        let cases = [
            (0.0, "0"),
            (1.0, "1"),
            (-1.0, "-1"),
            (0.001, "0.001"),
            (16.384, "16.384"),
            (0.25, "0.25"),
            (300.0, "300"),
            (41510.0, "41510"),
            (999_999.0, "999999"),
            (1_779_223.0, "1.779223e+06"),
            (1_000_000.0, "1e+06"),
            (1.57526993754e9, "1.57526993754e+09"),
            (4.79881454531e11, "4.79881454531e+11"),
            (0.0001, "0.0001"),
            (0.000_012_5, "1.25e-05"),
            (1e100, "1e+100"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
        ];
        for (value, want) in cases {
            assert_eq!(go_float(value), want, "{value:?}");
        }
    }
}
