//! RFC 3339 rendering of protobuf timestamps (`2026-11-26T23:40:01.123Z`), always in UTC.
//!
//! prost-types writes the text, with the digits of the proto JSON mapping: no fraction for
//! whole seconds, otherwise 3, 6 or 9 digits. This module only refuses values protobuf does
//! not allow, which prost-types would otherwise normalize into some other instant.

use prost_types::Timestamp;

/// Seconds of 0001-01-01T00:00:00Z, the earliest instant a protobuf `Timestamp` may hold.
const MIN_SECONDS: i64 = -62_135_596_800;
/// Seconds of 9999-12-31T23:59:59Z, the latest instant a protobuf `Timestamp` may hold.
const MAX_SECONDS: i64 = 253_402_300_799;

/// Formats `ts` as an RFC 3339 UTC string, or `None` when it is outside the range protobuf
/// allows (years 1-9999, nanos 0-999,999,999): such a value came from a broken peer, and
/// printing a made-up date for it would be worse than printing nothing.
pub(crate) fn rfc3339(ts: &Timestamp) -> Option<String> {
    let valid =
        (MIN_SECONDS..=MAX_SECONDS).contains(&ts.seconds) && (0..1_000_000_000).contains(&ts.nanos);
    valid.then(|| ts.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Timestamp {
        Timestamp { seconds, nanos }
    }

    #[test]
    fn formats_the_epoch_and_known_instants() {
        assert_eq!(rfc3339(&ts(0, 0)).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(
            rfc3339(&ts(1_795_736_401, 123_000_000)).as_deref(),
            Some("2026-11-26T23:40:01.123Z")
        );
        assert_eq!(
            rfc3339(&ts(951_825_600, 0)).as_deref(),
            Some("2000-02-29T12:00:00Z")
        );
        assert_eq!(
            rfc3339(&ts(-2_203_891_200, 0)).as_deref(),
            Some("1900-03-01T00:00:00Z")
        );
    }

    #[test]
    fn formats_instants_before_the_epoch() {
        assert_eq!(rfc3339(&ts(-1, 0)).as_deref(), Some("1969-12-31T23:59:59Z"));
        assert_eq!(
            rfc3339(&ts(-1, 500_000_000)).as_deref(),
            Some("1969-12-31T23:59:59.500Z")
        );
    }

    #[test]
    fn formats_the_ends_of_the_protobuf_range() {
        assert_eq!(
            rfc3339(&ts(MIN_SECONDS, 0)).as_deref(),
            Some("0001-01-01T00:00:00Z")
        );
        assert_eq!(
            rfc3339(&ts(MAX_SECONDS, 999_999_999)).as_deref(),
            Some("9999-12-31T23:59:59.999999999Z")
        );
    }

    #[test]
    fn uses_the_shortest_exact_fraction() {
        assert_eq!(
            rfc3339(&ts(0, 1_000)).as_deref(),
            Some("1970-01-01T00:00:00.000001Z")
        );
        assert_eq!(
            rfc3339(&ts(0, 1)).as_deref(),
            Some("1970-01-01T00:00:00.000000001Z")
        );
        assert_eq!(
            rfc3339(&ts(0, 10_000_000)).as_deref(),
            Some("1970-01-01T00:00:00.010Z")
        );
    }

    #[test]
    fn rejects_values_protobuf_does_not_allow() {
        assert_eq!(rfc3339(&ts(MIN_SECONDS - 1, 0)), None);
        assert_eq!(rfc3339(&ts(MAX_SECONDS + 1, 0)), None);
        assert_eq!(rfc3339(&ts(0, -1)), None);
        assert_eq!(rfc3339(&ts(0, 1_000_000_000)), None);
        assert_eq!(rfc3339(&ts(i64::MIN, 0)), None);
        assert_eq!(rfc3339(&ts(i64::MAX, 0)), None);
    }
}
