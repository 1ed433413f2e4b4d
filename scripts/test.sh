#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs every check: rustfmt, clippy, the
# Rust tests, ruff, the type stub (mypy's stubtest), and the end-to-end pytest suite. Extra arguments go to
# pytest (for example: scripts/test.sh -k conformance -x).
#
# Every check runs even when an earlier one failed, so one run shows every
# problem; the exit status is non-zero if any check failed.
set -euo pipefail
cd "$(dirname "$0")/.."

section() { printf '\n===== %s =====\n' "$*"; }

bash scripts/setup.sh

if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
# The PyO3 crate builds (and its tests link) against the same Python as the venv.
export PYO3_PYTHON="$PWD/.venv/bin/python"

failed=()
check() {
    local name="$1"
    shift
    section "$name"
    local start=$SECONDS
    if "$@"; then
        echo "--- $name: ok ($((SECONDS - start)) s)"
    else
        echo "--- $name: FAILED ($((SECONDS - start)) s)"
        failed+=("$name")
    fi
}

check "cargo fmt --all --check" cargo fmt --all --check
check "cargo clippy --workspace --all-targets -- -D warnings" \
    cargo clippy --workspace --all-targets --quiet -- -D warnings
check "cargo test --workspace" cargo test --workspace --quiet
check "ruff check" .venv/bin/ruff check tests python examples bench
check "ruff format --check" .venv/bin/ruff format --check tests python examples bench
# The native module's type stub against the module itself.
check "stubtest corral" .venv/bin/python -m mypy.stubtest corral
check "pytest" .venv/bin/pytest -q tests "$@"

section "summary"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all checks passed"
