"""The ``corral`` console script.

``corral [OPTIONS] APP`` serves an app (see ``corral --help``);
``corral stats ADDR`` prints a running server's ``--stats`` JSON once and
``corral top ADDR`` shows it live. (An app module named ``stats`` or ``top``
is given as ``stats:application``.)
"""

import sys

from corral._corral import main as _main


def main() -> None:
    args = sys.argv[1:]
    if len(args) == 2 and args[0] in ("stats", "top"):
        from corral import monitor

        sys.exit(monitor.stats_main(args[1]) if args[0] == "stats" else monitor.top_main(args[1]))
    sys.exit(_main(["corral", *args]))


if __name__ == "__main__":
    main()
