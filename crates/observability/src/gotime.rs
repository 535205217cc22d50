//! Times as Go's `encoding/json` writes a `time.Time` (RFC 3339 with up to nine
//! fractional digits, trailing zeros trimmed, `Z` for a zero offset), which upstream's
//! `/healthz` and `/livez` JSON carry since v1.33: `2025-04-23T10:02:41.123456789+08:00`.
//! Go's `time.Now()` is in the local zone, so the offset is the local one.

use std::time::SystemTime;

use jiff::tz::TimeZone;
use jiff::Timestamp;

/// Go's zero `time.Time` in JSON (an update that never happened).
pub const ZERO: &str = "0001-01-01T00:00:00Z";

/// `at` in the local time zone; `None` is Go's zero time.
pub fn rfc3339_nano(at: Option<SystemTime>) -> String {
    match at {
        None => ZERO.to_owned(),
        Some(at) => rfc3339_nano_in(at, &TimeZone::system()),
    }
}

pub fn rfc3339_nano_in(at: SystemTime, tz: &TimeZone) -> String {
    let Ok(ts) = Timestamp::try_from(at) else {
        return ZERO.to_owned();
    };
    let zoned = ts.to_zoned(tz.clone());
    let secs = zoned.offset().seconds();
    // Go's "Z07:00": `Z` for a zero offset, else ±hh:mm.
    let offset = if secs == 0 {
        "Z".to_owned()
    } else {
        let sign = if secs < 0 { '-' } else { '+' };
        format!(
            "{sign}{:02}:{:02}",
            secs.abs() / 3600,
            (secs.abs() % 3600) / 60
        )
    };
    let nanos = zoned.subsec_nanosecond();
    // Go's ".999999999": trailing zeros trimmed, no dot when the fraction is zero.
    let fraction = if nanos == 0 {
        String::new()
    } else {
        format!(".{nanos:09}").trim_end_matches('0').to_owned()
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}{offset}",
        zoned.year(),
        zoned.month(),
        zoned.day(),
        zoned.hour(),
        zoned.minute(),
        zoned.second(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn matches_go_json_time_format() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_667_970_875, 621_317_865);
        let tz = TimeZone::get("Asia/Shanghai").expect("tzdb has Asia/Shanghai");
        assert_eq!(
            rfc3339_nano_in(at, &tz),
            "2022-11-09T13:14:35.621317865+08:00"
        );
        let ny = TimeZone::get("America/New_York").expect("tzdb has America/New_York");
        assert_eq!(
            rfc3339_nano_in(SystemTime::UNIX_EPOCH + Duration::from_millis(1500), &ny),
            "1969-12-31T19:00:01.5-05:00"
        );
        assert_eq!(
            rfc3339_nano_in(SystemTime::UNIX_EPOCH, &TimeZone::UTC),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(rfc3339_nano(None), "0001-01-01T00:00:00Z");
    }
}
