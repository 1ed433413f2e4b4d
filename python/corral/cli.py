"""The ``corral`` console script.

``corral [OPTIONS] APP`` serves an app (see ``corral --help``);
``corral stats ADDR`` prints a running server's ``--stats`` JSON once and
``corral top ADDR`` shows it live; ``corral signal NAME PIDFILE`` sends a
running master a signal by name (HUP, TERM, INT, QUIT, USR1, USR2, TTIN,
TTOU). (An app module named ``stats``, ``top`` or ``signal`` is given as
``stats:application``.)
"""

import sys

from corral._corral import main as _main


def _check_usage(args: list, count: int, usage: str) -> None:
    """Exits with the usage: on stdout for --help, on stderr for a wrong count of arguments."""
    if args[1:] in (["-h"], ["--help"]):
        print(usage)
        sys.exit(0)
    if len(args) != count:
        print(usage, file=sys.stderr)
        sys.exit(2)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] in (["stats"], ["top"]):
        usage = (
            f"usage: corral {args[0]} ADDR   (the --stats address: HOST:PORT, http://HOST:PORT or unix:PATH)"
        )
        _check_usage(args, 2, usage)
        from corral import monitor

        sys.exit(monitor.stats_main(args[1]) if args[0] == "stats" else monitor.top_main(args[1]))
    if args[:1] == ["signal"]:
        _check_usage(
            args,
            3,
            "usage: corral signal NAME PIDFILE   (NAME: HUP, TERM, INT, QUIT, USR1, USR2, TTIN or TTOU)",
        )
        from corral import control

        sys.exit(control.signal_main(args[1], args[2]))
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            # Bytes the file system encoding could not decode (a path named in
            # Latin-1, say) come as lone surrogates, which the server cannot take.
            shown = arg.encode("utf-8", "backslashreplace").decode()
            print(
                f"corral: the argument {shown!r} is not valid UTF-8; name the path another way",
                file=sys.stderr,
            )
            sys.exit(2)
    sys.exit(_main(["corral", *args]))


if __name__ == "__main__":
    main()
