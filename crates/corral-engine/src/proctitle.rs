//! Process titles: what `ps`, `top` and `htop` show for the master and for
//! each worker (`corral: master [myapp]`, `corral: worker 2 [myapp]`), as
//! gunicorn does with setproctitle and uWSGI with its procname options.
//!
//! The kernel shows a process's command line from the memory its arguments
//! were passed in (`/proc/PID/cmdline` reads `arg_start..arg_end` of the
//! process), so a title is written over those bytes. Nothing else of ours
//! reads them afterwards: the interpreter copied its arguments at start
//! (`sys.orig_argv`, which a re-exec uses). A title longer than the original
//! command line loses its bracketed part (`corral: worker 2`), then is cut
//! to that length.

use std::sync::OnceLock;

/// The original arguments' memory: (start address, length).
static AREA: OnceLock<Option<(usize, usize)>> = OnceLock::new();

/// The process's name (`/proc/PID/comm`, which `pgrep`, `pidof`, `top`
/// and `ss -p` show) at the first start, given to the program a re-exec
/// runs: that one is the interpreter run again (`python`), and would go by
/// its name instead.
pub const NAME_ENV: &str = "CORRAL_PROCESS_NAME";

/// The process's name now (see [`NAME_ENV`]).
pub fn name() -> Option<String> {
    let comm = std::fs::read_to_string("/proc/self/comm").ok()?;
    Some(comm.trim_end_matches('\n').to_string()).filter(|c| !c.is_empty())
}

/// Finds the arguments' memory, and takes back the name of the first start
/// after a re-exec (see [`NAME_ENV`]). Call once at start, before any fork
/// (each worker then writes its own copy) and before any thread.
pub fn init() {
    if let Some(name) = std::env::var_os(NAME_ENV) {
        // Before any thread: nothing reads the environment meanwhile.
        std::env::remove_var(NAME_ENV);
        if let Ok(name) = std::ffi::CString::new(name.as_encoded_bytes()) {
            // The kernel keeps 15 bytes of it.
            unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
        }
    }
    AREA.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses;
        // the fields after its closing one start with field 3 (state).
        let rest: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
        let field = |n: usize| rest.get(n - 3)?.parse::<usize>().ok();
        let (start, end) = (field(48)?, field(49)?);
        (start != 0 && end > start).then_some((start, end - start))
    });
}

/// Shows `title` as this process's command line.
pub fn set(title: &str) {
    let Some(&Some((start, len))) = AREA.get() else {
        return;
    };
    let fits = |t: &str| t.len() < len;
    let title = match title.find(" [") {
        Some(i) if !fits(title) => &title[..i],
        _ => title,
    };
    let bytes = title.as_bytes();
    // One NUL at least at the end: with a last byte other than NUL the
    // kernel would read on into the environment, taking it for a longer
    // title.
    let n = bytes.len().min(len - 1);
    // SAFETY: [start, start + len) is this process's argument memory, mapped
    // writable for its whole life (the initial stack); only this module
    // writes it, from the process's one thread at start or after a fork.
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, len);
        area[..n].copy_from_slice(&bytes[..n]);
        area[n..].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this process's command line without allocating (as after a fork).
    fn cmdline(buf: &mut [u8]) -> &[u8] {
        let fd = unsafe { libc::open(c"/proc/self/cmdline".as_ptr(), libc::O_RDONLY) };
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        unsafe { libc::close(fd) };
        &buf[..n.max(0) as usize]
    }

    /// In a child process, so the test runner's own command line is
    /// untouched; the child allocates nothing (the runner has threads).
    #[test]
    fn the_command_line_shows_the_title() {
        init();
        let Some(&Some((_, len))) = AREA.get() else {
            panic!("no argument memory found in /proc/self/stat");
        };
        let long = "x".repeat(len + 10);
        let bracketed = format!("corral: worker 3 [{}]", "n".repeat(len));
        let mut buf = vec![0u8; len + 4096];
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            set("corral: worker 3 [app]");
            let first = cmdline(&mut buf);
            let ok_first =
                first.starts_with(b"corral: worker 3 [app]\0") && first[22..].iter().all(|&b| b == 0);
            set(&long);
            let cut = cmdline(&mut buf);
            let ok_cut = cut.len() <= len && cut.iter().take_while(|&&b| b == b'x').count() == len - 1;
            // Too long with a bracketed name: the name goes first.
            set(&bracketed);
            let short = cmdline(&mut buf);
            let ok_short = short.starts_with(b"corral: worker 3\0") && short[16..].iter().all(|&b| b == 0);
            unsafe { libc::_exit(if ok_first && ok_cut && ok_short { 0 } else { 1 }) };
        }
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status}");
    }
}
