//! `--reload` and `--touch-reload`: watches Python source directories and
//! named files with inotify and tells the master when a `.py` file changed
//! or a named file was touched, after a quiet period, so an editor saving
//! several files (or a deploy touching its file twice) triggers one reload.

use std::collections::HashMap;
use std::ffi::OsString;
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

/// A change that asks for a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A `.py` file under a `--reload` directory changed.
    Source(PathBuf),
    /// A `--touch-reload` file was touched, written, created or moved there.
    Touched(PathBuf),
}

pub struct Watcher {
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// Whether `.py` changes count (`--reload`), or only the touch files.
    sources: bool,
    /// `--touch-reload` files, by their directory's watch and their name, so
    /// a directory also reached by another path (a symlink) still matches.
    touch: HashMap<(WatchDescriptor, OsString), PathBuf>,
    /// Directories watched for `.py` changes (the first ones in `dirs`).
    source_dirs: usize,
    /// The first change since the last reload, and the latest one.
    pending: Option<(Change, Instant)>,
}

/// What every watched directory reports. IN_ATTRIB for a modification time
/// set alone (`touch`, `os.utime`, tools that restore timestamps), which a
/// polling reloader would notice. One mask for all: a directory watched for
/// both reasons has one watch, and adding it again replaces its mask.
fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ONLYDIR
}

impl Watcher {
    /// Watches every directory under `roots` (recursively) for `.py`
    /// changes, and the directory of each of `touch` for that file. A touch
    /// file need not exist yet (creating it counts), but its directory must.
    pub fn new(roots: &[PathBuf], touch: &[PathBuf]) -> Result<Watcher, String> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| format!("inotify: {e}"))?;
        let mut w = Watcher {
            inotify,
            dirs: HashMap::new(),
            sources: !roots.is_empty(),
            touch: HashMap::new(),
            source_dirs: 0,
            pending: None,
        };
        for root in roots {
            w.add_tree(root);
        }
        if w.sources && w.dirs.is_empty() {
            return Err("--reload: no directory to watch".into());
        }
        w.source_dirs = w.dirs.len();
        for file in touch {
            let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
                return Err(format!("--touch-reload {}: not a file name", file.display()));
            };
            let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
            let wd = w.inotify.add_watch(dir, mask()).map_err(|e| {
                format!("--touch-reload {}: cannot watch {}: {e}", file.display(), dir.display())
            })?;
            w.dirs.entry(wd).or_insert_with(|| dir.to_path_buf());
            w.touch.insert((wd, name.to_os_string()), file.clone());
        }
        Ok(w)
    }

    /// Directories watched for `.py` changes.
    pub fn watched(&self) -> usize {
        self.source_dirs
    }

    fn add_tree(&mut self, dir: &Path) {
        let Ok(wd) = self.inotify.add_watch(dir, mask()) else {
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
                let change = if let Some(file) = self.touch.get(&(ev.wd, name.clone())) {
                    // Removing the file, or renaming it away, is no touch.
                    let gone = AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM;
                    if ev.mask.intersects(gone) {
                        continue;
                    }
                    Change::Touched(file.clone())
                } else {
                    if !self.sources {
                        continue;
                    }
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
                    if !name.ends_with(".py") {
                        continue;
                    }
                    Change::Source(path)
                };
                let first = self.pending.take().map_or(change, |(c, _)| c);
                self.pending = Some((first, Instant::now()));
            }
        }
    }

    /// The first change, once everything watched has been quiet for [`DEBOUNCE`].
    pub fn due(&mut self) -> Option<Change> {
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
        let mut w = Watcher::new(std::slice::from_ref(&root), &[]).unwrap();
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
        assert_eq!(w.due(), Some(Change::Source(root.join("pkg/sub/mod.py"))));
        assert!(w.due().is_none());
        // Only the modification time set, the content untouched.
        let path = std::ffi::CString::new(root.join("pkg/sub/mod.py").into_os_string().into_encoded_bytes())
            .unwrap();
        let times = [libc::timespec { tv_sec: 1_000_000, tv_nsec: 0 }; 2];
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) }, 0);
        w.read();
        std::thread::sleep(DEBOUNCE + Duration::from_millis(50));
        assert_eq!(w.due(), Some(Change::Source(root.join("pkg/sub/mod.py"))));
        let _ = std::fs::remove_dir_all(&root);
    }

    fn settled(w: &mut Watcher) -> Option<Change> {
        w.read();
        std::thread::sleep(DEBOUNCE + Duration::from_millis(50));
        w.read();
        w.due()
    }

    #[test]
    fn touch_files_alone_or_inside_a_source_tree() {
        let root = std::env::temp_dir().join(format!("corral-touch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("deploy")).unwrap();
        let flag = root.join("deploy/reload");
        let in_tree = root.join("reload.txt");
        // Only touch files: .py changes next to them are not watched.
        let mut w = Watcher::new(&[], std::slice::from_ref(&flag)).unwrap();
        std::fs::write(root.join("deploy/app.py"), "x = 1").unwrap();
        std::fs::write(root.join("deploy/other"), "x").unwrap();
        assert_eq!(settled(&mut w), None);
        // Created (it did not exist), then written, then only its time set.
        std::fs::write(&flag, "").unwrap();
        assert_eq!(settled(&mut w), Some(Change::Touched(flag.clone())));
        std::fs::write(&flag, "again").unwrap();
        assert_eq!(settled(&mut w), Some(Change::Touched(flag.clone())));
        let c = std::ffi::CString::new(flag.clone().into_os_string().into_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0) }, 0);
        assert_eq!(settled(&mut w), Some(Change::Touched(flag.clone())));
        // Replaced by a rename (as deploy tools write files): a touch. Removed: not.
        std::fs::write(root.join("deploy/.tmp"), "new").unwrap();
        std::fs::rename(root.join("deploy/.tmp"), &flag).unwrap();
        assert_eq!(settled(&mut w), Some(Change::Touched(flag.clone())));
        std::fs::remove_file(&flag).unwrap();
        assert_eq!(settled(&mut w), None);
        // With --reload too, a touch file in a watched directory is still a touch.
        let mut w = Watcher::new(std::slice::from_ref(&root), std::slice::from_ref(&in_tree)).unwrap();
        std::fs::write(&in_tree, "").unwrap();
        assert_eq!(settled(&mut w), Some(Change::Touched(in_tree.clone())));
        std::fs::write(root.join("deploy/app.py"), "x = 2").unwrap();
        assert_eq!(settled(&mut w), Some(Change::Source(root.join("deploy/app.py"))));
        // A directory that does not exist is an error at start.
        let missing = root.join("nowhere/reload");
        let err = Watcher::new(&[], &[missing]).err().unwrap();
        assert!(err.starts_with("--touch-reload ") && err.contains("cannot watch"), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
