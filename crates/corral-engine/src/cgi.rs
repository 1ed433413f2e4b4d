//! The CGI-style variables a front end sends over uwsgi, FastCGI and SCGI,
//! and how they become a WSGI environ.
//!
//! The three protocols differ only in how the variables are framed; what the
//! front ends put in them differs more (which of PATH_INFO, SCRIPT_NAME and
//! REQUEST_URI they send, repeated keys, a port in SERVER_NAME). [`environ`]
//! turns any of them into one consistent set of values, so the WSGI adapter
//! does not care which protocol or front end a request came through.

use std::borrow::Cow;
use std::ops::Range;

use corral_proto::http1::percent_decode;

/// The variables of one request: ranges into the request's bytes.
#[derive(Debug, Default, Clone)]
pub struct CgiParams {
    pub pairs: Vec<(Range<usize>, Range<usize>)>,
    /// uwsgi `modifier1` 30: remove SCRIPT_NAME from the front of PATH_INFO.
    pub strip_script_name: bool,
}

impl CgiParams {
    /// The last value of `key` (a front end that sets a variable twice means
    /// the second one).
    pub fn get<'b>(&self, bytes: &'b [u8], key: &[u8]) -> Option<&'b [u8]> {
        self.pairs.iter().rev().find(|(k, _)| &bytes[k.clone()] == key).map(|(_, v)| &bytes[v.clone()])
    }

    pub fn iter<'b>(&'b self, bytes: &'b [u8]) -> impl Iterator<Item = (&'b [u8], &'b [u8])> + 'b {
        self.pairs.iter().map(move |(k, v)| (&bytes[k.clone()], &bytes[v.clone()]))
    }
}

/// The most variables one request may bring, over any gateway protocol
/// (SCGI's codec stops at the same number): nginx sends about twenty of its
/// own and one per header field; HTTP's --limit-request-fields goes no
/// higher. Bounds the work of building an environ, which looks each name
/// up among those before it.
pub const MAX_VARS: usize = corral_proto::scgi::MAX_HEADERS;

/// Why a front end's variables cannot make a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgiError {
    MissingMethod,
    BadContentLength(String),
    /// More than [`MAX_VARS`].
    TooManyVars(usize),
}

impl CgiError {
    /// The status the front end's client gets.
    pub fn status(&self) -> u16 {
        match self {
            CgiError::TooManyVars(_) => 431,
            _ => 400,
        }
    }
}

impl std::fmt::Display for CgiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CgiError::MissingMethod => f.write_str("no REQUEST_METHOD variable"),
            CgiError::BadContentLength(v) => write!(f, "invalid CONTENT_LENGTH {v:?}"),
            CgiError::TooManyVars(n) => write!(f, "{n} variables, over the {MAX_VARS} a request may have"),
        }
    }
}

/// Checks what the engine itself needs and returns the body length that
/// CONTENT_LENGTH announces (`None` when absent or empty).
pub fn check(params: &CgiParams, bytes: &[u8]) -> Result<Option<u64>, CgiError> {
    if params.pairs.len() > MAX_VARS {
        return Err(CgiError::TooManyVars(params.pairs.len()));
    }
    match params.get(bytes, b"REQUEST_METHOD") {
        Some(m) if !m.is_empty() => {}
        _ => return Err(CgiError::MissingMethod),
    }
    match params.get(bytes, b"CONTENT_LENGTH") {
        None | Some(b"") => Ok(None),
        Some(v) => corral_proto::http1::parse_content_length(v)
            .map(Some)
            .map_err(|_| CgiError::BadContentLength(String::from_utf8_lossy(v).into_owned())),
    }
}

/// The environ values a request's variables give, ready to be turned into
/// Python strings (latin-1).
#[derive(Debug, PartialEq, Eq)]
pub struct CgiEnviron<'b> {
    /// Every variable to set, in order, each key once. Does not include
    /// PATH_INFO and SCRIPT_NAME, which are below.
    pub vars: Vec<(&'b [u8], Cow<'b, [u8]>)>,
    pub path_info: Cow<'b, [u8]>,
    pub script_name: Cow<'b, [u8]>,
    /// The front end says the client used TLS: `wsgi.url_scheme` is https.
    pub https: bool,
}

/// Maps a front end's variables to environ values.
///
/// - Repeated `HTTP_*` variables (nginx sends one per header line) are
///   joined with "," (Cookie with "; "); for other names the last one wins.
///   So does HTTP_HOST when both name the same host, with and without a
///   port: that is `uwsgi_param HTTP_HOST $http_host;` after Debian's
///   params, which send `HTTP_HOST $host` (a request with two Host fields
///   gets 400 from nginx, but another front end might pass both on, and the
///   client must not choose which one the app sees).
/// - HTTP_CONTENT_LENGTH and HTTP_CONTENT_TYPE are dropped: PEP 3333 has
///   only the CGI names.
/// - PATH_INFO, when the front end sends none, is the path the front end
///   routed on: DOCUMENT_URI when sent (nginx's `$document_uri`, decoded and
///   normalized, what nginx itself sends as PATH_INFO over uwsgi), else
///   REQUEST_URI's path percent-decoded with its dot segments resolved and
///   repeated slashes merged, as nginx and Apache do before they route. A
///   raw `/internal/../public` must not reach the app as a path under
///   /internal when the front end allowed it as /public. A SCRIPT_NAME sent
///   without PATH_INFO is then ignored, because stock nginx and Apache
///   FastCGI configs put the whole path there.
/// - `strip_script_name` (uwsgi modifier1 30) removes SCRIPT_NAME from the
///   front of PATH_INFO; `mount` (the `--mount` prefix) moves itself from
///   PATH_INFO to SCRIPT_NAME when SCRIPT_NAME is unset or names it.
/// - SERVER_NAME loses a `:port` suffix (HAProxy sends one); QUERY_STRING and
///   SERVER_PROTOCOL get defaults when absent.
pub fn environ<'b>(params: &CgiParams, bytes: &'b [u8], mount: &'b [u8]) -> CgiEnviron<'b> {
    let mut vars = Gathered { list: Vec::with_capacity(params.pairs.len() + 2), seen: 0 };
    let mut path_sent: Option<&'b [u8]> = None;
    let mut script_sent: Option<&'b [u8]> = None;
    let mut request_uri: Option<&'b [u8]> = None;
    let mut document_uri: Option<&'b [u8]> = None;
    let mut https = false;
    let mut have_query = false;
    let mut have_protocol = false;
    let mut server_port_sent = false;
    let mut port_from_name: Option<&'b [u8]> = None;
    for (k, v) in params.pairs.iter() {
        let key = &bytes[k.clone()];
        let value = &bytes[v.clone()];
        match key {
            b"PATH_INFO" => {
                path_sent = Some(value);
                continue;
            }
            b"SCRIPT_NAME" => {
                script_sent = Some(value);
                continue;
            }
            b"HTTP_CONTENT_LENGTH" | b"HTTP_CONTENT_TYPE" => continue,
            b"HTTPS" => https |= value.eq_ignore_ascii_case(b"on") || value == b"1",
            // UWSGI_SCHEME: what uWSGI's own configs pass (`uwsgi_param UWSGI_SCHEME $scheme`).
            b"REQUEST_SCHEME" | b"UWSGI_SCHEME" => https |= value.eq_ignore_ascii_case(b"https"),
            // The server's own keys (wsgi.input, wsgi.version...) are not the
            // front end's to replace.
            _ if key.starts_with(b"wsgi.") => continue,
            b"REQUEST_URI" => request_uri = Some(value),
            b"DOCUMENT_URI" => document_uri = Some(value),
            b"QUERY_STRING" => have_query = true,
            b"SERVER_PROTOCOL" => have_protocol = true,
            b"SERVER_PORT" => server_port_sent = true,
            // nginx sends an empty one from a server block without
            // `server_name`; PEP 3333 says SERVER_NAME is never empty.
            b"SERVER_NAME" if value.is_empty() => continue,
            b"SERVER_NAME" => {
                let (host, port) = split_host_port(value);
                port_from_name = port.or(port_from_name);
                vars.set(key, Cow::Borrowed(host));
                continue;
            }
            _ => {}
        }
        if key.starts_with(b"HTTP_") {
            if let Some(slot) = vars.find(key) {
                if key == b"HTTP_HOST"
                    && split_host_port(slot).0.eq_ignore_ascii_case(split_host_port(value).0)
                {
                    // The same host, with and without its port: the
                    // configuration's HTTP_HOST after the stock one.
                    *slot = Cow::Borrowed(value);
                    continue;
                }
                let sep: &[u8] = if key == b"HTTP_COOKIE" { b"; " } else { b"," };
                // In place: copying the joined value for each repeat would
                // be quadratic in the number of repeats.
                let joined = slot.to_mut();
                joined.extend_from_slice(sep);
                joined.extend_from_slice(value);
                continue;
            }
            vars.push(key, Cow::Borrowed(value));
        } else {
            vars.set(key, Cow::Borrowed(value));
        }
    }
    if vars.find(b"SERVER_NAME").is_none() {
        // None sent, or an empty one: the host the client asked for, as an
        // HTTP server takes it; without a Host either, the template's
        // listener address stays.
        let host = vars.find(b"HTTP_HOST").map(|v| v.clone());
        if let Some(host) = host.filter(|h| !h.is_empty()) {
            let name = match host {
                Cow::Borrowed(h) => Cow::Borrowed(split_host_port(h).0),
                Cow::Owned(h) => Cow::Owned(split_host_port(&h).0.to_vec()),
            };
            vars.push(b"SERVER_NAME", name);
        }
    }
    if let (Some(port), false) = (port_from_name, server_port_sent) {
        vars.push(b"SERVER_PORT", Cow::Borrowed(port));
    }
    let (uri_path, uri_query) = match request_uri {
        Some(u) => match u.iter().position(|&b| b == b'?') {
            Some(i) => (&u[..i], Some(&u[i + 1..])),
            None => (u, None),
        },
        None => (&b""[..], None),
    };
    if !have_query {
        vars.push(b"QUERY_STRING", Cow::Borrowed(uri_query.unwrap_or(b"")));
    }
    if !have_protocol {
        vars.push(b"SERVER_PROTOCOL", Cow::Borrowed(b"HTTP/1.1"));
    }

    let (mut path, mut script): (Cow<'b, [u8]>, Cow<'b, [u8]>) = match path_sent {
        Some(p) => (Cow::Borrowed(p), Cow::Borrowed(script_sent.unwrap_or(b""))),
        None if document_uri.is_some_and(|d| d.starts_with(b"/")) => {
            (Cow::Borrowed(document_uri.unwrap_or_default()), Cow::Borrowed(b""))
        }
        None if request_uri.is_some() => (Cow::Owned(request_path(uri_path)), Cow::Borrowed(b"")),
        // Neither PATH_INFO nor REQUEST_URI (a bare CGI environment): the
        // script name is all there is to go by.
        None => (Cow::Borrowed(script_sent.unwrap_or(b"")), Cow::Borrowed(b"")),
    };
    // Compared without its trailing slashes (`uwsgi_param SCRIPT_NAME /app/`),
    // which it loses below anyway.
    let bare = script.len() - script.iter().rev().take_while(|&&b| b == b'/').count();
    let stripped = params.strip_script_name && bare > 0 && under(&path, &script[..bare]);
    if stripped {
        path = Cow::Owned(path[bare..].to_vec());
    }
    // The front end may name the mount point itself with the whole path in
    // PATH_INFO (uWSGI's --manage-script-name setups): the prefix is then
    // taken off PATH_INFO all the same. Only when PATH_INFO is the whole
    // path the client asked for: one the front end split already may be a
    // route of the app's that starts with the prefix too.
    let whole_path = |path: &[u8]| match (document_uri, request_uri) {
        (Some(d), _) if d.starts_with(b"/") => d == path,
        (_, Some(_)) => request_path(uri_path) == path,
        _ => false,
    };
    let names_mount = script.is_empty()
        || !stripped && script.strip_suffix(b"/").unwrap_or(&script) == mount && whole_path(&path);
    if names_mount && !mount.is_empty() && under(&path, mount) {
        path = Cow::Owned(path[mount.len()..].to_vec());
        script = Cow::Borrowed(mount);
    }
    // SCRIPT_NAME is "" at the root and never ends in "/" (PEP 3333, CGI).
    if script.ends_with(b"/") {
        let trimmed = script.len() - script.iter().rev().take_while(|&&b| b == b'/').count();
        script = Cow::Owned(script[..trimmed].to_vec());
        if !path.starts_with(b"/") {
            let mut p = b"/".to_vec();
            p.extend_from_slice(&path);
            path = Cow::Owned(p);
        }
    }
    CgiEnviron { vars: vars.list, path_info: path, script_name: script, https }
}

/// The path a REQUEST_URI (without its query) names, as PATH_INFO takes it
/// when the front end sends none: origin form, percent-decoded, with its dot
/// segments and repeated slashes resolved.
pub fn request_path(uri_path: &[u8]) -> Vec<u8> {
    let uri_path = origin_form(uri_path);
    let mut decoded = Vec::with_capacity(uri_path.len());
    percent_decode(uri_path, &mut decoded);
    normalize_path(decoded)
}

/// The path of a request target in absolute form (`http://host/path`, which
/// HTTP/1.1 servers must accept and HAProxy passes on as REQUEST_URI); any
/// other target as it is.
fn origin_form(target: &[u8]) -> &[u8] {
    let scheme = target.iter().position(|&b| b == b':');
    match scheme {
        Some(n)
            if n > 0
                && target[..n].iter().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(b))
                && target[n..].starts_with(b"://") =>
        {
            let rest = &target[n + 3..];
            match rest.iter().position(|&b| b == b'/') {
                Some(p) => &rest[p..],
                None => b"/",
            }
        }
        _ => target,
    }
}

/// A decoded absolute path with `.` and `..` segments resolved (RFC 3986
/// 5.2.4; `..` never climbs above the root) and runs of `/` merged into one,
/// as nginx (`merge_slashes on`, its default) and Apache (`MergeSlashes On`)
/// do before matching locations. A path not starting with `/` is returned as
/// it is.
pub fn normalize_path(path: Vec<u8>) -> Vec<u8> {
    let needs = path.starts_with(b"/") && path.windows(2).any(|w| w == b"//" || w == b"/.");
    if !needs {
        return path;
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    let parts: Vec<&[u8]> = path[1..].split(|&b| b == b'/').collect();
    let last = parts.len() - 1;
    for (i, seg) in parts.iter().enumerate() {
        let is_last = i == last;
        match *seg {
            b"" | b"." => trailing_slash = is_last,
            b".." => {
                segments.pop();
                trailing_slash = is_last;
            }
            _ => {
                segments.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for seg in &segments {
        out.push(b'/');
        out.extend_from_slice(seg);
    }
    if trailing_slash || out.is_empty() {
        out.push(b'/');
    }
    out
}

/// Whether `path` is `prefix` or lies below it (at a `/` boundary).
fn under(path: &[u8], prefix: &[u8]) -> bool {
    path.starts_with(prefix) && (path.len() == prefix.len() || path[prefix.len()] == b'/')
}

/// The variables [`environ`] keeps, each name once, with a mask of their
/// names' [`name_bit`]s: a name whose bit is clear was not seen, which is
/// what almost every name of a request finds, and is added without a search
/// through those before it.
struct Gathered<'b> {
    list: Vec<(&'b [u8], Cow<'b, [u8]>)>,
    seen: u64,
}

impl<'b> Gathered<'b> {
    fn find(&mut self, key: &[u8]) -> Option<&mut Cow<'b, [u8]>> {
        if self.seen & name_bit(key) == 0 {
            return None;
        }
        self.list.iter_mut().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Adds a name not among those kept.
    fn push(&mut self, key: &'b [u8], value: Cow<'b, [u8]>) {
        self.seen |= name_bit(key);
        self.list.push((key, value));
    }

    /// Replaces the value of `key`, or adds it.
    fn set(&mut self, key: &'b [u8], value: Cow<'b, [u8]>) {
        match self.find(key) {
            Some(slot) => *slot = value,
            None => self.push(key, value),
        }
    }
}

/// One of 64 bits for a name, from its length and two of its bytes: the
/// names nginx sends share lengths, but seldom those bytes as well.
fn name_bit(key: &[u8]) -> u64 {
    let (Some(&mid), Some(&last)) = (key.get(key.len() / 2), key.last()) else {
        return 1;
    };
    let h = key.len().wrapping_mul(31) ^ usize::from(mid).wrapping_mul(7) ^ usize::from(last);
    1 << (h % 64)
}

/// `host:port` -> (host, Some(port)); `[v6]:port` -> (v6, Some(port)); a bare
/// host or IPv6 address is returned whole.
fn split_host_port(v: &[u8]) -> (&[u8], Option<&[u8]>) {
    let digits = |p: &[u8]| !p.is_empty() && p.iter().all(u8::is_ascii_digit);
    if let Some(rest) = v.strip_prefix(b"[") {
        if let Some(end) = rest.iter().position(|&b| b == b']') {
            let port = rest[end + 1..].strip_prefix(b":").filter(|p| digits(p));
            return (&rest[..end], port);
        }
        return (v, None);
    }
    match v.iter().position(|&b| b == b':') {
        // One colon only: more would be a bare IPv6 address.
        Some(i) if !v[i + 1..].contains(&b':') && digits(&v[i + 1..]) => (&v[..i], Some(&v[i + 1..])),
        _ => (v, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> (CgiParams, Vec<u8>) {
        let mut bytes = Vec::new();
        let mut p = CgiParams::default();
        for (k, v) in pairs {
            let ks = bytes.len();
            bytes.extend_from_slice(k.as_bytes());
            let vs = bytes.len();
            bytes.extend_from_slice(v.as_bytes());
            p.pairs.push((ks..vs, vs..bytes.len()));
        }
        (p, bytes)
    }

    #[test]
    fn the_servers_own_keys_are_not_the_front_ends_to_set() {
        let (vars, ..) =
            env_of(&[("wsgi.version", "x"), ("wsgi.file_wrapper", "y"), ("X_OK", "1")], "", false);
        assert!(vars.iter().all(|(k, _)| !k.starts_with("wsgi.")), "{vars:?}");
        assert!(vars.iter().any(|(k, v)| k == "X_OK" && v == "1"));
    }

    fn env_of(
        pairs: &[(&str, &str)],
        mount: &str,
        strip: bool,
    ) -> (Vec<(String, String)>, String, String, bool) {
        let (mut p, bytes) = params(pairs);
        p.strip_script_name = strip;
        let e = environ(&p, &bytes, mount.as_bytes());
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let vars = e.vars.iter().map(|(k, v)| (s(k), s(v))).collect();
        (vars, s(&e.path_info), s(&e.script_name), e.https)
    }

    fn var(vars: &[(String, String)], k: &str) -> Option<String> {
        vars.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    }

    /// (variables sent, --mount, modifier1 30?) -> (PATH_INFO, SCRIPT_NAME)
    type PathVector =
        (&'static [(&'static str, &'static str)], &'static str, bool, &'static str, &'static str);
    const PATHS: &[PathVector] = &[
        // nginx uwsgi_params: PATH_INFO decoded, no SCRIPT_NAME.
        (&[("REQUEST_URI", "/a%20b?x=1"), ("PATH_INFO", "/a b")], "", false, "/a b", ""),
        // nginx scgi_params: REQUEST_URI only.
        // Decoded bytes C3 A9 (shown here through from_utf8_lossy).
        (&[("REQUEST_URI", "/caf%C3%A9?q")], "", false, "/café", ""),
        // Stock fastcgi_params: SCRIPT_NAME is the whole path, no PATH_INFO.
        (&[("SCRIPT_NAME", "/x/y"), ("REQUEST_URI", "/x/y?z")], "", false, "/x/y", ""),
        // Documented FastCGI config: SCRIPT_NAME "" and PATH_INFO given.
        (&[("SCRIPT_NAME", ""), ("PATH_INFO", "/x"), ("REQUEST_URI", "/x")], "", false, "/x", ""),
        // --mount splits the path.
        (&[("REQUEST_URI", "/app/x")], "/app", false, "/x", "/app"),
        (&[("REQUEST_URI", "/app")], "/app", false, "", "/app"),
        (&[("REQUEST_URI", "/application")], "/app", false, "/application", ""),
        (&[("PATH_INFO", "/app/x"), ("REQUEST_URI", "/app/x")], "/app", false, "/x", "/app"),
        // The front end names the mount point too: still taken off PATH_INFO,
        // unless the front end did that already.
        (
            &[("SCRIPT_NAME", "/app"), ("PATH_INFO", "/app/x"), ("REQUEST_URI", "/app/x")],
            "/app",
            false,
            "/x",
            "/app",
        ),
        (
            &[("SCRIPT_NAME", "/app/"), ("PATH_INFO", "/app/x"), ("DOCUMENT_URI", "/app/x")],
            "/app",
            false,
            "/x",
            "/app",
        ),
        (
            &[("SCRIPT_NAME", "/app"), ("PATH_INFO", "/x"), ("REQUEST_URI", "/app/x")],
            "/app",
            false,
            "/x",
            "/app",
        ),
        (
            &[("SCRIPT_NAME", "/other"), ("PATH_INFO", "/app/x"), ("REQUEST_URI", "/app/x")],
            "/app",
            false,
            "/app/x",
            "/other",
        ),
        // Split already: /app/x is a route of the app mounted at /app.
        (
            &[("SCRIPT_NAME", "/app"), ("PATH_INFO", "/app/x"), ("REQUEST_URI", "/app/app/x")],
            "/app",
            false,
            "/app/x",
            "/app",
        ),
        // modifier1 30 took SCRIPT_NAME off already: not again for the mount.
        (
            &[("SCRIPT_NAME", "/app"), ("PATH_INFO", "/app/app/x"), ("REQUEST_URI", "/app/app/x")],
            "/app",
            true,
            "/app/x",
            "/app",
        ),
        // modifier1 30: SCRIPT_NAME removed from PATH_INFO.
        (&[("SCRIPT_NAME", "/app"), ("PATH_INFO", "/app/x")], "", true, "/x", "/app"),
        (&[("SCRIPT_NAME", "/app"), ("PATH_INFO", "/app/x")], "", false, "/app/x", "/app"),
        // ...also when it ends in a slash (`uwsgi_param SCRIPT_NAME /app/;`).
        (&[("SCRIPT_NAME", "/app/"), ("PATH_INFO", "/app/x")], "", true, "/x", "/app"),
        (&[("SCRIPT_NAME", "/app/"), ("PATH_INFO", "/app")], "", true, "/", "/app"),
        (&[("SCRIPT_NAME", "/app/"), ("PATH_INFO", "/apps/x")], "", true, "/apps/x", "/app"),
        // SCRIPT_NAME is never "/".
        (&[("SCRIPT_NAME", "/"), ("PATH_INFO", "x")], "", false, "/x", ""),
        // A bare CGI environment.
        (&[("SCRIPT_NAME", "/s")], "", false, "/s", ""),
        // nginx's stock fastcgi_params and scgi_params: DOCUMENT_URI is the
        // decoded, normalized path nginx routed on.
        (&[("REQUEST_URI", "/a/../b//c/%2e%2e/d?q"), ("DOCUMENT_URI", "/b/d")], "", false, "/b/d", ""),
        (&[("REQUEST_URI", "/x/%2541"), ("DOCUMENT_URI", "/x/%41")], "", false, "/x/%41", ""),
        (&[("REQUEST_URI", "//app//x"), ("DOCUMENT_URI", "/app/x")], "/app", false, "/x", "/app"),
        // PATH_INFO, when sent, wins over DOCUMENT_URI.
        (&[("PATH_INFO", "/p"), ("DOCUMENT_URI", "/d")], "", false, "/p", ""),
        // Only REQUEST_URI (Apache, HAProxy): decoded, then normalized.
        (&[("REQUEST_URI", "/internal/%2e%2e/public")], "", false, "/public", ""),
        (&[("REQUEST_URI", "/internal/../public?x=/..")], "", false, "/public", ""),
        // An absolute-form target (HAProxy passes the client's on): its path.
        (&[("REQUEST_URI", "http://ex.com/abs/x?q=1")], "", false, "/abs/x", ""),
        (&[("REQUEST_URI", "HTTPS://ex.com:8443/app/../y")], "/app", false, "/y", ""),
        (&[("REQUEST_URI", "http://ex.com")], "", false, "/", ""),
        (&[("REQUEST_URI", "http://ex.com?q")], "", false, "/", ""),
        (&[("REQUEST_URI", "//app//x/./y/")], "/app", false, "/x/y/", "/app"),
        (&[("REQUEST_URI", "/../../etc")], "", false, "/etc", ""),
    ];

    #[test]
    fn normalized_paths() {
        let cases: &[(&str, &str)] = &[
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//", "/"),
            ("/a//b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/..", "/"),
            ("/..", "/"),
            ("/../a", "/a"),
            ("/a/b/../../../c", "/c"),
            ("/a/.b/..c/...", "/a/.b/..c/..."),
            ("/a/b/./", "/a/b/"),
            ("*", "*"),
            ("", ""),
            ("a/../b", "a/../b"),
        ];
        for (input, want) in cases {
            let got = normalize_path(input.as_bytes().to_vec());
            assert_eq!(String::from_utf8_lossy(&got), *want, "{input:?}");
        }
    }

    #[test]
    fn path_info_and_script_name() {
        for (pairs, mount, strip, path, script) in PATHS {
            let (_, p, s, _) = env_of(pairs, mount, *strip);
            assert_eq!((p.as_str(), s.as_str()), (*path, *script), "{pairs:?} mount={mount:?}");
        }
    }

    #[test]
    fn repeated_and_forbidden_variables() {
        let (vars, ..) = env_of(
            &[
                ("HTTP_X_A", "1"),
                ("HTTP_COOKIE", "a=1"),
                ("HTTP_X_A", "2"),
                ("HTTP_COOKIE", "b=2"),
                ("HTTP_CONTENT_LENGTH", "5"),
                ("HTTP_CONTENT_TYPE", "text/plain"),
                ("CONTENT_LENGTH", "5"),
                ("DOCUMENT_ROOT", "/one"),
                ("DOCUMENT_ROOT", "/two"),
                ("HTTP_HOST", "example.com"),
                ("HTTP_HOST", "example.com:8080"),
            ],
            "",
            false,
        );
        assert_eq!(var(&vars, "HTTP_X_A").as_deref(), Some("1,2"));
        assert_eq!(var(&vars, "HTTP_COOKIE").as_deref(), Some("a=1; b=2"));
        assert_eq!(var(&vars, "HTTP_CONTENT_LENGTH"), None);
        assert_eq!(var(&vars, "HTTP_CONTENT_TYPE"), None);
        assert_eq!(var(&vars, "CONTENT_LENGTH").as_deref(), Some("5"));
        assert_eq!(var(&vars, "DOCUMENT_ROOT").as_deref(), Some("/two"));
        assert_eq!(vars.iter().filter(|(k, _)| k == "DOCUMENT_ROOT").count(), 1);
        assert_eq!(var(&vars, "HTTP_HOST").as_deref(), Some("example.com:8080"));
        assert_eq!(vars.iter().filter(|(k, _)| k == "HTTP_HOST").count(), 1);
        let (vars, ..) = env_of(&[("HTTP_HOST", "good.example"), ("HTTP_HOST", "evil.example")], "", false);
        assert_eq!(var(&vars, "HTTP_HOST").as_deref(), Some("good.example,evil.example"));
    }

    #[test]
    fn scheme_server_and_defaults() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("HTTPS", "on")], true),
            (&[("HTTPS", "1")], true),
            (&[("HTTPS", "off")], false),
            (&[("REQUEST_SCHEME", "https")], true),
            (&[("REQUEST_SCHEME", "http")], false),
            (&[("UWSGI_SCHEME", "https")], true),
            (&[], false),
        ];
        for (pairs, https) in cases {
            assert_eq!(env_of(pairs, "", false).3, *https, "{pairs:?}");
        }
        let (vars, ..) = env_of(&[("SERVER_NAME", "example.com:8080"), ("REQUEST_URI", "/p?a=b")], "", false);
        assert_eq!(var(&vars, "SERVER_NAME").as_deref(), Some("example.com"));
        assert_eq!(var(&vars, "SERVER_PORT").as_deref(), Some("8080"));
        assert_eq!(var(&vars, "QUERY_STRING").as_deref(), Some("a=b"));
        assert_eq!(var(&vars, "SERVER_PROTOCOL").as_deref(), Some("HTTP/1.1"));
        let (vars, ..) = env_of(&[("SERVER_NAME", "[::1]:81"), ("SERVER_PORT", "82")], "", false);
        assert_eq!(var(&vars, "SERVER_NAME").as_deref(), Some("::1"));
        assert_eq!(var(&vars, "SERVER_PORT").as_deref(), Some("82"));
        let (vars, ..) = env_of(&[("SERVER_NAME", "::1")], "", false);
        assert_eq!(var(&vars, "SERVER_NAME").as_deref(), Some("::1"));
        let (vars, ..) = env_of(&[("SERVER_NAME", ""), ("HTTP_HOST", "shop.example:8443")], "", false);
        assert_eq!(var(&vars, "SERVER_NAME").as_deref(), Some("shop.example"));
        let (vars, ..) = env_of(&[("HTTP_HOST", "[::1]:81")], "", false);
        assert_eq!(var(&vars, "SERVER_NAME").as_deref(), Some("::1"));
        let (vars, ..) = env_of(&[("SERVER_NAME", "")], "", false);
        assert_eq!(var(&vars, "SERVER_NAME"), None);
    }

    #[test]
    fn checks() {
        let (p, b) = params(&[("REQUEST_METHOD", "GET")]);
        assert_eq!(check(&p, &b), Ok(None));
        let (p, b) = params(&[("REQUEST_METHOD", "POST"), ("CONTENT_LENGTH", "12")]);
        assert_eq!(check(&p, &b), Ok(Some(12)));
        let (p, b) = params(&[("REQUEST_METHOD", "POST"), ("CONTENT_LENGTH", "")]);
        assert_eq!(check(&p, &b), Ok(None));
        let (p, b) = params(&[("REQUEST_METHOD", "POST"), ("CONTENT_LENGTH", "-1")]);
        assert!(matches!(check(&p, &b), Err(CgiError::BadContentLength(_))));
        let (p, b) = params(&[("CONTENT_LENGTH", "1")]);
        assert_eq!(check(&p, &b), Err(CgiError::MissingMethod));
        let names: Vec<String> = (0..MAX_VARS).map(|i| format!("HTTP_X{i}")).collect();
        let mut pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        pairs[0] = ("REQUEST_METHOD", "GET");
        let (p, b) = params(&pairs);
        assert_eq!(check(&p, &b), Ok(None));
        pairs.push(("HTTP_ONE_MORE", "v"));
        let (p, b) = params(&pairs);
        assert_eq!(check(&p, &b), Err(CgiError::TooManyVars(MAX_VARS + 1)));
    }

    /// Names that share a bit of the mask are told apart by the search the
    /// bit leads to; a name set twice keeps its last value either way.
    #[test]
    fn names_sharing_a_mask_bit_stay_apart() {
        let names: Vec<String> = (0..5000).map(|i| format!("X_{i}")).collect();
        let bit = name_bit(names[0].as_bytes());
        let sharing: Vec<&str> =
            names.iter().filter(|n| name_bit(n.as_bytes()) == bit).map(String::as_str).take(3).collect();
        assert!(sharing.len() >= 2, "no two names share a bit: {sharing:?}");
        let mut pairs: Vec<(&str, &str)> = sharing.iter().map(|n| (*n, "first")).collect();
        pairs.push((sharing[1], "second"));
        let (vars, ..) = env_of(&pairs, "", false);
        for n in &sharing {
            let want = if *n == sharing[1] { "second" } else { "first" };
            assert_eq!(var(&vars, n).as_deref(), Some(want), "{n}");
            assert_eq!(vars.iter().filter(|(k, _)| k == n).count(), 1, "{n}");
        }
    }
}
