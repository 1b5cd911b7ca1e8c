//! Quotas: at most `limit` requests per UTC hour, day or calendar month, counted across
//! the fleet. The filter and the control plane compute a period's bounds with the same
//! [`Period::window`], so they agree on when a period starts and resets.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Largest quota limit the control plane accepts.
pub const MAX_LIMIT: u64 = 1_000_000_000_000;

/// A quota's period. `Seconds` exists for tests only: the control plane accepts it (written
/// `"<n>s"`) only when started with its test-only setting; the shipped periods are the three
/// others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Hour,
    Day,
    Month,
    Seconds(u32),
}

impl Period {
    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "hour" => Some(Period::Hour),
            "day" => Some(Period::Day),
            "month" => Some(Period::Month),
            _ => {
                let n: u32 = s.strip_suffix('s')?.parse().ok()?;
                (n > 0 && !s.starts_with('0') && !s.starts_with('+')).then_some(Period::Seconds(n))
            }
        }
    }

    pub fn as_string(self) -> String {
        match self {
            Period::Hour => "hour".into(),
            Period::Day => "day".into(),
            Period::Month => "month".into(),
            Period::Seconds(n) => format!("{n}s"),
        }
    }

    /// The period holding `now_s` (Unix seconds): `[start, end)`, in Unix seconds.
    pub fn window(self, now_s: i64) -> (i64, i64) {
        let fixed = |len: i64| {
            let start = now_s.div_euclid(len) * len;
            (start, start + len)
        };
        match self {
            Period::Hour => fixed(3_600),
            Period::Day => fixed(86_400),
            Period::Seconds(n) => fixed(i64::from(n.max(1))),
            Period::Month => {
                let (y, m, _) = civil_from_days(now_s.div_euclid(86_400));
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (
                    days_from_civil(y, m, 1) * 86_400,
                    days_from_civil(ny, nm, 1) * 86_400,
                )
            }
        }
    }
}

impl Serialize for Period {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_string())
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Period, D::Error> {
        let s = String::deserialize(d)?;
        Period::parse(&s)
            .ok_or_else(|| serde::de::Error::custom("must be \"hour\", \"day\" or \"month\""))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Requests per period, at least 1.
    pub limit: u64,
    pub period: Period,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_utc_boundaries() {
        // 2026-12-03T06:10:56Z
        let now = 1_796_278_256;
        assert_eq!(Period::Hour.window(now), (1_796_277_600, 1_796_281_200));
        assert_eq!(Period::Day.window(now), (1_796_256_000, 1_796_342_400));
        // 2026-12-01 .. 2027-01-01
        assert_eq!(Period::Month.window(now), (1_796_083_200, 1_798_761_600));
        // 2028-02 is a leap February: 29 days.
        let (s, e) = Period::Month.window(1_833_000_000);
        assert_eq!((e - s) / 86_400, 29);
        assert_eq!(Period::Seconds(10).window(1_005), (1_000, 1_010));
        let (s, e) = Period::Month.window(0);
        assert_eq!((s, e / 86_400), (0, 31));
    }

    #[test]
    fn periods_read_and_write_as_text() {
        for p in [Period::Hour, Period::Day, Period::Month, Period::Seconds(5)] {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<Period>(&json).unwrap(), p);
        }
        for bad in ["\"week\"", "\"0s\"", "\"s\"", "\"05s\"", "\"-1s\"", "3"] {
            assert!(serde_json::from_str::<Period>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_month_window_holds_its_instant_and_starts_on_the_first() {
        let mut t = -86_400 * 400;
        while t < 86_400 * 365 * 80 {
            let (s, e) = Period::Month.window(t);
            assert!(s <= t && t < e);
            assert_eq!(civil_from_days(s / 86_400).2, 1);
            assert!((28..=31).contains(&((e - s) / 86_400)));
            t += 86_400 * 7 + 3_601;
        }
    }
}
