//! `--static /url=DIR`: files answered by the worker thread itself, before
//! and without the app (no GIL), with sendfile(2), single byte ranges,
//! ETag / If-None-Match, Last-Modified / If-Modified-Since, precompressed
//! `.br` / `.gz` siblings, and a Content-Type from the file extension.
//!
//! A request can never leave DIR: `.` and `..` segments (also when
//! percent-encoded, since the path is decoded first) and NUL bytes are
//! refused, and the resolved file (symlinks followed) must still lie inside
//! the resolved DIR.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use crate::exchange::Exchange;

/// One `--static` mount.
#[derive(Debug, Clone)]
pub struct Mount {
    /// URL prefix without a trailing slash ("/static").
    pub prefix: String,
    /// The directory, resolved (canonical).
    pub dir: PathBuf,
}

impl Mount {
    /// Parses `/url=DIR`; the directory must exist.
    pub fn parse(s: &str) -> Result<Mount, String> {
        let (url, dir) = s.split_once('=').ok_or_else(|| format!("--static {s:?}: expected /URL=DIR"))?;
        if !url.starts_with('/') {
            return Err(format!("--static {s:?}: the URL prefix must start with '/'"));
        }
        let dir = std::fs::canonicalize(dir).map_err(|e| format!("--static {s:?}: {dir}: {e}"))?;
        if !dir.is_dir() {
            return Err(format!("--static {s:?}: {} is not a directory", dir.display()));
        }
        Ok(Mount { prefix: url.trim_end_matches('/').to_string(), dir })
    }

    /// The part of a decoded path below this mount, if the path is under it.
    pub fn relative<'p>(&self, path: &'p [u8]) -> Option<&'p [u8]> {
        let rest = path.strip_prefix(self.prefix.as_bytes())?;
        (rest.is_empty() || rest[0] == b'/').then_some(rest)
    }
}

/// What the request asks of the file, from its headers.
#[derive(Default)]
pub struct Conditions<'a> {
    pub if_none_match: Option<&'a [u8]>,
    pub if_modified_since: Option<&'a [u8]>,
    pub range: Option<&'a [u8]>,
    pub accept_encoding: Option<&'a [u8]>,
}

/// Resolves `rel` (decoded, below the mount) to a file inside `dir`.
pub fn resolve(dir: &Path, rel: &[u8]) -> Option<PathBuf> {
    if rel.contains(&0) {
        return None;
    }
    let rel = std::str::from_utf8(rel).ok()?;
    let mut path = dir.to_path_buf();
    for seg in rel.split('/').filter(|s| !s.is_empty()) {
        if seg == "." || seg == ".." || seg.contains('\\') {
            return None;
        }
        path.push(seg);
    }
    let mut real = std::fs::canonicalize(&path).ok()?;
    if real.is_dir() {
        real = std::fs::canonicalize(real.join("index.html")).ok()?;
    }
    // Symlinks are followed, but only to places inside the mount.
    (real.starts_with(dir) && real.is_file()).then_some(real)
}

/// Content-Type by extension.
pub fn content_type(path: &Path) -> &'static str {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/vnd.microsoft.icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "pdf" => "application/pdf",
        "wasm" => "application/wasm",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "csv" => "text/csv; charset=utf-8",
        _ => "application/octet-stream",
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
    let parsed = (|| {
        let spec = std::str::from_utf8(spec).ok()?.trim();
        let (a, b) = spec.split_once('-')?;
        if a.is_empty() {
            let n: u64 = b.parse().ok()?;
            if n == 0 {
                return None;
            }
            return Some((len.saturating_sub(n), len.saturating_sub(1)));
        }
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse::<u64>().ok()?.min(len.saturating_sub(1))
        };
        Some((start, end))
    })();
    match parsed {
        Some((start, end)) if len > 0 && start < len && start <= end => Ranged::Part(start, end),
        _ => Ranged::Unsatisfiable,
    }
}

fn accepts(accept_encoding: Option<&[u8]>, coding: &str) -> bool {
    let Some(v) = accept_encoding else {
        return false;
    };
    String::from_utf8_lossy(v).split(',').any(|part| {
        let mut it = part.split(';');
        let name = it.next().unwrap_or("").trim();
        let q_zero = it.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
        name.eq_ignore_ascii_case(coding) && !q_zero
    })
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
    let Some(path) = resolve(&mount.dir, rel) else {
        let _ = ex.start(b"404 Not Found");
        let _ = ex.header(b"Content-Type", b"text/plain; charset=utf-8");
        let _ = ex.write(b"404 Not Found\n", true);
        return;
    };
    // A precompressed sibling, when the client takes it and it is as new.
    let mut chosen = (path.clone(), None);
    for (coding, ext) in [("br", "br"), ("gzip", "gz")] {
        if accepts(c.accept_encoding, coding) {
            let mut sibling = path.clone().into_os_string();
            sibling.push(".");
            sibling.push(ext);
            let sibling = PathBuf::from(sibling);
            if let (Ok(s), Ok(o)) = (std::fs::metadata(&sibling), std::fs::metadata(&path)) {
                if s.is_file() && s.mtime() >= o.mtime() {
                    chosen = (sibling, Some(coding));
                    break;
                }
            }
        }
    }
    let (file_path, coding) = chosen;
    let Ok(file) = File::open(&file_path) else {
        let _ = ex.start(b"403 Forbidden");
        let _ = ex.write(b"", true);
        return;
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
    let not_modified = match (c.if_none_match, c.if_modified_since) {
        (Some(inm), _) => {
            let inm = String::from_utf8_lossy(inm);
            inm.trim() == "*" || inm.split(',').any(|t| t.trim().trim_start_matches("W/") == etag)
        }
        (None, Some(ims)) => std::str::from_utf8(ims)
            .ok()
            .and_then(|s| httpdate::parse_http_date(s.trim()).ok())
            .is_some_and(|since| modified <= since),
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
    let range = match c.range.map(|r| parse_range(r, len)) {
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
    let _ = ex.header(b"Content-Length", count.to_string().as_bytes());
    if head || count == 0 {
        let _ = ex.write(b"", true);
        return;
    }
    let _ = ex.sendfile(file.as_raw_fd(), start as i64, count);
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(resolve(&m.dir, b"/a.css").is_some());
        assert!(resolve(&m.dir, b"/sub").unwrap().ends_with("sub/index.html"));
        assert!(resolve(&m.dir, b"/inner-link").is_some());
        for bad in
            [&b"/../secret.txt"[..], b"/sub/../../secret.txt", b"/link", b"/./a.css", b"/a.css\0", b"/nope"]
        {
            assert_eq!(resolve(&m.dir, bad), None, "{}", String::from_utf8_lossy(bad));
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn encodings() {
        assert!(accepts(Some(b"gzip, deflate, br"), "br"));
        assert!(!accepts(Some(b"gzip;q=0, br"), "gzip"));
        assert!(!accepts(None, "gzip"));
        assert_eq!(content_type(Path::new("x.JS")), "text/javascript; charset=utf-8");
    }
}
