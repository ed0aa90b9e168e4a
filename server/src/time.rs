//! Time in the three forms orderflow uses: microseconds since the epoch in the databases,
//! protobuf `Timestamp`s in events and API responses, RFC 3339 text in AMQP headers.

use std::time::{Duration, SystemTime};

/// Microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A protobuf timestamp from microseconds since the epoch.
pub fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// The current time as a protobuf timestamp.
pub fn now_timestamp() -> prost_types::Timestamp {
    timestamp(now_micros())
}

/// The latest instant [`rfc3339`] can write: humantime formats years 1970 to 9999 only.
const LATEST: Duration = Duration::from_secs(253_402_300_799);

/// RFC 3339 UTC timestamp with millisecond precision (`2026-11-26T23:26:41.123Z`).
pub fn rfc3339(time: SystemTime) -> String {
    let time = time.clamp(SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH + LATEST);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Parses RFC 3339 text such as [`rfc3339`] writes.
pub fn parse_rfc3339(text: &str) -> Option<prost_types::Timestamp> {
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_735_601_123);
        assert_eq!(rfc3339(t), "2026-11-26T23:26:41.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn clamps_what_it_cannot_write() {
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00.000Z");
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 40);
        assert_eq!(rfc3339(after), "9999-12-31T23:59:59.000Z");
    }

    #[test]
    fn parses_what_it_formats() {
        for millis in [0u64, 951_782_400_000, 1_795_735_601_123, 4_102_444_799_999] {
            let t = SystemTime::UNIX_EPOCH + Duration::from_millis(millis);
            let parsed = parse_rfc3339(&rfc3339(t)).unwrap();
            assert_eq!(
                parsed.seconds as u64 * 1000 + parsed.nanos as u64 / 1_000_000,
                millis
            );
        }
        assert_eq!(
            parse_rfc3339("2026-11-26T23:26:41Z").unwrap().seconds,
            1_795_735_601
        );
        assert!(parse_rfc3339("").is_none());
        assert!(parse_rfc3339("2026-13-01T00:00:00Z").is_none());
        assert!(parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn timestamps_from_micros() {
        assert_eq!(
            timestamp(1_500_000),
            prost_types::Timestamp {
                seconds: 1,
                nanos: 500_000_000
            }
        );
        assert_eq!(
            timestamp(-1),
            prost_types::Timestamp {
                seconds: -1,
                nanos: 999_999_000
            }
        );
    }
}
