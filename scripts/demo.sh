#!/usr/bin/env bash
# Sets up, then serves examples/demo_app.py on http://127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/corral --http 127.0.0.1:8000 --workers 2 --threads 2 --chdir examples demo_app:app
