//! `--reload`: watches Python source directories with inotify and tells
//! the master when a `.py` file changed, after a quiet period, so an editor
//! saving several files triggers one reload.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// How long the tree must stay quiet after a change before the reload.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Directories not worth watching: caches, virtualenvs, VCS metadata.
fn skipped(name: &str) -> bool {
    name.starts_with('.') || matches!(name, "__pycache__" | "node_modules" | "venv" | "env" | "site-packages")
}

pub struct Watcher {
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// The first change since the last reload, and the latest one.
    pending: Option<(PathBuf, Instant)>,
}

impl Watcher {
    /// Watches every directory under `roots` (recursively).
    pub fn new(roots: &[PathBuf]) -> Result<Watcher, String> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| format!("--reload: inotify: {e}"))?;
        let mut w = Watcher { inotify, dirs: HashMap::new(), pending: None };
        for root in roots {
            w.add_tree(root);
        }
        if w.dirs.is_empty() {
            return Err("--reload: no directory to watch".into());
        }
        Ok(w)
    }

    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    fn add_tree(&mut self, dir: &Path) {
        // IN_ATTRIB for a modification time set alone (`os.utime`, tools
        // that restore timestamps), which a polling reloader would notice.
        let flags = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ONLYDIR;
        let Ok(wd) = self.inotify.add_watch(dir, flags) else {
            return;
        };
        self.dirs.insert(wd, dir.to_path_buf());
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if e.file_type().is_ok_and(|t| t.is_dir()) && !skipped(&name.to_string_lossy()) {
                self.add_tree(&e.path());
            }
        }
    }

    pub fn raw(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }

    /// Reads what inotify has: notes changed `.py` files and watches new
    /// directories.
    pub fn read(&mut self) {
        while let Ok(events) = self.inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for ev in events {
                let Some(dir) = self.dirs.get(&ev.wd).cloned() else { continue };
                let Some(name) = ev.name else { continue };
                let path = dir.join(&name);
                let name = name.to_string_lossy();
                if ev.mask.contains(AddWatchFlags::IN_ISDIR) {
                    if ev.mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
                        && !skipped(&name)
                    {
                        self.add_tree(&path);
                    }
                    continue;
                }
                if name.ends_with(".py") {
                    let first = self.pending.take().map_or(path, |(p, _)| p);
                    self.pending = Some((first, Instant::now()));
                }
            }
        }
    }

    /// The first changed file, once the tree has been quiet for [`DEBOUNCE`].
    pub fn due(&mut self) -> Option<PathBuf> {
        match &self.pending {
            Some((_, last)) if last.elapsed() >= DEBOUNCE => self.pending.take().map(|(p, _)| p),
            _ => None,
        }
    }

    /// Milliseconds until a pending change is due, for the master's poll.
    pub fn wait_ms(&self) -> Option<i32> {
        self.pending.as_ref().map(|(_, last)| DEBOUNCE.saturating_sub(last.elapsed()).as_millis() as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_python_changes_in_new_directories() {
        let root = std::env::temp_dir().join(format!("corral-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("pkg")).unwrap();
        let mut w = Watcher::new(std::slice::from_ref(&root)).unwrap();
        assert_eq!(w.watched(), 2);
        std::fs::write(root.join("notes.txt"), "x").unwrap();
        w.read();
        assert!(w.wait_ms().is_none(), "a non-Python file is not a change");
        std::fs::create_dir(root.join("pkg/sub")).unwrap();
        w.read();
        std::fs::write(root.join("pkg/sub/mod.py"), "x = 1").unwrap();
        w.read();
        assert!(w.due().is_none(), "debounced");
        std::thread::sleep(DEBOUNCE + Duration::from_millis(50));
        assert_eq!(w.due(), Some(root.join("pkg/sub/mod.py")));
        assert!(w.due().is_none());
        // Only the modification time set, the content untouched.
        let path = std::ffi::CString::new(root.join("pkg/sub/mod.py").into_os_string().into_encoded_bytes())
            .unwrap();
        let times = [libc::timespec { tv_sec: 1_000_000, tv_nsec: 0 }; 2];
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) }, 0);
        w.read();
        std::thread::sleep(DEBOUNCE + Duration::from_millis(50));
        assert_eq!(w.due(), Some(root.join("pkg/sub/mod.py")));
        let _ = std::fs::remove_dir_all(&root);
    }
}
