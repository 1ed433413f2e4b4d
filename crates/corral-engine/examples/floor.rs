//! Two backends with no Python in them, for measuring what a request costs
//! a front end's backend before any application runs (`bench/frontends.py`
//! runs them with `--floor`).
//!
//! - `floor engine PROTOCOL ADDR`: corral's engine (one worker, one thread)
//!   with a Rust app answering every request with "Hello, World!". The
//!   difference from corral with the WSGI hello app is what Python and
//!   PEP 3333 cost.
//! - `floor raw ADDR`: a uwsgi backend reduced to the system calls the
//!   protocol needs: a blocking accept, a read, one write and a close per
//!   request, no epoll and no parsing beyond the packet's length (it sleeps
//!   in accept when the front end is slower, as any backend sleeps
//!   somewhere). Every uwsgi backend makes these four calls per request, so
//!   this is about the least one can spend on the same kernel: the line a
//!   speed target for backends has to be read against.
//!
//! ADDR is `HOST:PORT` or `unix:/path`.

use std::io;
use std::os::fd::RawFd;

use corral_engine::scoreboard::Scoreboard;
use corral_engine::{
    run_worker, Addr, App, Config, Exchange, Listener, ListenerInfo, Protocol, Request, WorkerCtx,
};

const BODY: &[u8] = b"Hello, World!";

struct Hello;

impl App for Hello {
    type Thread = ();

    fn thread_start(&self, _: usize) {}

    fn call(&self, _: &mut (), _: &Request<'_>, ex: &mut Exchange) {
        // Errors mean the peer went away; the engine logs and closes.
        let _ = ex.start(b"200 OK");
        let _ = ex.header(b"Content-Type", b"text/plain");
        let _ = ex.write(BODY, true);
    }
}

fn engine(protocol: Protocol, addr: &Addr) -> Result<i32, String> {
    let mut listener = Listener::bind(addr, 2048)?;
    listener.protocol = protocol;
    let info = ListenerInfo {
        server_name: listener.server_name.clone(),
        server_port: listener.server_port.clone(),
        is_unix: listener.is_unix,
        protocol,
    };
    let scoreboard = Scoreboard::new(1, 1).map_err(|e| format!("scoreboard: {e}"))?;
    let ctx = WorkerCtx {
        config: Config { threads: 1, ..Config::default() },
        max_requests: None,
        listeners: vec![(listener.raw(), info)],
        slot: 0,
        age: 1,
        scoreboard,
        master: unsafe { libc::getppid() },
        access_sink: None,
        previous_program_serves: false,
    };
    // `listener` stays alive (and its unix socket file in place) while the worker runs.
    let code = run_worker(Hello, ctx);
    drop(listener);
    Ok(code)
}

/// Reads one uwsgi packet (4-byte header, then its variables) into `buf`.
fn read_packet(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    loop {
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n as usize;
        if got >= 4 {
            let want = 4 + u16::from_le_bytes([buf[1], buf[2]]) as usize;
            if got >= want {
                return Ok(());
            }
        }
        if got == buf.len() {
            return Err(io::ErrorKind::InvalidData.into());
        }
    }
}

fn raw(addr: &Addr) -> Result<i32, String> {
    let listener = Listener::bind(addr, 2048)?;
    let lfd = listener.raw();
    // Blocking accepts: the listener was made non-blocking for the engine.
    unsafe { libc::fcntl(lfd, libc::F_SETFL, 0) };
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\nHello, World!",
        BODY.len()
    );
    let mut buf = vec![0u8; 65536 + 4];
    loop {
        let fd =
            unsafe { libc::accept4(lfd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("accept: {e}"));
        }
        if read_packet(fd, &mut buf).is_ok() {
            unsafe { libc::write(fd, reply.as_ptr().cast(), reply.len()) };
        }
        unsafe { libc::close(fd) };
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: floor engine http|uwsgi|fastcgi|scgi ADDR | floor raw ADDR";
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["engine", proto, addr] => {
            let protocol = match *proto {
                "http" => Protocol::Http,
                "uwsgi" => Protocol::Uwsgi,
                "fastcgi" => Protocol::FastCgi,
                "scgi" => Protocol::Scgi,
                _ => {
                    eprintln!("{usage}");
                    std::process::exit(2);
                }
            };
            Addr::parse(addr).and_then(|a| engine(protocol, &a))
        }
        ["raw", addr] => Addr::parse(addr).and_then(|a| raw(&a)),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("floor: {e}");
            std::process::exit(1);
        }
    }
}
