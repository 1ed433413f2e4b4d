//! The application trait: what the engine asks of whatever serves requests.
//!
//! The engine parses and frames HTTP; an [`App`] sees a [`Request`] (the
//! parsed head, the peer, the listener) and an [`Exchange`] through which it
//! reads the body and writes the response. The WSGI adapter is one `App`; the
//! engine's own tests use plain Rust ones, so no Python is needed to test the
//! engine.

use corral_proto::http1::{Field, Head, Known, Version};

use crate::cgi::CgiParams;
use crate::exchange::Exchange;
use crate::listen::Protocol;

/// Per-process facts about a listener, shared by every request it accepts.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    pub server_name: String,
    pub server_port: String,
    pub is_unix: bool,
    pub protocol: Protocol,
}

/// What the request says about itself: an HTTP head, or the CGI-style
/// variables a front end sent over uwsgi, FastCGI or SCGI.
#[derive(Clone, Copy)]
pub enum Meta<'a> {
    Http(&'a Head),
    Cgi(&'a CgiParams),
}

/// The parsed request, borrowed for the duration of one call.
pub struct Request<'a> {
    pub meta: Meta<'a>,
    /// The bytes the ranges of `meta` index.
    pub bytes: &'a [u8],
    /// REMOTE_ADDR and REMOTE_PORT (empty for unix sockets).
    pub remote_addr: &'a str,
    pub remote_port: &'a str,
    pub listener: &'a ListenerInfo,
    pub listener_index: usize,
    /// A proxy the server trusts (`--forwarded-allow-ips`) said the client
    /// came over https (HTTP listeners; see [`crate::forwarded`]).
    pub forwarded_https: bool,
    /// A proxy the server trusts named the prefix the app is mounted at in
    /// a `SCRIPT_NAME` field (HTTP listeners; see
    /// [`corral_proto::http1::Known::ScriptName`]).
    pub forwarded_prefix: bool,
}

impl ListenerInfo {
    /// Who is on the other end of a connection to this listener, for a
    /// log line: its address and port (an IPv6 one in brackets, as nginx
    /// writes it), or the unix socket it came through, after the client a
    /// PROXY header named on it.
    pub fn peer(&self, remote_addr: &str, remote_port: &str) -> String {
        let addr = |a: &str| if a.contains(':') { format!("[{a}]") } else { a.to_string() };
        match (self.is_unix, remote_addr.is_empty(), remote_port.is_empty()) {
            (true, true, _) => format!("unix:{}", self.server_name),
            (true, false, true) => format!("{remote_addr} via unix:{}", self.server_name),
            (true, false, false) => {
                format!("{}:{remote_port} via unix:{}", addr(remote_addr), self.server_name)
            }
            (false, ..) => format!("{}:{remote_port}", addr(remote_addr)),
        }
    }
}

impl<'a> Request<'a> {
    /// The client, as log lines name it (see [`ListenerInfo::peer`]); behind
    /// a front end, the client it names (REMOTE_ADDR) and the front end.
    pub fn peer(&self) -> String {
        let hop = self.listener.peer(self.remote_addr, self.remote_port);
        match self.cgi().and_then(|c| c.get(self.bytes, b"REMOTE_ADDR")).filter(|a| !a.is_empty()) {
            // The front end's word: escaped as the target is, so that no
            // byte of it can begin a line of its own.
            Some(client) => format!("{} via {hop}", log_escape(client)),
            None => hop,
        }
    }
    /// The HTTP head, for requests that arrived over HTTP.
    pub fn http(&self) -> Option<&'a Head> {
        match self.meta {
            Meta::Http(h) => Some(h),
            Meta::Cgi(_) => None,
        }
    }
    /// The front end's variables, for requests over uwsgi, FastCGI or SCGI.
    pub fn cgi(&self) -> Option<&'a CgiParams> {
        match self.meta {
            Meta::Http(_) => None,
            Meta::Cgi(c) => Some(c),
        }
    }
    pub fn method(&self) -> &'a [u8] {
        match self.meta {
            Meta::Http(h) => &self.bytes[h.method.clone()],
            Meta::Cgi(c) => c.get(self.bytes, b"REQUEST_METHOD").unwrap_or(b""),
        }
    }
    /// "METHOD TARGET" for a log line, escaped with [`log_escape`].
    pub fn describe(&self) -> String {
        format!("{} {}", log_escape(self.method()), log_escape(self.target()))
    }
    /// The request target exactly as sent (REQUEST_URI), for logs and the
    /// scoreboard. A gateway peer that sends no REQUEST_URI (a bare CGI
    /// environment) gets the path it routed on instead, without its query.
    pub fn target(&self) -> &'a [u8] {
        match self.meta {
            Meta::Http(h) => &self.bytes[h.target.clone()],
            Meta::Cgi(c) => [&b"REQUEST_URI"[..], b"DOCUMENT_URI", b"PATH_INFO", b"SCRIPT_NAME"]
                .into_iter()
                .find_map(|k| c.get(self.bytes, k).filter(|v| !v.is_empty()))
                .unwrap_or(b""),
        }
    }
    /// The target for the access log: [`Request::target`], but from a
    /// gateway peer that sends no REQUEST_URI (a bare CGI environment,
    /// `cgi-fcgi`), the one its environ stands for, SCRIPT_NAME and
    /// PATH_INFO with `?QUERY_STRING`, so that the query is logged too.
    pub fn log_target(&self) -> std::borrow::Cow<'a, [u8]> {
        match self.meta {
            Meta::Cgi(c) if c.get(self.bytes, b"REQUEST_URI").is_none_or(|v| v.is_empty()) => {
                let get = |k: &[u8]| c.get(self.bytes, k).unwrap_or(b"");
                let mut t = [get(b"SCRIPT_NAME"), get(b"PATH_INFO")].concat();
                if t.is_empty() {
                    t = self.target().to_vec();
                }
                if !get(b"QUERY_STRING").is_empty() && !t.contains(&b'?') {
                    t.push(b'?');
                    t.extend_from_slice(get(b"QUERY_STRING"));
                }
                std::borrow::Cow::Owned(t)
            }
            _ => std::borrow::Cow::Borrowed(self.target()),
        }
    }
    /// The raw (still percent-encoded) path of an HTTP request.
    pub fn path(&self) -> &'a [u8] {
        match self.meta {
            Meta::Http(h) => &self.bytes[h.path.clone()],
            Meta::Cgi(_) => b"",
        }
    }
    /// The authority of an absolute-form HTTP target (`http://host:port/x`),
    /// which stands for the Host field (RFC 9112 3.2.2); empty otherwise.
    pub fn authority(&self) -> &'a [u8] {
        match self.meta {
            Meta::Http(h) => &self.bytes[h.authority.clone()],
            Meta::Cgi(_) => b"",
        }
    }
    /// The query of an HTTP request.
    pub fn query(&self) -> &'a [u8] {
        match self.meta {
            Meta::Http(h) => &self.bytes[h.query.clone()],
            Meta::Cgi(_) => b"",
        }
    }
    pub fn protocol(&self) -> &'static str {
        match self.meta {
            Meta::Http(h) if h.version == Version::Http10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }
    }
    /// Header fields of an HTTP request in arrival order: (name, value, kind).
    pub fn fields(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8], Known)> + 'a {
        let bytes = self.bytes;
        let fields: &'a [Field] = match self.meta {
            Meta::Http(h) => &h.fields,
            Meta::Cgi(_) => &[],
        };
        fields.iter().map(move |f: &Field| (&bytes[f.name.clone()], &bytes[f.value.clone()], f.known))
    }
}

/// Serves requests. One value lives in each worker process; every worker
/// thread calls it with its own per-thread state.
pub trait App: Send + Sync + 'static {
    /// State owned by one worker thread (for Python, its thread state).
    type Thread;

    /// Called once on each worker thread before it serves anything; `t` is
    /// the thread's index among the worker's threads.
    fn thread_start(&self, t: usize) -> Self::Thread;

    /// Serves one request. The engine completes the response afterwards if
    /// the app did not (an empty 500 when nothing was started).
    fn call(&self, thread: &mut Self::Thread, req: &Request<'_>, ex: &mut Exchange);

    /// Runs `f`, which blocks on a socket, in a way that lets other threads of
    /// this app run meanwhile (for Python: with the GIL released). Only called
    /// on a thread running the app's code: inside [`App::call`], or on a
    /// thread the app started that uses the [`Exchange`].
    fn blocking(f: &mut dyn FnMut()) {
        f()
    }

    /// Whether the app cannot run anything in this process now, for a
    /// while already (for Python: a thread has waited long for the GIL,
    /// which a thread stuck in C code keeps). New connections then go to
    /// the other workers, where they do not wait behind it. Called at every
    /// accept, so it must be cheap and must not wait.
    fn stalled(&self) -> bool {
        false
    }

    /// The stack of worker thread `t` (its index among the worker's
    /// threads), for the log when its request runs past `--timeout`. Called
    /// from another thread while `t` may be stuck anywhere, even holding
    /// locks the app uses, so it must not wait for any of them.
    fn thread_traceback(&self, _t: usize) -> Option<String> {
        None
    }
}

/// Bytes from a peer for a line of the text log: valid UTF-8 as it is, but
/// control characters and invalid bytes as `\xNN`, so that a method or
/// target a front end passed on raw cannot end the line and forge another.
pub fn log_escape(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                for b in c.encode_utf8(&mut [0; 4]).bytes() {
                    let _ = write!(out, "\\x{b:02x}");
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{log_escape, ListenerInfo};
    use crate::listen::Protocol;

    #[test]
    fn a_peer_is_named_as_nginx_names_it() {
        let l = |is_unix| ListenerInfo {
            server_name: "/run/app.sock".into(),
            server_port: String::new(),
            is_unix,
            protocol: Protocol::Http,
        };
        assert_eq!(l(false).peer("192.0.2.7", "5555"), "192.0.2.7:5555");
        assert_eq!(l(false).peer("2001:db8::7", "5555"), "[2001:db8::7]:5555");
        assert_eq!(l(true).peer("", ""), "unix:/run/app.sock");
        // A client a PROXY header named on a unix socket.
        assert_eq!(l(true).peer("192.0.2.7", "5555"), "192.0.2.7:5555 via unix:/run/app.sock");
        assert_eq!(l(true).peer("2001:db8::7", "80"), "[2001:db8::7]:80 via unix:/run/app.sock");
    }

    #[test]
    fn log_escape_keeps_a_line_a_line() {
        let cases: &[(&[u8], &str)] = &[
            (b"/plain?q=1", "/plain?q=1"),
            ("/caf\u{e9}".as_bytes(), "/caf\u{e9}"),
            (b"/x\n[2026] [1] [CRITICAL] forged", "/x\\x0a[2026] [1] [CRITICAL] forged"),
            (b"GET\r\x7f", "GET\\x0d\\x7f"),
            (b"/\xff\xfe", "/\\xff\\xfe"),
            ("\u{85}".as_bytes(), "\\xc2\\x85"),
        ];
        for (input, want) in cases {
            assert_eq!(log_escape(input), *want);
        }
    }
}
