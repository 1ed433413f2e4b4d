//! `--static /url=DIR` and `--static-map /url=DIR` (uWSGI's static-map, which
//! leaves what it has not to the app): files answered by the worker thread itself, before
//! and without the app (no GIL), with sendfile(2), single byte ranges and
//! If-Range, the conditional requests of RFC 9110 13 (If-Match,
//! If-Unmodified-Since, If-None-Match, If-Modified-Since) against a strong
//! ETag and Last-Modified, precompressed `.br` / `.gz` siblings chosen by
//! Accept-Encoding's q-values, and a Content-Type from the file extension.
//!
//! A request can never leave DIR: `.` and `..` segments (also when
//! percent-encoded, since the path is decoded first) and NUL bytes are
//! refused, and the resolved file (symlinks followed), precompressed
//! siblings included, must still lie inside the resolved DIR; so must the
//! file the open then finds, which must also be a regular one (a name can
//! change between the check and the open). A directory asked for without
//! its slash is redirected to it (301), as nginx does.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use crate::exchange::Exchange;

/// One `--static` or `--static-map` mount.
#[derive(Debug, Clone)]
pub struct Mount {
    /// URL prefix without a trailing slash ("/static").
    pub prefix: String,
    /// The directory (or, for a `--static-map` of one file, that file),
    /// resolved (canonical).
    pub dir: PathBuf,
    /// The directory or file as named (absolute, symlinks unresolved).
    pub named: PathBuf,
    /// Whether a request the mount has no file for goes on, to the next
    /// mount and then the app, rather than getting a 404: uWSGI's
    /// `static-map` (`--static-map`), and any mount at `/`.
    pub passes_misses: bool,
    /// Whether `dir` is one file (a `--static-map` of one URL).
    pub is_file: bool,
    /// `--static-safe`: directories outside `dir` that its symlinks may
    /// lead to (uWSGI's `static-safe`).
    pub safe: Vec<SafeDir>,
}

/// A `--static-safe` directory.
#[derive(Debug, Clone)]
pub struct SafeDir {
    /// As named (absolute, symlinks unresolved), to be resolved again by
    /// [`Mount::refresh`].
    pub named: PathBuf,
    /// Resolved (canonical).
    pub dir: PathBuf,
}

impl SafeDir {
    /// Parses a `--static-safe` directory, which must exist.
    pub fn parse(s: &str) -> Result<SafeDir, String> {
        let named = std::path::absolute(s).map_err(|e| format!("--static-safe {s:?}: {e}"))?;
        let dir = std::fs::canonicalize(s).map_err(|e| format!("--static-safe {s:?}: {e}"))?;
        if !dir.is_dir() {
            return Err(format!("--static-safe {s:?}: {} is not a directory", dir.display()));
        }
        Ok(SafeDir { named, dir })
    }
}

impl Mount {
    /// Parses `--static`'s `/url=DIR`; the directory must exist.
    pub fn parse(s: &str) -> Result<Mount, String> {
        Mount::parse_as(s, "--static", false)
    }

    /// Parses `--static-map`'s `/url=DIR` or `/url=FILE`, which must exist.
    pub fn parse_map(s: &str) -> Result<Mount, String> {
        Mount::parse_as(s, "--static-map", true)
    }

    fn parse_as(s: &str, flag: &str, map: bool) -> Result<Mount, String> {
        let target = if map { "DIR or FILE" } else { "DIR" };
        let (url, dir) = s.split_once('=').ok_or_else(|| format!("{flag} {s:?}: expected /URL={target}"))?;
        if !url.starts_with('/') {
            return Err(format!("{flag} {s:?}: the URL prefix must start with '/'"));
        }
        let named = std::path::absolute(dir).map_err(|e| format!("{flag} {s:?}: {dir}: {e}"))?;
        let dir = std::fs::canonicalize(dir).map_err(|e| format!("{flag} {s:?}: {dir}: {e}"))?;
        if !(dir.is_dir() || map && dir.is_file()) {
            let kind = if map { "a directory or a regular file" } else { "a directory" };
            return Err(format!("{flag} {s:?}: {} is not {kind}", dir.display()));
        }
        let is_file = dir.is_file();
        Ok(Mount {
            prefix: url.trim_end_matches('/').to_string(),
            dir,
            named,
            passes_misses: map,
            is_file,
            safe: Vec::new(),
        })
    }

    /// The flag the mount came from, for log lines.
    /// The URL prefix as the option gave it (`/` for the root).
    pub fn url(&self) -> &str {
        if self.prefix.is_empty() {
            "/"
        } else {
            &self.prefix
        }
    }

    pub fn flag(&self) -> &'static str {
        if self.passes_misses {
            "--static-map"
        } else {
            "--static"
        }
    }

    /// Resolves the directory again, for a worker starting after a deploy
    /// that switched a symlink on its way (`current -> releases/N`); keeps
    /// the one it had, with a warning, when the name leads nowhere now.
    pub fn refresh(&mut self) {
        for safe in &mut self.safe {
            match std::fs::canonicalize(&safe.named) {
                Ok(dir) if dir.is_dir() => safe.dir = dir,
                _ => tracing::warn!(
                    "--static-safe {}: no directory there now; keeping {}",
                    safe.named.display(),
                    safe.dir.display()
                ),
            }
        }
        match std::fs::canonicalize(&self.named) {
            Ok(dir) if (self.is_file && dir.is_file()) || (!self.is_file && dir.is_dir()) => self.dir = dir,
            Ok(dir) => tracing::warn!(
                "{} {}: {} is not a {} now; serving {} still",
                self.flag(),
                self.prefix,
                dir.display(),
                if self.is_file { "regular file" } else { "directory" },
                self.dir.display()
            ),
            Err(e) => tracing::warn!(
                "{} {}: {}: {e}; serving {} still",
                self.flag(),
                self.prefix,
                self.named.display(),
                self.dir.display()
            ),
        }
    }

    /// Whether a file whose path, symlinks resolved, is `real` may be
    /// served: it lies inside the mount or a `--static-safe` directory.
    fn holds(&self, real: &Path) -> bool {
        real.starts_with(&self.dir) || self.safe.iter().any(|s| real.starts_with(&s.dir))
    }

    /// The part of a decoded path below this mount, if the path is under it.
    pub fn relative<'p>(&self, path: &'p [u8]) -> Option<&'p [u8]> {
        let rest = path.strip_prefix(self.prefix.as_bytes())?;
        (rest.is_empty() || rest[0] == b'/').then_some(rest)
    }

    /// The part of a decoded path this mount answers for a request with
    /// `method`. A mount at `/` would otherwise leave the app no path at all,
    /// so it takes only a GET or HEAD naming one of its files, and every
    /// other request goes to the app: uWSGI's `static-map = /=DIR` (and
    /// `check-static`) and nginx's `try_files $uri @app` behave so, and a
    /// site's root files (robots.txt, favicon.ico) are mapped that way. A
    /// `--static-map` mount does the same under its prefix, as uWSGI's
    /// `static-map` does (it may map one prefix to several directories).
    pub fn takes<'p>(&self, path: &'p [u8], method: &[u8]) -> Option<&'p [u8]> {
        let rel = self.relative(path)?;
        if !self.prefix.is_empty() && !self.passes_misses {
            return Some(rel);
        }
        let file = (method == b"GET" || method == b"HEAD")
            && !rel.ends_with(b"/")
            && matches!(resolve(self, rel), Some(Resolved::File(_)));
        file.then_some(rel)
    }
}

/// What the request asks of the file, from its headers.
#[derive(Default)]
pub struct Conditions<'a> {
    pub if_match: Option<&'a [u8]>,
    pub if_none_match: Option<&'a [u8]>,
    pub if_modified_since: Option<&'a [u8]>,
    pub if_unmodified_since: Option<&'a [u8]>,
    pub if_range: Option<&'a [u8]>,
    pub range: Option<&'a [u8]>,
    pub accept_encoding: Option<&'a [u8]>,
    /// The query string, kept by the redirect of a directory to its slash.
    pub query: &'a [u8],
}

/// What a path below a mount names.
#[derive(Debug)]
pub enum Resolved {
    /// A file inside the mount (symlinks resolved).
    File(PathBuf),
    /// A directory asked for without its trailing slash: the client is sent
    /// to the name with one, so that relative links in its index resolve.
    AddSlash,
    /// The way to it cannot be looked at (a directory the worker may not
    /// enter): 403, as nginx answers, and the log says why.
    Denied(std::io::Error),
}

impl PartialEq for Resolved {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Resolved::File(a), Resolved::File(b)) => a == b,
            (Resolved::AddSlash, Resolved::AddSlash) => true,
            (Resolved::Denied(a), Resolved::Denied(b)) => a.kind() == b.kind(),
            _ => false,
        }
    }
}

impl Eq for Resolved {}

/// Resolves `rel` (decoded, below the mount) to a file inside the mount
/// (or, through a symlink, a `--static-safe` directory).
pub fn resolve(mount: &Mount, rel: &[u8]) -> Option<Resolved> {
    if rel.contains(&0) {
        return None;
    }
    use std::os::unix::ffi::OsStrExt;
    let mut path = mount.dir.to_path_buf();
    // File names are bytes, whatever their encoding (a Latin-1 `l\xe9`, as
    // nginx serves it). `.` names the directory itself, as a client that
    // normalizes the path would have sent it; `..` is refused, not resolved.
    for seg in rel.split(|&b| b == b'/').filter(|s| !s.is_empty() && *s != b".") {
        if seg == b".." || seg.contains(&b'\\') {
            return None;
        }
        path.push(std::ffi::OsStr::from_bytes(seg));
    }
    let ends_with_slash = rel.ends_with(b"/");
    let real = match std::fs::canonicalize(&path) {
        Ok(real) => real,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Some(Resolved::Denied(e)),
        Err(_) => return None,
    };
    if real.is_dir() {
        // Looked up by name like any file: an index.html that is a symlink
        // (`collectstatic --link`) is followed, within the same bounds.
        let index = inside(mount, &path.join("index.html"));
        if !ends_with_slash {
            return index.map(|_| Resolved::AddSlash);
        }
        return index.map(Resolved::File);
    } else if ends_with_slash {
        // "file.txt/" names no directory: nothing there (as nginx answers).
        return None;
    }
    checked_inside(mount, &path, real).map(Resolved::File)
}

/// Opens a file `resolve` found, and checks what was opened: a name checked
/// and then opened may have changed in between (a directory on the way
/// swapped for a symlink out of the mount, the file for a FIFO, whose
/// open would wait for a writer for ever). So the open neither follows a
/// symlink at the end nor waits, and the descriptor must be a regular file
/// whose own path lies inside the mount (or a `--static-safe` directory).
fn open_inside(mount: &Mount, path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let is_file = file.metadata()?.is_file();
    let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    if !is_file || !mount.holds(&real) {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "changed while it was opened"));
    }
    Ok(file)
}

/// `path` with its symlinks resolved, if that is a file inside the mount:
/// symlinks are followed, but only to places inside the mount (or a
/// `--static-safe` directory).
fn inside(mount: &Mount, path: &Path) -> Option<PathBuf> {
    checked_inside(mount, path, std::fs::canonicalize(path).ok()?)
}

/// `real`, what `path` resolves to, if it is a file inside the mount.
fn checked_inside(mount: &Mount, path: &Path, real: PathBuf) -> Option<PathBuf> {
    if !mount.holds(&real) {
        if real.is_file() {
            note_outside(&mount.dir, path, &real);
        }
        return None;
    }
    real.is_file().then_some(real)
}

/// How many files leading out of their mount a worker names in its log:
/// each once, so that a client asking again and again cannot fill the log.
const OUTSIDE_NOTED_MAX: usize = 64;

/// Says that a file of the mount is a symlink leading out of it, which is
/// not served (as uWSGI refuses it): a deployment that links its files
/// into the directory (Django's `collectstatic --link`) would otherwise
/// see only 404s, and the app the requests of a mount that passes misses.
fn note_outside(dir: &Path, path: &Path, real: &Path) {
    static NOTED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut noted = NOTED.lock().unwrap_or_else(|p| p.into_inner());
    if noted.len() >= OUTSIDE_NOTED_MAX || noted.iter().any(|p| p == path) {
        return;
    }
    noted.push(path.to_path_buf());
    tracing::warn!(
        "Static file {} not served: it leads to {}, outside {}; a symlink may only lead to a file inside \
         the directory served, or inside a directory given with --static-safe DIR; said once per file",
        path.display(),
        real.display(),
        dir.display()
    );
}

/// A decoded path made fit for a Location header: bytes outside the
/// unreserved and path characters percent-encoded.
fn percent_encode_path(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for &b in path {
        if b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// Content-Type by extension: mime_guess's table (the one of Apache's
/// mime.types that nginx's also follows), with `charset=utf-8` on text
/// types as whitenoise gives them, and the few choices browsers want that
/// differ from it.
pub fn content_type(path: &Path) -> std::borrow::Cow<'static, str> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let mime = match ext.as_str() {
        // RFC 9239: JavaScript is text/javascript (mime_guess still says
        // application/javascript).
        "js" | "mjs" => "text/javascript",
        "map" => "application/json",
        "ico" => "image/vnd.microsoft.icon",
        "webmanifest" => "application/manifest+json",
        "wasm" => "application/wasm",
        _ => mime_guess::from_ext(&ext).first_raw().unwrap_or("application/octet-stream"),
    };
    if mime.starts_with("text/") {
        format!("{mime}; charset=utf-8").into()
    } else {
        mime.into()
    }
}

/// What a `Range` header asks of a file.
#[derive(Debug, PartialEq, Eq)]
pub enum Ranged {
    /// No range, or one to ignore (several ranges): the whole file.
    Whole,
    /// Bytes `start..=end`.
    Part(u64, u64),
    /// A range outside the file: 416.
    Unsatisfiable,
}

/// A single `bytes=` range against a file of `len` bytes.
pub fn parse_range(v: &[u8], len: u64) -> Ranged {
    let Some(spec) = v.strip_prefix(b"bytes=") else {
        return Ranged::Whole;
    };
    if spec.contains(&b',') {
        return Ranged::Whole; // several ranges: answer the whole file, as allowed
    }
    // Digits only; more than a u64 holds reads as its largest value: a last
    // position or a suffix past the file is cut to it (RFC 9110 14.1.2), so
    // a huge one, whatever its size, is no error.
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().unwrap_or(u64::MAX))
    };
    let parsed = (|| {
        let spec = std::str::from_utf8(spec).ok()?.trim();
        let (a, b) = spec.split_once('-')?;
        if a.is_empty() {
            let n = number(b)?;
            if n == 0 {
                return None;
            }
            return Some((len.saturating_sub(n), len.saturating_sub(1)));
        }
        let start = number(a)?;
        let end = if b.is_empty() { len.saturating_sub(1) } else { number(b)?.min(len.saturating_sub(1)) };
        Some((start, end))
    })();
    match parsed {
        Some((start, end)) if len > 0 && start < len && start <= end => Ranged::Part(start, end),
        _ => Ranged::Unsatisfiable,
    }
}

/// The weight Accept-Encoding gives `coding` (RFC 9110 12.5.3): its own
/// entry's q, else `*`'s, else 0. A q that does not parse counts as 0.
pub fn coding_weight(accept_encoding: Option<&[u8]>, coding: &str) -> f32 {
    let Some(v) = accept_encoding else {
        return 0.0;
    };
    let (mut own, mut any) = (None, None);
    for part in String::from_utf8_lossy(v).split(',') {
        let mut it = part.split(';');
        let name = it.next().unwrap_or("").trim();
        let mut q = 1.0;
        for param in it {
            if let Some((k, val)) = param.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    q = parse_qvalue(val.trim()).unwrap_or(0.0);
                }
            }
        }
        if name.eq_ignore_ascii_case(coding) {
            own = Some(q);
        } else if name == "*" {
            any = Some(q);
        }
    }
    own.or(any).unwrap_or(0.0)
}

/// qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
fn parse_qvalue(v: &str) -> Option<f32> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match int {
        "0" => Some(format!("0.{frac}0").parse().ok()?),
        "1" if frac.bytes().all(|b| b == b'0') => Some(1.0),
        _ => None,
    }
}

/// Whether an entity-tag list (If-Match, If-None-Match) holds `etag`: `*`
/// matches any; `weak` compares ignoring the `W/` prefix (RFC 9110 8.8.3.2).
fn etag_listed(list: &[u8], etag: &str, weak: bool) -> bool {
    let list = String::from_utf8_lossy(list);
    if list.trim() == "*" {
        return true;
    }
    list.split(',').map(str::trim).any(|t| {
        if weak {
            t.trim_start_matches("W/") == etag
        } else {
            !t.starts_with("W/") && t == etag
        }
    })
}

fn http_date(v: &[u8]) -> Option<std::time::SystemTime> {
    httpdate::parse_http_date(std::str::from_utf8(v).ok()?.trim()).ok()
}

/// Answers a request under a mount. `head` is a HEAD request.
pub fn serve(ex: &Exchange, mount: &Mount, rel: &[u8], head: bool, method_ok: bool, c: &Conditions<'_>) {
    if !method_ok {
        let _ = ex.start(b"405 Method Not Allowed");
        let _ = ex.header(b"Allow", b"GET, HEAD");
        let _ = ex.header(b"Content-Type", b"text/plain; charset=utf-8");
        let _ = ex.write(b"405 Method Not Allowed\n", true);
        return;
    }
    let not_found = || {
        let _ = ex.start(b"404 Not Found");
        let _ = ex.header(b"Content-Type", b"text/plain; charset=utf-8");
        let _ = ex.write(b"404 Not Found\n", true);
    };
    let path = match resolve(mount, rel) {
        Some(Resolved::File(path)) => path,
        Some(Resolved::AddSlash) => {
            let mut location = mount.prefix.as_bytes().to_vec();
            location.extend_from_slice(rel);
            location.push(b'/');
            let mut location = percent_encode_path(&location);
            if !c.query.is_empty() {
                location.push(b'?');
                location.extend_from_slice(c.query);
            }
            let _ = ex.start(b"301 Moved Permanently");
            let _ = ex.header(b"Location", &location);
            let _ = ex.header(b"Content-Type", b"text/plain; charset=utf-8");
            let _ = ex.write(b"301 Moved Permanently\n", true);
            return;
        }
        Some(Resolved::Denied(e)) => {
            tracing::warn!(
                "{} {}: cannot look up {}: {e}; answering 403",
                mount.flag(),
                mount.url(),
                String::from_utf8_lossy(rel)
            );
            let _ = ex.start(b"403 Forbidden");
            let _ = ex.header(b"Content-Type", b"text/plain; charset=utf-8");
            let _ = ex.write(b"403 Forbidden\n", true);
            return;
        }
        None => return not_found(),
    };
    // A precompressed sibling, when the client takes it and it is as new:
    // the coding with the highest q, br before gzip at equal q. A sibling
    // is resolved like the file itself: it must lie inside the mount.
    let mut chosen = (path.clone(), None);
    let mut best = 0.0f32;
    for (coding, ext) in [("br", "br"), ("gzip", "gz")] {
        let q = coding_weight(c.accept_encoding, coding);
        if q <= best {
            continue;
        }
        let mut sibling = path.clone().into_os_string();
        sibling.push(".");
        sibling.push(ext);
        let Some(sibling) = inside(mount, Path::new(&sibling)) else {
            continue;
        };
        if let (Ok(s), Ok(o)) = (std::fs::metadata(&sibling), std::fs::metadata(&path)) {
            if s.mtime() >= o.mtime() {
                chosen = (sibling, Some(coding));
                best = q;
            }
        }
    }
    // An unreadable sibling falls back to the file itself.
    let opened = match open_inside(mount, &chosen.0) {
        Err(_) if chosen.1.is_some() => open_inside(mount, &path).map(|f| (f, None)),
        other => other.map(|f| (f, chosen.1)),
    };
    let (file, coding) = match opened {
        Ok(opened) => opened,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return not_found(),
        Err(e) => {
            tracing::warn!(
                "{} {}: cannot open {}: {e}; answering 403",
                mount.flag(),
                mount.url(),
                path.display()
            );
            let _ = ex.start(b"403 Forbidden");
            let _ = ex.header(b"Content-Type", b"text/plain; charset=utf-8");
            let _ = ex.write(b"403 Forbidden\n", true);
            return;
        }
    };
    let Ok(meta) = file.metadata() else {
        let _ = ex.start(b"500 Internal Server Error");
        let _ = ex.write(b"", true);
        return;
    };
    let len = meta.len();
    let etag = format!(
        "\"{:x}-{:x}{}\"",
        meta.mtime_nsec() as u64 ^ ((meta.mtime() as u64) << 20),
        len,
        coding.map_or(String::new(), |c| format!("-{c}"))
    );
    let modified = UNIX_EPOCH + Duration::from_secs(meta.mtime().max(0) as u64);
    let last_modified = httpdate::fmt_http_date(modified);
    // RFC 9110 13.2.2, in its order.
    let failed = match (c.if_match, c.if_unmodified_since) {
        (Some(im), _) => !etag_listed(im, &etag, false),
        (None, Some(ius)) => http_date(ius).is_some_and(|at| modified > at),
        _ => false,
    };
    if failed {
        let _ = ex.start(b"412 Precondition Failed");
        let _ = ex.header(b"ETag", etag.as_bytes());
        let _ = ex.header(b"Content-Type", b"text/plain; charset=utf-8");
        let _ = ex.write(b"412 Precondition Failed\n", true);
        return;
    }
    let not_modified = match (c.if_none_match, c.if_modified_since) {
        (Some(inm), _) => etag_listed(inm, &etag, true),
        (None, Some(ims)) => http_date(ims).is_some_and(|since| modified <= since),
        _ => false,
    };
    let common = |ex: &Exchange| {
        let _ = ex.header(b"ETag", etag.as_bytes());
        let _ = ex.header(b"Last-Modified", last_modified.as_bytes());
        let _ = ex.header(b"Vary", b"Accept-Encoding");
        let _ = ex.header(b"Accept-Ranges", b"bytes");
    };
    if not_modified {
        let _ = ex.start(b"304 Not Modified");
        common(ex);
        let _ = ex.write(b"", true);
        return;
    }
    // If-Range: the range only if the client's copy is this one (a strong
    // ETag, or exactly this Last-Modified); else the whole file.
    let range_applies = match c.if_range {
        None => true,
        Some(v) if v.starts_with(b"\"") => v == etag.as_bytes(),
        Some(v) => http_date(v).is_some_and(|at| at == modified),
    };
    let range = match c.range.filter(|_| range_applies).map(|r| parse_range(r, len)) {
        Some(Ranged::Unsatisfiable) => {
            let _ = ex.start(b"416 Range Not Satisfiable");
            let _ = ex.header(b"Content-Range", format!("bytes */{len}").as_bytes());
            common(ex);
            let _ = ex.header(b"Content-Length", b"0");
            let _ = ex.write(b"", true);
            return;
        }
        Some(Ranged::Part(a, b)) => Some((a, b)),
        Some(Ranged::Whole) | None => None,
    };
    let (status, start, count): (&[u8], u64, u64) = match range {
        Some((a, b)) => (b"206 Partial Content", a, b - a + 1),
        None => (b"200 OK", 0, len),
    };
    let _ = ex.start(status);
    let _ = ex.header(b"Content-Type", content_type(&path).as_bytes());
    if let Some(coding) = coding {
        let _ = ex.header(b"Content-Encoding", coding.as_bytes());
    }
    common(ex);
    if let Some((a, b)) = range {
        let _ = ex.header(b"Content-Range", format!("bytes {a}-{b}/{len}").as_bytes());
    }
    if head || count == 0 {
        let _ = ex.header(b"Content-Length", count.to_string().as_bytes());
        let _ = ex.write(b"", true);
        return;
    }
    // send_file gives the response the file's length, and a file cut short
    // while it is sent is then reported as a file, not as the app's claim.
    // What the socket cannot take at once goes out after this returns
    // (see Exchange::send_file).
    let _ = ex.send_file(file.into(), start as i64, count);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(b"bytes=0-9", 100), Ranged::Part(0, 9));
        assert_eq!(parse_range(b"bytes=90-", 100), Ranged::Part(90, 99));
        assert_eq!(parse_range(b"bytes=-10", 100), Ranged::Part(90, 99));
        assert_eq!(parse_range(b"bytes=50-500", 100), Ranged::Part(50, 99));
        assert_eq!(parse_range(b"bytes=100-", 100), Ranged::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=5-1", 100), Ranged::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=0-1,5-6", 100), Ranged::Whole);
        assert_eq!(parse_range(b"items=0-1", 100), Ranged::Whole);
        assert_eq!(parse_range(b"bytes=x-1", 100), Ranged::Unsatisfiable);
        // Positions past what a u64 holds are past the file's end: cut to it.
        assert_eq!(parse_range(b"bytes=0-99999999999999999999999", 100), Ranged::Part(0, 99));
        assert_eq!(parse_range(b"bytes=-99999999999999999999999", 100), Ranged::Part(0, 99));
        assert_eq!(parse_range(b"bytes=99999999999999999999999-", 100), Ranged::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=+5-9", 100), Ranged::Unsatisfiable);
    }

    #[test]
    fn traversal_is_refused() {
        let root = std::env::temp_dir().join(format!("corral-static-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("public/sub")).unwrap();
        std::fs::write(root.join("secret.txt"), "no").unwrap();
        std::fs::write(root.join("public/a.css"), "a{}").unwrap();
        std::fs::write(root.join("public/sub/index.html"), "<p>").unwrap();
        std::os::unix::fs::symlink(root.join("secret.txt"), root.join("public/link")).unwrap();
        std::os::unix::fs::symlink(root.join("public/a.css"), root.join("public/inner-link")).unwrap();
        let m = Mount::parse(&format!("/static={}", root.join("public").display())).unwrap();
        assert_eq!(m.relative(b"/static/a.css"), Some(&b"/a.css"[..]));
        assert_eq!(m.relative(b"/staticx/a.css"), None);
        assert_eq!(m.takes(b"/static/nope", b"POST"), Some(&b"/nope"[..]));
        // A mount at the root takes a GET or HEAD of one of its files only.
        let r = Mount::parse(&format!("/={}", root.join("public").display())).unwrap();
        assert_eq!(r.takes(b"/a.css", b"GET"), Some(&b"/a.css"[..]));
        assert_eq!(r.takes(b"/a.css", b"HEAD"), Some(&b"/a.css"[..]));
        for (path, method) in [
            (&b"/a.css"[..], &b"POST"[..]),
            (b"/nope", b"GET"),
            (b"/", b"GET"),
            (b"/sub", b"GET"),
            (b"/sub/", b"GET"),
            (b"/../secret.txt", b"GET"),
        ] {
            assert_eq!(r.takes(path, method), None, "{}", String::from_utf8_lossy(path));
        }
        // A --static-map mount takes, under its prefix, what a mount at the
        // root takes; one of a file takes its URL only.
        let sm = Mount::parse_map(&format!("/static={}", root.join("public").display())).unwrap();
        assert_eq!(sm.takes(b"/static/a.css", b"GET"), Some(&b"/a.css"[..]));
        for (path, method) in [
            (&b"/static/a.css"[..], &b"POST"[..]),
            (b"/static/nope", b"GET"),
            (b"/static", b"GET"),
            (b"/static/sub/", b"GET"),
            (b"/a.css", b"GET"),
        ] {
            assert_eq!(sm.takes(path, method), None, "{}", String::from_utf8_lossy(path));
        }
        let f = Mount::parse_map(&format!("/robots.txt={}", root.join("public/a.css").display())).unwrap();
        assert!(f.is_file && f.passes_misses);
        assert_eq!(f.takes(b"/robots.txt", b"GET"), Some(&b""[..]));
        assert_eq!(f.takes(b"/robots.txt/x", b"GET"), None);
        assert_eq!(f.takes(b"/robots.txt", b"PUT"), None);
        assert!(Mount::parse(&format!("/robots.txt={}", root.join("public/a.css").display())).is_err());
        assert!(resolve(&m, b"/a.css").is_some());
        assert_eq!(resolve(&m, b"/sub"), Some(Resolved::AddSlash));
        assert!(matches!(resolve(&m, b"/sub/"), Some(Resolved::File(p)) if p.ends_with("sub/index.html")));
        assert!(resolve(&m, b"/inner-link").is_some());
        // A directory's index.html that is a symlink: followed inside only.
        std::fs::create_dir_all(root.join("public/linked")).unwrap();
        std::os::unix::fs::symlink(root.join("public/a.css"), root.join("public/linked/index.html")).unwrap();
        assert!(matches!(resolve(&m, b"/linked/"), Some(Resolved::File(p)) if p.ends_with("public/a.css")));
        std::fs::create_dir_all(root.join("public/leaving")).unwrap();
        std::os::unix::fs::symlink(root.join("secret.txt"), root.join("public/leaving/index.html")).unwrap();
        assert_eq!(resolve(&m, b"/leaving/"), None);
        assert_eq!(resolve(&m, b"/leaving"), None);
        for bad in
            [&b"/../secret.txt"[..], b"/sub/../../secret.txt", b"/link", b"/a.css\0", b"/nope", b"/sub/.."]
        {
            assert_eq!(resolve(&m, bad), None, "{}", String::from_utf8_lossy(bad));
        }
        // `.` is the directory itself; a name need not be UTF-8.
        assert_eq!(resolve(&m, b"/./a.css"), resolve(&m, b"/a.css"));
        std::fs::write(root.join(std::ffi::OsStr::from_bytes(b"public/l\xe9.txt")), "latin-1").unwrap();
        assert!(matches!(resolve(&m, b"/l\xe9.txt"), Some(Resolved::File(_))));
        assert_eq!(resolve(&m, b"/a.css/"), None);

        // What the open finds is checked again: a directory on the way that
        // became a symlink out of the mount after `resolve`, a symlink or a
        // FIFO at the end.
        let Some(Resolved::File(checked)) = resolve(&m, b"/sub/index.html") else { panic!() };
        assert!(open_inside(&m, &checked).is_ok());
        std::fs::create_dir_all(root.join("elsewhere")).unwrap();
        std::fs::write(root.join("elsewhere/index.html"), "out").unwrap();
        std::fs::rename(root.join("public/sub"), root.join("public/sub-moved")).unwrap();
        std::os::unix::fs::symlink(root.join("elsewhere"), root.join("public/sub")).unwrap();
        assert!(open_inside(&m, &checked).is_err());
        assert!(open_inside(&m, &m.dir.join("link")).is_err());
        nix::unistd::mkfifo(&m.dir.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(open_inside(&m, &m.dir.join("fifo")).is_err());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn encodings() {
        let w = |v: &[u8], c: &str| coding_weight(Some(v), c);
        assert_eq!(w(b"gzip, deflate, br", "br"), 1.0);
        assert_eq!(w(b"gzip;q=0, br", "gzip"), 0.0);
        assert_eq!(w(b"br;Q=0, gzip", "br"), 0.0);
        assert_eq!(w(b"br;q=0., gzip", "br"), 0.0);
        assert_eq!(w(b"br;q=0.5, gzip;q=1", "br"), 0.5);
        assert_eq!(w(b"br;q=0.5, gzip;q=1", "gzip"), 1.0);
        assert_eq!(w(b"*;q=0.3", "gzip"), 0.3);
        assert_eq!(w(b"*;q=0.3, gzip;q=0", "gzip"), 0.0);
        assert_eq!(w(b"gzip;q=2", "gzip"), 0.0);
        assert_eq!(w(b"gzip;q=0.1234", "gzip"), 0.0);
        assert_eq!(w(b"identity", "gzip"), 0.0);
        assert_eq!(coding_weight(None, "gzip"), 0.0);
        for (name, ctype) in [
            ("x.JS", "text/javascript; charset=utf-8"),
            ("a.css", "text/css; charset=utf-8"),
            ("a.html", "text/html; charset=utf-8"),
            ("a.json", "application/json"),
            ("a.svg", "image/svg+xml"),
            ("a.woff2", "font/woff2"),
            ("a.bmp", "image/bmp"),
            ("a.mov", "video/quicktime"),
            ("a.xhtml", "application/xhtml+xml"),
            ("a.atom", "application/atom+xml"),
            ("a.md", "text/markdown; charset=utf-8"),
            ("a.wasm", "application/wasm"),
            ("a.map", "application/json"),
            ("noext", "application/octet-stream"),
            ("a.unknownext", "application/octet-stream"),
        ] {
            assert_eq!(content_type(Path::new(name)), ctype, "{name}");
        }
    }

    #[test]
    fn entity_tags() {
        let e = "\"5-a\"";
        assert!(etag_listed(b"*", e, false));
        assert!(etag_listed(b"\"x\", \"5-a\"", e, false));
        assert!(!etag_listed(b"W/\"5-a\"", e, false));
        assert!(etag_listed(b"W/\"5-a\"", e, true));
        assert!(!etag_listed(b"\"x\"", e, true));
    }

    #[test]
    fn a_static_safe_directory_may_be_led_to_and_no_other() {
        let root = std::env::temp_dir().join(format!("corral-static-safe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["public", "shared/css", "private"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("shared/css/site.css"), "a{}").unwrap();
        std::fs::write(root.join("private/key"), "no").unwrap();
        std::os::unix::fs::symlink(root.join("shared/css"), root.join("public/css")).unwrap();
        std::os::unix::fs::symlink(root.join("private/key"), root.join("public/key")).unwrap();
        let mut m = Mount::parse(&format!("/static={}", root.join("public").display())).unwrap();
        assert_eq!(resolve(&m, b"/css/site.css"), None);
        m.safe.push(SafeDir::parse(root.join("shared").to_str().unwrap()).unwrap());
        let Some(Resolved::File(found)) = resolve(&m, b"/css/site.css") else { panic!() };
        assert!(found.ends_with("shared/css/site.css"));
        assert!(open_inside(&m, &found).is_ok());
        assert_eq!(resolve(&m, b"/key"), None);
        assert!(SafeDir::parse(root.join("nowhere").to_str().unwrap()).is_err());
        assert!(SafeDir::parse(root.join("private/key").to_str().unwrap()).is_err());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_precompressed_sibling_outside_the_mount_is_not_served() {
        let root = std::env::temp_dir().join(format!("corral-static-br-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("public")).unwrap();
        std::fs::write(root.join("public/t.txt"), "text").unwrap();
        std::fs::write(root.join("secret.txt"), "secret").unwrap();
        std::os::unix::fs::symlink(root.join("secret.txt"), root.join("public/t.txt.br")).unwrap();
        let m = Mount::parse(&format!("/static={}", root.join("public").display())).unwrap();
        let sibling = m.dir.join("t.txt.br");
        assert_eq!(inside(&m, &sibling), None);
        std::fs::remove_file(&sibling).unwrap();
        std::fs::write(&sibling, "br").unwrap();
        assert!(inside(&m, &sibling).is_some());
        let _ = std::fs::remove_dir_all(&root);
    }
}
