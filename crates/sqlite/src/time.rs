//! Times as stored: integer microseconds since the Unix epoch (UTC), the
//! precision PostgreSQL's `timestamptz` keeps.

use chrono::{DateTime, Utc};

/// `at` in microseconds since the epoch (sub-microsecond digits dropped).
pub(crate) fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

/// The time stored as `micros`.
pub(crate) fn from_micros(micros: i64) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| format!("time {micros} out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_at_microsecond_precision() {
        let at = DateTime::from_timestamp(1_765_000_000, 123_456_789).unwrap();
        let back = from_micros(micros(at)).unwrap();
        assert_eq!(back.timestamp_subsec_nanos(), 123_456_000);
        assert!(from_micros(i64::MAX).is_err());
    }
}
