//! The engine end to end with a Rust app: a forked worker process serving
//! real sockets on loopback, no Python involved.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use corral_engine::scoreboard::Scoreboard;
use corral_engine::{run_worker, Addr, App, Config, Exchange, Listener, ListenerInfo, Request, WorkerCtx};

struct TestApp;

impl App for TestApp {
    type Thread = ();

    fn thread_start(&self, _: usize) {}

    fn call(&self, _: &mut (), req: &Request<'_>, ex: &mut Exchange) {
        match req.path() {
            b"/hello" => {
                ex.start(b"200 OK").unwrap();
                ex.header(b"Content-Type", b"text/plain").unwrap();
                ex.write(b"hello", true).unwrap();
            }
            b"/echo" => {
                let mut body = Vec::new();
                match ex.read_to_end(&mut body, 1 << 20) {
                    Ok(_) => {
                        ex.start(b"200 OK").unwrap();
                        ex.write(&body, false).unwrap();
                    }
                    Err(e) => {
                        ex.start(format!("{} Bad", e.status()).as_bytes()).unwrap();
                        ex.write(b"", true).unwrap();
                    }
                }
            }
            b"/stream" => {
                ex.start(b"200 OK").unwrap();
                for part in [&b"one,"[..], b"two,", b"three"] {
                    ex.write(part, false).unwrap();
                }
            }
            b"/short" => {
                ex.start(b"200 OK").unwrap();
                ex.header(b"Content-Length", b"10").unwrap();
                ex.write(b"12345", false).unwrap();
            }
            b"/panic" => panic!("the test app panics"),
            b"/slow" => {
                std::thread::sleep(Duration::from_millis(800));
                ex.start(b"200 OK").unwrap();
                ex.write(b"slow done", true).unwrap();
            }
            b"/pause" => {
                // Two blocks in quick succession, then nothing until the
                // client says it has them (see `stream_blocks_are_not_held_back`).
                ex.start(b"200 OK").unwrap();
                ex.write(b"first,", false).unwrap();
                ex.write(b"second,", false).unwrap();
                let marker = pause_marker(unsafe { libc::getppid() });
                let t0 = Instant::now();
                while !marker.exists() && t0.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                ex.write(b"third", false).unwrap();
            }
            b"/wait" => {
                // Nothing at all until the client says so.
                let marker = pause_marker(unsafe { libc::getppid() });
                let t0 = Instant::now();
                while !marker.exists() && t0.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                ex.start(b"200 OK").unwrap();
                ex.write(b"waited", true).unwrap();
            }
            b"/hop" => {
                ex.start(b"200 OK").unwrap();
                ex.header(b"Keep-Alive", b"timeout=5").unwrap();
                ex.header(b"Connection", b"close").unwrap();
                ex.write(b"hop", true).unwrap();
            }
            _ => {
                ex.start(b"404 Not Found").unwrap();
                ex.write(b"", true).unwrap();
            }
        }
    }
}

/// The file the `/pause` and `/wait` routes wait for; named after the test process.
fn pause_marker(test_pid: libc::pid_t) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("corral-engine-pause-{test_pid}"))
}

struct Worker {
    pid: libc::pid_t,
    port: u16,
}

impl Drop for Worker {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

fn start(threads: usize) -> Worker {
    start_with(threads, Duration::from_secs(1))
}

fn start_with(threads: usize, keepalive_timeout: Duration) -> Worker {
    let listener = Listener::bind(&Addr::parse("127.0.0.1:0").unwrap(), 64).unwrap();
    let port: u16 = listener.server_port.parse().unwrap();
    let config = Config {
        threads,
        header_timeout: Duration::from_secs(1),
        keepalive_timeout,
        graceful_timeout: Duration::from_secs(5),
        ..Config::default()
    };
    let scoreboard = Scoreboard::new(1, threads).unwrap();
    let info = ListenerInfo {
        server_name: listener.server_name.clone(),
        server_port: listener.server_port.clone(),
        is_unix: false,
        protocol: listener.protocol,
    };
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ctx = WorkerCtx {
            config,
            max_requests: None,
            listeners: vec![(listener.raw(), info)],
            slot: 0,
            age: 1,
            scoreboard,
            master: unsafe { libc::getppid() },
            access_sink: None,
            previous_program_serves: false,
        };
        let code = run_worker(TestApp, ctx);
        unsafe { libc::_exit(code) };
    }
    Worker { pid, port }
}

fn roundtrip(port: u16, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(raw).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn engine_end_to_end() {
    let w = start(2);

    // Keep-alive with pipelining: three responses on one connection, in order.
    let out = roundtrip(
        w.port,
        b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /stream HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 3, "{out}");
    assert!(out.contains("Content-Length: 5\r\n"), "{out}");
    assert!(out.contains("Transfer-Encoding: chunked\r\n"), "{out}");
    assert!(out.contains("\r\n\r\n4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"), "{out}");
    assert!(out.contains("Date: "), "{out}");

    // A chunked request body, echoed back.
    let out = roundtrip(
        w.port,
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert!(out.contains("hello world"), "{out}");

    // HTTP/1.0 without Content-Length: the close ends the body, no chunking.
    let out = roundtrip(w.port, b"GET /stream HTTP/1.0\r\n\r\n");
    assert!(out.ends_with("\r\n\r\none,two,three"), "{out}");
    assert!(!out.contains("chunked"), "{out}");

    // HEAD: the headers, no body.
    let out = roundtrip(w.port, b"HEAD /hello HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 200 OK") && out.ends_with("\r\n\r\n"), "{out}");

    // Expect: 100-continue is answered once the app reads the body.
    let mut s = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n").unwrap();
    let mut buf = [0u8; 25];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"ping").unwrap();
    // The response may arrive in several segments (head, chunk, last chunk):
    // read until the last chunk or the timeout.
    let mut rest = Vec::new();
    let mut chunk = [0u8; 512];
    while !rest.ends_with(b"0\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => rest.extend_from_slice(&chunk[..n]),
        }
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.ends_with("ping\r\n0\r\n\r\n"), "{rest}");

    // Smuggling attempt and malformed requests are refused with the right status.
    let out =
        roundtrip(w.port, b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    let out = roundtrip(w.port, b"POST /echo HTTP/1.1\r\nTransfer-Encoding: br, chunked\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 501 "), "{out}");
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
    assert!(roundtrip(w.port, long.as_bytes()).starts_with("HTTP/1.1 414 "));
    let out = roundtrip(
        w.port,
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");

    // The app sends fewer bytes than its Content-Length: the connection closes
    // after them, and a pipelined request is not answered as if all was well.
    let out = roundtrip(w.port, b"GET /short HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\n\r\n");
    assert!(out.ends_with("\r\n\r\n12345"), "{out}");

    // Hop-by-hop headers from the app are dropped, but for what its
    // `Connection: close` asks: the connection closes after the response
    // (roundtrip reads to the end), and a pipelined request is not answered.
    let out = roundtrip(w.port, b"GET /hop HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("\r\n\r\nhop"), "{out}");
    assert!(out.contains("\r\nConnection: close\r\n") && !out.contains("Keep-Alive"), "{out}");

    // An idle keep-alive connection is closed after the keep-alive timeout.
    let mut s = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t0 = Instant::now();
    let mut b = [0u8; 16];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    assert!(t0.elapsed() < Duration::from_secs(5));

    // SIGTERM: the in-flight request completes, then the worker exits 0.
    let mut slow = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    unsafe { libc::kill(w.pid, libc::SIGTERM) };
    let mut out = Vec::new();
    let _ = slow.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("slow done") && out.contains("Connection: close"), "{out}");
    let mut status = 0;
    unsafe { libc::waitpid(w.pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status}");
    std::mem::forget(w);
}

/// Reads from `s` until `want` has arrived, failing after the read timeout.
fn read_until(s: &mut TcpStream, got: &mut Vec<u8>, want: &[u8]) {
    let mut chunk = [0u8; 4096];
    while !got.windows(want.len()).any(|w| w == want) {
        match s.read(&mut chunk) {
            Ok(0) => panic!("connection closed before {:?}: {}", want, String::from_utf8_lossy(got)),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => {
                panic!("no {:?} yet ({e}): {}", String::from_utf8_lossy(want), String::from_utf8_lossy(got))
            }
        }
    }
}

#[test]
fn stream_blocks_are_not_held_back() {
    // Blocks that follow each other closely are gathered into one write;
    // they must still reach the client while the app waits before its next
    // block (PEP 3333), with one thread (responses of a pass held back) and
    // with several.
    for threads in [1, 3] {
        let marker = pause_marker(std::process::id() as libc::pid_t);
        let _ = std::fs::remove_file(&marker);
        let w = start(threads);
        let mut s = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /pause HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut got = Vec::new();
        // The app is now waiting for the marker: "second," must be here already.
        read_until(&mut s, &mut got, b"second,\r\n");
        std::fs::write(&marker, b"").unwrap();
        read_until(&mut s, &mut got, b"0\r\n\r\n");
        let text = String::from_utf8_lossy(&got);
        assert!(text.ends_with("\r\n\r\n6\r\nfirst,\r\n7\r\nsecond,\r\n5\r\nthird\r\n0\r\n\r\n"), "{text}");
        std::fs::remove_file(&marker).unwrap();

        // A finished response is held too (one thread writes those of a
        // pass together), but not until a slow request pipelined behind it
        // on the same connection is done.
        s.write_all(b"GET /hello HTTP/1.1\r\n\r\nGET /wait HTTP/1.1\r\n\r\n").unwrap();
        let mut got = Vec::new();
        read_until(&mut s, &mut got, b"\r\n\r\nhello");
        std::fs::write(&marker, b"").unwrap();
        read_until(&mut s, &mut got, b"\r\n\r\nwaited");
        std::fs::remove_file(&marker).unwrap();
    }
}

#[test]
fn responses_of_one_pass_reach_every_connection_in_order() {
    // One thread: the responses to connections that were ready together
    // are written after the pass; each connection must get its own, in
    // order, pipelined or not.
    let w = start(1);
    let mut conns: Vec<TcpStream> = (0..24)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        })
        .collect();
    for round in 0..5 {
        for (i, s) in conns.iter_mut().enumerate() {
            let pipelined = 1 + (i + round) % 3;
            let req = format!("POST /echo HTTP/1.1\r\nContent-Length: 8\r\n\r\nc{i:02}-r{round}-");
            let mut all = String::new();
            for k in 0..pipelined {
                all.push_str(&req);
                all.push_str(&format!("{k}"));
                // Each body is 8 bytes: "cNN-rR-K".
            }
            s.write_all(all.as_bytes()).unwrap();
        }
        for (i, s) in conns.iter_mut().enumerate() {
            let pipelined = 1 + (i + round) % 3;
            let mut got = Vec::new();
            let last = format!("c{i:02}-r{round}-{}", pipelined - 1);
            read_until(s, &mut got, last.as_bytes());
            let text = String::from_utf8_lossy(&got);
            let bodies: Vec<&str> =
                text.match_indices(&format!("c{i:02}-r{round}-")).map(|(at, _)| &text[at..at + 8]).collect();
            let want: Vec<String> = (0..pipelined).map(|k| format!("c{i:02}-r{round}-{k}")).collect();
            assert_eq!(bodies, want, "{text}");
        }
    }
}

#[test]
fn a_burst_of_pipelined_requests_is_served_to_the_end() {
    // One thread, whose connections stay armed edge-triggered between
    // requests: after a read that filled the buffer, more bytes may wait in
    // the socket while the buffer empties exactly at a request's end, and
    // no new event will come for them. 64-byte requests fill a read exactly.
    let w = start(1);
    let req = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Pad: 0123456789abcdefghijklm\r\n\r\n";
    assert_eq!(req.len(), 64);
    const COUNT: usize = 8192;
    let mut s = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut writer = s.try_clone().unwrap();
    // Written from another thread: the responses must be read meanwhile,
    // or both sides could end up blocked on full socket buffers.
    let sender = std::thread::spawn(move || {
        let burst: Vec<u8> = req.iter().copied().cycle().take(req.len() * COUNT).collect();
        writer.write_all(&burst).unwrap();
    });
    let mut got = Vec::new();
    let mut chunk = [0u8; 65536];
    let mut answered = 0;
    while answered < COUNT {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                // Counted over what is new, plus 4 bytes a body may straddle.
                let from = got.len().saturating_sub(4);
                got.extend_from_slice(&chunk[..n]);
                answered += got[from..].windows(5).filter(|w| w == b"hello").count();
            }
            Err(e) => panic!("after {answered} of {COUNT} responses: {e}"),
        }
    }
    sender.join().unwrap();
    assert_eq!(answered, COUNT);
}

#[test]
fn a_half_close_that_arrives_with_the_request_closes_the_connection() {
    // One thread, edge-triggered connections: the request and the client's
    // FIN reach the socket while the thread is busy elsewhere, so one event
    // covers both. The read that takes the request does not see the FIN;
    // the connection must still be closed after the response rather than
    // wait for its keep-alive timeout.
    let w = start_with(1, Duration::from_secs(60));
    let mut a = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    a.write_all(b"GET /hello HTTP/1.1\r\n\r\n").unwrap();
    let mut got = Vec::new();
    read_until(&mut a, &mut got, b"hello");
    // Keep the only thread busy, then send the next request and the FIN.
    let mut b = TcpStream::connect(("127.0.0.1", w.port)).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    b.write_all(b"GET /slow HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    a.write_all(b"GET /hello HTTP/1.1\r\n\r\n").unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let t0 = Instant::now();
    let end = a.read_to_end(&mut rest);
    assert!(end.is_ok(), "no end of stream after {:?}: {end:?}", t0.elapsed());
    assert!(String::from_utf8_lossy(&rest).ends_with("hello"), "{}", String::from_utf8_lossy(&rest));
    let mut slow = Vec::new();
    b.read_to_end(&mut slow).unwrap();
    assert!(String::from_utf8_lossy(&slow).ends_with("slow done"));
}

#[test]
fn a_panic_ends_the_worker_rather_than_its_thread_alone() {
    let w = start(2);
    let got = roundtrip(w.port, b"GET /panic HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(got, "", "the connection ends without a response");
    let mut status = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while unsafe { libc::waitpid(w.pid, &mut status, libc::WNOHANG) } == 0 {
        assert!(Instant::now() < deadline, "the worker is still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), corral_engine::worker::EXIT_PANIC);
}
