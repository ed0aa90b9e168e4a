//! RFC 3339 rendering of protobuf timestamps (`2026-11-26T23:40:01.123Z`), always in UTC.
//!
//! Written by hand on Howard Hinnant's days-to-civil algorithm so the CLI needs no date
//! crate for the one conversion it does. The digits follow the proto JSON mapping: no
//! fraction for whole seconds, otherwise 3, 6 or 9 digits.

use prost_types::Timestamp;

/// Seconds of 0001-01-01T00:00:00Z, the earliest instant a protobuf `Timestamp` may hold.
const MIN_SECONDS: i64 = -62_135_596_800;
/// Seconds of 9999-12-31T23:59:59Z, the latest instant a protobuf `Timestamp` may hold.
const MAX_SECONDS: i64 = 253_402_300_799;
const SECONDS_PER_DAY: i64 = 86_400;

/// Formats `ts` as an RFC 3339 UTC string, or `None` when it is outside the range protobuf
/// allows (years 1-9999, nanos 0-999,999,999): such a value came from a broken peer, and
/// printing a made-up date for it would be worse than printing nothing.
pub(crate) fn rfc3339(ts: &Timestamp) -> Option<String> {
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&ts.seconds) || !(0..1_000_000_000).contains(&ts.nanos)
    {
        return None;
    }
    let days = ts.seconds.div_euclid(SECONDS_PER_DAY);
    let second_of_day = ts.seconds.rem_euclid(SECONDS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
    );
    let fraction = fraction(ts.nanos);
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{fraction}Z"
    ))
}

/// The shortest of "", ".mmm", ".uuuuuu" and ".nnnnnnnnn" that is exact for `nanos`.
fn fraction(nanos: i32) -> String {
    if nanos == 0 {
        String::new()
    } else if nanos % 1_000_000 == 0 {
        format!(".{:03}", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!(".{:06}", nanos / 1_000)
    } else {
        format!(".{nanos:09}")
    }
}

/// Converts days since 1970-01-01 into a proleptic Gregorian (year, month, day).
///
/// Hinnant's trick: count from 0000-03-01 so the leap day is the last day of the
/// (shifted) year, and split time into 400-year eras, which all have exactly 146,097 days.
/// Inside an era the year and day-of-year then follow from plain integer division.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // 719,468 days separate 0000-03-01 from 1970-01-01.
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097); // 0..=146_096
    // Leap days accumulate every 4 years, minus every 100, plus the one at the era's end.
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // 0..=399
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // 0..=365
    // Months from March: their lengths 31,30,31,30,31 repeat, so 153 days per 5 months.
    let month_from_march = (5 * day_of_year + 2) / 153; // 0..=11
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1; // 1..=31
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    // January and February belong to the next civil year.
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both values are bounded by the arithmetic above, so the casts cannot truncate.
    (year, month as u32, day as u32)
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

    /// Walks every day of years 1-9999 with a naive calendar and checks the closed form
    /// agrees, which covers every leap-year rule and era boundary.
    #[test]
    fn agrees_with_a_day_by_day_calendar() {
        fn is_leap(year: i64) -> bool {
            year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
        }
        fn days_in_month(year: i64, month: u32) -> u32 {
            match month {
                2 if is_leap(year) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            }
        }

        let (mut year, mut month, mut day) = (1_i64, 1_u32, 1_u32);
        for days in MIN_SECONDS / SECONDS_PER_DAY..=MAX_SECONDS / SECONDS_PER_DAY {
            assert_eq!(civil_from_days(days), (year, month, day), "day {days}");
            day += 1;
            if day > days_in_month(year, month) {
                day = 1;
                month += 1;
                if month > 12 {
                    month = 1;
                    year += 1;
                }
            }
        }
        assert_eq!((year, month, day), (10_000, 1, 1));
    }
}
