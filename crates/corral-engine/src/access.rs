//! The access log: one line per request, in gunicorn's `%(x)s` format
//! language or as JSON.
//!
//! Lines are formatted by the thread that served the request, into that
//! thread's own buffer, with no Python and no system call; the worker's main
//! thread writes the buffers out at least once a second (and at exit), so
//! logging costs a request a few hundred nanoseconds, not a `write(2)`.
//!
//! Everything that comes from the client is escaped: in the text format
//! control bytes, quotes, backslashes and non-ASCII bytes become `\xNN`,
//! `\"` and `\\`; in JSON, strings are JSON-escaped (UTF-8 text kept as
//! text, other bytes read as latin-1). No header can start a new line or a
//! new field.

use std::fmt::Write as _;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::nowait::Target;

/// gunicorn's default access log format.
pub const DEFAULT_FORMAT: &str = r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s""#;

/// A thread writes its buffer itself when it grows past this, so a burst
/// between two flushes cannot take unbounded memory.
const FLUSH_AT: usize = 64 * 1024;

/// One piece of a compiled format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Atom {
    Literal(String),
    RemoteAddr,
    Dash,
    User,
    Time,
    RequestLine,
    Method,
    Path,
    Query,
    Protocol,
    Status,
    Bytes,
    BytesOrDash,
    Referer,
    UserAgent,
    Seconds,
    Millis,
    Micros,
    DecimalSeconds,
    Pid,
    RequestHeader(String),
    ResponseHeader(String),
    Environ(String),
    /// An atom with a width or precision, as Python's % formatting takes
    /// them (`%(h)-15s`, `%(D)8d`).
    Padded(Box<Atom>, Pad),
}

/// A width and precision of Python's % formatting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pad {
    width: usize,
    /// `-`: the value on the left.
    left: bool,
    /// `0`: zeros, not spaces, before a number.
    zero: bool,
    /// `.N`: at most N characters of the value.
    precision: Option<usize>,
}

impl Atom {
    /// The atom itself, without its width.
    fn inner(&self) -> &Atom {
        match self {
            Atom::Padded(a, _) => a,
            a => a,
        }
    }
}

/// A parsed `--access-log-format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Text(Vec<Atom>),
    Json,
}

impl Format {
    /// Parses gunicorn's format language, or `json`.
    pub fn parse(s: &str) -> Result<Format, String> {
        if s == "json" {
            return Ok(Format::Json);
        }
        let mut atoms = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('%') {
            lit.push_str(&rest[..i]);
            // `%%` is one `%`, as in Python's % formatting (gunicorn's).
            if rest[i + 1..].starts_with('%') {
                lit.push('%');
                rest = &rest[i + 2..];
                continue;
            }
            if !rest[i + 1..].starts_with('(') {
                lit.push('%');
                rest = &rest[i + 1..];
                continue;
            }
            let after = &rest[i + 2..];
            let end = after.find(')').ok_or_else(|| format!("unterminated atom at {:?}", &rest[i..]))?;
            let name = &after[..end];
            // What follows the name, as Python's % formatting reads it:
            // flags, a width, a precision, then the conversion.
            let spec = &after[end + 1..];
            let flags = spec.find(|c: char| !"-0 +#".contains(c)).unwrap_or(spec.len());
            let digits = |from: usize| {
                spec[from..].find(|c: char| !c.is_ascii_digit()).map_or(spec.len(), |n| from + n)
            };
            let width_end = digits(flags);
            let (precision, conv_at) = match spec[width_end..].starts_with('.') {
                true => {
                    let p_end = digits(width_end + 1);
                    (Some(spec[width_end + 1..p_end].parse::<usize>().unwrap_or(0)), p_end)
                }
                false => (None, width_end),
            };
            let whole = &rest
                [i..i + 2 + end + 1 + conv_at + spec[conv_at..].chars().next().map_or(0, char::len_utf8)];
            match spec[conv_at..].chars().next() {
                // Numbers come out the same either way.
                Some('s' | 'd' | 'i') => {}
                Some(c) => return Err(format!("{whole:?}: conversion {c:?} not taken (s, d or i)")),
                None => return Err(format!("unterminated atom at {:?}", &rest[i..])),
            }
            let pad = Pad {
                width: spec[flags..width_end].parse().unwrap_or(0),
                left: spec[..flags].contains('-'),
                zero: spec[..flags].contains('0'),
                precision,
            };
            let atom = match name {
                "h" => Atom::RemoteAddr,
                "l" => Atom::Dash,
                "u" => Atom::User,
                "t" => Atom::Time,
                "r" => Atom::RequestLine,
                "m" => Atom::Method,
                "U" => Atom::Path,
                "q" => Atom::Query,
                "H" => Atom::Protocol,
                "s" => Atom::Status,
                "B" => Atom::Bytes,
                "b" => Atom::BytesOrDash,
                "f" => Atom::Referer,
                "a" => Atom::UserAgent,
                "T" => Atom::Seconds,
                "M" => Atom::Millis,
                "D" => Atom::Micros,
                "L" => Atom::DecimalSeconds,
                "p" => Atom::Pid,
                n if n.starts_with('{') && n.ends_with("}i") => {
                    Atom::RequestHeader(n[1..n.len() - 2].to_ascii_lowercase())
                }
                n if n.starts_with('{') && n.ends_with("}o") => {
                    Atom::ResponseHeader(n[1..n.len() - 2].to_ascii_lowercase())
                }
                n if n.starts_with('{') && n.ends_with("}e") => {
                    Atom::Environ(n[1..n.len() - 2].to_ascii_lowercase())
                }
                _ => return Err(format!("unknown atom {whole}")),
            };
            if !lit.is_empty() {
                atoms.push(Atom::Literal(std::mem::take(&mut lit)));
            }
            atoms.push(match pad.width > 0 || pad.precision.is_some() {
                true => Atom::Padded(Box::new(atom), pad),
                false => atom,
            });
            rest = &rest[i + whole.len()..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            atoms.push(Atom::Literal(lit));
        }
        Ok(Format::Text(atoms))
    }

    /// Whether lines need the response's headers (kept only then).
    pub fn needs_response_headers(&self) -> bool {
        matches!(self, Format::Text(a) if a.iter().any(|x| matches!(x.inner(), Atom::ResponseHeader(_))))
    }

    /// The environ variables lines show (`%({name}e)s`), lower-case: the
    /// app keeps their values for the log after it ran.
    /// The request headers (lower-case) a line in this format shows.
    pub fn request_header_names(&self) -> Vec<String> {
        let mut names: Vec<String> = ["referer", "user-agent", "authorization"].map(String::from).to_vec();
        if let Format::Text(atoms) = self {
            names.extend(atoms.iter().filter_map(|a| match a.inner() {
                Atom::RequestHeader(n) => Some(n.to_ascii_lowercase()),
                _ => None,
            }));
        }
        names.sort();
        names.dedup();
        names
    }

    pub fn environ_names(&self) -> Vec<String> {
        let Format::Text(atoms) = self else { return Vec::new() };
        let mut names: Vec<String> = atoms
            .iter()
            .filter_map(|a| if let Atom::Environ(n) = a.inner() { Some(n.clone()) } else { None })
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// What one request contributes to its log line.
pub struct Entry<'a> {
    pub remote_addr: &'a str,
    pub method: &'a [u8],
    /// The target as sent (path and query).
    pub target: &'a [u8],
    pub protocol: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub micros: u64,
    /// Request header lookup by lower-case name.
    pub request_header: &'a dyn Fn(&str) -> Option<Vec<u8>>,
    /// Response header lookup by lower-case name.
    pub response_header: &'a dyn Fn(&str) -> Option<Vec<u8>>,
    /// The request's WSGI environ variable by lower-case name, as the app
    /// left it (gunicorn's `{var}e`).
    pub environ: &'a dyn Fn(&str) -> Option<Vec<u8>>,
}

/// Where lines go: a file (reopened on SIGUSR1) or stdout.
pub struct Sink {
    path: Option<PathBuf>,
    file: Mutex<Target>,
}

impl Sink {
    /// `-` is stdout; anything else a file opened for appending.
    pub fn open(target: &str) -> Result<Sink, String> {
        if target == "-" {
            // Close-on-exec, as every descriptor of corral's own: a program
            // the app runs, or the master's re-exec, must not inherit it.
            let fd = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 0) };
            if fd < 0 {
                return Err(format!("--access-log -: {}", std::io::Error::last_os_error()));
            }
            return Ok(Sink { path: None, file: Mutex::new(Target::new(unsafe { File::from_raw_fd(fd) })) });
        }
        let path = PathBuf::from(target);
        let file = open_append(&path).map_err(|e| format!("--access-log {target}: {e}"))?;
        Ok(Sink { path: Some(path), file: Mutex::new(Target::new(file)) })
    }

    /// Whether the log is a file named by its path (not standard output, a
    /// FIFO or a socket), the kind logrotate renames.
    pub fn is_file(&self) -> bool {
        self.path.is_some() && self.file.lock().unwrap_or_else(|p| p.into_inner()).is_blocking()
    }

    /// Opens the file again under its name (after logrotate renamed it).
    /// Standard output is taken again too: `--capture-output` may have
    /// pointed it at a reopened error log meanwhile.
    pub fn reopen(&self) -> Result<(), String> {
        let Some(path) = &self.path else {
            let fd = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 0) };
            if fd < 0 {
                return Err(format!("--access-log -: {}", std::io::Error::last_os_error()));
            }
            *self.file.lock().unwrap_or_else(|p| p.into_inner()) =
                Target::new(unsafe { File::from_raw_fd(fd) });
            return Ok(());
        };
        let fresh = open_append(path).map_err(|e| format!("reopening {}: {e}", path.display()))?;
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // Keep the descriptor number: forked workers share this sink. dup3
        // keeps close-on-exec, which dup2 would clear.
        // A pipe (a FIFO named as the log) gets a description of its own again.
        if !file.is_blocking()
            || unsafe { libc::dup3(fresh.as_raw_fd(), file.as_raw_fd(), libc::O_CLOEXEC) } < 0
        {
            *file = Target::new(fresh);
        }
        Ok(())
    }

    /// See [`Target::take_dropped`].
    pub fn take_dropped(&self) -> u64 {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).take_dropped()
    }

    pub fn write(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let failed = match self.file.lock().unwrap_or_else(|p| p.into_inner()).write(data) {
            Ok(()) => {
                // A failing stretch is over: the next failure is reported at once.
                if FAILING.load(Ordering::Relaxed) {
                    FAILING.store(false, Ordering::Relaxed);
                }
                return;
            }
            Err(e) => e,
        };
        // One line when a stretch of failures begins (a full disk fails every
        // write), then one every WRITE_ERROR_EVERY while it lasts, with the count.
        let now = crate::date::mono_ms();
        let mut errors = WRITE_ERRORS.lock().unwrap_or_else(|p| p.into_inner());
        errors.0 += 1;
        let begins = !FAILING.swap(true, Ordering::Relaxed);
        if begins || now >= errors.1 + WRITE_ERROR_EVERY.as_millis() as u64 {
            let n = std::mem::take(&mut errors.0);
            errors.1 = now;
            drop(errors);
            if n > 1 {
                tracing::warn!(
                    "writing the access log: {failed} ({n} writes failed since the last such line)"
                );
            } else {
                tracing::warn!("writing the access log: {failed}");
            }
        }
    }
}

/// Failed access log writes not yet reported, and when the last report was.
static WRITE_ERRORS: Mutex<(u64, u64)> = Mutex::new((0, 0));

/// Whether the last access log write failed.
static FAILING: AtomicBool = AtomicBool::new(false);

/// How often a failing access log is reported while it keeps failing.
const WRITE_ERROR_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

fn open_append(path: &PathBuf) -> std::io::Result<File> {
    crate::logfile::open_append(path)
}

/// Per-thread buffers of formatted lines.
pub struct AccessLog {
    pub format: Format,
    sink: Sink,
    buffers: Vec<Mutex<Vec<u8>>>,
    pid: String,
}

impl AccessLog {
    pub fn new(format: Format, sink: Sink, threads: usize) -> AccessLog {
        AccessLog {
            format,
            sink,
            buffers: (0..threads.max(1)).map(|_| Mutex::new(Vec::with_capacity(8192))).collect(),
            pid: std::process::id().to_string(),
        }
    }

    /// Called after fork, in the worker.
    pub fn set_pid(&mut self) {
        self.pid = std::process::id().to_string();
    }

    /// Formats one line into thread `t`'s buffer.
    pub fn log(&self, t: usize, e: &Entry<'_>) {
        let mut buf = self.buffers[t].lock().unwrap_or_else(|p| p.into_inner());
        match &self.format {
            Format::Text(atoms) => self.text_line(&mut buf, atoms, e),
            Format::Json => self.json_line(&mut buf, e),
        }
        buf.push(b'\n');
        if buf.len() >= FLUSH_AT {
            self.sink.write(&buf);
            buf.clear();
        }
    }

    /// Formats one line and writes it at once, outside any thread's buffer:
    /// for responses the engine writes itself, off the serving path.
    pub fn log_now(&self, e: &Entry<'_>) {
        let mut buf = Vec::with_capacity(256);
        match &self.format {
            Format::Text(atoms) => self.text_line(&mut buf, atoms, e),
            Format::Json => self.json_line(&mut buf, e),
        }
        buf.push(b'\n');
        // The lines the threads hold are of earlier requests, such as the
        // one before this refusal on its connection: they go first.
        let mut out = Vec::new();
        for held in &self.buffers {
            let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
            out.append(&mut held);
        }
        out.append(&mut buf);
        self.sink.write(&out);
    }

    /// Writes out thread `t`'s buffer, when it holds lines.
    pub fn flush_thread(&self, t: usize) {
        let mut buf = self.buffers[t].lock().unwrap_or_else(|p| p.into_inner());
        if !buf.is_empty() {
            self.sink.write(&buf);
            buf.clear();
        }
    }

    /// Writes out every thread's buffer.
    pub fn flush(&self) {
        for b in &self.buffers {
            let mut buf = b.lock().unwrap_or_else(|p| p.into_inner());
            self.sink.write(&buf);
            buf.clear();
        }
    }

    pub fn reopen(&self) -> Result<(), String> {
        self.flush();
        self.sink.reopen()
    }

    /// Writes out every buffer, then takes the count of lines dropped and
    /// not yet said to be (see [`Target::take_dropped`]).
    pub fn take_dropped(&self) -> u64 {
        self.flush();
        self.sink.take_dropped()
    }

    fn text_line(&self, out: &mut Vec<u8>, atoms: &[Atom], e: &Entry<'_>) {
        let (path, query) = split_target(e.target);
        for atom in atoms {
            self.atom(out, atom, e, path, query);
        }
    }

    fn atom(&self, out: &mut Vec<u8>, atom: &Atom, e: &Entry<'_>, path: &[u8], query: &[u8]) {
        {
            match atom {
                Atom::Padded(inner, pad) => {
                    let mut value = Vec::new();
                    self.atom(&mut value, inner, e, path, query);
                    if let Some(p) = pad.precision {
                        value.truncate(p);
                    }
                    let fill = pad.width.saturating_sub(value.len());
                    let number = !value.is_empty() && value.iter().all(u8::is_ascii_digit);
                    if pad.left {
                        out.extend_from_slice(&value);
                        out.resize(out.len() + fill, b' ');
                    } else {
                        out.resize(out.len() + fill, if pad.zero && number { b'0' } else { b' ' });
                        out.extend_from_slice(&value);
                    }
                }
                Atom::Literal(s) => out.extend_from_slice(s.as_bytes()),
                Atom::RemoteAddr => escaped(out, or_dash(e.remote_addr.as_bytes())),
                Atom::Dash => out.push(b'-'),
                Atom::User => escaped(out, or_dash(&basic_user(e).unwrap_or_default())),
                Atom::Time => {
                    out.push(b'[');
                    out.extend_from_slice(clf_time().as_bytes());
                    out.push(b']');
                }
                Atom::RequestLine => {
                    escaped(out, e.method);
                    out.push(b' ');
                    escaped(out, e.target);
                    out.push(b' ');
                    // Escaped too: a refused request line's third word, or a
                    // front end's SERVER_PROTOCOL, is whatever was sent.
                    escaped(out, e.protocol.as_bytes());
                }
                Atom::Method => escaped(out, e.method),
                Atom::Path => {
                    // Decoded, as gunicorn's (its PATH_INFO).
                    let mut decoded = Vec::with_capacity(path.len());
                    corral_proto::http1::percent_decode(path, &mut decoded);
                    escaped(out, &decoded);
                }
                Atom::Query => escaped(out, query),
                Atom::Protocol => escaped(out, e.protocol.as_bytes()),
                Atom::Status => push_num(out, u64::from(e.status)),
                Atom::Bytes => push_num(out, e.bytes),
                Atom::BytesOrDash if e.bytes == 0 => out.push(b'-'),
                Atom::BytesOrDash => push_num(out, e.bytes),
                Atom::Referer => escaped(out, or_dash(&(e.request_header)("referer").unwrap_or_default())),
                Atom::UserAgent => {
                    escaped(out, or_dash(&(e.request_header)("user-agent").unwrap_or_default()))
                }
                Atom::Seconds => push_num(out, e.micros / 1_000_000),
                Atom::Millis => push_num(out, e.micros / 1000),
                Atom::Micros => push_num(out, e.micros),
                Atom::DecimalSeconds => {
                    let _ = write!(Adapter(out), "{:.6}", e.micros as f64 / 1e6);
                }
                Atom::Pid => {
                    out.push(b'<');
                    out.extend_from_slice(self.pid.as_bytes());
                    out.push(b'>');
                }
                Atom::RequestHeader(h) => escaped(out, or_dash(&(e.request_header)(h).unwrap_or_default())),
                Atom::ResponseHeader(h) => escaped(out, or_dash(&(e.response_header)(h).unwrap_or_default())),
                // Set but empty is empty, unset is `-`, as in gunicorn.
                Atom::Environ(v) => match (e.environ)(v) {
                    Some(value) => escaped(out, &value),
                    None => out.push(b'-'),
                },
            }
        }
    }

    fn json_line(&self, out: &mut Vec<u8>, e: &Entry<'_>) {
        let (path, query) = split_target(e.target);
        out.extend_from_slice(b"{\"time\":\"");
        out.extend_from_slice(iso_time().as_bytes());
        out.extend_from_slice(b"\",\"remote_addr\":");
        json_str(out, e.remote_addr.as_bytes());
        out.extend_from_slice(b",\"user\":");
        match basic_user(e) {
            Some(u) => json_str(out, &u),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"method\":");
        json_str(out, e.method);
        out.extend_from_slice(b",\"path\":");
        json_str(out, path);
        out.extend_from_slice(b",\"query\":");
        json_str(out, query);
        out.extend_from_slice(b",\"protocol\":");
        json_str(out, e.protocol.as_bytes());
        out.extend_from_slice(b",\"status\":");
        push_num(out, u64::from(e.status));
        out.extend_from_slice(b",\"bytes\":");
        push_num(out, e.bytes);
        out.extend_from_slice(b",\"duration_us\":");
        push_num(out, e.micros);
        for (key, header) in [("referer", "referer"), ("user_agent", "user-agent")] {
            out.extend_from_slice(format!(",\"{key}\":").as_bytes());
            match (e.request_header)(header) {
                Some(v) => json_str(out, &v),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.extend_from_slice(b",\"pid\":");
        out.extend_from_slice(self.pid.as_bytes());
        out.push(b'}');
    }
}

/// The path and query of a request target, as the app got them in
/// PATH_INFO and QUERY_STRING: an absolute-form target's scheme and
/// authority left out, and any fragment.
fn split_target(target: &[u8]) -> (&[u8], &[u8]) {
    let target = match target.iter().position(|&b| b == b'#') {
        Some(i) => &target[..i],
        None => target,
    };
    let target = match target.windows(3).position(|w| w == b"://") {
        Some(i) if !target.starts_with(b"/") => {
            let after = &target[i + 3..];
            &after[after.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(after.len())..]
        }
        _ => target,
    };
    match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], &target[i + 1..]),
        None => (target, b""),
    }
}

fn or_dash(v: &[u8]) -> &[u8] {
    if v.is_empty() {
        b"-"
    } else {
        v
    }
}

/// The user name of HTTP Basic authentication, as gunicorn's `%(u)s` shows it.
fn basic_user(e: &Entry<'_>) -> Option<Vec<u8>> {
    let auth = (e.request_header)("authorization")?;
    // The scheme's name is case-insensitive (RFC 9110 11.1).
    let (scheme, cred) = auth.split_at(auth.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD.decode(cred.trim_ascii()).ok()?;
    let user = decoded.split(|&b| b == b':').next()?.to_vec();
    Some(user)
}

/// Appends `v` for the text format: printable ASCII as is, `"` and `\`
/// escaped, everything else as `\xNN`.
fn escaped(out: &mut Vec<u8>, v: &[u8]) {
    for &b in v {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x20..=0x7e => out.push(b),
            _ => {
                out.extend_from_slice(b"\\x");
                out.push(b"0123456789abcdef"[usize::from(b >> 4)]);
                out.push(b"0123456789abcdef"[usize::from(b & 15)]);
            }
        }
    }
}

/// Appends `v` as a JSON string. Text in UTF-8 (a path like `/café`, as
/// browsers send it) is written as that text; any other bytes are taken as
/// latin-1, as WSGI takes them, so that nothing is lost and a value a client
/// sent in latin-1 still reads right. Control characters, C1 ones included,
/// are escaped, so no value can move a terminal's cursor.
fn json_str(out: &mut Vec<u8>, v: &[u8]) {
    out.push(b'"');
    match std::str::from_utf8(v) {
        Ok(text) if !v.is_ascii() => {
            for c in text.chars() {
                match c {
                    '"' => out.extend_from_slice(b"\\\""),
                    '\\' => out.extend_from_slice(b"\\\\"),
                    '\u{20}'..='\u{7e}' => out.push(c as u8),
                    '\0'..='\u{9f}' => json_unicode_escape(out, c as u8),
                    _ => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
        }
        _ => {
            for &b in v {
                match b {
                    b'"' => out.extend_from_slice(b"\\\""),
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    0x20..=0x7e => out.push(b),
                    _ => json_unicode_escape(out, b),
                }
            }
        }
    }
    out.push(b'"');
}

/// `s` as a JSON string, escaped as [`json_str`] escapes it (for the stats
/// and the error log's JSON lines).
pub fn json_string(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    json_str(&mut out, s.as_bytes());
    // Text in, so text out: its characters are copied or escaped whole.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// `\u00NN`: the code point `b` (below 256) as a JSON escape.
fn json_unicode_escape(out: &mut Vec<u8>, b: u8) {
    out.extend_from_slice(b"\\u00");
    out.push(b"0123456789abcdef"[usize::from(b >> 4)]);
    out.push(b"0123456789abcdef"[usize::from(b & 15)]);
}

fn push_num(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(crate::exchange::itoa(n, &mut [0u8; 20]));
}

struct Adapter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Adapter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// `24/Nov/2026:15:20:37 +0000` in local time, formatted once a second per thread.
fn clf_time() -> String {
    thread_local!(static CACHE: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((-1, String::new())) });
    let now = crate::date::now_secs();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != now {
            let ((y, mo, d, h, mi, s), off) = crate::date::local(now);
            const MONTHS: [&str; 12] =
                ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
            *c = (now, format!("{d:02}/{}/{y}:{h:02}:{mi:02}:{s:02} {off}", MONTHS[mo as usize - 1]));
        }
        c.1.clone()
    })
}

/// `2026-11-24T15:20:37Z`.
pub(crate) fn iso_time() -> String {
    let (y, mo, d, h, mi, s) = crate::date::civil(crate::date::now_secs());
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_with<'a>(
        req: &'a dyn Fn(&str) -> Option<Vec<u8>>,
        resp: &'a dyn Fn(&str) -> Option<Vec<u8>>,
        env: &'a dyn Fn(&str) -> Option<Vec<u8>>,
    ) -> Entry<'a> {
        Entry {
            remote_addr: "10.0.0.1",
            method: b"GET",
            target: b"/a b?x=1",
            protocol: "HTTP/1.1",
            status: 200,
            bytes: 0,
            micros: 1_234_567,
            request_header: req,
            response_header: resp,
            environ: env,
        }
    }

    fn line(format: &str, e: &Entry<'_>) -> String {
        let log = AccessLog::new(Format::parse(format).unwrap(), Sink::open("-").unwrap(), 1);
        let mut out = Vec::new();
        match &log.format {
            Format::Text(atoms) => log.text_line(&mut out, atoms, e),
            Format::Json => log.json_line(&mut out, e),
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn atoms() {
        let req = |h: &str| match h {
            "user-agent" => Some(b"curl/8 \"evil\"\n[01/Jan/2000] \"GET / HTTP/1.1\" 200".to_vec()),
            "authorization" => Some(b"Basic YWxpY2U6c2VjcmV0".to_vec()),
            "x-id" => Some(b"42".to_vec()),
            _ => None,
        };
        let resp = |h: &str| (h == "content-type").then(|| b"text/html".to_vec());
        // Names arrive lower-case: gunicorn matches environ keys case-insensitively.
        let env = |v: &str| (v == "remote_user").then(|| b"bob".to_vec());
        let e = entry_with(&req, &resp, &env);
        assert_eq!(
            line("%(h)s %(l)s %(u)s \"%(r)s\" %(m)s %(U)s %(q)s %(H)s %(s)s %(B)s %(b)s %(f)s", &e),
            "10.0.0.1 - alice \"GET /a b?x=1 HTTP/1.1\" GET /a b x=1 HTTP/1.1 200 0 - -"
        );
        let encoded = Entry { target: b"/a%20b/%E2%82%AC?x=%20", ..entry_with(&req, &resp, &env) };
        assert_eq!(line("%(U)s %(q)s", &encoded), r"/a b/\xe2\x82\xac x=%20");
        assert_eq!(line("%(T)s %(M)s %(D)s %(L)s", &e), "1 1234 1234567 1.234567");
        assert_eq!(
            line("%({X-Id}i)s %({content-type}o)s %({REMOTE_USER}e)s %({nope}i)s", &e),
            "42 text/html bob -"
        );
        // A hostile user agent cannot end the line or close the quotes.
        let ua = line("\"%(a)s\"", &e);
        assert_eq!(ua, r#""curl/8 \"evil\"\x0a[01/Jan/2000] \"GET / HTTP/1.1\" 200""#);
        assert!(!ua.contains('\n'));
        assert_eq!(line("100%% %(s)s 5% %%(h)s", &e), "100% 200 5% %(h)s");
        // Nor a protocol that is the rest of a refused request line.
        let forged = Entry { protocol: "HTTP/1.1\" 200 1 \"-\" \"x\r\n", ..entry_with(&req, &resp, &env) };
        assert_eq!(
            line("\"%(r)s\" %(H)s", &forged),
            r#""GET /a b?x=1 HTTP/1.1\" 200 1 \"-\" \"x\x0d\x0a" HTTP/1.1\" 200 1 \"-\" \"x\x0d\x0a"#
        );
        assert!(Format::parse("%(zz)s").is_err());
        assert!(Format::parse("%(h").is_err());
        // Widths, precisions and conversions as Python's % formatting (gunicorn's).
        assert_eq!(
            line("%(D)d us|%(h)-12s|%(s)5s|%(B)03d|%(m).2s|", &e),
            "1234567 us|10.0.0.1    |  200|000|GE|"
        );
        let f = Format::parse("%({content-type}o)-20s").unwrap();
        assert!(f.needs_response_headers());
        assert_eq!(line("%({X-Id}i)4s", &e), "  42");
        assert_eq!(Format::parse("%(h)-15s %(zz)s").unwrap_err(), "unknown atom %(zz)s");
        assert!(Format::parse("%(h)x").unwrap_err().contains("conversion 'x' not taken"));
        assert!(Format::parse(DEFAULT_FORMAT).is_ok());
        let f = Format::parse("%({REMOTE_USER}e)s %({x}i)s %({Path_Info}e)s").unwrap();
        assert_eq!(f.environ_names(), ["path_info", "remote_user"]);
    }

    #[test]
    fn json_escapes_everything() {
        let req = |h: &str| (h == "user-agent").then(|| b"a\"b\\c\n\x01\xe9".to_vec());
        let none = |_: &str| None;
        let e = entry_with(&req, &none, &none);
        let s = line("json", &e);
        assert!(!s.contains('\n'));
        assert!(s.contains(r#""user_agent":"a\"b\\c\u000a\u0001\u00e9""#), "{s}");
        assert!(s.contains(r#""path":"/a b","query":"x=1""#), "{s}");
        // UTF-8 text stays text (its C1 controls escaped); other bytes are latin-1.
        for (value, json) in [
            (&b"caf\xc3\xa9 \xe2\x82\xac"[..], "\"caf\u{e9} \u{20ac}\""),
            (b"\xc2\x85\xc3\xa9\n\"", "\"\\u0085\u{e9}\\u000a\\\"\""),
            (b"caf\xe9", r#""caf\u00e9""#),
            (b"\xc3\xa9\xff", r#""\u00c3\u00a9\u00ff""#),
        ] {
            let mut out = Vec::new();
            json_str(&mut out, value);
            assert_eq!(String::from_utf8(out).unwrap(), json, "{value:?}");
        }
        assert!(s.contains(r#""status":200"#) && s.contains(r#""duration_us":1234567"#), "{s}");
    }
}
