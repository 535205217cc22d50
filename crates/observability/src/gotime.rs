//! Go's `time.Time.String()` format, which upstream's `/healthz` JSON carries:
//! `2022-11-09 13:14:35.621317865 +0800 CST m=+4802354.950616250`.
//!
//! The `m=` part is Go's monotonic clock reading, seconds since the process started; we
//! write the time since our own start, which is what it means to a reader.

use std::time::{Duration, SystemTime};

use jiff::tz::TimeZone;
use jiff::Timestamp;

/// Formats `at` in the local time zone, with `since_start` as the monotonic reading.
pub fn format(at: SystemTime, since_start: Option<Duration>) -> String {
    format_in(at, since_start, &TimeZone::system())
}

/// Go's zero `time.Time` as `String()` writes it (an update that never happened).
pub const ZERO: &str = "0001-01-01 00:00:00 +0000 UTC";

pub fn format_in(at: SystemTime, since_start: Option<Duration>, tz: &TimeZone) -> String {
    let Ok(ts) = Timestamp::try_from(at) else {
        return ZERO.to_owned();
    };
    let zoned = ts.to_zoned(tz.clone());
    let offset = zoned.offset();
    let secs = offset.seconds();
    let sign = if secs < 0 { '-' } else { '+' };
    let (h, m) = (secs.abs() / 3600, (secs.abs() % 3600) / 60);
    // Go writes the zone's abbreviation, or the numeric offset when it has none.
    let abbreviation = tz.to_offset_info(ts).abbreviation().to_owned();
    let abbreviation = if abbreviation.is_empty() {
        format!("{sign}{h:02}{m:02}")
    } else {
        abbreviation
    };
    let nanos = zoned.subsec_nanosecond();
    // Go's ".999999999": trailing zeros trimmed, no dot when the fraction is zero.
    let fraction = if nanos == 0 {
        String::new()
    } else {
        format!(".{nanos:09}").trim_end_matches('0').to_owned()
    };
    let mut text = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}{fraction} {sign}{h:02}{m:02} {abbreviation}",
        zoned.year(),
        zoned.month(),
        zoned.day(),
        zoned.hour(),
        zoned.minute(),
        zoned.second(),
    );
    if let Some(mono) = since_start {
        text.push_str(&format!(
            " m=+{}.{:09}",
            mono.as_secs(),
            mono.subsec_nanos()
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_go_string_format() {
        // 2022-11-09 05:14:35.621317865 UTC, shown in Asia/Shanghai as in the seed.
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_667_970_875, 621_317_865);
        let tz = TimeZone::get("Asia/Shanghai").expect("tzdb has Asia/Shanghai");
        assert_eq!(
            format_in(at, Some(Duration::new(4_802_354, 950_616_250)), &tz),
            "2022-11-09 13:14:35.621317865 +0800 CST m=+4802354.950616250"
        );
        assert_eq!(
            format_in(
                SystemTime::UNIX_EPOCH + Duration::from_millis(1500),
                None,
                &TimeZone::UTC
            ),
            "1970-01-01 00:00:01.5 +0000 UTC"
        );
        assert_eq!(
            format_in(SystemTime::UNIX_EPOCH, None, &TimeZone::UTC),
            "1970-01-01 00:00:00 +0000 UTC"
        );
    }
}
