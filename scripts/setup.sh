#!/usr/bin/env bash
# Installs what corral's demo and tests need on a fresh Debian machine (as
# root, with Rust and Python 3 present), then builds corral into .venv.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for cmd in nginx wrk curl tmux; do
    command -v "$cmd" >/dev/null || need_apt+=("$cmd")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi
echo "== Python packages"
.venv/bin/pip install -q --disable-pip-version-check \
    "maturin>=1.5,<2" pytest pytest-timeout requests ruff flask==3.1.3 django==5.2.19

echo "== building corral into .venv (release)"
VIRTUAL_ENV="$PWD/.venv" .venv/bin/maturin develop --release -q
.venv/bin/corral --version
