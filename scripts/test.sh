#!/usr/bin/env bash
# Sets up, then runs every check: formatting, lints, Rust tests, Python lints
# and the end-to-end pytest suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
echo "== cargo test (codecs and engine, no libpython)"
cargo test -q
echo "== ruff"
.venv/bin/ruff check python tests examples
.venv/bin/ruff format --check python tests examples
echo "== pytest"
.venv/bin/pytest -q tests "$@"
