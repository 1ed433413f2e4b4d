//! uWSGI's option names, and what corral takes in their place: the hint an
//! unknown option or config key gets when it is one of them, since clap's
//! "similar argument" guess is by spelling (`--socket` -> `--socket-mode`)
//! and misleads anyone moving a uwsgi.ini over.

/// uWSGI option (without dashes) -> what to write for corral.
const EQUIVALENTS: &[(&str, &str)] = &[
    ("module", "the APP argument (MODULE:CALLABLE)"),
    ("wsgi-file", "the APP argument (MODULE:CALLABLE, with --chdir or --pythonpath to find it)"),
    ("wsgi", "the APP argument (MODULE:CALLABLE)"),
    ("callable", "the APP argument (MODULE:CALLABLE)"),
    ("socket", "--uwsgi ADDR (the uwsgi protocol), or --http ADDR"),
    ("uwsgi-socket", "--uwsgi ADDR"),
    ("http-socket", "--http ADDR"),
    ("fastcgi-socket", "--fastcgi ADDR"),
    ("scgi-socket", "--scgi ADDR"),
    ("chmod-socket", "--socket-mode MODE"),
    ("chown-socket", "--socket-owner USER[:GROUP]"),
    ("processes", "--workers N"),
    ("harakiri", "--timeout SECS (504 to the client, the worker replaced)"),
    ("limit-post", "--max-body-size BYTES"),
    ("logto", "--error-log FILE"),
    ("logto2", "--error-log FILE"),
    ("logger", "--error-log FILE"),
    ("req-logger", "--access-log FILE"),
    ("disable-logging", "nothing: no access log is written unless --access-log is given"),
    ("uid", "--user USER"),
    ("gid", "--group GROUP"),
    ("daemonize", "--daemon with --error-log FILE"),
    ("listen", "--backlog N"),
    ("ini", "--config FILE (TOML: the same keys as the long options)"),
    ("home", "nothing: install corral into the app's virtualenv and run that corral"),
    ("virtualenv", "nothing: install corral into the app's virtualenv and run that corral"),
    ("venv", "nothing: install corral into the app's virtualenv and run that corral"),
    ("master", "nothing: corral always runs a master"),
    ("vacuum", "nothing: corral removes its socket and pid files at exit"),
    ("die-on-term", "nothing: SIGTERM stops corral gracefully"),
    ("enable-threads", "nothing: the app may start threads; --threads N sets the serving threads"),
    ("lazy-apps", "nothing: each worker imports the app unless --preload is given"),
    ("need-app", "nothing: corral exits when the app cannot be imported"),
    ("thunder-lock", "nothing: workers take connections without a lock stampede"),
    ("single-interpreter", "nothing: each worker has one interpreter"),
    ("post-buffering", "nothing: behind a front end, a body the app did not read is read and dropped"),
    ("buffer-size", "nothing: a uwsgi vars block may use the protocol's whole 64 KiB"),
    ("reload-mercy", "--graceful-timeout SECS"),
    ("worker-reload-mercy", "--graceful-timeout SECS"),
    ("py-autoreload", "--reload"),
    ("stats-http", "--stats ADDR"),
    // A uwsgi.ini's section header, when the rest of the file is valid TOML.
    ("uwsgi", "top-level keys named as the long options (no [uwsgi] section)"),
];

/// What corral takes in place of uWSGI's `name` (without dashes), if it is
/// one of uWSGI's options corral spells differently.
pub fn equivalent(name: &str) -> Option<&'static str> {
    let name = name.trim_start_matches('-').replace('_', "-");
    EQUIVALENTS.iter().find(|(u, _)| *u == name).map(|(_, c)| *c)
}

/// Whether a file that is not TOML looks like a uWSGI ini file.
pub fn looks_like_uwsgi_ini(text: &str) -> bool {
    text.lines().map(str::trim).any(|l| l.eq_ignore_ascii_case("[uwsgi]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(equivalent("--harakiri"), Some("--timeout SECS (504 to the client, the worker replaced)"));
        assert_eq!(equivalent("chmod_socket"), Some("--socket-mode MODE"));
        assert_eq!(equivalent("workers"), None);
        assert!(looks_like_uwsgi_ini("; deploy\n[uwsgi]\nmodule = x\n"));
        assert!(!looks_like_uwsgi_ini("workers = 2\n"));
    }
}
