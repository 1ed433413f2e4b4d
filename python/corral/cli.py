"""The ``corral`` console script."""

import sys

from corral._corral import main as _main


def main() -> None:
    sys.exit(_main(["corral", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
