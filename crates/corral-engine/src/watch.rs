//! `--reload`: watches Python source directories with inotify and tells
//! the master when a `.py` file changed, after a quiet period, so an editor
//! saving several files triggers one reload.
//!
//! `--touch-reload`: files whose modification the master looks for once a
//! second, by their path, as uWSGI does: a path through a symlink that a
//! deploy switches (`current -> releases/42`), a directory replaced or not
//! there yet all work, which a watch on one directory's inode would miss.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// How long the tree must stay quiet after a change before the reload.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Directories not worth watching: caches, VCS metadata and virtualenvs,
/// none of which can hold a package the app imports by name (`.git`,
/// `site-packages`), and a virtualenv by its `pyvenv.cfg`, whatever its name:
/// a package named `env` (`settings/env/prod.py`) is the app's own code.
fn skipped(name: &str, path: &Path) -> bool {
    name.starts_with('.')
        || matches!(name, "__pycache__" | "node_modules" | "site-packages")
        || path.join("pyvenv.cfg").is_file()
}

/// Whether `dir` is on a filesystem the kernel makes up (/proc, /sys and
/// the like): no code lives there, and /proc alone holds tens of thousands
/// of directories, which a `--reload` started from `/` walked before the
/// first worker could boot.
fn pseudo_fs(dir: &Path) -> bool {
    use nix::sys::statfs::{statfs, FsType, PROC_SUPER_MAGIC, SYSFS_MAGIC};
    const PSEUDO: [FsType; 9] = [
        PROC_SUPER_MAGIC,
        SYSFS_MAGIC,
        FsType(0x1cd1),     // devpts
        FsType(0x63677270), // cgroup2
        FsType(0x27e0eb),   // cgroup
        FsType(0x64626720), // debugfs
        FsType(0x74726163), // tracefs
        FsType(0x73636673), // securityfs
        FsType(0xcafe4a11), // bpf
    ];
    statfs(dir).is_ok_and(|fs| PSEUDO.contains(&fs.filesystem_type()))
}

/// Files editors make beside the one edited, which no import reads: Emacs's
/// lock (`.#app.py`, a dangling symlink made at the first change of a
/// buffer) and its syntax checkers' copies (`flycheck_app.py`,
/// `app_flymake.py`); hidden files in general.
fn editor_scratch(name: &str) -> bool {
    name.starts_with('.') || name.starts_with("flycheck_") || name.ends_with("_flymake.py")
}

pub struct Watcher {
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// Directories watched alone, without what is below them.
    shallow: std::collections::HashSet<WatchDescriptor>,
    /// The first change since the last reload, and the latest one.
    pending: Option<(PathBuf, Instant)>,
    /// Directories that could not be watched, and the first of them with why.
    unwatched: (usize, Option<String>),
}

impl Watcher {
    /// Watches every directory under `roots` (recursively).
    // IN_ATTRIB for a modification time set alone (`os.utime`, tools that
    // restore timestamps), which a polling reloader would notice.
    const FLAGS: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
        .union(AddWatchFlags::IN_ATTRIB)
        .union(AddWatchFlags::IN_MOVED_TO)
        .union(AddWatchFlags::IN_MOVED_FROM)
        .union(AddWatchFlags::IN_CREATE)
        .union(AddWatchFlags::IN_DELETE)
        .union(AddWatchFlags::IN_ONLYDIR);

    pub fn new(roots: &[PathBuf]) -> Result<Watcher, String> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| format!("--reload: inotify: {e}"))?;
        let mut w = Watcher {
            inotify,
            dirs: HashMap::new(),
            shallow: Default::default(),
            pending: None,
            unwatched: (0, None),
        };
        for root in roots {
            w.add_tree(root);
        }
        if w.dirs.is_empty() {
            return Err("--reload: no directory to watch".into());
        }
        Ok(w)
    }

    /// Watches `dir` itself, not the directories below it: the directory
    /// of an app file given by its path, which may be one as large as $HOME.
    pub fn add_dir(&mut self, dir: &Path) {
        if self.dirs.values().any(|d| d == dir) {
            return;
        }
        match self.inotify.add_watch(dir, Self::FLAGS) {
            Ok(wd) => {
                self.dirs.insert(wd, dir.to_path_buf());
                self.shallow.insert(wd);
            }
            Err(e) => self.failed(dir, e),
        }
    }

    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    /// How many directories could not be watched (changes there reload
    /// nothing), and the first of them with why.
    pub fn unwatched(&self) -> (usize, Option<&str>) {
        (self.unwatched.0, self.unwatched.1.as_deref())
    }

    fn failed(&mut self, dir: &Path, e: nix::Error) {
        self.unwatched.0 += 1;
        if self.unwatched.1.is_none() {
            let hint = match e {
                nix::Error::ENOSPC => " (the limit of inotify watches, sysctl fs.inotify.max_user_watches)",
                _ => "",
            };
            self.unwatched.1 = Some(format!("{}: {e}{hint}", dir.display()));
        }
    }

    /// Watches `dir` and the directories below it, those behind symlinks
    /// included (a package linked into the project, as gunicorn's reloader
    /// follows it through the imported modules' paths).
    fn add_tree(&mut self, dir: &Path) {
        let wd = match self.inotify.add_watch(dir, Self::FLAGS) {
            Ok(wd) => wd,
            Err(e) => return self.failed(dir, e),
        };
        // inotify gives a directory watched already its descriptor again: a
        // symlink back up the tree, or a second way to one, ends here.
        if self.dirs.contains_key(&wd) {
            return;
        }
        self.dirs.insert(wd, dir.to_path_buf());
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir() || t.is_symlink() && e.path().is_dir());
            if is_dir && !skipped(&name.to_string_lossy(), &e.path()) && !pseudo_fs(&e.path()) {
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
                    if skipped(&name, &path) || self.shallow.contains(&ev.wd) {
                        continue;
                    }
                    if ev.mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                        // Its watches follow the inode, under the old name:
                        // dropped, and made anew if it moved within the tree.
                        let gone: Vec<WatchDescriptor> = self
                            .dirs
                            .iter()
                            .filter(|(_, d)| d.starts_with(&path))
                            .map(|(wd, _)| *wd)
                            .collect();
                        for wd in gone {
                            self.dirs.remove(&wd);
                            let _ = self.inotify.rm_watch(wd);
                        }
                    }
                    if ev.mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
                        self.add_tree(&path);
                    }
                    // A package renamed, moved in or out, or deleted: what
                    // imports it now finds something else (or nothing).
                    // A directory just made holds no module yet.
                    if ev.mask.intersects(
                        AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_DELETE,
                    ) {
                        let first = self.pending.take().map_or(path, |(p, _)| p);
                        self.pending = Some((first, Instant::now()));
                    }
                    continue;
                }
                if name.ends_with(".py") && !editor_scratch(&name) {
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

/// How often the master looks at `--touch-reload` files.
pub const TOUCH_POLL: Duration = Duration::from_secs(1);

/// What identifies one state of a touch file: the file the path leads to
/// (device, inode) and its modification time; not the change time, which
/// chmod, chown or a new hard link move too.
type Stamp = (u64, u64, i64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec()))
}

/// `--touch-reload` files and how each looked when last seen.
pub struct TouchFiles {
    files: Vec<(PathBuf, Option<Stamp>)>,
    next: Instant,
}

impl TouchFiles {
    pub fn new(paths: &[PathBuf]) -> TouchFiles {
        TouchFiles {
            files: paths.iter().map(|p| (p.clone(), stamp(p))).collect(),
            next: Instant::now() + TOUCH_POLL,
        }
    }

    /// Whether each file exists now, for the start-up log.
    pub fn present(&self) -> impl Iterator<Item = (&Path, bool)> {
        self.files.iter().map(|(p, s)| (p.as_path(), s.is_some()))
    }

    /// Milliseconds until the next look, for the master's poll.
    pub fn wait_ms(&self) -> i32 {
        self.next.saturating_duration_since(Instant::now()).as_millis() as i32
    }

    /// A file touched, written, created or replaced since the last look
    /// (once a second at most); removing one is no touch.
    pub fn changed(&mut self) -> Option<PathBuf> {
        if Instant::now() < self.next {
            return None;
        }
        self.next = Instant::now() + TOUCH_POLL;
        let mut first = None;
        for (path, seen) in &mut self.files {
            let now = stamp(path);
            if now.is_some() && now != *seen && first.is_none() {
                first = Some(path.clone());
            }
            *seen = now;
        }
        first
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_kernels_made_up_filesystems_are_not_walked() {
        assert!(super::pseudo_fs(std::path::Path::new("/proc")));
        assert!(super::pseudo_fs(std::path::Path::new("/proc/self")));
        assert!(super::pseudo_fs(std::path::Path::new("/sys")));
        assert!(!super::pseudo_fs(&std::env::temp_dir()));
        assert!(!super::pseudo_fs(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))));
    }
    use super::*;

    #[test]
    fn sees_python_changes_in_new_directories() {
        let root = std::env::temp_dir().join(format!("corral-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("pkg")).unwrap();
        let mut w = Watcher::new(std::slice::from_ref(&root)).unwrap();
        assert_eq!(w.watched(), 2);
        assert_eq!(w.unwatched(), (0, None));
        // One that cannot be watched is counted, and named with why.
        w.add_dir(&root.join("gone"));
        let (n, first) = w.unwatched();
        assert!(n == 1 && first.is_some_and(|f| f.contains("gone: ENOENT")), "{first:?}");
        std::fs::write(root.join("notes.txt"), "x").unwrap();
        w.read();
        assert!(w.wait_ms().is_none(), "a non-Python file is not a change");
        std::os::unix::fs::symlink("root@host.1:1", root.join(".#app.py")).unwrap();
        std::fs::write(root.join("flycheck_app.py"), "x").unwrap();
        w.read();
        assert!(w.wait_ms().is_none(), "an editor's lock or scratch copy is not a change");
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

    #[test]
    fn follows_symlinked_directories_without_looping() {
        let base = std::env::temp_dir().join(format!("corral-watch-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (root, real) = (base.join("project"), base.join("realpkg"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(real.join("sub")).unwrap();
        std::os::unix::fs::symlink(&real, root.join("pkg")).unwrap();
        // A loop back up the tree, and a second way to the same package.
        std::os::unix::fs::symlink(&root, real.join("sub/up")).unwrap();
        std::os::unix::fs::symlink(&real, root.join("again")).unwrap();
        let mut w = Watcher::new(std::slice::from_ref(&root)).unwrap();
        assert_eq!(w.watched(), 3, "project, realpkg and realpkg/sub, each once");
        std::fs::write(real.join("sub/mod.py"), "x = 1").unwrap();
        w.read();
        std::thread::sleep(DEBOUNCE + Duration::from_millis(50));
        assert!(w.due().is_some_and(|p| p.ends_with("sub/mod.py")));
        let _ = std::fs::remove_dir_all(&base);
    }

    fn settle(w: &mut Watcher) -> Option<PathBuf> {
        w.read();
        std::thread::sleep(DEBOUNCE + Duration::from_millis(50));
        w.due()
    }

    #[test]
    fn a_package_named_env_is_watched_and_a_virtualenv_is_not() {
        let root = std::env::temp_dir().join(format!("corral-watch-env-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("settings/env")).unwrap();
        std::fs::create_dir_all(root.join("env/lib")).unwrap();
        std::fs::write(root.join("env/pyvenv.cfg"), "home = /usr/bin\n").unwrap();
        std::fs::create_dir_all(root.join("tools/.venv")).unwrap();
        let mut w = Watcher::new(std::slice::from_ref(&root)).unwrap();
        assert_eq!(w.watched(), 4, "the root, settings, settings/env and tools");
        std::fs::write(root.join("env/lib/site.py"), "x").unwrap();
        assert_eq!(settle(&mut w), None);
        std::fs::write(root.join("settings/env/prod.py"), "x").unwrap();
        assert_eq!(settle(&mut w), Some(root.join("settings/env/prod.py")));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_package_renamed_or_removed_is_a_change_and_is_named_by_its_new_path() {
        let root = std::env::temp_dir().join(format!("corral-watch-mv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("pkg/sub")).unwrap();
        let mut w = Watcher::new(std::slice::from_ref(&root)).unwrap();
        std::fs::rename(root.join("pkg"), root.join("pkg_old")).unwrap();
        assert_eq!(settle(&mut w), Some(root.join("pkg")));
        std::fs::write(root.join("pkg_old/sub/mod.py"), "x").unwrap();
        assert_eq!(settle(&mut w), Some(root.join("pkg_old/sub/mod.py")));
        std::fs::remove_dir_all(root.join("pkg_old")).unwrap();
        assert!(settle(&mut w).is_some_and(|p| p.starts_with(root.join("pkg_old"))));
        let _ = std::fs::remove_dir_all(&root);
    }

    fn looked(t: &mut TouchFiles) -> Option<PathBuf> {
        t.next = Instant::now();
        t.changed()
    }

    #[test]
    fn touch_files_by_path_through_symlinks() {
        let root = std::env::temp_dir().join(format!("corral-touch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for r in ["releases/1/tmp", "releases/2/tmp"] {
            std::fs::create_dir_all(root.join(r)).unwrap();
        }
        std::os::unix::fs::symlink("releases/1", root.join("current")).unwrap();
        let flag = root.join("current/tmp/restart.txt");
        let mut t = TouchFiles::new(std::slice::from_ref(&flag));
        assert_eq!(t.present().collect::<Vec<_>>(), vec![(flag.as_path(), false)]);
        assert_eq!(looked(&mut t), None);
        // Created; then its times set (`touch`); then written.
        std::fs::write(&flag, "").unwrap();
        assert_eq!(looked(&mut t), Some(flag.clone()));
        assert_eq!(looked(&mut t), None, "seen once");
        let c = std::ffi::CString::new(flag.clone().into_os_string().into_encoded_bytes()).unwrap();
        let times = [libc::timespec { tv_sec: 1_000_000, tv_nsec: 0 }; 2];
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) }, 0);
        assert_eq!(looked(&mut t), Some(flag.clone()));
        std::fs::write(&flag, "x").unwrap();
        assert_eq!(looked(&mut t), Some(flag.clone()));
        // The deploy switches the symlink and touches the new release's file.
        std::fs::write(root.join("releases/2/tmp/restart.txt"), "").unwrap();
        std::fs::remove_file(root.join("current")).unwrap();
        std::os::unix::fs::symlink("releases/2", root.join("current")).unwrap();
        assert_eq!(looked(&mut t), Some(flag.clone()));
        // Removed: no touch; not looked at again before a second passed.
        std::fs::remove_file(root.join("releases/2/tmp/restart.txt")).unwrap();
        assert_eq!(looked(&mut t), None);
        std::fs::write(&flag, "").unwrap();
        assert_eq!(t.changed(), None, "within the second");
        assert_eq!(looked(&mut t), Some(flag.clone()));
        let _ = std::fs::remove_dir_all(&root);
    }
}
