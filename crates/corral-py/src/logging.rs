//! The error log: `[time] [pid] [LEVEL] message` (workers add `[worker N]`
//! after the pid), one line per event, in the shape gunicorn users already
//! grep for; or, with `--log-format json`, one JSON object per line. Lines go
//! to stderr or to `--error-log FILE` (see `corral_engine::logfile`).

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicI64, Ordering};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::cli::LogLevel;

/// This process's worker slot, or -1 in the master.
static WORKER: AtomicI64 = AtomicI64::new(-1);

/// Called in a new worker process: its lines carry its slot from now on.
pub fn set_worker(slot: usize) {
    WORKER.store(slot as i64, Ordering::Relaxed);
}

struct LineFormat;

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "TRACE",
    }
}

/// Collects an event's message.
#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            use fmt::Write as _;
            let _ = write!(self.0, "{value:?}");
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let level = level_name(event.metadata().level());
        if corral_engine::logfile::json() {
            let mut msg = Message::default();
            event.record(&mut msg);
            return writeln!(w, "{}", json_line(level, &msg.0));
        }
        let now = timestamp();
        let pid = std::process::id();
        match WORKER.load(Ordering::Relaxed) {
            -1 => write!(w, "[{now}] [{pid}] [{level}] ")?,
            n => write!(w, "[{now}] [{pid}] [worker {n}] [{level}] ")?,
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// One JSON log object; every string is escaped, so a message cannot end
/// the line or add a field.
pub fn json_line(level: &str, message: &str) -> String {
    let worker = match WORKER.load(Ordering::Relaxed) {
        -1 => "null".to_string(),
        n => n.to_string(),
    };
    format!(
        "{{\"time\":\"{}\",\"level\":\"{level}\",\"pid\":{},\"worker\":{worker},\"message\":{}}}",
        iso_timestamp(),
        std::process::id(),
        corral_engine::access::json_string(message)
    )
}

/// Local time as `YYYY-MM-DD HH:MM:SS +0000`, as gunicorn's error log has it.
fn timestamp() -> String {
    let ((y, m, d, h, mi, s), off) = corral_engine::date::local(corral_engine::date::now_secs());
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02} {off}")
}

fn iso_timestamp() -> String {
    let (y, m, d, h, mi, s) = corral_engine::date::civil(corral_engine::date::now_secs());
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Text written to `wsgi.errors`: as it is in the text format; in the JSON
/// format, one object for what one write ended with a newline (a logging
/// handler's record, its traceback included), so that a log system keeps a
/// record's lines together.
pub fn app_error_text(text: &str) {
    // Whole lines only: print() and tracebacks write a line in pieces, and
    // pieces from two threads or processes must not interleave in a line.
    PENDING.with(|p| {
        let mut p = p.0.borrow_mut();
        // Only the new text is looked at: a line that grows a piece at a
        // time is not searched again at each piece.
        match text.rfind('\n') {
            Some(end) => {
                p.push_str(&text[..=end]);
                let lines = std::mem::replace(&mut *p, text[end + 1..].to_string());
                emit_app_lines(&lines);
            }
            None => p.push_str(text),
        }
        // A line that never ends (progress dots, `\r` updates) is written in
        // parts rather than held without bound.
        if p.len() >= PENDING_MAX {
            let mut line = std::mem::take(&mut *p);
            line.push('\n');
            emit_app_lines(&line);
        }
    });
}

/// The most of an unfinished `wsgi.errors` line held for its end.
const PENDING_MAX: usize = 8192;

/// `wsgi.errors.flush()`: a serving thread's unfinished line waits for its
/// end or the request's (a progress line written a piece at a time, with a
/// flush after each, came out a piece per line); a thread of the app's own,
/// which may never finish it, has it written now.
pub fn app_error_flush_from_app() {
    let serving = std::thread::current().name().is_some_and(|n| n.starts_with("corral-"));
    if !serving {
        app_error_flush();
    }
}

/// Writes what this thread's `wsgi.errors` holds of an unfinished line
/// (after each request).
pub fn app_error_flush() {
    PENDING.with(|p| {
        let mut p = p.0.borrow_mut();
        if !p.is_empty() {
            let mut line = std::mem::take(&mut *p);
            line.push('\n');
            emit_app_lines(&line);
        }
    });
}

thread_local! {
    /// This thread's `wsgi.errors` text after its last newline.
    static PENDING: Pending = const { Pending(std::cell::RefCell::new(String::new())) };
}

/// A thread's unfinished `wsgi.errors` line. A serving thread writes it
/// after each request; a thread of the app's own, which may never flush,
/// when it ends.
struct Pending(std::cell::RefCell<String>);

impl Drop for Pending {
    fn drop(&mut self) {
        let line = self.0.get_mut();
        if !line.is_empty() {
            line.push('\n');
            emit_app_lines(line);
        }
    }
}

fn emit_app_lines(text: &str) {
    if corral_engine::logfile::json() {
        let record = text.trim_end_matches(['\n', '\r']);
        if !record.trim().is_empty() {
            let mut out = json_line(app_record_level(record), record);
            out.push('\n');
            corral_engine::logfile::write(out.as_bytes());
        }
    } else {
        corral_engine::logfile::write(text.as_bytes());
    }
}

/// The level of a record written to `wsgi.errors`: the first level name
/// standing as a word near the start of its first line, where Python's
/// logging formats put `%(levelname)s` (`INFO:root:...`, Flask's
/// `[time] WARNING in app: ...`); ERROR when none is there, as the stream is
/// the app's error stream. An app's INFO line is then not an error to a log
/// system that alerts on the level.
fn app_record_level(record: &str) -> &'static str {
    /// How far into the first line a level name is looked for: past a
    /// timestamp and a logger name, short of most messages.
    const LEVEL_WITHIN: usize = 64;
    let first = record.lines().next().unwrap_or("");
    let head = match first.char_indices().nth(LEVEL_WITHIN) {
        Some((i, _)) => &first[..i],
        None => first,
    };
    head.split(|c: char| !c.is_ascii_alphabetic())
        .find_map(|word| match word {
            "DEBUG" => Some("DEBUG"),
            "INFO" => Some("INFO"),
            "WARNING" | "WARN" => Some("WARNING"),
            "ERROR" => Some("ERROR"),
            "CRITICAL" | "FATAL" => Some("CRITICAL"),
            _ => None,
        })
        .unwrap_or("ERROR")
}

/// Buffers one event and writes it in one piece.
struct EventWriter(Vec<u8>);

impl io::Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        corral_engine::logfile::write(&escape_controls(std::mem::take(&mut self.0)));
    }
}

/// A text log line with its control characters but tab and newline
/// written as `\xNN`: a NUL from an exception message would make the file
/// binary to grep, and a carriage return or an escape sequence could hide
/// the line's start on a terminal. (JSON lines are escaped already.)
fn escape_controls(line: Vec<u8>) -> Vec<u8> {
    let control = |b: u8| (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7f;
    if !line.iter().any(|&b| control(b)) {
        return line;
    }
    let mut out = Vec::with_capacity(line.len() + 16);
    for b in line {
        if control(b) {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

struct ErrorLog;

impl<'a> MakeWriter<'a> for ErrorLog {
    type Writer = EventWriter;
    fn make_writer(&'a self) -> EventWriter {
        EventWriter(Vec::with_capacity(256))
    }
}

pub fn init(level: LogLevel) {
    let max = match level {
        LogLevel::Debug => Level::DEBUG,
        LogLevel::Info => Level::INFO,
        LogLevel::Warning => Level::WARN,
        LogLevel::Error => Level::ERROR,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(max)
        .with_writer(ErrorLog)
        .event_format(LineFormat)
        .try_init();
}

/// `corral._corral._log(level, message)`: a line of the error log written
/// from Python (gunicorn's server hooks call `server.log.info(...)`).
#[pyfunction(name = "_log")]
pub fn log_line(level: &str, message: &Bound<'_, PyString>) {
    let text = log_text(message);
    match level {
        "error" => tracing::error!("{text}"),
        "warning" => tracing::warn!("{text}"),
        "debug" => tracing::debug!("{text}"),
        _ => tracing::info!("{text}"),
    }
}

/// A Python string for the log. A string that is not valid Unicode (a lone
/// surrogate, as `os.fsdecode` makes of undecodable file names) is written
/// with `\udcff` escapes, as Python's own stderr does, not refused.
pub fn log_text<'a>(s: &'a Bound<'_, PyString>) -> Cow<'a, str> {
    s.to_cow().unwrap_or_else(|_| {
        let escaped = s.call_method1("encode", ("utf-8", "backslashreplace"));
        let bytes = escaped.as_ref().ok().and_then(|b| b.downcast::<PyBytes>().ok());
        Cow::Owned(bytes.map(|b| String::from_utf8_lossy(b.as_bytes()).into_owned()).unwrap_or_default())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_lines_show_control_characters_escaped() {
        let line = super::escape_controls(b"a\0b\rc\x1b[2Jd\te\nf\x7f\n".to_vec());
        assert_eq!(line, b"a\\x00b\\x0dc\\x1b[2Jd\te\nf\\x7f\n");
        assert_eq!(super::escape_controls(b"plain\n".to_vec()), b"plain\n");
    }

    #[test]
    fn app_records_keep_their_logging_level() {
        for (record, level) in [
            ("INFO:root:started", "INFO"),
            ("[2026-12-04 10:00:00,123] WARNING in app: slow query", "WARNING"),
            ("2026-12-04 10:00:00 DEBUG myapp.views cache miss", "DEBUG"),
            ("CRITICAL:db:gone\nTraceback (most recent call last):", "CRITICAL"),
            ("Traceback (most recent call last):\n  File \"x\"\nINFO", "ERROR"),
            ("something the app printed", "ERROR"),
            ("INFORMATION is not a level, nor is error", "ERROR"),
            (&format!("{}INFO", "x ".repeat(40)), "ERROR"),
        ] {
            assert_eq!(super::app_record_level(record), level, "{record:?}");
        }
    }

    #[test]
    fn json_lines_cannot_be_forged() {
        let line = super::json_line("INFO", "a\"b\nc\\d\u{1}");
        assert!(!line.contains('\n'));
        assert!(line.ends_with(r#""message":"a\"b\u000ac\\d\u0001"}"#), "{line}");
    }
}
