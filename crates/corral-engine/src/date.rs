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
    fn date_header_shape() {
        let mut v = Vec::new();
        super::append_date_header(&mut v);
        let s = String::from_utf8(v).unwrap();
        assert!(s.starts_with("Date: ") && s.ends_with(" GMT\r\n"), "{s}");
        assert_eq!(s.len(), 6 + 29 + 2);
    }
}
