//! Go-compatible durations (`time.ParseDuration` / `Duration.String()`).
//!
//! kube-proxy flags and the config file spell durations the Go way (`30s`,
//! `15m0s`, `1h2m3.5s`), and `--write-config-to` must print them the same way
//! so that files round-trip and stay readable by upstream tooling.

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

const NANOSECOND: u64 = 1;
const MICROSECOND: u64 = 1_000 * NANOSECOND;
const MILLISECOND: u64 = 1_000 * MICROSECOND;
const SECOND: u64 = 1_000 * MILLISECOND;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;

/// A signed duration in nanoseconds, like Go's `time.Duration`.
///
/// Negative values are representable on purpose: upstream parses them and
/// rejects them during validation with a field-specific message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration(i64);

/// Why a duration string was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

impl GoDuration {
    pub const ZERO: GoDuration = GoDuration(0);

    pub const fn from_nanos(nanos: i64) -> Self {
        GoDuration(nanos)
    }

    pub const fn from_millis(millis: i64) -> Self {
        GoDuration(millis * MILLISECOND as i64)
    }

    pub const fn from_secs(secs: i64) -> Self {
        GoDuration(secs * SECOND as i64)
    }

    pub const fn from_mins(mins: i64) -> Self {
        GoDuration(mins * MINUTE as i64)
    }

    pub const fn from_hours(hours: i64) -> Self {
        GoDuration(hours * HOUR as i64)
    }

    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// The duration as a `std::time::Duration`, or `None` when negative.
    pub fn to_std(self) -> Option<std::time::Duration> {
        u64::try_from(self.0)
            .ok()
            .map(std::time::Duration::from_nanos)
    }
}

/// Parses a duration exactly as Go's `time.ParseDuration` does: an optional
/// sign followed by one or more `<decimal><unit>` terms, or the bare `0`.
pub fn parse_duration(input: &str) -> Result<GoDuration, DurationError> {
    let fail = |reason| DurationError {
        input: input.to_string(),
        reason,
    };
    let mut s = input;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(GoDuration::ZERO);
    }
    if s.is_empty() {
        return Err(fail("empty duration"));
    }

    let mut total: u64 = 0;
    while !s.is_empty() {
        // Integer part.
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int_digits, rest) = s.split_at(int_len);
        s = rest;
        let mut int_part: u64 = 0;
        for b in int_digits.bytes() {
            int_part = int_part
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(b - b'0')))
                .ok_or_else(|| fail("value out of range"))?;
        }

        // Optional fraction; like Go, extra digits beyond u64 precision are dropped.
        let mut frac: u64 = 0;
        let mut scale: f64 = 1.0;
        let mut frac_len = 0;
        if let Some(rest) = s.strip_prefix('.') {
            s = rest;
            frac_len = s.bytes().take_while(u8::is_ascii_digit).count();
            let (frac_digits, rest) = s.split_at(frac_len);
            s = rest;
            let mut overflow = false;
            for b in frac_digits.bytes() {
                if overflow {
                    continue;
                }
                match frac
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(u64::from(b - b'0')))
                {
                    Some(v) if v <= (1 << 63) => {
                        frac = v;
                        scale *= 10.0;
                    }
                    _ => overflow = true,
                }
            }
        }
        if int_len == 0 && frac_len == 0 {
            return Err(fail("expected a number"));
        }

        let unit_len = s
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map_or(s.len(), |(i, _)| i);
        let (unit_str, rest) = s.split_at(unit_len);
        s = rest;
        let unit = match unit_str {
            "" => return Err(fail("missing unit (use ns, us, ms, s, m or h)")),
            "ns" => NANOSECOND,
            "us" | "\u{b5}s" | "\u{3bc}s" => MICROSECOND,
            "ms" => MILLISECOND,
            "s" => SECOND,
            "m" => MINUTE,
            "h" => HOUR,
            _ => return Err(fail("unknown unit (use ns, us, ms, s, m or h)")),
        };

        let mut value = int_part
            .checked_mul(unit)
            .ok_or_else(|| fail("value out of range"))?;
        if frac > 0 {
            // Float here mirrors Go, which also scales the fraction in float64.
            let extra = (frac as f64 * (unit as f64 / scale)) as u64;
            value = value
                .checked_add(extra)
                .ok_or_else(|| fail("value out of range"))?;
        }
        total = total
            .checked_add(value)
            .ok_or_else(|| fail("value out of range"))?;
    }

    if negative {
        if total > 1 << 63 {
            return Err(fail("value out of range"));
        }
        // 1<<63 itself maps to i64::MIN.
        Ok(GoDuration((total as i64).wrapping_neg()))
    } else {
        i64::try_from(total)
            .map(GoDuration)
            .map_err(|_| fail("value out of range"))
    }
}

/// `value / unit` with the remainder as a trimmed decimal fraction, e.g. 1.5.
fn write_fraction(out: &mut String, value: u64, unit: u64, digits: usize) {
    out.push_str(&(value / unit).to_string());
    let rem = value % unit;
    if rem != 0 {
        let frac = format!("{rem:0digits$}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
}

impl fmt::Display for GoDuration {
    /// Formats like Go's `Duration.String()`: `0s`, `250ms`, `1.5µs`, `15m0s`, `1h0m0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0s");
        }
        let mut out = String::new();
        if self.0 < 0 {
            out.push('-');
        }
        let u = self.0.unsigned_abs();
        if u < SECOND {
            let (unit, name, digits) = if u < MICROSECOND {
                (NANOSECOND, "ns", 0)
            } else if u < MILLISECOND {
                (MICROSECOND, "\u{b5}s", 3)
            } else {
                (MILLISECOND, "ms", 6)
            };
            write_fraction(&mut out, u, unit, digits);
            out.push_str(name);
        } else {
            let hours = u / HOUR;
            let minutes = (u % HOUR) / MINUTE;
            let rest = u % MINUTE;
            if hours > 0 {
                out.push_str(&format!("{hours}h{minutes}m"));
            } else if minutes > 0 {
                out.push_str(&format!("{minutes}m"));
            }
            write_fraction(&mut out, rest, SECOND, 9);
            out.push('s');
        }
        f.write_str(&out)
    }
}

impl FromStr for GoDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    /// Only strings, as upstream's `metav1.Duration` accepts only JSON strings.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        parse_duration(&s).map_err(de::Error::custom)
    }
}

/// Deserializes a duration given either as a Go duration string or as an
/// integer number of nanoseconds (upstream's logging `flushFrequency` accepts
/// both, and kubeadm writes `flushFrequency: 0`).
pub fn deserialize_duration_or_nanos<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<GoDuration, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = GoDuration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"5s\" or an integer number of nanoseconds")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<GoDuration, E> {
            Ok(GoDuration(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<GoDuration, E> {
            i64::try_from(v)
                .map(GoDuration)
                .map_err(|_| E::custom("duration out of range"))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<GoDuration, E> {
            // A quoted number is still nanoseconds for upstream's lenient parser.
            if let Ok(n) = v.parse::<i64>() {
                return Ok(GoDuration(n));
            }
            parse_duration(v).map_err(E::custom)
        }
    }
    deserializer.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_examples() {
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("0s", 0),
            ("-0", 0),
            ("+0s", 0),
            ("30s", 30 * SECOND as i64),
            ("15m0s", 15 * MINUTE as i64),
            ("1h2m3s", (HOUR + 2 * MINUTE + 3 * SECOND) as i64),
            ("250ms", 250 * MILLISECOND as i64),
            ("1.5h", (HOUR + 30 * MINUTE) as i64),
            (".5s", 500 * MILLISECOND as i64),
            ("1.s", SECOND as i64),
            ("10ns", 10),
            ("3us", 3_000),
            ("3\u{b5}s", 3_000),
            ("3\u{3bc}s", 3_000),
            ("-1.5s", -1_500_000_000),
            ("1h1h", 2 * HOUR as i64),
            ("1.0000000000000000000001s", SECOND as i64),
            ("9223372036854775807ns", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
        ];
        for (input, want) in cases {
            assert_eq!(parse_duration(input), Ok(GoDuration(*want)), "{input}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        for input in [
            "",
            "abc",
            "30",
            "1",
            "s",
            ".s",
            "1.5",
            "1d",
            "1 s",
            "--1s",
            "9223372036854775808ns",
            "3000000h",
            "1s ",
            " 1s",
        ] {
            assert!(parse_duration(input).is_err(), "{input:?} should fail");
        }
        let err = parse_duration("abc").unwrap_err().to_string();
        assert!(err.contains("\"abc\""), "{err}");
    }

    #[test]
    fn formats_like_go() {
        let cases: &[(i64, &str)] = &[
            (0, "0s"),
            (1, "1ns"),
            (1_500, "1.5\u{b5}s"),
            (250 * MILLISECOND as i64, "250ms"),
            (1_100_000, "1.1ms"),
            (SECOND as i64, "1s"),
            (1_500_000_000, "1.5s"),
            (30 * SECOND as i64, "30s"),
            (15 * MINUTE as i64, "15m0s"),
            (HOUR as i64, "1h0m0s"),
            (24 * HOUR as i64, "24h0m0s"),
            ((HOUR + 2 * MINUTE + 3 * SECOND) as i64, "1h2m3s"),
            (HOUR as i64 + 500_000_000, "1h0m0.5s"),
            (-(90 * SECOND as i64), "-1m30s"),
            (i64::MAX, "2562047h47m16.854775807s"),
            (i64::MIN, "-2562047h47m16.854775808s"),
        ];
        for (nanos, want) in cases {
            assert_eq!(GoDuration(*nanos).to_string(), *want, "{nanos}");
        }
    }

    #[test]
    fn round_trips() {
        // A deterministic spread of values across all unit ranges.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let magnitude = x % 10u64.pow((i % 19) as u32 + 1);
            let nanos = if i % 3 == 0 {
                -(magnitude as i64)
            } else {
                magnitude as i64
            };
            let d = GoDuration(nanos);
            assert_eq!(parse_duration(&d.to_string()), Ok(d), "{nanos}");
        }
    }

    #[test]
    fn conversions() {
        assert_eq!(
            GoDuration::from_secs(2).to_std(),
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(GoDuration::from_secs(-2).to_std(), None);
        assert_eq!(GoDuration::from_millis(5).as_nanos(), 5_000_000);
        assert_eq!(GoDuration::from_mins(1), GoDuration::from_secs(60));
        assert_eq!(GoDuration::from_hours(1), GoDuration::from_mins(60));
        assert_eq!(GoDuration::from_nanos(7).as_nanos(), 7);
        assert!(GoDuration::ZERO.is_zero());
        assert!(GoDuration::from_secs(-1).is_negative());
        assert_eq!("1m".parse::<GoDuration>(), Ok(GoDuration::from_mins(1)));
    }
}
