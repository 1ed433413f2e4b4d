#!/usr/bin/env bash
# Installs what corral's demo and tests need on a fresh Debian 12 machine
# (with Rust from rustup and Python 3 present; as root, or as a user with
# sudo for the apt packages), then builds corral into
# .venv. Idempotent: a second run installs nothing new and only rebuilds what
# changed in the Rust code.
set -euo pipefail
cd "$(dirname "$0")/.."

section() { printf '\n===== %s =====\n' "$*"; }

# cargo from rustup may not be on PATH in a non-login shell.
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup first" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 1; }

section "system packages"
need_apt=()
# command:package. nginx, apache2, haproxy and cgi-fcgi are the front ends
# the tests put in front of corral; iproute2 gives `ss` and `ip netns`;
# podman, runc and debootstrap build and run the container image recipe.
for pair in nginx:nginx wrk:wrk curl:curl tmux:tmux apache2:apache2 haproxy:haproxy \
    cgi-fcgi:libfcgi-bin ss:iproute2 podman:podman runc:runc debootstrap:debootstrap strace:strace; do
    cmd="${pair%%:*}"
    pkg="${pair#*:}"
    command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || need_apt+=("$pkg")
done
# Rust links with the system C compiler (rustup does not bring one), and
# `cargo test` links corral-py's tests against libpython.
command -v cc >/dev/null || need_apt+=(build-essential)
python3 -c 'import os, sysconfig; p = sysconfig.get_paths()["include"]; raise SystemExit(not os.path.exists(p + "/Python.h"))' \
    || need_apt+=(python3-dev)
# Debian's own python3 needs python3-venv for `python3 -m venv`.
if [ ! -x .venv/bin/python ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    need_apt+=(python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing: ${need_apt[*]}"
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "installing apt packages needs root or sudo" >&2; exit 1; }
        sudo=(sudo)
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
else
    echo "nginx, apache2, haproxy, cgi-fcgi, wrk, curl, tmux, ss, podman, runc and debootstrap are installed"
fi

section "Python environment (.venv)"
if ! .venv/bin/python -c 'import sys' 2>/dev/null; then
    echo "creating .venv"
    rm -rf .venv
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check \
    "maturin>=1.5,<2" pytest==9.2.0 pytest-timeout==2.4.0 flask==3.1.3 django==5.2.19 falcon==4.4.0 \
    ruff==0.17.6 requests==2.34.2 mypy==2.4.1
.venv/bin/python --version

section "building corral into .venv (release)"
# maturin runs cargo, which rebuilds only when the Rust code changed, then
# reinstalls the package in development mode.
export VIRTUAL_ENV="$PWD/.venv"
export PYO3_PYTHON="$PWD/.venv/bin/python"
.venv/bin/maturin develop --release --quiet
.venv/bin/corral --version
