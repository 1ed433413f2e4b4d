//! The `Date` response header, formatted once a second per thread rather
//! than once per response.

use std::cell::RefCell;
use std::time::{Duration, UNIX_EPOCH};

thread_local! {
    static CACHE: RefCell<(i64, [u8; 29])> = const { RefCell::new((-1, [0; 29])) };
}

/// Seconds since the epoch from the coarse clock: a vDSO read, no syscall.
pub fn now_secs() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    ts.tv_sec
}

/// Milliseconds on the monotonic coarse clock, for deadlines.
pub fn mono_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// UTC calendar fields of `secs` since the epoch: (year, month, day, hour,
/// minute, second).
pub fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let rem = secs.rem_euclid(86400) as u32;
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Local calendar fields of `secs` since the epoch (the TZ variable, else
/// /etc/localtime, as gunicorn's and uWSGI's log times), with the offset
/// from UTC as `+HHMM`; UTC if the C library cannot tell.
pub fn local(secs: i64) -> ((i64, u32, u32, u32, u32, u32), String) {
    let t = secs as libc::time_t;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return (civil(secs), "+0000".to_string());
    }
    let off = tm.tm_gmtoff / 60;
    let fields = (
        i64::from(tm.tm_year) + 1900,
        (tm.tm_mon + 1) as u32,
        tm.tm_mday as u32,
        tm.tm_hour as u32,
        tm.tm_min as u32,
        tm.tm_sec as u32,
    );
    let sign = if off < 0 { '-' } else { '+' };
    (fields, format!("{sign}{:02}{:02}", off.abs() / 60, off.abs() % 60))
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Appends `Date: <IMF-fixdate>\r\n`.
pub fn append_date_header(out: &mut Vec<u8>) {
    let now = now_secs();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != now {
            let s = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(now.max(0) as u64));
            c.1.copy_from_slice(&s.as_bytes()[..29]);
            c.0 = now;
        }
        out.extend_from_slice(b"Date: ");
        out.extend_from_slice(&c.1);
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        // Expected values from Python: datetime.fromtimestamp(N, timezone.utc).
        assert_eq!(super::civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(super::civil(1_763_997_637), (2025, 11, 24, 15, 20, 37));
        assert_eq!(super::civil_from_days(20416), (2025, 11, 24));
    }

    extern "C" {
        fn tzset();
    }

    #[test]
    fn local_time_follows_tz() {
        // POSIX TZ strings need no time zone files; this test alone sets TZ,
        // and nothing else here asserts an offset.
        std::env::set_var("TZ", "XYZ-3");
        unsafe { tzset() };
        let ((y, m, d, h, mi, s), off) = super::local(1_763_997_637);
        assert_eq!(((y, m, d, h, mi, s), off.as_str()), ((2025, 11, 24, 18, 20, 37), "+0300"));
        std::env::set_var("TZ", "ABC+4:30");
        unsafe { tzset() };
        assert_eq!(super::local(1_763_997_637).1, "-0430");
    }

    #[test]
    fn date_header_shape() {
        let mut v = Vec::new();
        super::append_date_header(&mut v);
        let s = String::from_utf8(v).unwrap();
        assert!(s.starts_with("Date: ") && s.ends_with(" GMT\r\n"), "{s}");
        assert_eq!(s.len(), 6 + 29 + 2);
    }
}
