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
    (
        "logto",
        "--error-log FILE with --capture-output (the app's stdout and stderr go there too, as under uWSGI)",
    ),
    ("logto2", "--error-log FILE with --capture-output"),
    ("logger", "--error-log FILE with --capture-output"),
    ("log-reopen", "nothing: USR1 (and HUP) reopen the log files"),
    ("log-master", "nothing: master and workers write to the one --error-log"),
    ("harakiri-verbose", "nothing: --timeout logs the stuck thread's Python stack"),
    ("plugins", "nothing: corral serves WSGI apps with the Python it is installed in"),
    ("plugin", "nothing: corral serves WSGI apps with the Python it is installed in"),
    ("manage-script-name", "--mount PREFIX (the prefix goes to SCRIPT_NAME, the rest to PATH_INFO)"),
    ("static-map", "--static-map /URL=DIR (or =FILE; what is not there goes on to the app)"),
    ("check-static", "--static-map /=DIR (the app answers what DIR has not)"),
    ("cheaper", "--workers-min N with --workers-max M (the adaptive pool)"),
    ("cheaper-algo", "--workers-min N with --workers-max M (the adaptive pool)"),
    ("max-requests-delta", "--max-requests-jitter J"),
    ("offload-threads", "nothing: large downloads are sent by an offload thread already"),
    ("procname-prefix", "--name NAME (process titles are `corral: worker N [NAME]`)"),
    ("procname", "--name NAME (process titles are `corral: worker N [NAME]`)"),
    ("auto-procname", "nothing: process titles name the master and each worker (--name NAME sets the name)"),
    ("memory-report", "--stats ADDR (each worker's resident memory is in /stats and /metrics)"),
    ("strict", "nothing: corral refuses unknown options and keys"),
    ("touch-chain-reload", "--touch-reload FILE (workers are replaced one ready replacement at a time)"),
    ("pidfile2", "--pidfile FILE (written before --user takes effect; corral removes it at exit)"),
    ("max-fd", "`ulimit -n` (LimitNOFILE= under systemd), with --max-connections N"),
    ("stop", "`corral signal TERM PIDFILE` (a graceful stop)"),
    ("req-logger", "--access-log FILE"),
    ("disable-logging", "nothing: no access log is written unless --access-log is given"),
    ("uid", "--user USER"),
    ("gid", "--group GROUP"),
    ("daemonize", "--daemon with --error-log FILE"),
    ("listen", "--backlog N"),
    ("ini", "--config FILE.ini (its [uwsgi] section is translated), or --config FILE.toml"),
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
